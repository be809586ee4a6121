"""Other libraries load our models as they are: the sentence-transformers exports (``export-model``): the embedder
as a ``SentenceTransformer``, the reranker as a ``CrossEncoder``.

sentence-transformers runs in a separate ``python -I`` process where ``import unime_ray`` fails, so the exported
folder alone has to carry the input format, pooling and normalisation.

This CPU install has no usable torchvision (its PyPI wheel is built for CUDA torch), and transformers' Qwen-VL
processor needs it for its *video* processor only. Where ``AutoProcessor`` cannot be built for that reason, the
loader below builds the same processor class from the same folder without its video half (transformers' own
text and image code runs unchanged); with torchvision installed it is not used.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from unime_ray.cli import main
from unime_ray.data.schema import Item
from unime_ray.judge.prompt import JudgePrompt, judge_text
from unime_ray.models import Embedder, format_item
from unime_ray.models.st_export import CHAT_TEMPLATES
from unime_ray.rerank import Reranker
from unime_ray.rerank.st_export import pair_template

from ..conftest import make_png
from ..ops.test_readme_commands import REPO, VENV, bash_blocks, run_script

ST_LOADER = r'''
import json, sys
sys.modules["unime_ray"] = None          # any import of unime-ray fails here
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2VLProcessor, Qwen2_5_VLProcessor

_auto = AutoProcessor.from_pretrained.__func__

def _without_video(cls, path, **kwargs):
    try:
        return _auto(cls, path, **kwargs)
    except ImportError as exc:           # torchvision: needed by the video processor only
        if "torchvision" not in str(exc).lower():
            raise
        tok = AutoTokenizer.from_pretrained(path)
        kind = json.load(open(f"{path}/config.json"))["model_type"]
        proc = (Qwen2_5_VLProcessor if kind == "qwen2_5_vl" else Qwen2VLProcessor).__new__(
            Qwen2_5_VLProcessor if kind == "qwen2_5_vl" else Qwen2VLProcessor)
        proc.tokenizer, proc.image_processor, proc.chat_template = tok, AutoImageProcessor.from_pretrained(path), \
            tok.chat_template
        proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
        proc.image_token_id, proc.video_token_id = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
        return proc

AutoProcessor.from_pretrained = classmethod(_without_video)
'''

ENCODE = r'''
import numpy as np
from PIL import Image
from sentence_transformers import SentenceTransformer

spec = json.loads(sys.argv[1])

def st_input(x):
    if x["image"] is None:
        return x["text"]
    image = Image.open(x["image"]).convert("RGB")
    return {"text": x["text"], "image": image} if x["text"] else image

for folder, out in spec["models"]:
    model = SentenceTransformer(folder, device="cpu")
    np.save(out, np.concatenate([model.encode([st_input(x) for x in group["inputs"]], prompt=group["prompt"],
                                              prompt_name=group["prompt_name"]) for group in spec["groups"]]))
assert sys.modules["unime_ray"] is None
'''


PREDICT = r'''
import numpy as np
from PIL import Image
from sentence_transformers import CrossEncoder

spec = json.loads(sys.argv[1])

def side(x):
    if x["image"] is None:
        return x["text"]
    image = Image.open(x["image"]).convert("RGB")
    return {"text": x["text"], "image": image} if x["text"] else image

model = CrossEncoder(spec["model"], device="cpu")
np.save(spec["out"], model.predict([(side(q), side(d)) for q, d in spec["pairs"]]))
assert sys.modules["unime_ray"] is None
'''


MTEB_LOCAL_TASK = r'''
import numpy as np
import mteb
from datasets import Dataset
from PIL import Image
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
from sentence_transformers import SentenceTransformer

spec = json.loads(sys.argv[1])

def side(records):
    """A Dataset of id, text and (where the side has images) image: one modality layout per side."""
    columns = {"id": [r["id"] for r in records], "text": [r["text"] for r in records]}
    if any(r["image"] for r in records):
        columns["image"] = [Image.open(r["image"]).convert("RGB") for r in records]
    return Dataset.from_dict(columns)

def local_task(name, data):
    class LocalPairs(AbsTaskRetrieval):   # each query ranks its own candidates (top_ranked): MMEB's P@1
        metadata = TaskMetadata(
            name=name, description="eval pairs from local files", reference=None,
            dataset={"path": "local", "revision": "0"}, type="Any2AnyRetrieval", category="it2it",
            modalities=["text", "image"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="precision_at_1", date=None, domains=None, task_subtypes=None, license=None,
            annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {"test": {
                "queries": side(data["queries"]), "corpus": side(data["corpus"]),
                "relevant_docs": {q["id"]: {q["positive"]: 1} for q in data["queries"]},
                "top_ranked": {q["id"]: q["candidates"] for q in data["queries"]}}}}
            self.data_loaded = True
    return LocalPairs()

model = SentenceTransformerEncoderWrapper(SentenceTransformer(spec["model"], device="cpu"))
# a SentenceTransformer object is taken as text-only; its sentence_bert_config lists text and image
model.mteb_model_meta = model.mteb_model_meta.model_copy(update={"modalities": ["image", "text"]})
tasks = [local_task(name, data) for name, data in spec["tasks"].items()]
result = mteb.evaluate(model, tasks, cache=None, prediction_folder=spec["out"], show_progress_bar=False)
json.dump({r.task_name: r.scores["test"][0]["precision_at_1"] for r in result.task_results},
          open(spec["out"] + "/p_at_1.json", "w"))
assert sys.modules["unime_ray"] is None
'''


def run_isolated(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-I", "-c", code, *args], check=False, capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_chat_template_renders_each_item_as_format_item(tiny_models):
    """The saved template, fed the messages sentence-transformers builds (the prompt as a system message, the
    input as one user message), gives exactly the text unime-ray's formatting gives the item."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"])
    cases = [("", "a dog", False), ("Find it:", "a dog", False), ("  Find it: ", "", False),
             ("Find", "<image> a dog", False), ("", "", True), ("Represent the image:", "", True),
             ("Q:", "a <image> dog <image>", True), ("", "<image>\nabc", True), ("I", "\nabc", True),
             ("", "text only <image>", True)]
    for input_format, template in CHAT_TEMPLATES.items():
        for instruction, text, has_image in cases:
            item = Item(text=text, instruction=instruction, image=b"png" if has_image else None)
            user = [{"type": "image", "image": "x.png"}] * has_image + [{"type": "text", "text": text}] * bool(text)
            messages = ([{"role": "system", "content": [{"type": "text", "text": instruction}]}] * bool(instruction)
                        + [{"role": "user", "content": user}])
            got = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
            assert got == format_item(item, input_format), (input_format, instruction, text, has_image)
    two_images = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b"}]}]
    with pytest.raises(Exception, match="one image per input"):
        tok.apply_chat_template(two_images, chat_template=CHAT_TEMPLATES["official"], tokenize=False)


def test_sentence_transformers_export_encodes_as_the_embedder(tiny_models, tmp_path):
    """Texts, images and text + image inputs, with and without instructions, in both input formats on both
    backbones: SentenceTransformer(folder).encode equals Embedder.encode within 1e-5. The official format's
    default sequential positions are the one setting it cannot carry: text-only inputs still agree, image inputs
    differ (they get M-RoPE positions, as Embedder(positions="mrope") gives them)."""
    images = []
    for i, (w, h) in enumerate([(60, 80), (100, 50), (40, 30)]):
        images.append(tmp_path / f"img{i}.png")
        images[-1].write_bytes(make_png(w, h, seed=i + 1))
    groups = [
        {"prompt": "Represent the text:", "prompt_name": None,
         "inputs": [("a red car", None), ("two <image> dogs", None)]},
        {"prompt": None, "prompt_name": "document", "inputs": [("", images[0]), ("", images[1])]},
        {"prompt": None, "prompt_name": "query", "inputs": [("<image> what colour is it?", images[2]),
                                                            ("a dog", images[0])]},
        {"prompt": None, "prompt_name": None,
         "inputs": [("short", None), ("", images[1]), ("a <image> cat", images[2])]},
    ]
    prompts = {"query": "Find an image that matches the given caption.", "document": "Represent the given image"}
    models, expected, sequential = [], [], {}
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        for input_format in ("official", "chat"):
            embedder = Embedder.from_pretrained(tiny_models[arch], input_format=input_format, positions="mrope")
            folder = embedder.save_pretrained(tmp_path / f"{arch}-{input_format}", format="sentence-transformers",
                                              prompts=prompts)
            models.append((str(folder), str(tmp_path / f"{arch}-{input_format}.npy")))
            vectors = []
            for g in groups:
                instruction = g["prompt"] or prompts.get(g["prompt_name"]) or ""
                texts, paths = zip(*g["inputs"])
                vectors.append(embedder.encode(list(texts), images=[str(p) if p else None for p in paths],
                                               instructions=instruction))
            expected.append(np.concatenate(vectors))
            if input_format == "official":
                default = Embedder.from_pretrained(tiny_models[arch], input_format=input_format)
                assert default.positions == "sequential"
                sequential[len(expected) - 1] = np.concatenate([default.encode(
                    [t for t, _ in g["inputs"]], images=[str(p) if p else None for _, p in g["inputs"]],
                    instructions=g["prompt"] or prompts.get(g["prompt_name"]) or "") for g in groups])
    spec = {"models": models, "groups": [{**g, "inputs": [{"text": t, "image": str(p) if p else None}
                                                          for t, p in g["inputs"]]} for g in groups]}
    run_isolated(ST_LOADER + ENCODE, json.dumps(spec))
    has_image = np.array([p is not None for g in groups for _, p in g["inputs"]])
    for i, (folder, out) in enumerate(models):
        got = np.load(out)
        assert got.shape == expected[i].shape
        np.testing.assert_allclose(got, expected[i], atol=1e-5, err_msg=folder)
        if i in sequential:
            np.testing.assert_allclose(got[~has_image], sequential[i][~has_image], atol=1e-5)
            assert np.abs(got[has_image] - sequential[i][has_image]).max() > 1e-4


def test_export_names_what_it_cannot_carry(tiny_models, tmp_path, caplog):
    from unime_ray.models import ImageOptions

    embedder = Embedder.from_pretrained(tiny_models["qwen2_vl"], image_options=ImageOptions(resize=56,
                                                                                              max_pixels=56 * 56))
    embedder.save_pretrained(tmp_path / "st", format="sentence-transformers")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "sequential positions" in warned and "resize to 56x56" in warned
    config = json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())
    assert config["processing_kwargs"]["image"]["size"]["longest_edge"] == 56 * 56
    with pytest.raises(ValueError, match="format must be"):
        embedder.save_pretrained(tmp_path / "x", format="onnx")
    with pytest.raises(SystemExit):
        main(["export-model", "--model", str(tiny_models["qwen2_vl"]), "--format", "sentence-transformers",
              "--out", str(tmp_path / "y"), "--prompt", "no-equals-sign"])


def test_readme_export_command_and_usage(tiny_models, tmp_path):
    """The *Use it with other tools* section as written: its bash block exports (a tiny checkpoint stands in for
    the demo's trained model at runs/demo/train/model) and its Python block encodes with the export."""
    work, home = tmp_path / "repo", tmp_path / "home"
    (work / "runs" / "demo" / "train").mkdir(parents=True)
    home.mkdir()
    (work / ".venv").symlink_to(VENV)
    shutil.copytree(tiny_models["qwen2_vl"], work / "runs" / "demo" / "train" / "model")
    blocks = bash_blocks(REPO / "README.md", "Use it with other tools")
    assert len(blocks) == 1 and "unime-ray export-model" in blocks[0]
    proc = run_script(blocks[0], work, home, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((work / "runs" / "demo" / "st-model" / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "Find an emoji image that matches the name:",
                                "document": "Represent the given emoji image:"}
    section = re.search(r"^## Use it with other tools$(.*?)^## ", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    python = re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.MULTILINE | re.DOTALL)
    assert len(python) == 1
    run_isolated(ST_LOADER + python[0] + "\nassert queries.shape == (2, model.get_embedding_dimension())\n",
                 cwd=work)


def test_pair_template_writes_the_judge_prompt(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_5_vl"])

    def side(item: Item, role: str) -> dict:
        return {"role": role, "content": [{"type": "image", "image": "x.png"}] * item.has_image
                + [{"type": "text", "text": item.text}] * bool(item.text)}

    img = b"png"
    cases = [(Item(text="a dog"), Item(text="a cat")), (Item(text="<image> what is it?", image=img), Item(text="a dog")),
             (Item(text="find: ", image=img), Item(image=img)),
             (Item(text="x <image> y", image=img), Item(text="  z <image>", image=img))]
    odd = JudgePrompt(instruction="Is it 'right'? Say \\Yes\\ or No.\n", candidate_label=",\nCandidate: ", system=None)
    for prompt in (JudgePrompt(), odd):
        for query, candidate in cases:
            got = tok.apply_chat_template([side(query, "query"), side(candidate, "document")],
                                          chat_template=pair_template(prompt), tokenize=False)
            assert got == judge_text(query, candidate, prompt)
    with pytest.raises(Exception, match="not a user message"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=pair_template(JudgePrompt()),
                                tokenize=False)


def test_cross_encoder_export_scores_p_yes(tiny_models, tmp_path):
    """CrossEncoder(folder).predict of text, image and text + image pairs equals Reranker.score_pairs (P(Yes))
    within 1e-5, in a process that cannot import unime-ray; the export is the CLI's."""
    images = []
    for i, (w, h) in enumerate([(60, 80), (100, 50)]):
        images.append(tmp_path / f"img{i}.png")
        images[-1].write_bytes(make_png(w, h, seed=i + 5))
    pairs = [(("Find the caption: a dog", None), ("a dog on a beach", None)),
             (("<image> what is it?", images[0]), ("a red square", None)),
             (("a blue circle", None), ("", images[1])),
             (("Find the same: ", images[1]), ("Represent it: a <image> circle", images[0]))]
    out = tmp_path / "ce"
    assert main(["export-model", "--model", str(tiny_models["qwen2_5_vl"]), "--role", "reranker",
                 "--format", "sentence-transformers", "--out", str(out)]) == 0
    reranker = Reranker.from_pretrained(tiny_models["qwen2_5_vl"], device="cpu")
    expected = reranker.score_pairs([tuple(Item(text=t, image_path=str(p) if p else None) for t, p in pair)
                                     for pair in pairs])
    spec = {"model": str(out), "out": str(tmp_path / "scores.npy"),
            "pairs": [[{"text": t, "image": str(p) if p else None} for t, p in pair] for pair in pairs]}
    run_isolated(ST_LOADER + PREDICT, json.dumps(spec))
    got = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.std() > 0    # distinct pairs, distinct scores: not a constant


def test_mteb_evaluates_the_export_on_a_local_task(tiny_models, tmp_path):
    """mteb (2.x) runs the sentence-transformers export on a retrieval task built from our eval rows (each query
    ranks its own candidates: ``top_ranked``), in a process without unime-ray: its P@1 equals
    ``unime_ray.evaluate``'s on the same rows, and its score of every (query, candidate) equals our cosine."""
    pytest.importorskip("mteb")
    from unime_ray import evaluate

    def png(i: int) -> str:
        path = tmp_path / f"img{i}.png"
        path.write_bytes(make_png(36 + 6 * i, 40, seed=20 + i))
        return str(path)

    texts = ["a red square", "a blue circle", "a green star", "a pink heart", "a grey moon"]
    i2t = ("Represent the given image for finding its description:", "Represent the description:")
    t2i = ("Find a shape image that matches the description:", "Represent the given shape image:")
    rows = []
    for k in range(5):   # image -> description, 3 distractors each
        negs = [(k + d) % 5 for d in (1, 2, 3)]
        rows.append({"id": f"i2t-{k}", "task": "i2t", "query_image_path": png(k), "query_instruction": i2t[0],
                     "pos_id": f"t{k}", "pos_text": texts[k], "pos_instruction": i2t[1],
                     "neg_id": [f"t{j}" for j in negs], "neg_text": [texts[j] for j in negs],
                     "neg_instruction": [i2t[1]] * 3})
    for k in range(5):   # description -> image
        negs = [(k + d) % 5 for d in (1, 3)]
        rows.append({"id": f"t2i-{k}", "task": "t2i", "query_text": texts[k], "query_instruction": t2i[0],
                     "pos_id": f"i{k}", "pos_image_path": png(k), "pos_instruction": t2i[1],
                     "neg_id": [f"i{j}" for j in negs], "neg_text": ["", ""], "neg_image_path": [png(j) for j in negs],
                     "neg_instruction": [t2i[1]] * 2})
    embedder = Embedder.from_pretrained(tiny_models["qwen2_vl"], positions="mrope")
    ours = evaluate(embedder, rows, out_dir=tmp_path / "ours", update_card=False).per_dataset
    assert set(ours) == {"i2t", "t2i"}

    def record(item: Item, item_id: str) -> dict:   # the instruction joined to the text, as format_item reads it
        return {"id": item_id, "text": item.prompt_text(), "image": item.image_path}

    tasks, expected = {}, {}
    for row in rows:
        query = Item(text=row.get("query_text", ""), instruction=row["query_instruction"],
                     image_path=row.get("query_image_path"))
        cands = [Item(text=row.get("pos_text", ""), instruction=row["pos_instruction"],
                      image_path=row.get("pos_image_path"))]
        cands += [Item(text=t, instruction=i, image_path=p) for t, i, p in zip(
            row["neg_text"], row["neg_instruction"],
            row.get("neg_image_path") or [None] * len(row["neg_id"]))]
        ids = [row["pos_id"], *row["neg_id"]]
        task = tasks.setdefault(f"Local{row['task']}", {"queries": [], "corpus": {}})
        task["queries"].append({**record(query, row["id"]), "positive": ids[0], "candidates": ids})
        task["corpus"].update({i: record(c, i) for i, c in zip(ids, cands)})
        vectors = embedder.encode([query, *cands])
        expected[row["id"]] = dict(zip(ids, (vectors[1:] @ vectors[0]).tolist()))
    spec = {"model": str(embedder.save_pretrained(tmp_path / "st", format="sentence-transformers")),
            "out": str(tmp_path / "mteb"),
            "tasks": {name: {"queries": t["queries"], "corpus": list(t["corpus"].values())} for name, t in tasks.items()}}
    run_isolated(ST_LOADER + MTEB_LOCAL_TASK, json.dumps(spec))
    p_at_1 = json.loads((tmp_path / "mteb" / "p_at_1.json").read_text())
    assert {name: round(100 * v, 6) for name, v in p_at_1.items()} == {
        f"Local{task}": round(v, 6) for task, v in ours.items()}
    for name in tasks:
        predicted = json.loads((tmp_path / "mteb" / f"{name}_predictions.json").read_text())["default"]["test"]
        for query_id, scores in predicted.items():
            assert scores.keys() == expected[query_id].keys()
            np.testing.assert_allclose([scores[c] for c in scores], [expected[query_id][c] for c in scores],
                                       atol=1e-5, err_msg=query_id)
