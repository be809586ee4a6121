"""Ray job: stage S4, embedder training on Ray Train + DeepSpeed (`unime-ray train-embedder`): train.num_workers
workers, one GPU each with train.use_gpu.

    ray job submit --working-dir . -- python jobs/train_embedder.py --config jobs/configs/demo.yaml [-o key=value ...]

See jobs/_common.py for how the config is found, how the cluster is joined and what is printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_entrypoint  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_entrypoint(__file__))
