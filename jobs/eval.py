"""Ray job: evaluation of any embedder checkpoint (`unime-ray eval`; its own options, no run config).
For the run's own models use jobs/evaluate.py.

    ray job submit --working-dir . -- python jobs/eval.py \\
        --model /mnt/cluster_storage/unime-ray/paper/train/model \\
        --mmeb-dir /mnt/cluster_storage/unime-ray/data/MMEB-eval --out /mnt/cluster_storage/unime-ray/paper/eval-mmeb

See jobs/_common.py for how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
