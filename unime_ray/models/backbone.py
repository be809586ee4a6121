"""One loader for the MLLM backbones used by the embedder, the judge and the reranker.

``load_backbone("Qwen/Qwen2-VL-2B-Instruct")`` and ``load_backbone("/ckpt/tiny-qwen2-vl")`` go through the
same code: a local folder, or a hub id resolved from the local Hugging Face cache (no download is attempted
when ``HF_HUB_OFFLINE=1``). ``build_random_backbone`` builds a real-size model with random weights from the
configs shipped in ``unime_ray/models/configs`` (meta device for memory planning, a GPU for throughput).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
ROLES = ("embedder", "judge", "reranker")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: str          # attribute of ``transformers``
    description: str
    roles: tuple[str, ...] = ROLES      # which stages may use it as backbone
    mrope: bool = True                  # Qwen M-RoPE (3-axis positions) vs plain 1-D RoPE
    # the vision side's top-level modules (tower first; projector/merger after): ``freeze_vision`` freezes them
    vision_modules: tuple[str, ...] = ("visual",)
    # vision-tower projections the official LoRA target list matches (suffix match): none on Qwen-VL,
    # SigLIP's q/k/v/out_proj on LLaVA-OV (method reference 3.3)
    vision_lora_targets: tuple[str, ...] = ()

    def is_vision_parameter(self, name: str) -> bool:
        parts = f".{name}."
        return any(f".{m}." in parts for m in self.vision_modules)

    def load_class(self):
        import transformers

        return getattr(transformers, self.model_class)


SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    "qwen2_vl": Architecture("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2-VL (embedder backbone)"),
    "qwen2_5_vl": Architecture("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                               "Qwen2.5-VL (judge and reranker backbone)"),
    "llava_onevision": Architecture("llava_onevision", "LlavaOnevisionForConditionalGeneration",
                                    "LLaVA-OneVision (embedder backbone; judge and reranker on transformers)",
                                    mrope=False,
                                    vision_modules=("vision_tower", "multi_modal_projector", "image_newline"),
                                    vision_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj")),
}

# Shipped configs of the published checkpoints: hub id -> file.
SHIPPED_CONFIGS = {
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b-instruct.json",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b-instruct.json",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b-instruct.json",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b-ov-hf.json",
}


class UnsupportedArchitectureError(ValueError):
    pass


class ModelNotFoundError(FileNotFoundError):
    pass


def _supported_list() -> str:
    return ", ".join(f"{k} ({a.description})" for k, a in SUPPORTED_ARCHITECTURES.items())


def architecture_of(config: Any, name: str = "", role: str | None = None) -> Architecture:
    """The supported architecture of ``config``; with ``role`` ("embedder", "judge", "reranker"), also check
    that it may serve that role."""
    model_type = getattr(config, "model_type", None)
    arch = SUPPORTED_ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"model {name!r} has architecture {model_type!r}, which unime-ray does not support; "
            f"supported: {_supported_list()}")
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; choose one of {', '.join(ROLES)}")
        if role not in arch.roles:
            others = [k for k, a in SUPPORTED_ARCHITECTURES.items() if role in a.roles]
            raise UnsupportedArchitectureError(
                f"model {name!r} ({arch.description}) cannot be the {role} backbone; use one of "
                f"{', '.join(others)} for the {role}")
    return arch


def uses_mrope(model_or_config: Any) -> bool:
    """Whether a model (or its config) takes Qwen's 3-axis M-RoPE positions; False for 1-D RoPE (LLaVA-OV)."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = SUPPORTED_ARCHITECTURES.get(getattr(config, "model_type", None))
    return arch.mrope if arch is not None else True


def load_config(name_or_path: str | os.PathLike):
    """The model config of a local folder or a cached hub id, with a clear error when neither exists."""
    from transformers import AutoConfig

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} exists but has no config.json: not a model checkpoint folder")
    looks_local = path.is_absolute() or name.startswith(".") or path.exists()
    if looks_local and not path.exists():
        raise ModelNotFoundError(f"model folder {path} does not exist")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0]
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is not a local checkpoint folder and not in the local Hugging Face "
            f"cache ({msg}). Download it on a machine with hub access (huggingface-cli download {name}) or pass "
            f"a local folder; for tests use `unime-ray make-tiny-models`.") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)} or auto")
    return table[dtype]


def load_backbone(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
                  device: str | torch.device | None = None, attn_implementation: str | None = None,
                  role: str | None = None):
    """Load a supported ``*ForConditionalGeneration`` model from a folder or hub id; ``role`` (embedder, judge,
    reranker) refuses, before any weights load, an architecture that cannot serve it."""
    config = load_config(name_or_path)
    arch = architecture_of(config, str(name_or_path), role)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = arch.load_class().from_pretrained(str(name_or_path), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def shipped_config(name: str):
    """The config of a published checkpoint from the copy shipped with unime-ray (no download)."""
    from transformers import AutoConfig

    file = SHIPPED_CONFIGS.get(name)
    if file is None:
        by_file = {Path(v).stem: v for v in SHIPPED_CONFIGS.values()}
        file = by_file.get(name)
    if file is None:
        raise ModelNotFoundError(f"no shipped config for {name!r}; shipped: {', '.join(SHIPPED_CONFIGS)}")
    data = json.loads((CONFIG_DIR / file).read_text())
    data.pop("_source", None)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def build_random_backbone(name: str, device: str | torch.device = "meta", dtype: str | torch.dtype = "bfloat16"):
    """A real-size model with random weights from a shipped config: ``device="meta"`` allocates nothing."""
    config = shipped_config(name)
    arch = architecture_of(config, name)
    torch_dtype = resolve_dtype(dtype)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)
        with torch.device(device):
            model = arch.load_class()(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
