"""Model cards and pushing AlignGPT checkpoints to the Hugging Face Hub.

`prepare_push_folder` writes exactly what `push_to_hub` uploads, without any network access:

- the weights and `config.json` (`model.save_pretrained`, which also copies `configuration_aligngpt.py` and
  `modeling_aligngpt.py` next to them and records them in `auto_map`),
- the processor (`processor_config.json`, tokenizer, chat template, `processing_aligngpt.py`),
- `README.md`: a model card rendered from the package's template (`model_cards/template.md`) with YAML metadata
  (license, base models, datasets, `pipeline_tag: image-text-to-text`, `library_name: transformers`, tags and a
  `model-index` for evaluation results) and the training setup, alignment levels, gate statistics and results,
- `aligngpt_card_info.json`: the facts the card was filled with, so that a later push keeps them.

The folder therefore loads with `trust_remote_code=True` on a machine without this package.

Card facts come from an `aligngpt_card_info.json` in the checkpoint folder (the demo writes one) and from keyword
arguments, which take precedence. Its keys, all optional:

    {"model_name": str, "summary": str, "license": str, "base_models": [str], "datasets": [str], "tags": [str],
     "training": {phase name: {setting: value}},
     "alignment_levels": [{"level": 0, ...one row per level...}],
     "gate_statistics": {"mean": [w_0, ..., w_{N-2}], "std": [...], "num_samples": int, "source": str},
     "eval_results": see `normalize_eval_results`,
     "example_question": str,
     "source": {"converted_from": str, "language_model": str, "vision_tower": str}}

`source` is written by `aligngpt convert`: what the checkpoint was converted from and its base models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

CARD_INFO_FILENAME = "aligngpt_card_info.json"
REMOTE_CODE_FILES = ("configuration_aligngpt.py", "modeling_aligngpt.py", "processing_aligngpt.py")
DEFAULT_TAGS = ("aligngpt", "llava", "vision-language", "multimodal", "custom_code")
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_QUESTION = "What is shown in the image?"
CARD_INFO_KEYS = (
    "model_name", "summary", "license", "base_models", "datasets", "tags", "training", "alignment_levels",
    "gate_statistics", "eval_results", "example_question", "source",
)
SOURCE_ROWS = {"converted_from": "converted from", "language_model": "base language model",
               "vision_tower": "base vision tower"}
CONVERTED_SUMMARY_PREFIXES = ("Converted from the original AlignGPT", "Built by `aligngpt convert`")

logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """The Hub could not be reached, or refused the upload (one line, naming the endpoint)."""


def template_path() -> Path:
    """The card template that ships with the package (`transformers_aligngpt/model_cards/template.md`)."""
    return Path(str(resources.files("transformers_aligngpt") / "model_cards" / "template.md"))


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) < 1e-3 and value != 0:  # learning rates and the like: 2e-05
            return f"{value:.4g}"
        # at most 4 decimals, every integer digit kept (an MME score of 1527.4 stays 1527.4, not 1527)
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; columns default to the union of the rows' keys, in first-seen order."""
    rows = list(rows)
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- card sections
def architecture_rows(config, num_parameters: int | None = None,
                      source: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    vision, text = config.vision_config, config.text_config
    rows = [{"part": SOURCE_ROWS[key], "value": f"`{value}`"} for key, value in (source or {}).items()
            if key in SOURCE_ROWS and value]
    rows += [
        {"part": "vision tower", "value": f"{vision.model_type}: {vision.num_hidden_layers} layers, width "
         f"{vision.hidden_size}, {vision.image_size} px, patch {vision.patch_size}"},
        {"part": "image features", "value": f"{config.num_image_tokens} tokens per image from layer "
         f"{config.vision_feature_layer} ({config.vision_feature_select_strategy})"},
        {"part": "projector", "value": config.projector_type},
        {"part": "language model", "value": f"{text.model_type}: {text.num_hidden_layers} layers, width "
         f"{text.hidden_size}, vocabulary {text.vocab_size}"},
        {"part": "alignment levels", "value": f"{config.num_alignment_levels} (level "
         f"{config.num_alignment_levels - 1} = global)"},
        {"part": "gate", "value": f"Linear({config.num_image_tokens}, {config.alignment_gate_hidden_size}), GELU, "
         f"Linear({config.alignment_gate_hidden_size}, {config.num_alignment_levels - 1}), softmax"},
        {"part": "alignment mode", "value": config.alignment_mode
         + (f" (level {config.fixed_alignment_level})" if config.alignment_mode == "fixed" else "")},
        {"part": "gate text", "value": config.gate_text_scope},
    ]
    if num_parameters is not None:
        rows.append({"part": "parameters", "value": f"{num_parameters:,}"})
    return rows


def training_section(training: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Settings as rows, phases as columns."""
    if not training:
        return "No training information was recorded for this checkpoint."
    phases = list(training)
    settings = list(dict.fromkeys(key for phase in phases for key in training[phase]))
    rows = [{"setting": key, **{phase: training[phase].get(key) for phase in phases}} for key in settings]
    return markdown_table(rows, ["setting", *phases])


def levels_section(levels: list[Mapping[str, Any]] | None, num_levels: int) -> str:
    if not levels:
        return (f"{num_levels} levels. No level statistics were recorded (`aligngpt pretrain --data` records the pairs "
                "per level of its data, scored and bucketed by `aligngpt levels`).")
    return (f"Pre-training pairs were ranked by CLIP score and cut into {num_levels} equal-count levels "
            f"(level {num_levels - 1} = best aligned):\n\n" + markdown_table(levels))


def gate_section(gate: Mapping[str, Any] | None) -> str:
    if not gate or not gate.get("mean"):
        return "No gate statistics were recorded."
    mean, std = list(gate["mean"]), list(gate.get("std") or [])
    rows = [{"level": i, "mean weight": m, **({"std": std[i]} if i < len(std) else {})} for i, m in enumerate(mean)]
    where = gate.get("source") or "held-out questions"
    count = gate.get("num_samples")
    intro = (f"Weights of the gate over the local levels 0..{len(mean) - 1} (softmax, summing to 1), averaged over "
             f"{count if count is not None else 'the'} {where}; the global level is always added with weight 1.")
    return intro + "\n\n" + markdown_table(rows)


def normalize_eval_results(results: Any) -> list[dict[str, Any]]:
    """Evaluation results as rows `{"task", "metric", "value"}` (+ optional `dataset_name`, `split`).

    Accepted: such a list; `{task: {metric: value}}`; `{task: value}` (metric "score"); an lmms-eval results file
    (`{"results": {task: {"metric,filter": value, ...}}}`: stderr entries and non-numbers are dropped).
    """
    if not results:
        return []
    if isinstance(results, Mapping) and "results" in results and isinstance(results["results"], Mapping):
        results = results["results"]
    rows = []
    if isinstance(results, Mapping):
        for task, metrics in results.items():
            if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
                rows.append({"task": task, "metric": "score", "value": float(metrics)})
                continue
            if not isinstance(metrics, Mapping):
                raise TypeError(f"evaluation results for {task!r} must be a number or a mapping, got {metrics!r}")
            for metric, value in metrics.items():
                name = metric.split(",")[0]
                # lmms-eval writes `<metric>_stderr` and `<metric>_stderr_clt` (standard errors, not metrics)
                if "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                rows.append({"task": task, "metric": name, "value": float(value)})
    else:
        for row in results:
            if not {"task", "metric", "value"} <= set(row):
                raise ValueError(f"each evaluation result needs 'task', 'metric' and 'value', got {row!r}")
            rows.append(dict(row))
    return rows


def eval_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No evaluation results were recorded for this checkpoint."
    return markdown_table(rows, [c for c in ("task", "dataset_name", "split", "metric", "value")
                                 if any(c in row for row in rows)])


# ---------------------------------------------------------------------------------------------- the card
def build_model_card(
    config,
    repo_id: str,
    *,
    model_name: str | None = None,
    summary: str = "",
    license: str = DEFAULT_LICENSE,
    base_models: Iterable[str] = (),
    datasets: Iterable[str] = (),
    tags: Iterable[str] = (),
    training: Mapping[str, Mapping[str, Any]] | None = None,
    alignment_levels: list[Mapping[str, Any]] | None = None,
    gate_statistics: Mapping[str, Any] | None = None,
    eval_results: Any = None,
    example_question: str = DEFAULT_QUESTION,
    example_image: str = "image.png",
    num_parameters: int | None = None,
    template: str | Path | None = None,
    source: Mapping[str, Any] | None = None,
):
    """A `huggingface_hub.ModelCard` for an AlignGPT checkpoint, rendered from the package's template.

    Args:
        config: the model's `AlignGPTConfig` (architecture table, number of levels).
        repo_id: where the card will live (`user/name`), used in the usage snippet; a local folder works too.
        base_models / datasets: Hub ids for the YAML metadata (`base_model`, `datasets`).
        training / alignment_levels / gate_statistics / eval_results / source: see the module docstring.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from . import __version__

    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    rows = normalize_eval_results(eval_results)
    card_data = ModelCardData(
        license=license,
        base_model=list(base_models) or None,
        datasets=list(datasets) or None,
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type="image-text-to-text",
                dataset_type=row["task"],
                dataset_name=row.get("dataset_name") or row["task"],
                dataset_split=row.get("split"),
                metric_type=row["metric"],
                metric_value=row["value"],
            )
            for row in rows
        ] or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        repo_id=repo_id,
        model_name=model_name,
        summary=summary,
        num_levels=config.num_alignment_levels,
        # a Python literal: questions hold quotes and newlines (LLaVA's "\nAnswer the question using ...")
        example_question_literal=repr(example_question),
        example_image=example_image,
        architecture_table=markdown_table(architecture_rows(config, num_parameters, source), ["part", "value"]),
        training_section=training_section(training),
        levels_section=levels_section(alignment_levels, config.num_alignment_levels),
        gate_section=gate_section(gate_statistics),
        eval_section=eval_section(rows),
        package_version=__version__,
    )


def load_card_info(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Card facts from a mapping, a JSON file, or a checkpoint folder holding `aligngpt_card_info.json`."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        info = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / CARD_INFO_FILENAME
            if not path.exists():
                return {}
        info = json.loads(path.read_text(encoding="utf-8"))
    unknown = set(info) - set(CARD_INFO_KEYS)
    if unknown:
        raise ValueError(f"unknown card info keys {sorted(unknown)}; known keys: {', '.join(CARD_INFO_KEYS)}")
    return info


def save_card_info(folder: str | Path, info: Mapping[str, Any]) -> None:
    """Writes the card facts as `folder/aligngpt_card_info.json`, which `load_card_info(folder)` reads back."""
    (Path(folder) / CARD_INFO_FILENAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- checks
def check_repo_id(repo_id: str) -> str:
    """`user/name` as the Hub accepts it (ValueError saying what is wrong otherwise)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if "/" not in repo_id.strip("/"):
        raise ValueError(f"must look like user/name, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid repo id ({str(error).splitlines()[0]})") from None
    return repo_id


def check_push_model(model) -> None:
    """A checkpoint folder given to push is a whole AlignGPT checkpoint of this package's format (ValueError
    otherwise). Reads config.json only; a Hub id or a model object is checked when it is loaded."""
    if not isinstance(model, (str, Path)) or not Path(model).is_dir():
        return
    folder = Path(model)
    if (folder / "adapter_config.json").exists():
        raise ValueError(
            f"{model} is a LoRA adapter, not a whole model: push the merged model instead (`aligngpt sft --merge` "
            "writes it to <output>/merged; `transformers_aligngpt.training.merge_qlora_adapter` merges a saved one)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{model} has no config.json: not a checkpoint folder")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type == "aligngpt" and "text_config" not in config and any(key.startswith("mm_") for key in config):
        raise ValueError(
            f"{model} is a checkpoint of the original AlignGPT release format (LLaVA-style mm_* keys): convert it "
            f"first (`aligngpt convert --checkpoint {model} --output DIR`), then push DIR"
        )
    if model_type != "aligngpt":
        raise ValueError(f"{model} is not an AlignGPT checkpoint (config.json has model_type {model_type!r})")


def check_staging_dir(folder: str | Path | None) -> None:
    """The staging folder is uploaded as it is: it must be new or empty, or stray files would be published."""
    if folder is None:
        return
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(
            f"staging folder {folder} is not empty: everything in it is uploaded, so files already there would be "
            "published too. Give a new or empty folder."
        )


def is_converted(info: Mapping[str, Any]) -> bool:
    """Card facts of a checkpoint made by `aligngpt convert` (also folders converted before `source` existed)."""
    return bool(info.get("source")) or str(info.get("summary") or "").startswith(CONVERTED_SUMMARY_PREFIXES)


def license_warning(info: Mapping[str, Any]) -> str | None:
    """A converted checkpoint whose card would only get the apache-2.0 fallback: its weights are under the base
    models' licenses (Llama 2 Community License for Vicuna v1.5, the base of AlignGPT-7B/13B)."""
    if info.get("license") or not is_converted(info):
        return None
    return (f"the card's license is the {DEFAULT_LICENSE} fallback, but this checkpoint was converted from the "
            "original release, whose weights carry their base models' licenses (AlignGPT-7B/13B: Vicuna v1.5, "
            "Llama 2 Community License): pass --license (e.g. llama2)")


def _checkpoint_card_info(model) -> str | None:
    """Where the card facts of a checkpoint given by name are: its folder, or the file in its Hub repo (None when
    the repo has none or cannot be reached: the card is then built from the config and the arguments)."""
    if Path(model).is_dir():
        return str(model)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(str(model), CARD_INFO_FILENAME)
    except Exception:  # noqa: BLE001  (no such file or repo, offline, no access: all mean "no recorded facts")
        return None


def _load_model_and_processor(model, processor):
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from . import AlignGPTConfig  # noqa: F401  (registers AlignGPT with the Auto classes)

        path = str(model)
        if processor is None:
            try:
                processor = AutoProcessor.from_pretrained(path)
            except OSError as error:
                raise ValueError(
                    f"cannot load the processor from {path} ({error}): save the processor next to the model, or "
                    "pass it (processor=...)"
                ) from error
        model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")
    if processor is None:
        raise ValueError("pass the processor (or a checkpoint folder that holds one): the repo needs it to load")
    return model, processor


def prepare_push_folder(
    model,
    folder: str | Path,
    repo_id: str,
    *,
    processor=None,
    card_info: str | Path | Mapping[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
    **card_kwargs,
) -> Path:
    """Writes what `push_to_hub` uploads into `folder` and returns it (no network access).

    Args:
        model: an `AlignGPTForConditionalGeneration` (then also pass `processor`) or a checkpoint folder.
        folder: the staging folder (created; it must be new or empty, as all of it is uploaded).
        repo_id: the target repo, written into the card's usage snippet.
        card_info: facts for the card (see the module docstring); by default the checkpoint folder's
            `aligngpt_card_info.json` when `model` is a folder. `card_kwargs` override single facts.
    """
    check_push_model(model)
    check_staging_dir(folder)
    if card_info is None and isinstance(model, (str, Path)):
        card_info = _checkpoint_card_info(model)
    info = {**load_card_info(card_info), **{k: v for k, v in card_kwargs.items() if v is not None}}
    if info.get("eval_results") is not None:  # the normalised rows only (a results file also holds local paths)
        info["eval_results"] = normalize_eval_results(info["eval_results"])
    unknown = set(info) - set(CARD_INFO_KEYS)
    if unknown:
        raise TypeError(f"unexpected card arguments {sorted(unknown)}; known: {', '.join(CARD_INFO_KEYS)}")
    warning = license_warning(info)
    if warning:
        logger.warning("Warning: %s.", warning)
    model, processor = _load_model_and_processor(model, processor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).exists()]
    config = json.loads((folder / "config.json").read_text())
    if missing or "AutoModelForImageTextToText" not in config.get("auto_map", {}):
        raise RuntimeError(
            f"the staged checkpoint lacks its remote code ({', '.join(missing) or 'auto_map'}): load the model "
            "through `transformers_aligngpt` (importing it registers the code with save_pretrained)"
        )
    card = build_model_card(
        model.config, repo_id, num_parameters=sum(p.numel() for p in model.parameters()), **info
    )
    card.save(folder / "README.md")
    save_card_info(folder, info)
    return folder


def push_to_hub(
    model,
    repo_id: str,
    *,
    processor=None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload AlignGPT model, processor, remote code and model card",
    staging_dir: str | Path | None = None,
    card_info: str | Path | Mapping[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
    **card_kwargs,
):
    """Stages the checkpoint with `prepare_push_folder` and uploads it with `huggingface_hub` (one commit).

    Returns the `CommitInfo` (its `.commit_url` / `.repo_url` say where it went). The token comes from `token`,
    `HF_TOKEN` or `hf auth login`. The repo id, the model folder and the staging folder are checked first, then the
    repo is created (which finds an unreachable Hub or a bad token before minutes of staging), then staged and
    uploaded. Network and Hub errors are raised as `HubPushError` (one line, naming the endpoint).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    check_push_model(model)
    check_staging_dir(staging_dir)
    api = HfApi(token=token)
    with _hub_errors(api):
        api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aligngpt-push-") as tmp:
        folder = prepare_push_folder(
            model, staging_dir or tmp, repo_id, processor=processor, card_info=card_info,
            max_shard_size=max_shard_size, **card_kwargs,
        )
        with _hub_errors(api):
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )


def _is_network_error(error: BaseException) -> bool:
    # HfHubHTTPError and requests' errors are OSErrors; httpx's (huggingface_hub >= 1 uses httpx, or a vendored
    # copy named httpx2) are not, so they are recognised by their module
    return isinstance(error, OSError) or any(
        cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") for cls in type(error).__mro__
    )


@contextlib.contextmanager
def _hub_errors(api):
    """Turns a network or Hub error of the block into a one-line HubPushError naming the endpoint."""
    endpoint = getattr(api, "endpoint", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        yield
    except Exception as error:
        if not _is_network_error(error):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HubPushError(f"the Hub at {endpoint} cannot be reached or refused the request "
                           f"({type(error).__name__}: {reason}); check HF_ENDPOINT, the network and the token") from error


__all__ = [
    "CARD_INFO_FILENAME",
    "HubPushError",
    "build_model_card",
    "check_push_model",
    "check_repo_id",
    "check_staging_dir",
    "license_warning",
    "load_card_info",
    "markdown_table",
    "normalize_eval_results",
    "prepare_push_folder",
    "push_to_hub",
    "save_card_info",
    "template_path",
]
