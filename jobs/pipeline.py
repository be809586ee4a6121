"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml

Runs from any working directory and joins the cluster of the job (``RAY_ADDRESS``) or, outside a job,
starts a local Ray; extra arguments are passed on (``-o key=value``, ``--stages``, ``--force``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from unime_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
