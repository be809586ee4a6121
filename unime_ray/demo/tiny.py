"""Tiny Qwen2-VL / Qwen2.5-VL (and, on request, LLaVA-OneVision) checkpoints with random weights, built offline.

They are ordinary Hugging Face folders (config, safetensors weights, tokenizer, image-processor config),
so tests and the demo load them through exactly the code path that loads real checkpoints. The tokenizer is
a byte-level BPE trained locally on a small corpus (plus, optionally, the demo's *training* texts), with
digits split individually and "Yes"/"No" guaranteed to be single tokens: the judge and reranker read the
logits of those tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from ..models.config import TinyModelConfig

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL / Qwen2.5-VL chat template, reduced to text and image parts (no video, no tools).
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words every stage needs as tokens: answers, list markers, instructions of the method's prompts.
BASE_CORPUS = [
    "Yes", "No", "Yes.", "No.", "Ans: (1)", "Ans: (2)", "(1) (2) (3) (4) (5) (6) (7) (8) (9) (10)",
    "0 1 2 3 4 5 6 7 8 9",
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'.",
    "Query: Candidate: Candidates: Answer: Which candidate best matches the query?",
    "Represent the given image with the following question:",
    "Represent the given image. Find an image caption describing the given image.",
    "Represent the given emoji image for finding its name: Find an emoji image that matches the name:",
    "Classify the emoji image into its subgroup: Represent the emoji name: Represent the given emoji image:",
    "a photo of a red car. a small blue circle. a large green square. a yellow triangle.",
    "You are a helpful assistant.", "system user assistant",
]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with Qwen's special tokens; returns a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(BASE_CORPUS) * 20 + [t for t in corpus if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=SPECIAL_TOKENS[1:])
    hf.padding_side = "left"
    hf.chat_template = QWEN_VL_CHAT_TEMPLATE
    for word in ("Yes", "No", *"0123456789"):
        ids = hf(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token ({ids})")
    return hf


def _text_config(spec: TinyModelConfig, tok) -> dict:
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2
    # mrope_section splits head_dim/2 over (temporal, height, width), like Qwen's [16, 24, 24] for 128.
    t = half // 4
    hw = (half - t) // 2
    mrope = [t, hw, half - t - hw]
    ids = tok.convert_tokens_to_ids
    return dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads,
                max_position_embeddings=spec.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))


def build_tiny_model(arch: str, tok, spec: TinyModelConfig, seed: int = 0):
    """A randomly initialised tiny model of ``arch`` ("qwen2_vl" or "qwen2_5_vl")."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    ids = tok.convert_tokens_to_ids
    special = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                   vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text = _text_config(spec, tok)
    if arch == "qwen2_vl":
        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_embed_dim, hidden_size=spec.hidden_size,
                      num_heads=spec.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        cfg_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif arch == "qwen2_5_vl":
        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_embed_dim,
                      intermediate_size=2 * spec.vision_embed_dim, num_heads=spec.vision_heads,
                      out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[spec.vision_depth - 1])
        cfg_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    elif arch == "llava_onevision":  # ``tok`` must be the LLaVA-OV tokenizer (llava_onevision.tiny_tokenizer)
        from ..models.llava_onevision import build_tiny_llava_onevision

        return build_tiny_llava_onevision(tok, spec, seed)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_NAMES)}")
    cfg = cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **special, **spec.extra)
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def build_image_processor(spec: TinyModelConfig):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
                                    patch_size=14, merge_size=2, temporal_patch_size=2)


TINY_NAMES = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "llava_onevision": "tiny-llava-onevision"}


def make_tiny_models(out_dir: str | Path, seed: int | None = None, spec: TinyModelConfig | None = None,
                     corpus: Iterable[str] = (), archs: Iterable[str] = ("qwen2_vl", "qwen2_5_vl")) -> dict[str, Path]:
    """Write tiny checkpoints to ``out_dir/<name>``; returns {arch: folder}. Deterministic given ``seed``
    (None: ``spec.seed``). ``archs`` may add ``"llava_onevision"`` (see :data:`TINY_NAMES`)."""
    spec = spec or TinyModelConfig()
    seed = spec.seed if seed is None else seed
    out_dir = Path(out_dir)
    corpus = list(corpus)
    tok = train_tokenizer(corpus, spec.vocab_size)
    image_processor = build_image_processor(spec)
    written = {}
    for i, arch in enumerate(archs):
        folder = out_dir / TINY_NAMES[arch]
        arch_tok, arch_images = tok, image_processor
        if arch == "llava_onevision":  # the same tokenizer plus <image>/<video>; LLaVA-OV's anyres image processor
            from ..models.llava_onevision import tiny_image_processor, tiny_tokenizer

            arch_tok, arch_images = tiny_tokenizer(tok), tiny_image_processor()
        model = build_tiny_model(arch, arch_tok, spec, seed=seed + i)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        arch_tok.save_pretrained(folder)
        arch_images.save_pretrained(folder)
        (folder / "unime_tiny.json").write_text(json.dumps(
            {"arch": arch, "seed": seed + i, "spec": spec.model_dump(exclude={"make", "seed"}), "corpus_texts": len(corpus)}, indent=1))
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("wrote %s (%s, %d parameters)", folder, arch, n_params)
        written[arch] = folder
    return written
