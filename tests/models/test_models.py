"""Backbones, processor, formatting, embedder and adapters on tiny Qwen2-VL / Qwen2.5-VL checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unime_ray.data.schema import Item
from unime_ray.models import (Embedder, ImageOptions, LoraSettings, ModelNotFoundError, UnsupportedArchitectureError,
                              apply_lora, build_random_backbone, format_item, load_adapter,
                              load_backbone, save_adapter)
from unime_ray.models.auto_processor import load_processor
from unime_ray.models.backbone import SHIPPED_CONFIGS
from unime_ray.models.embedder import last_token_pool
from unime_ray.models.processor import IMAGE_PAD

from ..conftest import make_png

ARCHS = ["qwen2_vl", "qwen2_5_vl"]


def mixed_items() -> list[Item]:
    return [
        Item(text="a red car", instruction="Represent the text:"),
        Item(image=make_png(60, 80, seed=1), instruction="Represent the given image"),
        Item(text="<image> what colour is it?", image=make_png(100, 50, seed=2)),
        Item(text="short"),
        Item(image=make_png(28, 28, seed=3)),
    ]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


def test_tiny_checkpoints_are_ordinary_hf_folders(tiny_models, arch):
    folder = tiny_models[arch]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json"):
        assert (folder / f).is_file(), f
    assert json.loads((folder / "config.json").read_text())["model_type"] == arch
    model = load_backbone(folder, dtype="float32")
    assert type(model).__name__ == {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[arch]


def test_tokenizer_has_single_token_answers_and_digits(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"])
    for word in ["Yes", "No", *"0123456789"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.convert_tokens_to_ids(IMAGE_PAD) != tok.unk_token_id


def test_tiny_models_are_deterministic(tmp_path):
    from unime_ray.models.config import TinyModelConfig
    from unime_ray.demo.tiny import make_tiny_models

    spec = TinyModelConfig(vocab_size=400)
    a = make_tiny_models(tmp_path / "a", seed=3, spec=spec, archs=["qwen2_vl"])["qwen2_vl"]
    b = make_tiny_models(tmp_path / "b", seed=3, spec=spec, archs=["qwen2_vl"])["qwen2_vl"]
    c = make_tiny_models(tmp_path / "c", seed=4, spec=spec, archs=["qwen2_vl"])["qwen2_vl"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as exc:
        load_backbone(tmp_path)
    assert "gpt2" in str(exc.value) and "qwen2_vl" in str(exc.value) and "qwen2_5_vl" in str(exc.value)


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local checkpoint folder"):
        load_backbone("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("name,expected", [("Qwen/Qwen2-VL-2B-Instruct", (2_208_985_600, 1536)),
                                           ("Qwen/Qwen2-VL-7B-Instruct", (8_291_375_616, 3584)),
                                           ("Qwen/Qwen2.5-VL-7B-Instruct", (8_292_166_656, 3584)),
                                           # HF reports 8.03B for this checkpoint
                                           ("llava-hf/llava-onevision-qwen2-7b-ov-hf", (8_030_807_584, 3584))])
def test_real_size_models_build_on_meta(name, expected):
    model = build_random_backbone(name, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert (n, model.config.text_config.hidden_size) == expected
    assert next(model.parameters()).device.type == "meta"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert set(SHIPPED_CONFIGS) >= {name}


def test_formats():
    img = Item(text="<image>\nRepresent the given image with the following question: what?\n", image=b"x")
    assert format_item(img, "official") == f"{IMAGE_PAD}\nRepresent the given image with the following question: what?\n"
    bare = Item(instruction="Represent the given image", image=b"x")
    assert format_item(bare, "official") == f"{IMAGE_PAD}\nRepresent the given image"
    assert format_item(Item(text="hello", instruction="Find:"), "official") == "Find: hello"
    chat = format_item(bare, "chat")
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Represent the given image<|im_end|>\n"
                    "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown input format"):
        format_item(bare, "llava")


def test_chat_format_matches_the_tokenizer_template(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Represent the given image"}]}]
    via_template = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert format_item(Item(instruction="Represent the given image", image=b"x"), "chat") == via_template


def test_hf_and_manual_processors_give_identical_inputs(tiny_models, arch):
    proc = load_processor(tiny_models[arch], backend="auto")
    assert proc.backend == "hf"
    items = mixed_items()
    from unime_ray.data.images import load_image

    for fmt in ("official", "chat"):
        texts = [format_item(it, fmt) for it in items]
        images = [load_image(it) for it in items]
        hf, manual = proc(texts, images, backend="hf"), proc(texts, images, backend="manual")
        assert set(hf) == set(manual) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                          "image_grid_thw"}
        for k in hf:
            assert torch.equal(hf[k], manual[k]), (fmt, k)
        # each image expanded to t*h*w/4 placeholder tokens
        n_pad = (manual["input_ids"] == proc.image_pad_id).sum().item()
        assert n_pad == int(manual["image_grid_thw"].prod(dim=1).sum().item()) // 4


def test_cached_images_give_the_same_inputs(tiny_models, arch, tmp_path):
    """Embedder.cache_images: the same tensors as processing every image afresh (repeats, a path and bytes, a
    cache too small for the batch that drops entries while it runs), and the visual-token tally counts each use."""
    from unime_ray.models.embedder import Embedder

    (tmp_path / "a.png").write_bytes(make_png(40, 30, 5))
    items = mixed_items() + [Item(text="x", image_path="a.png"), Item(image_path="a.png")] + mixed_items()[:2]
    plain = Embedder.from_pretrained(tiny_models[arch], image_root=tmp_path)
    for budget in (1 << 30, 200_000):                         # all of them; about two at a time
        cached = Embedder.from_pretrained(tiny_models[arch], image_root=tmp_path)
        cached.cache_images(budget)
        for fmt in ("official", "chat"):
            plain.input_format = cached.input_format = fmt
            want = plain.prepare(items)
            for _ in range(2):                                    # a cold and a warm cache
                got = cached.prepare(items)
                assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), (budget, fmt)
        assert cached.processor.visual_tokens == {k: 2 * v for k, v in plain.processor.visual_tokens.items()}
        plain.processor.visual_tokens.clear()
        assert cached.pixel_cache.bytes <= budget


def test_processor_image_options(tiny_models):
    from PIL import Image

    proc = load_processor(tiny_models["qwen2_vl"], backend="manual",
                                       image_options=ImageOptions(resize=(112, 112), max_pixels=112 * 112))
    im = Image.new("RGB", (300, 40), (255, 0, 0))
    out = proc([IMAGE_PAD], [im])
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112/14 = 8 patches a side
    small = load_processor(tiny_models["qwen2_vl"], backend="manual",
                                        image_options=ImageOptions(max_pixels=56 * 56))
    assert small([IMAGE_PAD], [Image.new("RGB", (200, 200))])["image_grid_thw"].prod().item() <= 16
    with pytest.raises(ValueError, match="image placeholders"):
        proc(["no placeholder"], [im])
    with pytest.raises(ValueError):
        ImageOptions(min_pixels=100, max_pixels=10)


def test_last_token_pool_left_and_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_pool(h, left).flatten().tolist() == [3.0, 7.0]
    assert last_token_pool(h, right).flatten().tolist() == [1.0, 7.0]


@pytest.mark.parametrize("input_format", ["official", "chat"])
def test_embeddings_unit_norm_and_batch_invariant(tiny_models, arch, input_format):
    emb = Embedder.from_pretrained(tiny_models[arch], input_format=input_format, dtype="float32")
    batched = _unit_norm_and_batch_invariant(emb, mixed_items())
    # different items give different vectors (the model is not collapsed)
    assert np.abs(batched[0] - batched[3]).max() > 1e-4


def _unit_norm_and_batch_invariant(emb, items):
    """Encode ``items`` as one batch and one by one: float32 unit vectors, equal either way; the batch."""
    batched = emb.encode(items, batch_size=len(items))
    alone = np.stack([emb.encode([it])[0] for it in items])
    assert batched.dtype == np.float32 and batched.shape == (len(items), emb.dim)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    return batched


def test_embedding_equals_manual_forward(tiny_models):
    """Independent check of pooling: last-layer hidden state at the last real token, normalised."""
    emb = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype="float32")
    items = [Item(text="a red car"), Item(text="a much longer text about a small blue circle")]
    vecs = emb.encode(items)
    for item, vec in zip(items, vecs):
        ids = emb.processor.tokenizer(format_item(item, "official"), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = emb.model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(vec, h / np.linalg.norm(h), atol=1e-5)


def test_lora_save_load_merge(tiny_models, tmp_path):
    base = load_backbone(tiny_models["qwen2_vl"], dtype="float32")
    model = apply_lora(base, LoraSettings(r=4, alpha=16, dropout=0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n for n in names) and not any("visual" in n for n in names)
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    proc = load_processor(tiny_models["qwen2_vl"])
    items = mixed_items()
    with_adapter = Embedder(model.eval(), proc).encode(items)
    plain = Embedder(load_backbone(tiny_models["qwen2_vl"], dtype="float32"), proc).encode(items)
    assert np.abs(with_adapter - plain).max() > 1e-3

    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(load_backbone(tiny_models["qwen2_vl"], dtype="float32"), tmp_path / "adapter")
    np.testing.assert_allclose(Embedder(reloaded.eval(), proc).encode(items), with_adapter, atol=1e-5)

    merged_dir = Embedder(reloaded, proc).save(tmp_path / "merged")
    from_merged = Embedder.from_pretrained(merged_dir, dtype="float32").encode(items)
    np.testing.assert_allclose(from_merged, with_adapter, atol=1e-4)

    via_flag = Embedder.from_pretrained(tiny_models["qwen2_vl"], adapter=tmp_path / "adapter", dtype="float32")
    np.testing.assert_allclose(via_flag.encode(items), with_adapter, atol=1e-5)


def test_official_lora_setting_is_dora():
    cfg = LoraSettings().to_peft()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (16, 64, 0.1, True)
    assert cfg.init_lora_weights == "gaussian"


def test_position_modes(tiny_models):
    from unime_ray.models.embedder import sequential_position_ids

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = sequential_position_ids(mask)
    assert pos.shape == (3, 2, 5)
    assert pos[0].tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]] and torch.equal(pos[0], pos[2])
    # against an independent count, on random left- and right-padded masks: transformers 4's get_rope_index, for
    # ids without <|vision_start|>, numbers the real tokens 0, 1, ... in order and gives padding position 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 9, size=4)
        left = bool(rng.integers(2))
        mask = torch.tensor([[0] * (8 - n) + [1] * n if left else [1] * n + [0] * (8 - n) for n in lengths])
        want = []
        for row in mask.tolist():
            seen, out = 0, []
            for real in row:
                out.append(seen if real else 1)
                seen += real
            want.append(out)
        got = sequential_position_ids(mask)
        assert got[0].tolist() == want and torch.equal(got[1], got[0]) and torch.equal(got[2], got[0])

    items = mixed_items()
    seq = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype="float32")
    assert seq.positions == "sequential"  # official format -> as the released models
    mrope = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype="float32", positions="mrope")
    assert Embedder.from_pretrained(tiny_models["qwen2_vl"], input_format="chat").positions == "mrope"
    a, b = seq.encode(items), mrope.encode(items)
    has_image = [it.has_image for it in items]
    # text-only items are unaffected; image items get different positions, hence different vectors
    np.testing.assert_allclose(a[[not h for h in has_image]], b[[not h for h in has_image]], atol=1e-5)
    assert np.abs(a[has_image] - b[has_image]).max() > 1e-4
    # sequential mode is batch-invariant too
    np.testing.assert_allclose(a, np.stack([seq.encode([it])[0] for it in items]), atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        Embedder(seq.model, seq.processor, positions="2d")


# ------------------------------------------------------------------------------------------- LLaVA-OneVision
# The published llava-hf chat template (chat_template.json of the llava-onevision-qwen2-*-ov-hf checkpoints).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from unime_ray.demo.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_llava"), seed=0, archs=["llava_onevision"])["llava_onevision"]


def llava_items() -> list[Item]:
    # mixed_items plus a wide image and a large square one (its 4x4 tile grid exceeds anyres_max_9: downscaled)
    return mixed_items() + [Item(text="wide", image=make_png(300, 90, seed=4)),
                            Item(instruction="Represent the given image", image=make_png(200, 200, seed=5))]


def test_llava_tiny_checkpoint_loads(tiny_llava):
    from transformers import AutoTokenizer

    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tiny_llava / f).is_file(), f
    config = json.loads((tiny_llava / "config.json").read_text())
    assert config["model_type"] == "llava_onevision"
    assert config["text_config"]["model_type"] == "qwen2"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    model = load_backbone(tiny_llava, dtype="float32")
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(tiny_llava)
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert len(tok) == model.config.text_config.vocab_size
    for word in ["Yes", "No", *"0123456789"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def _llava_pairs():
    wide, square = make_png(300, 90, seed=4), make_png(64, 64, seed=6)
    return [
        (Item(text="a red car"), Item(text="the car is red")),
        (Item(instruction="Represent the given image", image=wide), Item(text="a wide picture")),
        (Item(text="find the picture"), Item(image=square)),
        (Item(instruction="Find a matching image", image=square), Item(image=wide, text="wide one")),
        (Item(instruction="Find a matching image", image=square), Item(image=square)),
    ]


def test_llava_judge_matches_the_hf_processor_and_model(tiny_llava):
    """LLaVA-OV as the judge's backbone: pairwise P(Yes) with prefix reuse, batched whole prompts and one pair at
    a time all equal Hugging Face's own processor + model on the whole prompt (anyres for a lone image, base
    views for the two images of an image-image pair via batch_num_images)."""
    from unime_ray.data.images import load_image
    from unime_ray.judge.hf_backend import TransformersJudge
    from unime_ray.judge.prompt import judge_images, judge_text
    from unime_ray.models.backbone import architecture_of, load_config

    for role in ("embedder", "judge", "reranker"):
        assert architecture_of(load_config(tiny_llava), "x", role=role).model_type == "llava_onevision"
    pairs = _llava_pairs()
    judge = TransformersJudge(tiny_llava, dtype="float32", prefix_reuse=True, batch_size=2)
    proc = judge.processor
    hf = load_processor(tiny_llava, backend="hf")._hf
    expected = []
    for q, c in pairs:
        images = [load_image(it) for it in judge_images(q, c)]
        text = proc.adapt_chat(judge_text(q, c, judge.prompt))
        assert "<|vision_start|>" not in text and text.count("<image>") == len(images)
        inputs = hf(images=[images] if images else None, text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = judge.model(**inputs).logits[0, -1]
        two = torch.softmax(logits[[judge.yes_id, judge.no_id]], dim=-1)
        expected.append(float(two[0]))
        n_image_tokens = int((inputs["input_ids"] == proc.image_pad_id).sum())
        enc = judge.encode(q, c)
        assert len(enc.prefix_ids) + len(enc.suffix_ids) == inputs["input_ids"].shape[1]
        assert sum(t == proc.image_pad_id for t in enc.prefix_ids + enc.suffix_ids) == n_image_tokens
    np.testing.assert_allclose(judge.score(pairs), expected, atol=1e-5)
    judge.prefix_reuse = False
    np.testing.assert_allclose(judge.score(pairs), expected, atol=1e-5)
    np.testing.assert_allclose([judge.score_one(q, c) for q, c in pairs], expected, atol=1e-5)


def test_llava_reranker_trains_and_decodes(tiny_llava):
    """The reranker's answer-token loss backpropagates into a LLaVA-OV model (LoRA), and listwise greedy
    decoding with a multi-image prompt runs and equals step-by-step decoding of the HF model."""
    from unime_ray.rerank.encoding import encode_conversation
    from unime_ray.rerank.inference import Reranker
    from unime_ray.rerank.model import answer_token_losses
    from unime_ray.rerank.prompt import listwise_text, pairwise_text

    q, c = _llava_pairs()[3]
    model = apply_lora(load_backbone(tiny_llava, dtype="float32"), LoraSettings(r=4, alpha=8, dropout=0.0))
    proc = load_processor(tiny_llava, backend="manual")
    encs = [encode_conversation(proc, pairwise_text(q, c), [q, c], "Yes", decision=(0, 3)),
            encode_conversation(proc, listwise_text(q, [c, Item(text="none")]), [q, c], "Ans: (1)", decision=(6, 7))]
    losses = answer_token_losses(model.train(), proc, encs)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    losses.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)

    from unime_ray.data.images import load_image
    from unime_ray.rerank.model import greedy_generate

    reranker = Reranker(tiny_llava, dtype="float32", max_new_tokens=4)
    cands = [c, Item(text="none")]
    enc = encode_conversation(reranker.processor, listwise_text(q, cands), [q, c])
    text = reranker.processor.adapt_chat(listwise_text(q, cands))
    inputs = load_processor(tiny_llava, backend="hf")._hf(
        images=[[load_image(q), load_image(c)]], text=[text], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == enc.ids          # base views: the HF multi-image token count
    with torch.no_grad():
        ref = reranker.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, len(enc.ids):].tolist()
    ours = greedy_generate(reranker.model, reranker.processor, [enc], max_new_tokens=4)[0]
    assert ours == ref
    assert reranker.choose(q, cands).raw == reranker.processor.tokenizer.decode(ref, skip_special_tokens=False)


def test_llava_format_is_the_published_chat_template(tiny_llava):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llava)
    for item in llava_items():
        text = item.prompt_text().replace("<image>", "").strip()
        content = ([{"type": "image"}] if item.has_image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        want = tok.apply_chat_template(messages, chat_template=LLAVA_HF_CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
        assert format_item(item, "official", "llava_onevision") == want
        assert format_item(item, "chat", "llava_onevision") == want
        # the tiny checkpoint's own (reduced) template renders the same text
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert format_item(Item(text="<image>\nwhat?", image=b"x"), "official", "llava_onevision") == (
        "<|im_start|>user <image>\nwhat?<|im_end|><|im_start|>assistant\n")


def test_llava_hf_and_manual_processors_give_identical_inputs(tiny_llava):
    from unime_ray.data.images import load_image
    from unime_ray.models.llava_onevision import LlavaOVProcessor

    proc = load_processor(tiny_llava, backend="auto")
    assert isinstance(proc, LlavaOVProcessor) and proc.backend == "hf"
    items = llava_items()
    texts = [format_item(it, "official", "llava_onevision") for it in items]
    images = [load_image(it) for it in items]
    hf, manual = proc(texts, images, backend="hf"), proc(texts, images, backend="manual")
    assert set(hf) == set(manual) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}
    for k in hf:
        assert torch.equal(hf[k], manual[k]), k
    n_tokens = (manual["input_ids"] == proc.image_pad_id).sum(dim=1).tolist()
    counts = iter(proc.feature_count(im) for im in images if im is not None)
    assert n_tokens == [next(counts) if im is not None else 0 for im in images]
    assert len(set(n for n in n_tokens if n)) > 3  # the image sizes give different grids
    # text-only batches carry no vision inputs
    assert set(proc(["<|im_start|>user \nhi<|im_end|>"], [None])) == {"input_ids", "attention_mask"}


def test_llava_processor_image_options(tiny_llava):
    from PIL import Image

    proc = load_processor(tiny_llava, backend="manual", image_options=ImageOptions(resize=(112, 56)))
    out = proc(["<image>"], [Image.new("RGB", (300, 40), (255, 0, 0))])
    assert out["image_sizes"].tolist() == [[56, 112]]  # (height, width) after the resize
    with pytest.raises(ValueError, match="Qwen-VL processor settings"):
        load_processor(tiny_llava, image_options=ImageOptions(max_pixels=56 * 56))
    with pytest.raises(ValueError, match="image placeholders"):
        proc(["no placeholder"], [Image.new("RGB", (30, 30))])


def test_llava_feature_count_matches_hf_at_real_size():
    """The manual token count against Hugging Face's, with the real 384 px tiles and 6x6 pinpoints."""
    from transformers import LlavaOnevisionImageProcessorPil

    from unime_ray.models.llava_onevision import _hf_processor, image_feature_count, tiny_tokenizer
    from unime_ray.demo.tiny import train_tokenizer

    tok = tiny_tokenizer(train_tokenizer([], 400))
    images = LlavaOnevisionImageProcessorPil()
    hf = _hf_processor(tok, images, 27 * 27, "full", "anyres_max_9")
    sizes = [(336, 336), (384, 384), (1344, 1344), (480, 640), (640, 480), (100, 2000), (2000, 100), (503, 316),
             (28, 28), (720, 1280), (1080, 1920), (3000, 4000), (37, 991), (1200, 300)]
    for h, w in sizes:
        ours = image_feature_count(h, w, tile=384, patch=14, pinpoints=images.image_grid_pinpoints)
        assert ours == hf._get_number_of_features(h, w, 384, 384), (h, w)
    assert image_feature_count(336, 336, tile=384, patch=14, pinpoints=images.image_grid_pinpoints) == 729 + 27 * 28


@pytest.mark.parametrize("input_format", ["official", "chat"])
def test_llava_embeddings_unit_norm_and_batch_invariant(tiny_llava, input_format):
    emb = Embedder.from_pretrained(tiny_llava, input_format=input_format, dtype="float32")
    assert emb.positions == "sequential" and emb.dim == 64
    items = llava_items()
    batched = _unit_norm_and_batch_invariant(emb, items)
    np.testing.assert_allclose(emb.encode(items, batch_size=3), batched, atol=1e-5)
    assert np.abs(batched[0] - batched[3]).max() > 1e-4
    assert np.abs(batched[1] - batched[4]).max() > 1e-4  # different images, same instruction
    with pytest.raises(ValueError, match="1-D"):
        Embedder(emb.model, emb.processor, positions="mrope")


def test_llava_embedding_equals_manual_forward(tiny_llava):
    """Last-layer hidden state at the last token of one unpadded sequence, through the full model."""
    from unime_ray.data.images import load_image

    emb = Embedder.from_pretrained(tiny_llava, dtype="float32")
    items = [Item(text="a red car"), Item(instruction="Represent the given image", image=make_png(100, 50, seed=2))]
    for item, vec in zip(items, emb.encode(items)):
        inputs = emb.processor([format_item(item, "official", "llava_onevision")], [load_image(item)], backend="hf")
        with torch.no_grad():
            out = emb.model(**inputs, output_hidden_states=True)
        h = out.hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(vec, h / np.linalg.norm(h), atol=1e-5)


def test_llava_lora_save_load_merge(tiny_llava, tmp_path):
    base = load_backbone(tiny_llava, dtype="float32")
    model = apply_lora(base, LoraSettings(r=4, alpha=16, dropout=0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n for n in names) and not any("vision_tower" in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    proc = load_processor(tiny_llava)
    items = llava_items()
    with_adapter = Embedder(model.eval(), proc).encode(items)
    plain = Embedder(load_backbone(tiny_llava, dtype="float32"), proc).encode(items)
    assert np.abs(with_adapter - plain).max() > 1e-3

    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(load_backbone(tiny_llava, dtype="float32"), tmp_path / "adapter")
    np.testing.assert_allclose(Embedder(reloaded.eval(), proc).encode(items), with_adapter, atol=1e-5)

    merged_dir = Embedder(reloaded, proc).save(tmp_path / "merged")
    from_merged = Embedder.from_pretrained(merged_dir, dtype="float32")
    assert type(from_merged.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    np.testing.assert_allclose(from_merged.encode(items), with_adapter, atol=1e-4)

    via_flag = Embedder.from_pretrained(tiny_llava, adapter=tmp_path / "adapter", dtype="float32")
    np.testing.assert_allclose(via_flag.encode(items), with_adapter, atol=1e-5)


def test_llava_lora_targets_follow_the_official_list(tiny_llava):
    """On LLaVA-OV the official target list also matches SigLIP's q/k/v/out_proj (method reference 3.3);
    on Qwen-VL nothing in the vision tower; ``freeze_vision`` keeps the whole vision side frozen."""
    from unime_ray.train.config import TrainConfig
    from unime_ray.train.trainer import TrainJob, build_model

    model = build_model(TrainJob(TrainConfig(), model=str(tiny_llava), output_dir="unused"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    vision = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "vision_tower" in n})
    assert vision == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert any("language_model" in n for n in trainable)
    assert not any("multi_modal_projector" in n or "image_newline" in n for n in trainable)

    frozen = build_model(TrainJob(TrainConfig(freeze_vision=True, lora=False), model=str(tiny_llava),
                                  output_dir="unused"))
    names = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert names and not any(k in n for n in names for k in ("vision_tower", "multi_modal_projector", "image_newline"))


def test_qwen_lora_leaves_the_vision_tower_alone(tiny_models):
    from unime_ray.train.config import TrainConfig
    from unime_ray.train.trainer import TrainJob, build_model

    model = build_model(TrainJob(TrainConfig(), model=str(tiny_models["qwen2_vl"]), output_dir="unused"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".visual." in f".{n}." for n in trainable)


def test_lora_init_is_the_official_one_per_task(tiny_models):
    """The official embedder draws LoRA A from N(0, 1/r); the official reranker keeps PEFT's default
    (Kaiming-uniform A, bound 1/sqrt(fan_in)). B starts at zero either way."""
    from unime_ray.train.config import RerankerTrainConfig, TrainConfig
    from unime_ray.train.trainer import TrainJob, build_model

    def lora_a(settings, model):
        m = build_model(TrainJob(settings, model=str(tiny_models[model]), output_dir="unused"))
        init = m.peft_config["default"].init_lora_weights
        a = [(p.shape[1], p.detach()) for n, p in m.named_parameters() if "lora_A" in n]
        assert all(float(p.abs().max()) == 0 for n, p in m.named_parameters() if "lora_B" in n)
        return init, a

    init, a = lora_a(TrainConfig(lora_r=4, use_dora=False), "qwen2_vl")
    assert init == "gaussian"
    values = torch.cat([w.flatten() for _, w in a])
    assert float(values.std()) == pytest.approx(1 / 4, rel=0.1)
    init, a = lora_a(RerankerTrainConfig(lora_r=4), "qwen2_5_vl")
    assert init is True and RerankerTrainConfig().lora_init == "kaiming"
    assert all(float(w.abs().max()) <= 1 / fan_in ** 0.5 + 1e-6 for fan_in, w in a)


def test_an_adapter_named_by_hub_id_loads_through_the_cache_or_says_why(tiny_models, monkeypatch):
    """A base + adapter spec may name the adapter as a hub id (TIGER-Lab/VLM2Vec-Qwen2VL-7B); offline and not
    cached, the error says what was looked for, as for a model name."""
    from unime_ray.models.backbone import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_backbone(tiny_models["qwen2_vl"], dtype="float32", device="cpu")
    with pytest.raises(ModelNotFoundError, match="cannot load adapter 'no-such-org/no-such-adapter'"):
        load_adapter(model, "no-such-org/no-such-adapter")
    with pytest.raises(FileNotFoundError, match="not a peft adapter folder"):
        load_adapter(model, "./no-such-folder")


# ------------------------------------------------------------------------------------------- Hub cards and push
def test_model_card_carries_the_hubs_metadata(tmp_path):
    """The card parses with huggingface_hub, with the Hub's fields and the measured results as model-index."""
    from huggingface_hub import ModelCard

    from unime_ray.models.card import write_model_card

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    folder = tmp_path / "m"
    folder.mkdir()
    write_model_card(folder, base_model=str(base), recipe={"task": "embedder", "objective": "judge_alignment"},
                     evaluation={"per_dataset": {"ImageNet-1K": 61.25, "N24News": 40.5}, "chance": {},
                                 "reranked": {"ImageNet-1K": 63.0}}, datasets=["TIGER-Lab/MMEB-train"])
    card = ModelCard.load(folder / "README.md")
    d = card.data
    assert (d.library_name, d.pipeline_tag, d.license) == ("transformers", "feature-extraction", "apache-2.0")
    assert d.datasets == ["TIGER-Lab/MMEB-train"] and "unime-ray" in d.tags
    got = {(r.dataset_name, r.metric_name): r.metric_value for r in d.eval_results}
    assert got == {("ImageNet-1K", "P@1"): 61.25, ("N24News", "P@1"): 40.5, ("ImageNet-1K", "P@1 reranked"): 63.0}
    write_model_card(folder, base_model="Qwen/Qwen2.5-VL-7B-Instruct", recipe={"task": "reranker"})
    d = ModelCard.load(folder / "README.md").data
    assert (d.pipeline_tag, d.base_model, d.license) == ("text-ranking", "Qwen/Qwen2.5-VL-7B-Instruct", "apache-2.0")


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    """Everything up to the upload call (the Hub cannot be reached from tests): what would be sent, and the real
    client's failure as a one-line error."""
    import huggingface_hub

    from unime_ray.cli import main
    from unime_ray.models.card import write_model_card

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0")
    write_model_card(folder, base_model="Qwen/Qwen2-VL-2B-Instruct", recipe={"task": "embedder"})
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(kw) or "https://huggingface.co/me/m/commit/1")
    assert main(["push", "--model", str(folder), "--repo", "me/m", "--dataset", "TIGER-Lab/MMEB-train"]) == 0
    assert calls[0] == "me/m" and calls[1]["folder_path"] == str(folder) and calls[1]["repo_id"] == "me/m"
    assert "- TIGER-Lab/MMEB-train" in (folder / "README.md").read_text()
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")   # offline (or refused online): one error line, exit 2
    assert main(["push", "--model", str(folder), "--repo", "me/m"]) == 2
    assert main(["push", "--model", str(tmp_path), "--repo", "me/m"]) == 2   # not a model folder
