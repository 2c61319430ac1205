"""Per-benchmark prompts of the original AlignGPT (= LLaVA-1.5) evaluation, where lmms-eval's default differs.

lmms-eval builds each question with the task's `doc_to_text` and the `default` entry of its
`lmms_eval_specific_kwargs` (there is no `aligngpt` entry, so every task falls back to `default`). For the 12
benchmarks of the paper that default already carries the suffix of the original evaluation, except in five places,
which `AlignGPTLmmsEval` rebuilds from the task's document with `prompt_style="aligngpt"` (the default).

Kept as lmms-eval builds them (its `default` already is the original prompt):
- `vqav2_*`, `gqa`, `pope*`: `{q}\\nAnswer the question using a single word or phrase.`
- `mme`: " Please answer yes or no." replaced by "\\nAnswer the question using a single word or phrase.", which is
  what LLaVA-1.5's `llava_mme.jsonl` holds (its `convert_answer_to_mme.py` swaps them back for scoring).
- `scienceqa_img`, `seedbench`: options + `\\nAnswer with the option's letter from the given choices directly.`
- `llava_in_the_wild`: the bare question.

Rebuilt (lmms-eval default -> original prompt):
- `textvqa_*`: `{Q}\\nAnswer ...` (capitalised, no OCR tokens) -> `{q}\\nReference OCR token: {tokens}\\nAnswer the
  question using a single word or phrase.` (`llava_textvqa_val_v051_ocr.jsonl`).
- `mmbench_en_*`: `{hint} {q} {options}\\n\\nAnswer with ...` -> `{hint}\\n{q}\\nA. ..\\nB. ..\\nAnswer with the
  option's letter from the given choices directly.` (`model_vqa_mmbench.py --single-pred-prompt`).
- `mmbench_cn_*`: same, with `请直接回答选项字母。` (`--lang cn`) instead of lmms-eval's
  `请直接使用所提供的选项字母作为答案回答。`.
- `mmbench_en_dev_static`, `mmbench_{en,cn}_dev_lite`: as `mmbench_{en,cn}_*` (the same documents, other scoring).
- `mmvet`: "First please perform reasoning, and think step by step ..." + q -> the bare question
  (`llava-mm-vet.jsonl`).
- `vizwiz_vqa_*`: lmms-eval `capitalize()`s the question, which also lower-cases all but its first letter ("Is this
  pepsi or coke? i can't ...") -> the question as given + `\\nWhen the provided information is insufficient, respond
  with 'Unanswerable'.\\nAnswer the question using a single word or phrase.` (`llava_vizwiz_test.jsonl`).

Image preprocessing: the original scripts pad every image to a square (`process_images` with
`image_aspect_ratio="pad"`) except ScienceQA, LLaVA-Bench (in the wild) and MM-Vet (`model_vqa_science.py` and
`model_vqa.py` call the image processor directly: resize the shortest side and centre-crop);
`ORIGINAL_ASPECT_TASKS` lists those tasks for `image_aspect_ratio="auto"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER_EN = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"


def _is_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


def mmbench_prompt(doc: dict, instruction: str = OPTION_LETTER_EN) -> str:
    """`model_vqa_mmbench.py --single-pred-prompt`: hint, question, options A-D one per line, instruction."""
    question = doc["question"]
    if not _is_none(doc.get("hint")):
        question = f"{doc['hint']}\n{question}"
    for letter in "ABCD":
        option = doc.get(letter)
        if _is_none(option):
            break
        question += f"\n{letter}. {option}"
    return f"{question}\n{instruction}"


def mmbench_cn_prompt(doc: dict) -> str:
    return mmbench_prompt(doc, OPTION_LETTER_CN)


def textvqa_prompt(doc: dict) -> str:
    """`llava_textvqa_val_v051_ocr.jsonl`: the question as given, the OCR tokens (when any), the short-answer suffix."""
    question = doc["question"]
    tokens = doc.get("ocr_tokens") or []
    if tokens:
        question += "\nReference OCR token: " + ", ".join(tokens)
    return f"{question}\n{SHORT_ANSWER}"


def bare_question(doc: dict) -> str:
    return doc["question"]


VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'."


def vizwiz_prompt(doc: dict) -> str:
    """`llava_vizwiz_test.jsonl`: the question as asked (its case kept), the unanswerable hint, the short-answer
    suffix."""
    return f"{doc['question']}\n{VIZWIZ_SUFFIX}\n{SHORT_ANSWER}"


ORIGINAL_PROMPTS: dict[str, Callable[[dict], str]] = {
    "mmbench_en_dev": mmbench_prompt,
    "mmbench_en_dev_static": mmbench_prompt,
    "mmbench_en_dev_lite": mmbench_prompt,
    "mmbench_en_test": mmbench_prompt,
    "mmbench_cn_dev": mmbench_cn_prompt,
    "mmbench_cn_dev_lite": mmbench_cn_prompt,
    "mmbench_cn_test": mmbench_cn_prompt,
    "textvqa_val": textvqa_prompt,
    "textvqa_test": textvqa_prompt,
    "mmvet": bare_question,
    "vizwiz_vqa_val": vizwiz_prompt,
    "vizwiz_vqa_val_lite": vizwiz_prompt,
    "vizwiz_vqa_test": vizwiz_prompt,
}

ORIGINAL_ASPECT_TASKS = frozenset({"scienceqa_img", "scienceqa", "scienceqa_full", "llava_in_the_wild", "mmvet"})


def original_prompt(task: str, doc: dict) -> str | None:
    """The original evaluation's question text for `task`'s `doc`, or None where lmms-eval's default is kept."""
    builder = ORIGINAL_PROMPTS.get(task)
    return None if builder is None else builder(doc)


__all__ = [
    "SHORT_ANSWER",
    "OPTION_LETTER_EN",
    "OPTION_LETTER_CN",
    "ORIGINAL_PROMPTS",
    "ORIGINAL_ASPECT_TASKS",
    "mmbench_prompt",
    "mmbench_cn_prompt",
    "textvqa_prompt",
    "vizwiz_prompt",
    "bare_question",
    "original_prompt",
]
