"""Operations: Ray jobs (`python -m unime_ray COMMAND`, configs in jobs/), cluster-launcher and KubeRay configs
(cluster/).

Static checks tie every YAML to what it references (commands, configs, images, Ray's own schemas, the GPU
resources the stage configs ask for). ``test_pipeline_job_on_a_two_node_cluster`` starts a real two-node
Ray cluster on this machine with the ``ray`` CLI and submits the smoke pipeline through the Jobs SDK.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
JOB_CONFIGS = sorted((JOBS / "configs").glob("*.yaml"))
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_FILES = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "rayservice.yaml"]
ALL_YAML = sorted({*JOB_CONFIGS, *CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")})
VENV_BIN = Path(sys.executable).parent


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(reqs: list[str], name: str) -> str:
    """The ``==`` version of ``name`` in a requirement list."""
    for r in reqs:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", r.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"no {name}==... pin in {reqs}")


# ---------------------------------------------------------------------------------------------- YAML loads
def test_there_is_something_to_check():
    assert {p.stem for p in JOB_CONFIGS} >= {"demo", "paper", "smoke"}
    assert all(p.is_file() for p in LAUNCHER_CONFIGS + KUBERAY_FILES)


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_loads(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path
    for d in docs:  # YAML embedded in KubeRay strings
        spec = d.get("spec") or {}
        for key in ("serveConfigV2", "runtimeEnvYAML"):
            if key in spec:
                assert isinstance(yaml.safe_load(spec[key]), dict), f"{path}: spec.{key}"


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_configs_load(path):
    from unime_ray.run.config import load_run_config
    from unime_ray.run.runner import STAGE_NAMES

    assert "extends" in _yaml(path), "job configs hold only what differs from a preset"
    cfg = load_run_config(config_path=path)
    assert Path(cfg.run_dir).is_absolute(), "a job's relative run_dir would land in Ray's temporary working dir"
    assert not set(cfg.stages or []) - set(STAGE_NAMES)
    assert cfg.ray.address in (None, "auto"), "jobs join their cluster (RAY_ADDRESS), never a fixed address"


# ---------------------------------------------------------------------------------------------- entrypoints
# A job's entrypoint is the command line itself: `python -m unime_ray COMMAND --config jobs/configs/X.yaml ...`.
DOCS_NAMING_COMMANDS = sorted({REPO / "README.md", JOBS / "README.md", *CLUSTER.rglob("*.md"),
                               *CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("Dockerfile*"), *JOB_CONFIGS})


def _named_commands(text: str) -> list[str]:
    """The COMMANDs of every ``python -m unime_ray COMMAND`` in a text (line breaks allowed between the words)."""
    return re.findall(r"python\s+-m\s+unime_ray\s+([a-z][\w-]*)", text)


def test_there_are_no_job_scripts():
    assert not list(JOBS.glob("*.py")), "jobs/ holds configs; the job entrypoint is `python -m unime_ray COMMAND`"
    assert {p.name for p in JOBS.iterdir()} == {"README.md", "configs"}


def test_every_named_command_exists():
    """Every `python -m unime_ray COMMAND` in the READMEs, cluster/ and the job configs is a subcommand."""
    from unime_ray.cli import commands

    have = set(commands())
    named = {}
    for path in DOCS_NAMING_COMMANDS:
        for cmd in _named_commands(path.read_text()):
            named.setdefault(cmd, _rel(path))
    assert {"pipeline", "judge", "index"} <= set(named), named
    missing = {cmd: where for cmd, where in named.items() if cmd not in have}
    assert not missing, f"named but not a subcommand (have {sorted(have)}): {missing}"


def test_jobs_readme_table_names_every_job_command():
    """jobs/README.md's table: the pipeline, every stage command, `eval` and `index`, each a subcommand."""
    from unime_ray.cli import commands
    from unime_ray.run.runner import STAGES

    rows = re.findall(r"^\| `python -m unime_ray ([\w-]+)` \|", (JOBS / "README.md").read_text(), flags=re.M)
    assert len(rows) == len(set(rows))
    assert set(rows) == {"pipeline", "eval", "index", *(s.command_name for s in STAGES if s.command_name)}
    assert set(rows) <= set(commands())


def test_config_is_found_from_any_directory(tmp_path, monkeypatch):
    from unime_ray.cli import build_parser, _config_from_args, find_config

    monkeypatch.chdir(tmp_path)
    smoke = (JOBS / "configs" / "smoke.yaml").resolve()
    assert find_config("jobs/configs/smoke.yaml") == smoke      # relative to the repo root
    assert find_config("smoke") == find_config("smoke.yaml") == find_config(str(smoke)) == smoke  # jobs/configs/
    (tmp_path / "smoke.yaml").write_text("extends: synthetic\nname: here\n")
    assert find_config("smoke.yaml") == tmp_path / "smoke.yaml"  # as given comes first
    with pytest.raises(FileNotFoundError, match="config 'no/such.yaml' not found"):
        find_config("no/such.yaml")
    cfg = _config_from_args(build_parser().parse_args(["judge", "--config", "smoke", "-o", "seed=3"]))
    assert (cfg.name, cfg.seed) == ("smoke", 3)


def _cli(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """``python -m unime_ray ARGS`` in ``cwd``: the code of this repo (PYTHONPATH), as a job's uploaded copy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_JOB_CONFIG", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **env_vars)
    return subprocess.run([sys.executable, "-m", "unime_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_command_runs_from_elsewhere_and_fails_with_exit_2(tmp_path):
    """A real `python -m unime_ray <stage> --config jobs/configs/...` from another directory finds its config;
    a config error and a missing config exit 2."""
    r = _cli(["config", "show", "--config", "jobs/configs/smoke.yaml"], tmp_path)
    assert r.returncode == 0 and "name: smoke" in r.stdout, r.stdout + r.stderr
    r = _cli(["mine", "--config", "jobs/configs/smoke.yaml", "-o", "no_such_section.key=1"], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no_such_section: unknown key" in r.stderr
    r = _cli(["judge", "--config", "missing.yaml"], tmp_path)
    assert r.returncode == 2 and "config 'missing.yaml' not found" in r.stderr, r.stderr


def test_command_line_loads_nothing_heavy_before_the_job_environment():
    """cli.main calls prepare_job_environment first; nothing before it may load torch or an OpenMP runtime."""
    code = ("import sys; import unime_ray.cli, unime_ray.utils.ray_utils; "
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'numpy', 'pyarrow', 'faiss', "
            "'transformers', 'pydantic', 'yaml'}; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import inspect

    from unime_ray import cli

    body = inspect.getsource(cli.main).split('"""')[-1]
    assert body.index("prepare_job_environment()") < body.index("build_parser()")


def _job_json(**runtime_env) -> str:
    import json

    return json.dumps({"runtime_env": runtime_env, "metadata": {}})


def test_job_environment(monkeypatch, tmp_path):
    from unime_ray.utils.ray_utils import job_env_vars, job_working_dir_warning, prepare_job_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    # not in a job: nothing changes
    assert job_env_vars() is None and prepare_job_environment() is None
    assert os.environ["OMP_NUM_THREADS"] == "1" and "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ
    assert job_working_dir_warning(tmp_path / "run") is None
    # the job's runtime_env asked for one thread: kept
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _job_json(working_dir="gcs://x.zip",
                                                                env_vars={"OMP_NUM_THREADS": "1"}))
    assert job_env_vars() == {"OMP_NUM_THREADS": "1"}
    assert prepare_job_environment() == {"override_runtime_env": True, "dropped_omp_threads": False}
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    # Ray's own OMP_NUM_THREADS=1 for the driver: dropped; an explicit RAY_OVERRIDE_JOB_RUNTIME_ENV is kept
    monkeypatch.setenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", "0")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _job_json(working_dir="gcs://x.zip",
                                                                env_vars={"HF_HUB_OFFLINE": "1"}))
    assert prepare_job_environment() == {"override_runtime_env": False, "dropped_omp_threads": True}
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "0"
    # a thread count other than Ray's 1 is the user's
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert prepare_job_environment()["dropped_omp_threads"] is False and os.environ["OMP_NUM_THREADS"] == "4"
    # outputs inside the job's copy of its working dir (its current directory) are warned about
    monkeypatch.chdir(tmp_path)
    assert "inside the job's copy of its working dir" in job_working_dir_warning("runs/x")
    assert job_working_dir_warning(tmp_path.parent / "elsewhere") is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _job_json())  # no working_dir: the cwd is not temporary
    assert job_working_dir_warning("runs/x") is None


def test_command_in_a_job_environment(tmp_path):
    """`python -m unime_ray` as a job's driver: the job lines, the dropped thread limit, the run_dir warning."""
    job = _job_json(working_dir="gcs://x.zip", env_vars={"HF_HUB_OFFLINE": "1"})
    r = _cli(["config", "show", "--config", "smoke", "-o", "run_dir=runs/smoke"], tmp_path,
             RAY_JOB_CONFIG_JSON_ENV_VAR=job, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[unime-ray job] unime-ray config show --config smoke" in r.stdout
    assert f"[unime-ray job] python {sys.executable}; unime_ray from {REPO / 'unime_ray'}; cwd {tmp_path}" in r.stdout
    assert "[unime-ray job] dropped the job driver's OMP_NUM_THREADS=1" in r.stdout
    assert f"warning: outputs go to {tmp_path / 'runs' / 'smoke'}, inside the job's copy" in r.stderr
    r = _cli(["config", "show", "--config", "smoke"], tmp_path, RAY_JOB_CONFIG_JSON_ENV_VAR=job,
             OMP_NUM_THREADS="1")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr   # smoke's run_dir is absolute


# ---------------------------------------------------------------------------------------------- cluster nodes
@dataclass
class NodeType:
    source: str
    name: str
    cpus: float
    gpus: float
    min_workers: int
    max_workers: int


def _k8s_quantity(q) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def _launcher_nodes(path: Path) -> list[NodeType]:
    cfg = _yaml(path)
    out = []
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        r = nt.get("resources", {})
        out.append(NodeType(path.name, name, r.get("CPU", 0), r.get("GPU", 0), nt.get("min_workers", 0),
                            nt.get("max_workers", cfg["max_workers"])))
    return out


def _cluster_spec(path: Path) -> dict:
    doc = _yaml(path)
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _pod_resources(group: dict) -> tuple[float, float]:
    """CPUs and GPUs Ray sees in a KubeRay pod: rayStartParams, else the Ray container's limits."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits") or {}
    cpus = (_k8s_quantity(params["num-cpus"]) if "num-cpus" in params
            else math.floor(_k8s_quantity(limits.get("cpu", 0))))
    gpus = (_k8s_quantity(params["num-gpus"]) if "num-gpus" in params
            else _k8s_quantity(limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def _kuberay_nodes(path: Path) -> list[NodeType]:
    spec = _cluster_spec(path)
    return [NodeType(path.name, g["groupName"], *_pod_resources(g), g.get("minReplicas", 0), g["maxReplicas"])
            for g in spec["workerGroupSpecs"]]


GPU_CLUSTERS = LAUNCHER_CONFIGS + KUBERAY_FILES


def _nodes(path: Path) -> list[NodeType]:
    return _kuberay_nodes(path) if path.parent == KUBERAY else _launcher_nodes(path)


def _actor_capacity(nodes: list[NodeType], cpus: float, gpus: float) -> int:
    """How many actors of {CPU: cpus, GPU: gpus} the cluster holds at its largest."""
    total = 0
    for n in nodes:
        per_node = math.inf
        if gpus > 0:
            per_node = math.floor(n.gpus / gpus + 1e-9)
        if cpus > 0:
            per_node = min(per_node, math.floor(n.cpus / cpus + 1e-9))
        total += 0 if per_node == math.inf else per_node * n.max_workers
    return total


def _resource_demands(cfg) -> list[tuple[str, float, float, int, int]]:
    """(what, CPUs per unit, GPUs per unit, units needed at least, units wanted at most) for every section that
    asks Ray for resources: actor pools (``num_gpus_per_actor``, or a ``pool``) and training runs (``use_gpu``)."""
    from unime_ray.utils.pool import Pool

    demands = []
    for name in type(cfg).model_fields:
        sec = getattr(cfg, name)
        fields = type(sec).model_fields if hasattr(type(sec), "model_fields") else {}
        pool = sec.pool if isinstance(getattr(sec, "pool", None), Pool) else sec
        if isinstance(pool, Pool) or ("num_gpus_per_actor" in fields and "max_actors" in fields):
            demands.append((f"{name} actors", pool.num_cpus_per_actor, pool.num_gpus_per_actor, pool.min_actors,
                            pool.max_actors))
        if "use_gpu" in fields and "num_workers" in fields:
            if getattr(sec, "enabled", True) is False:
                continue
            gpus = 1.0 if sec.use_gpu else 0.0
            cpus = 1.0
            demands.append((f"{name} workers", cpus, gpus, sec.num_workers, sec.num_workers))
    return demands


def _gpu_job_configs():
    from unime_ray.run.config import load_run_config

    out = []
    for p in JOB_CONFIGS:
        cfg = load_run_config(config_path=p)
        if any(g > 0 for _, _, g, _, _ in _resource_demands(cfg)):
            out.append(p)
    return out


@pytest.mark.parametrize("cluster", GPU_CLUSTERS, ids=_rel)
def test_cluster_has_cpu_workers_and_an_autoscaling_gpu_type(cluster):
    nodes = _nodes(cluster)
    gpu = [n for n in nodes if n.gpus > 0]
    cpu = [n for n in nodes if n.gpus == 0 and n.cpus > 0]
    assert gpu and cpu, nodes
    for n in gpu:
        assert n.min_workers == 0 and n.max_workers >= 1, f"{n.name}: GPU nodes must scale from zero"
        assert n.cpus >= n.gpus, f"{n.name}: too few CPUs to feed {n.gpus} GPUs"


def test_gpu_job_configs_exist():
    assert [p.name for p in _gpu_job_configs()] == ["paper-llava-ov.yaml", "paper.yaml"]


@pytest.mark.parametrize("cluster", GPU_CLUSTERS, ids=_rel)
@pytest.mark.parametrize("job_config", JOB_CONFIGS, ids=lambda p: p.name)
def test_stage_resources_fit_the_cluster(job_config, cluster):
    """Every actor or training worker fits one node type, and the largest pool fits the cluster at max size."""
    from unime_ray.run.config import load_run_config

    cfg = load_run_config(config_path=job_config)
    nodes = _nodes(cluster)
    for what, cpus, gpus, least, most in _resource_demands(cfg):
        cap = _actor_capacity(nodes, cpus, gpus)
        assert cap >= least, f"{what}: {least} x {{CPU: {cpus}, GPU: {gpus}}} never fit {cluster.name} ({nodes})"
        assert cap >= most, f"{what}: at most {most}, but {cluster.name} holds {cap} at full size"
    if cfg.judge.backend == "vllm":
        assert cfg.judge.vllm.tensor_parallel_size <= cfg.judge.pool.num_gpus_per_actor
    if cfg.train.use_gpu:  # one node holds the whole training group (NCCL within a node)
        assert any(n.gpus >= cfg.train.num_workers for n in nodes), f"train.num_workers vs {cluster.name}"


# ---------------------------------------------------------------------------------------------- launcher
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_config_passes_ray_validation(path):
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    import jsonschema

    cfg = _yaml(path)
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before bootstrapping
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # fractional: the schema says integer
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(bad))
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_gpus"] = 1  # unknown key
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_config_shape(path):
    cfg = _yaml(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["max_workers"] >= sum(n.max_workers for n in _launcher_nodes(path) if n.gpus > 0)
    assert cfg["docker"]["image"] == _image(), "all cluster configs run the image from cluster/Dockerfile"
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------------- image
def _image() -> str:
    return f"unime-ray:{_pyproject()['project']['version']}-gpu"


def test_dockerfile_matches_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    py = _pyproject()
    ray_version = _pin(py["project"]["dependencies"], "ray")
    torch_gpu = _pin(py["project"]["optional-dependencies"]["gpu"], "torch")
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(ray_version)}-py3\d+-gpu$", text, re.M)
    assert f'"torch=={torch_gpu}"' in text and f'"ray[default,train,data,serve]=={ray_version}"' in text
    assert 'pip install ".[gpu]"' in text
    import ray

    assert ray.__version__ == ray_version
    assert _image() in text
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert yaml.safe_load(_yaml(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    for copied in re.findall(r"^COPY \S+ (\S+) \./", text, re.M):
        assert (REPO / copied).exists(), copied
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text()
    assert "**" in ignore.split() and "!unime_ray/**" in ignore.split()


# ---------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_rel)
def test_kuberay_cluster_spec(path):
    import ray

    doc = _yaml(path)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(path)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    assert groups["gpu-workers"]["minReplicas"] == 0
    for g in [spec["headGroupSpec"], *groups.values()]:
        for c in g["template"]["spec"]["containers"]:
            assert c["image"] == _image()
        for k, v in (g.get("rayStartParams") or {}).items():
            assert isinstance(v, str), f"rayStartParams.{k} must be a string"
    for g in groups.values():
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]


def test_kuberay_specs_agree():
    """raycluster.yaml, rayjob.yaml and rayservice.yaml describe the same groups and pods."""
    def shape(path):
        spec = _cluster_spec(path)
        groups = [(g["groupName"], g["minReplicas"], g["maxReplicas"], _pod_resources(g),
                   g["template"]["spec"]["containers"][0]["resources"]) for g in spec["workerGroupSpecs"]]
        head = spec["headGroupSpec"]
        return (spec["rayVersion"], spec.get("autoscalerOptions"), head["rayStartParams"],
                head["template"]["spec"]["containers"][0]["resources"], groups)

    shapes = [shape(p) for p in KUBERAY_FILES]
    assert shapes[0] == shapes[1] == shapes[2]


def test_rayjob_entrypoint_references_exist():
    from unime_ray.cli import commands

    spec = _yaml(KUBERAY / "rayjob.yaml")["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:4] == ["python", "-m", "unime_ray", "pipeline"] and args[3] in commands()
    config = args[args.index("--config") + 1]
    assert (REPO / config).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the submitter pod uploads working_dir


def test_rayservice_serve_config():
    from ray.serve.schema import ServeDeploySchema

    serve = yaml.safe_load(_yaml(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    (app,) = serve["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("unime_ray.serve.app", "build_app")
    assert set(app["args"]) >= {"index", "embedder", "reranker"}
    gpu_per_pod = max(n.gpus for n in _kuberay_nodes(KUBERAY / "rayservice.yaml"))
    max_gpus = sum(n.gpus * n.max_workers for n in _kuberay_nodes(KUBERAY / "rayservice.yaml"))
    wanted = 0.0
    for name in ("embedder", "reranker", "index", "ingress"):
        d = (app["args"].get("config") or {}).get(name) or {}
        assert d.get("num_gpus", 0) <= gpu_per_pod
        wanted += d.get("num_gpus", 0) * (d.get("autoscaling") or {}).get("max_replicas", d.get("num_replicas", 1))
    assert wanted <= max_gpus, f"Serve wants up to {wanted} GPUs, the cluster has {max_gpus}"

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not there yet: schema checked, application args not")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, attr))
    if hasattr(mod, "AppArgs"):
        args = mod.AppArgs.model_validate(app["args"])
        from unime_ray.serve.config import ServeConfig

        ServeConfig.model_validate(args.config or {})
    shipped = REPO / "unime_ray" / "serve" / "serve_config.yaml"
    if shipped.is_file():  # the same application as the shipped Serve config
        (ref,) = _yaml(shipped)["applications"]
        for key in ("name", "route_prefix", "import_path"):
            assert app[key] == ref[key], key
        assert set(app["args"]) == set(ref["args"])
        assert set(app["args"]["config"]) == set(ref["args"]["config"])


# ---------------------------------------------------------------------------------------------- docs
PATH_RE = re.compile(r"(?<![\w/.-])((?:jobs|cluster|unime_ray)/[\w./-]*[\w])")


@pytest.mark.parametrize("doc", [p for p in (CLUSTER / "README.md", JOBS / "README.md") if p.is_file()], ids=_rel)
def test_paths_in_docs_exist(doc):
    text = doc.read_text()
    paths = set(PATH_RE.findall(text))
    assert paths
    missing = sorted(p for p in paths if not (REPO / p).exists() and not p.endswith("/"))
    assert not missing, f"{doc.name} mentions files that do not exist: {missing}"


def test_commands_in_yaml_comments_reference_real_files():
    for path in ALL_YAML:
        for p in set(PATH_RE.findall(path.read_text())):
            assert (REPO / p).exists(), f"{_rel(path)} mentions {p}"


# ---------------------------------------------------------------------------------------------- real job
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _stop_local_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop only this cluster's processes (``ray stop`` would stop every Ray on the machine): those whose command
    line names its temp dir or GCS address, and their children (workers, agents, the job's driver)."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if p.pid in me or not any(temp_dir in a or a.endswith(f":{gcs_port}") for a in args):
            continue
        found[p.pid] = p
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in found.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@dataclass
class LocalCluster:
    dashboard: str
    headers: dict
    gcs_port: int


@pytest.fixture
def two_node_cluster():
    """A head (2 CPUs) and a worker node (1 CPU) on this machine, started with the venv's ``ray`` CLI."""
    # Short temp dir: Ray's Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay
    # under 108 bytes, which pytest's tmp_path would exceed.
    temp_dir = tempfile.mkdtemp(prefix="uro", dir="/tmp")
    gcs, dash, client, agent_head, agent_worker = _free_ports(5)
    token = secrets.token_hex(32)  # this cluster's own token: independent of ~/.ray/auth_token
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    ray_cli = str(VENV_BIN / "ray")
    common = ["--temp-dir", temp_dir, "--disable-usage-stats"]
    t0 = time.time()
    try:
        subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                        "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
                        "--dashboard-agent-listen-port", str(agent_head), *common],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                        "--dashboard-agent-listen-port", str(agent_worker), *common],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        print(f"two-node cluster up in {time.time() - t0:.0f} s")
        yield LocalCluster(f"http://127.0.0.1:{dash}", {"Authorization": f"Bearer {token}"}, gcs)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"ray start failed: {exc.stdout[-2000:]}\n{exc.stderr[-4000:]}")
    finally:
        _stop_local_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(cluster: LocalCluster) -> int:
    import requests

    r = requests.get(f"{cluster.dashboard}/api/v0/nodes", headers=cluster.headers, timeout=30)
    r.raise_for_status()
    return sum(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"])


# slow: tests/test_readme_commands.py runs the same two-node cluster and smoke job in the default suite, through
# the README's own commands; this one adds the checks of the job's environment (Jobs SDK, its own ports).
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_job_on_a_two_node_cluster(two_node_cluster, tmp_path):
    """`ray job submit` of `python -m unime_ray pipeline` with jobs/configs/smoke.yaml: joins the cluster through RAY_ADDRESS,
    runs the uploaded working dir with the venv's python, and leaves a complete run dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from unime_ray.run.config import load_run_config
    from unime_ray.data.io import read_table

    cluster = two_node_cluster
    t0 = time.time()
    deadline = time.time() + 60
    while _alive_nodes(cluster) < 2 and time.time() < deadline:
        time.sleep(1)
    assert _alive_nodes(cluster) == 2

    client = JobSubmissionClient(cluster.dashboard, headers=cluster.headers)
    run_dir = tmp_path / "smoke-run"
    job_id = client.submit_job(
        entrypoint=f"python -m unime_ray pipeline --config jobs/configs/smoke.yaml -o run_dir={run_dir}",
        submission_id=f"unime-smoke-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"],
                     "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    deadline = time.time() + 420
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal and time.time() < deadline:
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    print(f"job {job_id}: {status} after {time.time() - t0:.0f} s")
    if status not in terminal:
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-6000:]}"

    # the driver joined this cluster, ran the uploaded copy of the repo, with the venv's python
    assert "[unime-ray job] Ray: joining the cluster at RAY_ADDRESS=" in logs
    assert "joining Ray cluster at" in logs and "starting a local Ray" not in logs  # init_ray's own words
    assert "dropped the job driver's OMP_NUM_THREADS=1" in logs
    assert f"[unime-ray job] python {VENV_BIN}" in logs
    m = re.search(r"unime_ray from (\S+);", logs)
    assert m and "_ray_pkg_" in m.group(1) and Path(m.group(1)) != REPO / "unime_ray", logs[:3000]
    assert f"[unime-ray job] unime-ray pipeline --config jobs/configs/smoke.yaml -o run_dir={run_dir}" in logs
    assert f"run directory: {run_dir}" in logs and "warning: outputs go to" not in logs

    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    cfg = load_run_config(config_path=JOBS / "configs" / "smoke.yaml")
    for stage in cfg.stages:
        assert manifest["stages"][stage]["status"] == "complete", stage
    table = manifest["stages"]["mine"]["outputs"]["training_table"]
    rows = read_table(table).to_pylist()
    mined = manifest["stages"]["mine"]["outputs"]
    assert len(rows) == mined["mined"] > 0 and mined["mined"] + mined["quarantined"] == mined["queries"]
    assert all(len(r["neg_id"] or []) == cfg.mine.num_negatives for r in rows)
    assert (run_dir / "report.md").is_file()
