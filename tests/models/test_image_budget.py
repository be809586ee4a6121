"""One image budget per model role (models.images), honoured by every stage, and the visual tokens each stage
records against it.

The end-to-end test feeds real-size images (1000x800 PNGs) through the pipeline's stages with a different
budget per role and checks that each stage's recorded tokens per image equal what the smart-resize rule gives
for that role's budget, computed here independently of the code under test.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from unime_ray.run.config import load_run_config
from unime_ray.models.budget import ImageBudget
from unime_ray.utils.tallies import drain_visual_tokens, merge_tallies, token_tally

IMAGE_W, IMAGE_H = 1000, 800


def smart_tokens(width: int, height: int, budget: dict, *, default_min: int, default_max: int,
                 patch: int = 14, merge: int = 2) -> int:
    """Visual tokens of one image under a budget: resize, then Qwen-VL's smart resize into the pixel range
    (sides multiples of patch*merge), then (h/factor)*(w/factor) merged tokens."""
    if budget.get("resize"):
        width, height = budget["resize"]
    lo = budget.get("min_pixels") or default_min
    hi = budget.get("max_pixels") or default_max
    f = patch * merge
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return (h // f) * (w // f)


def real_size_png(seed: int, width: int = IMAGE_W, height: int = IMAGE_H, fmt: str = "PNG") -> bytes:
    """A large image that compresses well (a colour field with a few boxes), distinct per seed."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed + 80) % 256))
    draw = ImageDraw.Draw(im)
    for k in range(3):
        x, y = (seed * 97 + k * 211) % (width - 200), (seed * 61 + k * 157) % (height - 200)
        draw.rectangle([x, y, x + 150, y + 120], fill=((k * 80) % 256, (seed * 40) % 256, 200 - k * 50))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- unit tests
def test_budget_type_and_tallies():
    assert ImageBudget(resize=672).resize == (672, 672)
    assert ImageBudget.model_validate({"resize": [672, 480]}).resize == (672, 480)
    with pytest.raises(ValueError):
        ImageBudget(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError):
        ImageBudget(resize=(0, 10))
    with pytest.raises(ValueError):
        ImageBudget(max_pix=3)   # strict: unknown keys are errors
    assert ImageBudget().is_default and ImageBudget().describe() == "checkpoint default"
    assert ImageBudget(resize=(672, 672), min_pixels=200704, max_pixels=1003520).describe() == \
        "672x672, 200704-1003520 px"

    t = token_tally([4, 16, 9, 16])
    assert (t["images"], t["min"], t["median"], t["max"]) == (4, 4, 12.5, 16)
    assert t["histogram"] == {"4": 1, "9": 1, "16": 2}
    assert token_tally({}) is None and token_tally(None) is None
    m = merge_tallies(t, None, token_tally({"16": 3}))
    assert (m["images"], m["median"], m["max"]) == (7, 16, 16)

    class Owner:
        def __init__(self):
            self.processor = type("P", (), {"visual_tokens": Counter({576: 2})})()

    owner = Owner()
    assert drain_visual_tokens(owner) == {576: 2} and not owner.processor.visual_tokens
    assert drain_visual_tokens(object()) == {}


def test_processor_records_visual_tokens(tiny_models, png_bytes):
    from PIL import Image

    from unime_ray.models.processor import IMAGE_PAD, VLProcessor

    budget = {"resize": (168, 112), "max_pixels": 28 * 28 * 64}
    proc = VLProcessor.from_pretrained(tiny_models["qwen2_vl"], image_options=ImageBudget(**budget))
    im = Image.open(io.BytesIO(real_size_png(1))).convert("RGB")
    out = proc([f"{IMAGE_PAD} a", "text only", f"{IMAGE_PAD} b"], [im, None, im])
    assert dict(proc.visual_tokens) == {24: 2} == {smart_tokens(IMAGE_W, IMAGE_H, budget, default_min=3136,
                                                                default_max=12544): 2}
    assert int((out["input_ids"] == proc.image_pad_id).sum()) == 48


def test_exported_folder_sizes_images_as_trained_in_plain_transformers(tiny_models, tmp_path):
    """``Embedder.save_pretrained`` (what ``export_model`` writes every trained model with, at the job's budget)
    stores the processor's pixel range in ``preprocessor_config.json``: transformers' own image processor loaded
    from the exported folder (``AutoImageProcessor``: ``AutoProcessor`` reads the same file, but needs torchvision
    for its video half) gives the training budget's grid, not the base checkpoint's; without a budget the base
    checkpoint's range is kept."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from unime_ray.models import Embedder

    budget = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 24}
    base = tiny_models["qwen2_vl"]
    trained = Embedder.from_pretrained(base, dtype="float32", device="cpu", image_options=ImageBudget(**budget))
    folder = trained.save_pretrained(tmp_path / "trained")
    im = Image.open(io.BytesIO(real_size_png(1))).convert("RGB")

    def tokens(path) -> int:
        return int(AutoImageProcessor.from_pretrained(str(path))(images=[im], return_tensors="pt")["image_grid_thw"]
                   .prod()) // 4

    native = json.loads((base / "preprocessor_config.json").read_text())["size"]
    assert tokens(folder) == smart_tokens(IMAGE_W, IMAGE_H, budget, default_min=0, default_max=0) == 20
    assert tokens(base) == smart_tokens(IMAGE_W, IMAGE_H, {}, default_min=native["shortest_edge"],
                                        default_max=native["longest_edge"]) != 20
    untouched = Embedder.from_pretrained(base, dtype="float32", device="cpu").save_pretrained(tmp_path / "as-is")
    assert json.loads((untouched / "preprocessor_config.json").read_text())["size"] == native

def test_role_budgets_in_the_config():
    cfg = load_run_config(preset="demo")
    assert all(cfg.image_budget(r).is_default for r in ("retriever", "judge", "embedder", "reranker", "eval"))
    cfg = load_run_config(preset="demo", overrides=["models.images.eval={resize: 1344}"])
    assert cfg.image_budget("eval").resize == (1344, 1344) and cfg.image_budget("retriever").is_default
    # one name per setting: the budgets before per-role ones existed are gone, and say so
    for old in ("models.image_resize=[672, 672]", "models.max_pixels=1003520", "judge.max_pixels=235200"):
        with pytest.raises(ValueError, match="unknown key"):
            load_run_config(preset="demo", overrides=[old])
    with pytest.raises(ValueError, match="models.images.judge"):
        load_run_config(preset="demo", overrides=["models.images.judge={size: 3}"])


@pytest.mark.parametrize("source", [{"preset": "paper-qwen2vl-2b"}, {"config_path": "jobs/configs/paper.yaml"}])
def test_paper_budgets_are_the_official_ones(source):
    """Official: 672x672 within 256..1280*28*28 for the embedder (576 tokens), the reranker at most 300*28*28
    pixels (min 4*28*28), evaluation 1344x1344 before the 1280*28*28 cap; the judge as the retriever."""
    cfg = load_run_config(**source)
    qwen = dict(default_min=56 * 56, default_max=28 * 28 * 1280 * 10)   # Qwen2-VL's checkpoint range
    tokens = {r: smart_tokens(IMAGE_W, IMAGE_H, cfg.image_budget(r).model_dump(), **qwen)
              for r in ("retriever", "judge", "embedder", "reranker", "eval")}
    assert cfg.image_budget("embedder") == ImageBudget(resize=(672, 672), min_pixels=256 * 28 * 28,
                                                       max_pixels=1280 * 28 * 28)
    assert cfg.image_budget("reranker") == ImageBudget(min_pixels=4 * 28 * 28, max_pixels=300 * 28 * 28)
    assert cfg.image_budget("eval") == ImageBudget(resize=(1344, 1344), min_pixels=256 * 28 * 28,
                                                   max_pixels=1280 * 28 * 28)
    assert cfg.image_budget("judge") == cfg.image_budget("retriever") == cfg.image_budget("embedder")
    assert tokens == {"retriever": 576, "judge": 576, "embedder": 576, "reranker": 285, "eval": 1225}


def test_cli_flags_and_serve_budget(tmp_path):
    from unime_ray.cli import build_parser
    from unime_ray.models.budget import budget_from_arguments
    from unime_ray.serve.app import load_serve_config

    p = build_parser()
    args = p.parse_args(["eval", "--model", "m", "--table", "t", "--out", "o", "--image-resize", "1344", "1344",
                         "--min-pixels", "200704", "--max-pixels", "1003520", "--rerank-max-pixels", "235200"])
    assert budget_from_arguments(args) == ImageBudget(resize=(1344, 1344), min_pixels=200704, max_pixels=1003520)
    assert args.rerank_max_pixels == 235200
    args = p.parse_args(["embed", "--model", "m", "--table", "t", "--out", "o", "--max-pixels", "1003520"])
    assert budget_from_arguments(args) == ImageBudget(max_pixels=1003520)
    # a run config given to `serve --config`: its reranker budget serves unless serve.reranker sets one
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("models:\n  images:\n    reranker: {min_pixels: 3136, max_pixels: 235200}\nserve:\n  port: 8123\n")
    s = load_serve_config(None, run_cfg)
    assert (s.port, s.reranker.min_pixels, s.reranker.max_pixels) == (8123, 3136, 235200)
    s = load_serve_config({"reranker": {"max_pixels": 100352}}, run_cfg)
    assert s.reranker.max_pixels == 100352


# ------------------------------------------------------------------------------------------- end to end
BUDGETS = {   # a different budget per role, each far below the images' native 1000x800
    "retriever": {"max_pixels": 28 * 28 * 12},
    "judge": {"resize": [224, 224], "max_pixels": 28 * 28 * 64},
    "embedder": {"resize": [168, 112], "max_pixels": 28 * 28 * 64},
    "reranker": {"max_pixels": 28 * 28 * 24},
    "eval": {"resize": [1344, 1344], "max_pixels": 28 * 28 * 30},
}
STAGE_ROLES = {"retrieve": ["retriever"], "judge": ["judge"], "train": ["embedder"],
               "rerank": ["reranker"], "eval": ["eval", "reranker"]}


def _write_tables(root, n: int = 6):
    from unime_ray.data.io import write_rows
    from unime_ray.data.schema import PAIR_SCHEMA

    def item(prefix, text, seed):
        return {f"{prefix}instruction": "", f"{prefix}text": f"<image> {text}", f"{prefix}image": real_size_png(seed),
                f"{prefix}image_path": None}

    train = [{"id": f"q{i}", "task": "T", **item("query_", f"query {i}", i), "pos_id": f"p{i}",
              **item("pos_", f"answer {i}", 100 + i)} for i in range(n)]
    evals = []
    for i in range(3):
        negs = [item("", f"other {i} {k}", 300 + 10 * i + k) for k in range(2)]
        evals.append({"id": f"e{i}", "task": "T", **item("query_", f"eval query {i}", 200 + i), "pos_id": f"ep{i}",
                      **item("pos_", f"eval answer {i}", 250 + i), "neg_id": [f"en{i}{k}" for k in range(2)],
                      **{f"neg_{f}": [x[f] for x in negs] for f in ("instruction", "text", "image", "image_path")}})
    out = {}
    for name, rows in (("train_pairs", train), ("eval_pairs", evals)):
        write_rows(rows, root / name, PAIR_SCHEMA)
        out[name] = {"path": str(root / name), "rows_in": len(rows), "rows_out": len(rows), "rows_quarantined": 0}
    return out


def test_every_stage_records_the_tokens_of_its_budget(tiny_models, ray_local, tmp_path):
    from unime_ray.run.runner import Manifest, run_pipeline

    run = tmp_path / "run"
    tables = _write_tables(tmp_path)
    small = "max_steps: 1, micro_batch_size: 2, num_workers: 1, lora: false, checkpoint_every: 1, zero_stage: 0"
    cfg = load_run_config(overrides=[
        f"run_dir={run}", "models.tiny.make=false", f"models.embedder={tiny_models['qwen2_vl']}",
        f"models.judge={tiny_models['qwen2_5_vl']}", f"models.images={json.dumps(BUDGETS)}",
        "embed={pool: {batch_size: 8, max_actors: 1}}", "retrieve={top_k: 3, delta: null}",
        "judge={pool: {batch_size: 32, max_actors: 1}}", "mine={num_negatives: 2, export_official: false}",
        f"train={{num_negatives: 2, {small}}}", f"reranker={{enabled: true, list_negatives: 2, {small}}}",
        "eval={pool: {ray: false, batch_size: 8}, rerank: {enabled: true, top_k: 2, require_validation: false}}"])
    manifest = Manifest(run.resolve())
    manifest.update("prepare", status="complete", outputs={"tables": tables, "image_root": None})
    run_pipeline(cfg, only=["retrieve", "judge", "mine", "train", "rerank", "eval", "report"])

    manifest = Manifest(run.resolve())
    tiny = json.loads((tiny_models["qwen2_vl"] / "preprocessor_config.json").read_text())
    limits = dict(default_min=tiny["size"]["shortest_edge"], default_max=tiny["size"]["longest_edge"],
                  patch=tiny["patch_size"], merge=tiny["merge_size"])
    expected = {r: smart_tokens(IMAGE_W, IMAGE_H, b, **limits) for r, b in BUDGETS.items()}
    assert expected == {"retriever": 9, "judge": 64, "embedder": 24, "reranker": 20, "eval": 25}
    for stage, roles in STAGE_ROLES.items():
        recorded = manifest.outputs(stage)["visual_tokens"]
        assert sorted(recorded) == sorted(roles), stage
        for role in roles:
            t = recorded[role]
            assert t["images"] > 0 and t["min"] == t["median"] == t["max"] == expected[role], (stage, role, t)
            assert t["budget"] == ImageBudget(**BUDGETS[role]).describe()
    # every image of the stage was counted: e.g. retrieval embeds each query and each pool item once
    assert manifest.outputs("retrieve")["visual_tokens"]["retriever"]["images"] == 12
    assert manifest.outputs("judge")["visual_tokens"]["judge"]["images"] >= 6 * 4   # a candidate image per pair
    for stage, role in (("train", "embedder"), ("rerank", "reranker")):   # exported at the training budget's range
        folder = manifest.outputs(stage)["model"]
        size = json.loads((Path(folder) / "preprocessor_config.json").read_text())["size"]
        assert size == {"shortest_edge": tiny["size"]["shortest_edge"], "longest_edge": BUDGETS[role]["max_pixels"]}
    report = (run / "report.md").read_text()
    assert "## Images: visual tokens per image" in report
    assert "| judge | judge | 224x224, default-50176 px |" in report


def test_vllm_judge_applies_the_budget_and_counts_tokens(tiny_models):
    """The vLLM judge resizes before vLLM and records the tokens vLLM expands each image to (no vLLM needed)."""
    from transformers import AutoTokenizer

    from tests.judge.test_judge_vllm import _FakeLLM
    from unime_ray.data.schema import Item
    from unime_ray.judge.prompt import JudgePrompt, answer_token_ids
    from unime_ray.judge.stage import JudgeSpec
    from unime_ray.judge.vllm_backend import VisionLimits, VLLMJudge, sampling_params_kwargs

    budget = {"resize": [224, 224], "min_pixels": 3136, "max_pixels": 28 * 28 * 64}
    spec = JudgeSpec.model_validate({"model": "m", "budget": budget})
    assert spec.budget == ImageBudget(**budget)
    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen2_5_vl"]))
    judge = VLLMJudge.__new__(VLLMJudge)   # no engine: a fake stands in for vllm.LLM
    judge.budget = spec.budget
    judge.prompt, judge.image_root, judge.tokenizer = JudgePrompt(), None, tok
    judge.yes_id, judge.no_id = answer_token_ids(tok)
    judge.sampling_params = sampling_params_kwargs(judge.yes_id, judge.no_id)
    judge.vision = VisionLimits(min_pixels=3136, max_pixels=28 * 28 * 64)
    judge.llm = _FakeLLM(tok, judge.yes_id, judge.no_id)
    q = Item(text="<image> a query", image=real_size_png(3))
    judge.score([(q, Item(text="candidate number 0", image=real_size_png(4))), (q, Item(text="candidate number 1"))])
    (requests, _, _), = judge.llm.calls
    assert [im.size for r in requests for im in r["multi_modal_data"]["image"]] == [(224, 224)] * 3
    expected = smart_tokens(IMAGE_W, IMAGE_H, budget, default_min=3136, default_max=12544)
    assert drain_visual_tokens(judge) == {expected: 3} and expected == 64


def test_tools_default_to_the_budget_the_model_was_trained_with(tmp_path):
    """A trained folder's card records its training budget (the recipe's ``images``); `eval`, `embed` and `index`
    use it when no budget flag is given (not the base checkpoint's native range), and flags override it."""
    from unime_ray.cli import build_parser
    from unime_ray.models.budget import budget_from_arguments
    from unime_ray.models.budget import training_budget
    from unime_ray.models.card import write_model_card

    trained = ImageBudget(resize=(168, 112), min_pixels=3136, max_pixels=28 * 28 * 64)
    folder = tmp_path / "model"
    folder.mkdir()
    write_model_card(folder, base_model="base", recipe={"task": "embedder", "images": trained.model_dump(mode="json")})
    assert training_budget(folder) == trained and training_budget(tmp_path) is None
    p = build_parser()
    for argv in (["eval", "--model", str(folder), "--table", "t", "--out", "o"],
                 ["embed", "--model", str(folder), "--table", "t", "--out", "o"]):
        assert budget_from_arguments(p.parse_args(argv), str(folder)) == trained
    args = p.parse_args(["eval", "--model", str(folder), "--table", "t", "--out", "o", "--max-pixels", "1003520"])
    assert budget_from_arguments(args, str(folder)) == ImageBudget(max_pixels=1003520)
    assert budget_from_arguments(p.parse_args(["embed", "--model", "org/base", "--table", "t", "--out", "o"]),
                                 "org/base").is_default    # a hub model: its own setting
