"""The one interface every pipeline stage implements, and what a stage sees while it runs.

A stage is declared once (``run/stages/<package>.py``, beside the others that drive the same library package)
as a :class:`Stage`: its name (the run-directory folder and the manifest key; the ``unime-ray`` command unless the
declaration renames it), the settings it reads (``reads``: it sees nothing else of the run config, and their hash
is its key), a ``run(ctx)`` that returns its result, and a ``report(section)`` that renders that result as
Markdown. :mod:`unime_ray.run.runner` runs the list of stages; :mod:`unime_ray.cli` derives a command per stage;
:mod:`unime_ray.run.report` concatenates the sections.

A result is a frozen pydantic model (:class:`StageResult`); the manifest stores it as JSON and a later
stage reads it back typed with :meth:`Context.result`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict

from ..utils.files import write_text_atomic

if TYPE_CHECKING:
    from .config import RunConfig


class StageResult(BaseModel):
    """What a stage returns and the manifest keeps. Subclasses declare the fields other stages and the report
    read (read as attributes; a field added later has a default, so older manifests still load); details kept only
    for people (counts, timings) may ride along as extra fields, which nothing reads."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def as_dict(self) -> dict[str, Any]:
        """As the manifest stores it (JSON types; anything else as its string, e.g. paths)."""
        return json.loads(json.dumps(self.model_dump(), default=str))


R = TypeVar("R", bound=StageResult)


class Manifest:
    """``run_dir/manifest.json``: per stage its status, config key, timings and result; rewritten atomically.
    ``keys`` names how the stage keys were computed: keys of another kind cannot say whether a stage is current."""

    KEYS = "declared-reads-1"     # the hash of the settings a stage reads (ConfigView.values) and its upstream

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data: dict[str, Any] = {"keys": self.KEYS, "stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def outputs(self, name: str) -> dict[str, Any]:
        """What a completed stage returned (its result as JSON)."""
        stage = self.stage(name)
        if stage.get("status") != "complete":
            raise RuntimeError(f"stage {name!r} has not completed in this run directory; run it first")
        return stage["outputs"]

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        write_text_atomic(json.dumps(self.data, indent=1, default=str), self.path)


class UndeclaredRead(AttributeError):
    """A stage read a config setting its declaration does not list (``Stage.reads``)."""


def _setting(cfg: "RunConfig", path: str) -> Any:
    """The value at a dotted path of the run config."""
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


class ConfigView:
    """What a running stage sees of the run config: only the settings its declaration lists (``Stage.reads``), so
    the stage's key, the hash of those settings, covers everything it can read. A listed path is a section
    (``"judge"``), a field (``"models.input_format"``) or a role's image budget (``"images.judge"``, what
    ``image_budget("judge")`` returns); reading anything else raises :class:`UndeclaredRead`. Where the run goes
    (``run_dir``, ``ray``) is readable and in no key: it changes where a result is computed, not the result."""

    _FREE = ("run_dir", "ray")

    def __init__(self, cfg: "RunConfig", reads: tuple[str, ...], stage: str, prefix: str = ""):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        value = _setting(self._cfg, path)
        if path in self._reads or (not self._prefix and name in self._FREE):
            return value
        if any(r.startswith(path + ".") for r in self._reads):
            return ConfigView(self._cfg, self._reads, self._stage, path + ".")
        raise UndeclaredRead(f"stage {self._stage!r} read the setting {path!r}, which its declaration does not "
                             f"list: add it to the stage's reads (a change to it must rerun the stage)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the run config is read-only to a stage")

    def path(self, p: str | os.PathLike) -> Path:
        return self._cfg.path(p)

    def model_ref(self, ref: str) -> str:
        return self._cfg.model_ref(ref)

    def image_budget(self, role: str) -> Any:
        if f"images.{role}" not in self._reads:
            raise UndeclaredRead(f"stage {self._stage!r} read the {role} image budget, which its declaration does "
                                 f"not list: add 'images.{role}' to the stage's reads")
        return self._cfg.image_budget(role)

    def values(self) -> dict[str, Any]:
        """Every listed setting's value, as JSON types: what the stage's key hashes."""
        out = {}
        for path in sorted(self._reads):
            value = (self._cfg.image_budget(path.split(".", 1)[1]) if path.startswith("images.")
                     else _setting(self._cfg, path))
            out[path] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return json.loads(json.dumps(out, default=str))


class Context:
    """What a running stage gets: the run config (a :class:`ConfigView` of the settings the stage declares, when
    the runner makes it), the results of earlier stages, its own folder, and Ray."""

    def __init__(self, cfg: "RunConfig | ConfigView", manifest: Manifest, stage: str):
        self.cfg = cfg
        self.manifest = manifest
        self.stage = stage
        self.run_dir = Path(cfg.run_dir).resolve()

    @property
    def dir(self) -> Path:
        """This stage's folder in the run directory."""
        return self.run_dir / self.stage

    def result(self, name: str, cls: type[R] = StageResult) -> R:  # type: ignore[assignment]
        """A completed earlier stage's result, typed."""
        return cls.model_validate(self.manifest.outputs(name))

    def result_if_run(self, name: str, cls: type[R] = StageResult) -> R | None:  # type: ignore[assignment]
        """An earlier stage's result, typed, if it completed (None otherwise): for stages switched off by config."""
        return cls.model_validate(self.manifest.outputs(name)) if self.completed(name) else None

    def completed(self, name: str) -> bool:
        return self.manifest.stage(name).get("status") == "complete"

    def init_ray(self) -> None:
        """Start or join Ray as the run config's ``ray`` section says (idempotent)."""
        from ..utils.ray_utils import init_ray

        r = self.cfg.ray
        init_ray(r.address, r.num_cpus, r.num_gpus, r.include_dashboard, r.env_vars)

    def visual_tokens(self, **tallies: Any) -> dict[str, Any]:
        """A result's ``visual_tokens``: per budget role, the tally of visual tokens per image the stage's models
        received (one tally or several merged) and the configured budget; roles without images left out."""
        from ..utils.tallies import merge_tallies

        out = {}
        for role, tally in tallies.items():
            merged = merge_tallies(*tally) if isinstance(tally, (list, tuple)) else tally
            if merged:
                out[role] = {**merged, "budget": self.cfg.image_budget(role).describe()}
        return out


@dataclass(frozen=True)
class Section:
    """What a stage's report section is rendered from: its result, the whole manifest, the run directory."""

    result: StageResult
    stages: Mapping[str, Any]
    run_dir: Path

    def link(self, path: str | Path) -> str:
        """A link target relative to the report when the file is inside the run directory."""
        p = Path(path)
        return str(p.relative_to(self.run_dir)) if p.is_relative_to(self.run_dir) else str(p)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once. ``name`` is its folder, manifest key, report anchor and (with ``-``
    for ``_``) its command unless ``command`` says otherwise; ``reads`` lists the settings it reads (see
    :class:`ConfigView`): their hash is its key, and a change to one reruns it and every stage after it."""

    name: str
    help: str
    run: Callable[[Context], StageResult | Mapping[str, Any]]
    reads: tuple[str, ...] = ()
    result: type[StageResult] = StageResult
    report: Callable[[Section], list[str]] | None = None
    headline: bool = False                # its report section opens the report (the comparison)
    clear_on_rerun: bool = True           # wipe the stage folder when its config changed
    optional: bool = False                # nothing downstream reads its result
    always_run: bool = False              # runs even when complete (the report)
    command: str | None = field(default=None)   # None: the name with "-" for "_"; "": no command of its own

    @property
    def command_name(self) -> str | None:
        if self.command is None:
            return self.name.replace("_", "-")
        return self.command or None

    def execute(self, ctx: Context) -> StageResult:
        out = self.run(ctx)
        return out if isinstance(out, StageResult) else self.result.model_validate(dict(out))
