"""The base of every settings section, and the two views of its fields a user reads: commented YAML
(``unime-ray config show``) and command-line flags (the tool commands). A field's help is written once, as its
``Field(description=...)``, and every view shows that text."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """Unknown keys are errors (a typo fails with its dotted path instead of being ignored), and assignments are
    validated as loading is."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FlagError(ValueError):
    """A command-line flag with a value its setting refuses (the message names the flag)."""


def _plain(annotation) -> Any:
    """``int | None`` -> int, ``Optional[Literal[...]]`` -> the Literal: the type a flag parses."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def settings_rows(section: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, value, description)`` of every setting of ``section``, nested sections flattened."""
    rows = []
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            rows += settings_rows(value, f"{prefix}{name}.")
        else:
            rows.append((prefix + name, value, info.description or ""))
    return rows


def commented_yaml(section: BaseModel, indent: int = 0) -> str:
    """``section`` as YAML that loads back to the same values, each setting followed by its description."""
    lines, pad = [], " " * indent
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:" + (f"   # {info.description}" if info.description else ""))
            lines.append(commented_yaml(value, indent + 2))
            continue
        dumped = yaml.safe_dump(section.model_dump(mode="json", include={name})[name], default_flow_style=True,
                                width=10 ** 6, allow_unicode=True).strip()
        dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{name}: {dumped}" + (f"   # {info.description}" if info.description else ""))
    return "\n".join(line for line in lines if line)


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], fields: typing.Iterable[str],
              prefix: str = "") -> None:
    """``--PREFIX-FIELD`` flags for ``fields`` of ``model``, typed and described by the model (a true-by-default
    bool becomes ``--no-FIELD``). Unset flags stay None, so :func:`from_flags` keeps the model's default."""
    for name in fields:
        info = model.model_fields[name]
        flag = "--" + prefix + name.replace("_", "-")
        kind = _plain(info.annotation)
        default = info.get_default(call_default_factory=True)
        help_ = f"{name}: {info.description} (default: {default})" if info.description else f"default: {default}"
        if kind is bool:
            parser.add_argument(f"--no-{prefix}{name.replace('_', '-')}" if default else flag,
                                dest=f"{prefix}{name}".replace("-", "_"), action="store_const",
                                const=not default, default=None, help=help_)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=None, help=help_)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_)


def from_flags(model: type[BaseModel], args: argparse.Namespace, fields: typing.Iterable[str], prefix: str = "",
               **given: Any):
    """``model`` built from the flags :func:`add_flags` made (those not given keep their defaults) and ``given``."""
    values = {name: getattr(args, f"{prefix}{name}".replace("-", "_")) for name in fields}
    try:
        return model(**{k: v for k, v in values.items() if v is not None}, **given)
    except ValidationError as exc:
        raise FlagError("; ".join(f"--{prefix}{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else
                                  e["msg"] for e in exc.errors())) from None


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, mappings merged key by key (how an override or ``extends:`` applies)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
