"""Ray job: the serving index for the Ray Serve app (`unime-ray index`; its own options, no run config).

    ray job submit --working-dir . -- python jobs/build_index.py \\
        --model /mnt/cluster_storage/unime-ray/paper/train/model \\
        --candidates CANDIDATE_TABLE --out /mnt/cluster_storage/unime-ray/paper/serving-index

See jobs/_common.py for how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
