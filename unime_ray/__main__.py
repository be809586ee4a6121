"""``python -m unime_ray ...``: the same command line as ``unime-ray``."""

import sys

from .cli import main

sys.exit(main())
