"""Ray job: stage S2, MLLM-as-a-Judge scores (`unime-ray judge`): the judge actor pool takes
judge.pool.num_gpus_per_actor GPUs per actor and scales between judge.pool.min_actors and judge.pool.max_actors.

    ray job submit --working-dir . -- python jobs/judge.py --config jobs/configs/demo.yaml [-o key=value ...]

See jobs/_common.py for how the config is found, how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
