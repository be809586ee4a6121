"""Ray job: the whole staged, resumable pipeline (`unime-ray pipeline`: the stages of unime_ray.pipeline.STAGES,
or the config's `stages:`); extra arguments go to the command (`--stages a,b`, `--force`).

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml [-o key=value ...]

See jobs/_common.py for how the config is found, how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
