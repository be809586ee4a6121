"""The import rule of ARCHITECTURE.md, checked on the source: ``cli -> run -> library -> utils``; library packages
in one order, each importing only those below it; ``run/stages/*`` never importing each other; no import cycle.
Every import counts, function-local and TYPE_CHECKING ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "unime_ray"
# bottom to top: a library package may import the packages before it (and utils), never one after it
LIBRARY = ["data", "models", "retrieval", "judge", "mining", "rerank", "train", "eval", "serve", "demo"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ["unime_ray", *p.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports anywhere in it (``from pkg import mod`` counts as ``pkg.mod``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                if cand in MODULES and cand != name:
                    out.add(cand)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES and a.name != name}
    return out


def layer(name: str) -> str:
    """cli | api | run | utils | a library package."""
    parts = name.split(".")
    if name in ("unime_ray.cli", "unime_ray.__main__") or parts[-1] == "cli":
        return "cli"
    if name == "unime_ray":
        return "api"
    return parts[1]


def _allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if not {a, b} <= {"cli", "api", "run", "utils", *LIBRARY}:
        return False          # a module outside every layer (e.g. a new top-level file) is placed first
    if a == b or b == "utils":
        return not (a == "run" and b == "run" and _stage_file(src) and _stage_file(dst) and src != dst)
    if a == "utils":
        return False
    if a == "cli":
        return True
    if a == "api":
        return b in LIBRARY
    if a == "run":
        return b in LIBRARY
    if b in ("cli", "run", "api"):
        return False
    return LIBRARY.index(b) < LIBRARY.index(a)


def _stage_file(name: str) -> bool:
    return name.startswith("unime_ray.run.stages.")


def violations() -> list[str]:
    return sorted(f"{src} -> {dst}" for src in MODULES for dst in _imports(src) if not _allowed(src, dst))


def cycles() -> list[list[str]]:
    """Import cycles, function-local imports included (a lazy import hides a cycle; it does not remove it)."""
    graph = {m: _imports(m) for m in MODULES}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    return found


def test_every_library_package_is_placed():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LIBRARY) | {"run", "utils"}, "place a new package in LIBRARY (and ARCHITECTURE.md)"
    top = {p.name for p in ROOT.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "cli.py"}, "the run's modules go in run/, the library's in a package"


def test_imports_only_go_down_the_layers():
    assert violations() == []


def test_no_import_cycles():
    assert cycles() == []


def test_the_rule_catches_what_it_forbids():
    """The checker itself: each kind of forbidden edge is reported, each allowed one is not."""
    forbidden = [("unime_ray.data.io", "unime_ray.models.budget"), ("unime_ray.train.api", "unime_ray.run.stage"),
                 ("unime_ray.utils.shards", "unime_ray.data.io"), ("unime_ray.judge.config", "unime_ray.train.config"),
                 ("unime_ray.run.stages.eval", "unime_ray.run.stages.train"), ("unime_ray.run.runner", "unime_ray.cli"),
                 ("unime_ray.models.encode", "unime_ray.cli")]
    allowed = [("unime_ray.train.config", "unime_ray.judge.config"),
               ("unime_ray.run.stages.eval", "unime_ray.run.results"),
               ("unime_ray.cli", "unime_ray.run.runner"), ("unime_ray.serve.cli", "unime_ray.run.config"),
               ("unime_ray.run.stage", "unime_ray.models.budget"), ("unime_ray.eval.mmeb", "unime_ray.utils.tallies")]
    assert [e for e in forbidden if _allowed(*e)] == []
    assert [e for e in allowed if not _allowed(*e)] == []


def _defined(module: str) -> set[str]:
    """The names a module defines or imports, and those its lazy ``_EXPORTS`` map serves."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_project_import_resolves():
    """Function-local imports run only when their branch does: a moved module or name must fail here, not in a
    user's run. Every ``from unime_ray...`` / relative import names an existing module and a name defined in it."""
    tests = Path(__file__).resolve().parents[1]
    missing = []
    for path in [*MODULES.values(), *tests.rglob("*.py"), *(tests.parent / "benchmarks").glob("*.py")]:
        parts = path.relative_to(tests.parent).with_suffix("").parts
        package = ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                if node.level > len(base):
                    missing.append(f"{path.name}:{node.lineno}: relative import beyond the package")
                    continue
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "unime_ray":
                continue
            if target not in MODULES:
                missing.append(f"{path.name}:{node.lineno}: no module {target}")
                continue
            defined = _defined(target)
            missing += [f"{path.name}:{node.lineno}: {target} has no {a.name}" for a in node.names
                        if a.name not in defined and f"{target}.{a.name}" not in MODULES]
    assert missing == []


def test_every_lazily_exported_name_resolves():
    """The packages export names lazily (``_EXPORTS``: name -> module); each must exist where the map says."""
    import importlib

    missing = []
    for name, path in sorted(MODULES.items()):
        if path.name != "__init__.py" or "_EXPORTS" not in path.read_text():
            continue
        package = importlib.import_module(name)
        missing += [f"{name}.{n}" for n in package._EXPORTS if not hasattr(package, n)]
    assert missing == []


def test_tests_mirror_the_packages():
    """A package's unit tests sit in tests/<package>/, pipeline scenarios in tests/run/, operations (commands,
    README, deployment, this rule) in tests/ops/: nothing at the top but the shared fixtures."""
    tests = Path(__file__).resolve().parents[1]
    allowed = set(LIBRARY) | {"utils", "run", "ops"}
    assert not sorted(p.name for p in tests.glob("test_*.py"))
    folders = {p.parent.name for p in tests.rglob("test_*.py")}
    assert folders <= allowed, folders - allowed
    assert all((tests / d / "__init__.py").is_file() for d in folders)
