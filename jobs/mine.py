"""Ray job: stage S3, hard-negative mining into the training table (`unime-ray mine`).

    ray job submit --working-dir . -- python jobs/mine.py --config jobs/configs/demo.yaml [-o key=value ...]

See jobs/_common.py for how the config is found, how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
