"""Local lmms-eval tasks built offline: POPE-style and MME-style yes/no sets on the demo's synthetic scenes.

The task YAMLs reuse lmms-eval's own POPE and MME functions (prompt, scoring, aggregation); only the data is ours,
read from a `save_to_disk` folder (POPE-style) or a parquet file (MME-style), so nothing is downloaded. Used by the
tests and by `examples/eval_demo_pope.py`; `run_lmms_eval` runs `python -m lmms_eval` on such a folder.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Image, Value

SHORT_ANSWER_SUFFIX = "\\nAnswer the question using a single word or phrase."  # YAML double-quoted escape
POPE_FEATURES = Features(
    {"question_id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
     "category": Value("string")}
)
MME_FEATURES = Features(
    {"question_id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
     "category": Value("string")}
)
MME_CATEGORIES = ("existence", "count", "position", "color")

# A filter that keeps the first word when it is yes/no (any case, any trailing punctuation): the original POPE
# script (`eval_pope.py`) also reads "Yes." as yes, while lmms-eval's POPE scoring compares the lower-cased answer
# exactly. Optional: the scoring functions stay lmms-eval's.
YES_NO_FILTER = """filter_list:
  - name: "yes_no"
    filter:
      - function: "regex"
        regex_pattern: "(?i)^\\\\W*(yes|no)\\\\b"
      - function: "take_first"
"""


def pope_style_dataset(yes_no: Dataset) -> DatasetDict:
    """POPE's columns (`question_id`, `image`, `question`, `answer` yes/no, `category`) from the demo's
    `build_yes_no_eval(...)` rows (`id`, `image`, `question`, `answer`, `category`)."""
    data = {
        "question_id": list(yes_no["id"]),
        "image": list(yes_no["image"]),
        "question": list(yes_no["question"]),
        "answer": [answer.lower().strip(" .") for answer in yes_no["answer"]],
        "category": list(yes_no["category"]),
    }
    return DatasetDict({"test": Dataset.from_dict(data, features=POPE_FEATURES)})


def _there_is(colour: str, shape: str) -> str:
    return f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} in the image?"


def mme_style_dataset(num_images: int = 8, seed: int = 0, image_size: int = 64) -> DatasetDict:
    """MME's layout on synthetic scenes: per image two questions, one answered "Yes" and one "No", both ending in
    " Please answer yes or no."; categories cycle through existence, count, position and color (perception)."""
    from ..demo import scenes

    rng = random.Random(seed)
    rows = {name: [] for name in MME_FEATURES}
    for i in range(num_images):
        scene = scenes.random_scene(rng)
        category = MME_CATEGORIES[i % len(MME_CATEGORIES)]
        obj = rng.choice(scene.objects)
        if category == "existence":
            yes, no = (_there_is(*scenes.yes_no_pair(scene, rng, present)) for present in (True, False))
        elif category == "count":
            count = scene.count(obj.shape)
            wrong = rng.choice([n for n in range(1, scenes.MAX_OBJECTS + 1) if n != count])
            yes, no = (f"Does the image show exactly {n} {obj.shape}{'s' if n > 1 else ''}?" for n in (count, wrong))
        elif category == "position":
            occupied = {o.position for o in scene.objects if (o.shape, o.colour) == (obj.shape, obj.colour)}
            wrong = rng.choice([p for p in scenes.POSITIONS if p not in occupied])
            article = "an" if obj.colour[0] in "aeiou" else "a"
            yes, no = (f"Is there {article} {obj.colour} {obj.shape} at the {p}?" for p in (obj.position, wrong))
        else:  # color
            wrong = rng.choice([c for c in scenes.COLOURS if c != obj.colour])
            yes, no = (f"Is the object at the {obj.position} {c}?" for c in (obj.colour, wrong))
        image = scene.render(image_size)
        for question, answer in ((yes, "Yes"), (no, "No")):
            rows["question_id"].append(f"{category}/{i:04d}.png")
            rows["image"].append(image)
            rows["question"].append(f"{question} Please answer yes or no.")
            rows["answer"].append(answer)
            rows["category"].append(category)
    return DatasetDict({"test": Dataset.from_dict(rows, features=MME_FEATURES)})


def _generation_kwargs(max_new_tokens: int) -> str:
    return f"""generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
"""


POPE_UTILS = "lmms_eval.tasks.pope.utils"


def _write_pope_style_task(task_dir, dataset: DatasetDict, task: str, output_type: str, body: str,
                           post_prompt: str) -> Path:
    """Saves `dataset` (`save_to_disk`) and writes a task YAML on it with lmms-eval's POPE prompt and images, the
    `body` (target, scoring) in between; returns the YAML path."""
    task_dir = Path(task_dir).resolve()
    data_dir = task_dir / f"{task}_data"
    dataset.save_to_disk(str(data_dir))
    text = f"""task: "{task}"
dataset_path: "{data_dir}"
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: {output_type}
doc_to_visual: !function {POPE_UTILS}.pope_doc_to_visual
doc_to_text: !function {POPE_UTILS}.pope_doc_to_text
{body}lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post_prompt}"
metadata:
  - version: 0.0
"""
    path = task_dir / f"{task}.yaml"
    path.write_text(text)
    return path


def write_pope_task(
    task_dir: str | os.PathLike, dataset: DatasetDict, task: str = "aligngpt_pope_local",
    max_new_tokens: int = 16, yes_no_filter: bool = False, post_prompt: str = SHORT_ANSWER_SUFFIX,
) -> Path:
    """Writes `dataset` with `save_to_disk` and a task YAML that reuses lmms-eval's POPE functions; returns the
    YAML path. `yes_no_filter=True` adds `YES_NO_FILTER` (metrics then appear under the filter name `yes_no`).
    `post_prompt` follows the question (POPE's "\\nAnswer the question using a single word or phrase." by
    default; YAML double-quoted escapes, so "\\n" is a newline)."""
    metrics = "\n".join(
        f"  - metric: pope_{name}\n    aggregation: !function {POPE_UTILS}.pope_aggregate_{name}\n"
        f"    higher_is_better: true"
        for name in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
    )
    body = f"""doc_to_target: "answer"
{_generation_kwargs(max_new_tokens)}process_results: !function {POPE_UTILS}.pope_process_results
metric_list:
{metrics}
{YES_NO_FILTER if yes_no_filter else ""}"""
    return _write_pope_style_task(task_dir, dataset, task, "generate_until", body, post_prompt)


def write_choice_task(
    task_dir: str | os.PathLike, dataset: DatasetDict, task: str = "aligngpt_choice_local",
    post_prompt: str = SHORT_ANSWER_SUFFIX,
) -> Path:
    """Writes a POPE-style `dataset` with `save_to_disk` and a `multiple_choice` task YAML on it: the model's
    log-likelihood of "yes" and of "no" after POPE's prompt (lmms-eval's `loglikelihood` requests), scored by
    accuracy. Returns the YAML path."""
    body = """doc_to_choice: ["yes", "no"]
doc_to_target: "{{0 if answer == 'yes' else 1}}"
metric_list:
  - metric: acc
"""
    return _write_pope_style_task(task_dir, dataset, task, "multiple_choice", body, post_prompt)


def write_mme_task(
    task_dir: str | os.PathLike, dataset: DatasetDict, task: str = "aligngpt_mme_local", max_new_tokens: int = 16
) -> Path:
    """Writes `dataset["test"]` as parquet and a task YAML that reuses lmms-eval's MME functions (MME's default
    prompt: " Please answer yes or no." becomes "\\nAnswer the question using a single word or phrase.")."""
    task_dir = Path(task_dir).resolve()
    parquet = task_dir / f"{task}.parquet"
    dataset["test"].to_parquet(str(parquet))
    utils = "lmms_eval.tasks.mme.utils"
    text = f"""task: "{task}"
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: "{parquet}"
test_split: test
output_type: generate_until
doc_to_visual: !function {utils}.mme_doc_to_visual
doc_to_text: !function {utils}.mme_doc_to_text
doc_to_target: "answer"
{_generation_kwargs(max_new_tokens)}process_results: !function {utils}.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function {utils}.mme_aggregate_results
    higher_is_better: true
  - metric: mme_cognition_score
    aggregation: !function {utils}.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{SHORT_ANSWER_SUFFIX}"
metadata:
  - version: 0.0
"""
    path = task_dir / f"{task}.yaml"
    path.write_text(text)
    return path


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for an lmms-eval subprocess that must not reach the network."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_lmms_eval(
    pretrained: str | os.PathLike,
    tasks: list[str],
    include_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    batch_size: int = 1,
    model_args: str = "",
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict:
    """Runs `python -m lmms_eval --model aligngpt` in a subprocess and returns
    `{"results": <the results JSON>, "samples": {task: [logged samples]}, "log": <stdout + stderr>}`."""
    args = f"pretrained={pretrained}" + (f",{model_args}" if model_args else "")
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "aligngpt", "--model_args", args,
        "--tasks", ",".join(tasks), "--include_path", str(include_path), "--batch_size", str(batch_size),
        "--output_path", str(output_dir), "--log_samples", *extra_args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env or offline_env(), timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"lmms-eval failed (exit {proc.returncode}):\n{log[-6000:]}")
    found = sorted(glob.glob(os.path.join(str(output_dir), "**", "*_results.json"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"lmms-eval wrote no results under {output_dir}:\n{log[-6000:]}")
    results_path = found[-1]
    with open(results_path) as f:
        results = json.load(f)
    samples = {}
    for task in tasks:
        prefix = os.path.basename(results_path)[: -len("_results.json")]
        files = glob.glob(os.path.join(os.path.dirname(results_path), f"{prefix}_samples_{task}.jsonl"))
        if files:
            with open(files[0]) as f:
                samples[task] = [json.loads(line) for line in f if line.strip()]
    return {"results": results, "samples": samples, "log": log}


__all__ = [
    "pope_style_dataset",
    "mme_style_dataset",
    "write_pope_task",
    "write_choice_task",
    "write_mme_task",
    "offline_env",
    "run_lmms_eval",
    "YES_NO_FILTER",
]
