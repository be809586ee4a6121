"""The embedder as a sentence-transformers folder: ``SentenceTransformer(folder)`` loads it with no unime-ray code.

What each part of :meth:`~unime_ray.models.Embedder.encode` becomes (sentence-transformers >= 6):

* the backbone: sentence-transformers' ``Transformer`` module (``AutoModel`` + ``AutoProcessor``), every input
  rendered as a chat message (``modality_config`` ``message``);
* the input format: a chat template saved in the folder (``chat_template.jinja``) that renders a message exactly as
  :func:`~unime_ray.models.formatting.format_item` writes the item; the instruction is sentence-transformers' prompt
  (a system message: ``encode(..., prompt=instruction)`` or a saved ``prompts`` name);
* the image budget: the processor's pixel range (``processing_kwargs``);
* last-token pooling and L2 normalisation: its ``Pooling("lasttoken")`` and ``Normalize`` modules.

Two settings have no sentence-transformers form, so :func:`unexpressed` names them for the caller to warn about:

* ``positions="sequential"`` (the ``official`` format's default) on image inputs: transformers' Qwen-VL computes
  M-RoPE positions from the processor's ``mm_token_type_ids`` whenever no ``position_ids`` are passed, and neither
  sentence-transformers nor the processor passes them. Text-only inputs are the same in both modes.
* a fixed ``resize``: the Qwen-VL image processor keeps the aspect ratio within its pixel range.

Where torchvision is installed, transformers picks the torchvision image processor; ``SentenceTransformer(folder,
processor_kwargs={"backend": "pil"})`` asks for unime-ray's PIL one (not run on this project's CPU machines, which
have no usable torchvision: the tests build the processor without its video half). The reranker's
``CrossEncoder`` is :mod:`unime_ray.rerank.st_export`, on :func:`write_folder`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .budget import ImageBudget
from .formatting import DEFAULT_SYSTEM_PROMPT
from .processor import IMAGE_PAD, VISION_END, VISION_START

# The message's parts as format_item reads an Item: system text = the instruction, user text = the text (with an
# optional "<image>" marker), one image part at most; then the item's prompt_text (join_instruction) as ``body``.
_READ_ITEM = """\
{%- set ns = namespace(instruction='', text='', images=0) -%}
{%- for message in messages -%}
{%- for part in ([{'type': 'text', 'text': message['content']}] if message['content'] is string
                 else message['content']) -%}
{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}
{%- elif part['type'] == 'text' and message['role'] == 'system' -%}{%- set ns.instruction = ns.instruction + part['text'] -%}
{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- if ns.images > 1 -%}{{ raise_exception('this embedder reads one image per input') }}{%- endif -%}
{%- set instruction = ns.instruction | trim -%}
{%- set body = (instruction + ' ' + ns.text) if (instruction and ns.text) else (instruction or ns.text) -%}
"""

_OFFICIAL = _READ_ITEM + """\
{%- if ns.images == 0 -%}{{ body.replace('<image>', '') }}
{%- elif '<image>' in body -%}{{ body.replace('<image>', 'PAD', 1) }}
{%- else -%}{{ 'PAD\\n' + body }}
{%- endif -%}""".replace("PAD", IMAGE_PAD)

_CHAT = _READ_ITEM + """\
{%- set pieces = body.split('<image>', 1) if '<image>' in body else ['', body] -%}
{{- '<|im_start|>system\\nSYSTEM<|im_end|>\\n<|im_start|>user\\n' + pieces[0] -}}
{%- if ns.images -%}{{ 'VISION' }}{%- endif -%}
{{- (pieces[1].lstrip('\\n') if ns.images and not pieces[0] else pieces[1]) + '<|im_end|>\\n<|im_start|>assistant\\n' -}}
""".replace("SYSTEM", DEFAULT_SYSTEM_PROMPT).replace("VISION", VISION_START + IMAGE_PAD + VISION_END)

CHAT_TEMPLATES = {"official": _OFFICIAL, "chat": _CHAT}

TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"


def unexpressed(input_format: str, positions: str, budget: ImageBudget) -> list[str]:
    """What of this embedder's settings the folder cannot carry (see the module docstring); empty when none."""
    out = []
    if positions == "sequential":
        out.append(f"{input_format} format with sequential positions: sentence-transformers gives image inputs "
                   "M-RoPE positions (text-only inputs are identical)")
    if budget.resize is not None:
        out.append(f"the fixed resize to {budget.resize[0]}x{budget.resize[1]}: sentence-transformers keeps each "
                   "image's aspect ratio within the pixel range")
    return out


def write_folder(path: str | Path, *, chat_template: str, transformer_task: str, outputs: tuple[str, str],
                 budget: ImageBudget, image_processor, modules: list[tuple[str, str, dict]], model: dict) -> None:
    """Add sentence-transformers' files to the Hugging Face folder ``path`` the model was saved into: its
    ``Transformer`` module (``outputs``: the model's output it reads, the feature it writes) over every input as a
    chat message, then ``modules`` ((folder, class, config) each), and ``model`` (config_sentence_transformers)."""
    path = Path(path)

    def dump(name: str, obj) -> None:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(obj, indent=2) + "\n")

    (path / "chat_template.jinja").write_text(chat_template)
    forward = {"method": "forward", "method_output_name": outputs[0]}
    config = {"transformer_task": transformer_task,
              "modality_config": {"text": forward, "image": forward, "message": {**forward, "format": "structured"}},
              "module_output_name": outputs[1], "unpad_inputs": False}
    size = budget.size_kwargs(image_processor)
    if size:
        config["processing_kwargs"] = {"image": size}
    dump("sentence_bert_config.json", config)
    dump("modules.json", [{"idx": i, "name": str(i), "path": p, "type": t}
                          for i, (p, t, _) in enumerate([("", TRANSFORMER, {}), *modules])])
    for folder, _, module_config in modules:
        dump(f"{folder}/config.json", module_config)
    dump("config_sentence_transformers.json", model)


def write_sentence_transformers(path: str | Path, *, dim: int, input_format: str, budget: ImageBudget,
                                image_processor, prompts: Mapping[str, str] | None = None) -> None:
    """The embedder's files: last-token pooling, then L2 normalisation; ``prompts`` for ``prompt_name``."""
    modules = [("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
                {"embedding_dimension": dim, "pooling_mode": "lasttoken", "include_prompt": True}),
               ("2_Normalize", "sentence_transformers.base.modules.normalize.Normalize", {})]
    write_folder(path, chat_template=CHAT_TEMPLATES[input_format], transformer_task="feature-extraction",
                 outputs=("last_hidden_state", "token_embeddings"), budget=budget, image_processor=image_processor,
                 modules=modules, model={"model_type": "SentenceTransformer", "prompts": dict(prompts or {}),
                                         "default_prompt_name": None, "similarity_fn_name": "cosine"})
