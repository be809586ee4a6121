"""Online serving of a trained embedder (and reranker) on Ray Serve.

* :mod:`.config` - :class:`ServeConfig` (pydantic only; the run config's ``serve:`` section);
* :mod:`.index` - build/load the serving index (``unime-ray index``);
* :mod:`.deployments` - the query embedder, index partition and reranker deployments;
* :mod:`.ingress` - the HTTP front deployment, deadlines and readiness;
* :mod:`.app` - the application builder (``unime_ray.serve.app:build_app``), fitted to the cluster;
* :mod:`.api` - the HTTP API (FastAPI models, validation);
* :mod:`.client` - :class:`UniMEClient`, a small ``requests`` client;
* :mod:`.cli` - ``register(subparsers)`` adds the ``index`` and ``serve`` commands.

Importing this package pulls in pydantic only; Ray, torch and FastAPI load with the submodules that need them.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
