"""LoRA / DoRA adapters on the language model through peft: apply, save, load, merge.

The official UniME-V2 setting is DoRA with r=16, alpha=64, dropout 0.1, Gaussian init. Its target list
(suffix-matched by peft) hits q/k/v/o and down_proj of the language model on every backbone, and on
LLaVA-OneVision also the SigLIP vision tower's q/k/v/out_proj (method reference 3.3); Qwen-VL's vision
tower names its layers qkv/proj/fc1/fc2, so nothing there matches. ``vision_targets`` and
``vision_module`` state that per architecture (see ``backbone.Architecture``) instead of relying on names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    use_dora: bool = True
    init: str = "gaussian"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    vision_targets: list[str] = field(default_factory=list)   # projections of the vision tower (none: frozen)
    vision_module: str = "vision_tower"                          # the vision tower's module name

    def target_regex(self) -> str:
        names = "|".join(self.target_modules)
        language = rf".*language_model.*\.({names})"
        if not self.vision_targets:
            return language + "$"
        vision = rf".*\.{self.vision_module}\..*\.({'|'.join(self.vision_targets)})"
        return rf"({language}|{vision})$"

    def to_peft(self):
        from peft import LoraConfig

        init = True if self.init in ("default", "kaiming") else self.init
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.use_dora,
                          init_lora_weights=init, target_modules=self.target_regex(), bias="none")


def apply_lora(model, settings: LoraSettings | None = None):
    from peft import get_peft_model

    settings = settings or LoraSettings()
    return get_peft_model(model, settings.to_peft())


def save_adapter(model, path: str | os.PathLike) -> Path:
    if not hasattr(model, "peft_config"):
        raise ValueError("model has no adapter to save; apply_lora first")
    model.save_pretrained(str(path))
    return Path(path)


def load_adapter(model, path: str | os.PathLike, trainable: bool = False):
    """A peft adapter on ``model``: a local folder, or a hub id (e.g. ``TIGER-Lab/VLM2Vec-Qwen2VL-7B``, an
    adapter on ``Qwen/Qwen2-VL-7B-Instruct``) resolved through the Hugging Face cache as any model name is."""
    from peft import PeftModel

    local = Path(os.path.expanduser(str(path)))
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        if not (local / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} is not a peft adapter folder (no adapter_config.json)")
        return PeftModel.from_pretrained(model, str(local), is_trainable=trainable)
    from .backbone import ModelNotFoundError

    try:   # the hub cache (or the hub, where reachable), as for a model name
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load adapter {str(path)!r}: not a local adapter folder and not in the "
                                 f"local Hugging Face cache ({str(exc).splitlines()[0]})") from None


def merged(model):
    """The plain backbone with adapter weights folded in (a no-op for a model without adapters)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
