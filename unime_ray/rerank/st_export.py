"""The reranker as a sentence-transformers ``CrossEncoder`` folder: ``CrossEncoder(folder).predict(pairs)`` is its P(Yes).

sentence-transformers reads a generative Yes/No reranker as its ``Transformer`` module on the causal LM
(``any-to-any``, logits of the last position) and ``LogitScore(yes, no)``: logit(Yes) - logit(No), through a
sigmoid, is e_yes / (e_yes + e_no), the pairwise score of :mod:`unime_ray.judge.prompt`. A pair arrives as a
``query`` and a ``document`` message; the saved chat template writes them into the pairwise prompt exactly as
:func:`~unime_ray.judge.prompt.judge_text` does (each side's instruction belongs in its text; the
CrossEncoder's ``prompt`` is the query's instruction). The listwise "(i)" prompt has no CrossEncoder form (it
generates a choice, it does not score a pair).
"""

from __future__ import annotations

from pathlib import Path

from ..judge.prompt import JudgePrompt, answer_token_ids
from ..models.budget import ImageBudget
from ..models.processor import IMAGE_PAD, VISION_END, VISION_START
from ..models.st_export import write_folder

# The pairwise prompt from a CrossEncoder pair: a "query" and a "document" message
# (their texts include their instructions; a system message, the CrossEncoder's prompt, is the query's), read as
# :func:`~unime_ray.judge.prompt.judge_text` writes a (query, candidate) pair.
PAIR_TEMPLATE = """\
{%- macro item(text, images) -%}
{%- if images > 1 -%}{{ raise_exception('this reranker reads one image per query and per candidate') }}{%- endif -%}
{%- set pieces = text.split('<image>', 1) if '<image>' in text else ['', text] -%}
{%- set before, after = pieces[0] | trim, pieces[1] | trim -%}
{%- if before -%}{{ before + (' ' if images or after else '') }}{%- endif -%}
{%- if images -%}{{ 'VISION' }}{%- endif -%}
{{- after -}}
{%- endmacro -%}
{%- set ns = namespace(system='', query='', document='', query_images=0, document_images=0) -%}
{%- for message in messages -%}
{%- if message['role'] not in ('system', 'query', 'document') -%}
{{- raise_exception('a reranker input is a (query, document) pair, not a ' + message['role'] + ' message') -}}
{%- endif -%}
{%- for part in ([{'type': 'text', 'text': message['content']}] if message['content'] is string
                 else message['content']) -%}
{%- if part['type'] == 'text' and message['role'] == 'system' -%}{%- set ns.system = ns.system + part['text'] -%}
{%- elif part['type'] == 'text' and message['role'] == 'query' -%}{%- set ns.query = ns.query + part['text'] -%}
{%- elif part['type'] == 'text' -%}{%- set ns.document = ns.document + part['text'] -%}
{%- elif message['role'] == 'query' -%}{%- set ns.query_images = ns.query_images + 1 -%}
{%- elif message['role'] == 'document' -%}{%- set ns.document_images = ns.document_images + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- set instruction = ns.system | trim -%}
{%- set query = (instruction + ' ' + ns.query) if (instruction and ns.query) else (instruction or ns.query) -%}
{{- 'HEAD' + item(query, ns.query_images) + 'MIDDLE' + item(ns.document, ns.document_images) + 'TAIL' -}}
"""



def pair_template(prompt) -> str:
    """The CrossEncoder chat template of the pairwise prompt ``prompt`` (a
    :class:`~unime_ray.judge.prompt.JudgePrompt`)."""
    def literal(text: str) -> str:   # inside a single-quoted Jinja string
        return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

    system = "" if prompt.system is None else f"<|im_start|>system\n{prompt.system}<|im_end|>\n"
    head = f"{system}<|im_start|>user\n{prompt.instruction} {prompt.query_label}"
    tail = f"{prompt.closing}<|im_end|>\n<|im_start|>assistant\n"
    return (PAIR_TEMPLATE.replace("HEAD", literal(head)).replace("MIDDLE", literal(prompt.candidate_label))
            .replace("TAIL", literal(tail)).replace("VISION", VISION_START + IMAGE_PAD + VISION_END))


def write_cross_encoder(path: str | Path, *, tokenizer, prompt: JudgePrompt, budget: ImageBudget,
                        image_processor) -> None:
    """Add the CrossEncoder's files to the Hugging Face folder ``path`` the reranker was saved into."""
    yes, no = answer_token_ids(tokenizer, prompt)
    write_folder(path, chat_template=pair_template(prompt), transformer_task="any-to-any",
                 outputs=("logits", "causal_logits"), budget=budget, image_processor=image_processor,
                 modules=[("1_LogitScore", "sentence_transformers.cross_encoder.modules.logit_score.LogitScore",
                           {"true_token_id": yes, "false_token_id": no, "module_input_name": "causal_logits"})],
                 model={"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.Sigmoid",
                        "prompts": {}, "default_prompt_name": None})
