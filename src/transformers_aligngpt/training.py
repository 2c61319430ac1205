"""Training AlignGPT with transformers' `Trainer` (phase 1) and TRL's `SFTTrainer` (phase 2), PEFT and bitsandbytes.

Phase 1 (pre-training): [`AlignGPTPretrainer`] trains the projector and the alignment embeddings only, on image-caption
pairs in the plain format with one alignment level per pair, and writes the phase-1 artefact
(`mm_projector_align.safetensors`: projector + alignment embeddings) next to every checkpoint.

Phase 2 (instruction tuning): [`make_sft_trainer`] returns a TRL `SFTTrainer` on `messages` + `images` data, with the
alignment embeddings and the vision tower frozen and the gate, the projector and the LLM trained (fully, or with LoRA
on the LLM and the gate and projector in `modules_to_save`; QLoRA with [`load_for_qlora`]). It checks the options
before training starts.

Nothing here runs a training loop: `Trainer`, `SFTTrainer`, PEFT and bitsandbytes do.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from .collators import (
    AlignGPTInstructionCollator,
    AlignGPTPretrainingCollator,
)
from .configuration_aligngpt import GATE_TEXT_SCOPES, AlignGPTConfig

logger = logging.getLogger(__name__)

#: The LLM's linear projections under their Llama / Mistral / Qwen2 / Gemma names (a regex PEFT matches against full
#: module names). Not the default of [`aligngpt_lora_config`], which finds the linear layers whatever their names;
#: kept for tools that take one regex (`trl sft --lora_target_modules`).
LLM_LORA_TARGET_MODULES = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: Default LoRA targets: PEFT's "all-linear" takes every linear layer of the model (not `lm_head`), whatever the
#: architecture calls it (Phi-3's fused `qkv_proj` / `gate_up_proj`, Phi's `dense` / `fc1` / `fc2`, ...) ...
LORA_TARGET_MODULES = "all-linear"
#: ... and this regex (matched against full module names) leaves out everything outside the LLM: the vision tower
#: stays frozen, the projector and the gate are trained fully (`modules_to_save`).
LORA_EXCLUDED_MODULES = r"(?!model\.language_model\.).*"
#: Trained fully next to LoRA in phase 2.
LORA_MODULES_TO_SAVE = ("multi_modal_projector", "alignment_gate")
#: Kept out of quantisation by [`qlora_bnb_config`] (full module paths: bitsandbytes matches them from the start).
NOT_QUANTIZED_MODULES = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.alignment_embeddings",
    "model.alignment_gate",
    "lm_head",
)
#: Trained in phase 1.
PRETRAINING_MODULES = ("multi_modal_projector", "alignment_embeddings")
#: File name of the phase-1 artefact (the original writes `mm_projector_align.bin` with its own key names).
PRETRAINING_ARTIFACT_NAME = "mm_projector_align.safetensors"
ORIGINAL_PRETRAINING_ARTIFACT_NAME = "mm_projector_align.bin"


# --------------------------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------------------------


def _base_model(model) -> torch.nn.Module:
    """The `AlignGPTModel` inside a head model, a PEFT model or a DDP wrapper."""
    for module in model.modules():
        if hasattr(module, "alignment_embeddings") and hasattr(module, "vision_tower"):
            return module
    raise TypeError(f"{type(model).__name__} is not an AlignGPT model (no alignment_embeddings found).")


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def freeze_for_pretraining(model: torch.nn.Module) -> list[str]:
    """Phase 1: only the projector and the alignment embeddings are trained. Returns the trainable parameter names."""
    base = _base_model(model)
    model.requires_grad_(False)
    for name in PRETRAINING_MODULES:
        getattr(base, name).requires_grad_(True)
    return trainable_parameter_names(model)


def freeze_for_instruction_tuning(model: torch.nn.Module, train_language_model: bool = True) -> list[str]:
    """Phase 2 without LoRA: vision tower and alignment embeddings frozen; gate, projector (and the LLM with its head
    unless `train_language_model=False`) trained. Returns the trainable parameter names."""
    base = _base_model(model)
    model.requires_grad_(train_language_model)
    base.vision_tower.requires_grad_(False)
    base.alignment_embeddings.requires_grad_(False)
    base.multi_modal_projector.requires_grad_(True)
    base.alignment_gate.requires_grad_(True)
    return trainable_parameter_names(model)


# --------------------------------------------------------------------------------------------------------------------
# QLoRA
# --------------------------------------------------------------------------------------------------------------------


def qlora_bnb_config(
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip_modules: Iterable[str] = NOT_QUANTIZED_MODULES,
) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantisation and bf16 compute for the LLM; the vision tower, projector, gate, alignment
    embeddings and `lm_head` stay in `compute_dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules),
    )


def aligngpt_lora_config(
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str | list[str] | None = None,
    modules_to_save: Iterable[str] | None = LORA_MODULES_TO_SAVE,
    **kwargs,
):
    """LoRA on every linear layer of the LLM (any decoder: Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, ...); the gate and
    the projector are trained fully (`modules_to_save`), the vision tower not at all.

    `target_modules` (PEFT's: names, a regex, or "all-linear") replaces the default, and then nothing is excluded
    unless `exclude_modules` is given.
    """
    from peft import LoraConfig

    if target_modules is None:
        target_modules = LORA_TARGET_MODULES
        kwargs.setdefault("exclude_modules", LORA_EXCLUDED_MODULES)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("bias", "none")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
        **kwargs,
    )


def load_for_qlora(
    model_name_or_path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.bfloat16,
    quantization_config: BitsAndBytesConfig | None = None,
    **kwargs,
) -> PreTrainedModel:
    """An AlignGPT checkpoint with its LLM in 4-bit NF4 ([`qlora_bnb_config`]), everything else in `compute_dtype`.

    Unlike `peft.prepare_model_for_kbit_training`, nothing is upcast to fp32 (the frozen vision tower and `lm_head`
    stay in bf16); `SFTTrainer` enables activation checkpointing and the input gradients it needs.
    """
    kwargs.setdefault("dtype", compute_dtype)
    return AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, quantization_config=quantization_config or qlora_bnb_config(compute_dtype), **kwargs
    )


def is_quantized_module(module: torch.nn.Module) -> bool:
    """Whether `module` or one of its children holds bitsandbytes-quantised weights."""
    for child in module.modules():
        for parameter in child.parameters(recurse=False):
            if type(parameter).__name__ in ("Params4bit", "Int8Params") or parameter.dtype in (torch.uint8, torch.int8):
                return True
    return False


def load_qlora_adapter(
    model_name_or_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.bfloat16,
    quantization_config: BitsAndBytesConfig | None = None,
    is_trainable: bool = False,
):
    """The 4-bit base with a saved QLoRA adapter, computing exactly as in training.

    TRL trains the adapter (and the `modules_to_save` copies) of a quantised model in bf16; PEFT would load them in
    fp32. They are cast back to `compute_dtype` here, so the outputs match the trained model's bit for bit.
    """
    from peft import PeftModel

    base = load_for_qlora(model_name_or_path, compute_dtype, quantization_config)
    model = PeftModel.from_pretrained(base, adapter_path, is_trainable=is_trainable)
    for name, parameter in model.named_parameters():
        if ("lora_" in name or "modules_to_save" in name) and parameter.is_floating_point():
            parameter.data = parameter.data.to(compute_dtype)
    return model


def merge_qlora_adapter(
    model_name_or_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.bfloat16,
    dequantize: bool = True,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """A plain (unquantised) AlignGPT model with a QLoRA adapter merged in, ready for `save_pretrained`.

    With `dequantize=True` (the default) the base is loaded exactly as in training (4-bit) and dequantised before the
    merge, so the merged model computes what the quantised model + adapter computed. `dequantize=False` merges into the
    original `compute_dtype` weights instead (what you want when the full-precision base is better than its NF4 copy).
    """
    from peft import PeftModel

    if dequantize:
        base = load_for_qlora(model_name_or_path, compute_dtype, quantization_config)
        base = base.dequantize(dtype=compute_dtype)
        # the weights kept in fp32 by the 4-bit load (projector, alignment table, gate) follow, as a saved model in
        # compute_dtype has them; buffers do not: `Module.to` would also round RoPE's fp32 `inv_freq`, whose angles
        # then drift with the position (a reloaded checkpoint rebuilds it in fp32)
        for parameter in base.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(compute_dtype)
    else:
        base = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=compute_dtype)
    return PeftModel.from_pretrained(base, adapter_path).merge_and_unload()


# --------------------------------------------------------------------------------------------------------------------
# Phase-1 artefact
# --------------------------------------------------------------------------------------------------------------------

_ORIGINAL_ARTIFACT_KEYS = (
    (re.compile(r"^(?:model\.)?mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^(?:model\.)?mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^(?:model\.)?mm_projector\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^(?:model\.)?align_indicators\.indicator_embs$"), "model.alignment_embeddings.weight"),
)


def pretraining_state_dict(model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The phase-1 weights (`model.multi_modal_projector.*`, `model.alignment_embeddings.weight`) of a model or of its
    state dict, detached, contiguous and on the CPU."""
    state_dict = (
        model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    )
    prefixes = tuple(f"model.{name}." for name in PRETRAINING_MODULES)
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in state_dict.items()
        if key.startswith(prefixes)
    }


def save_pretraining_artifact(
    model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor], output_dir: str | os.PathLike
) -> Path | None:
    """Writes `mm_projector_align.safetensors` (projector + alignment embeddings) to `output_dir`."""
    weights = pretraining_state_dict(model_or_state_dict)
    if not any(key.startswith("model.alignment_embeddings") for key in weights):
        logger.warning("No alignment embeddings in the state dict; the phase-1 artefact is not written.")
        return None
    path = Path(output_dir) / PRETRAINING_ARTIFACT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"format": "pt", "aligngpt": "phase-1 artefact"})
    return path


def load_pretraining_artifact(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Loads a phase-1 artefact into `model` (this package's safetensors, or the original `mm_projector_align.bin`).

    `path` is the file or a folder holding it. Returns the loaded keys.
    """
    path = Path(path)
    if path.is_dir():
        for name in (PRETRAINING_ARTIFACT_NAME, ORIGINAL_PRETRAINING_ARTIFACT_NAME):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"No {PRETRAINING_ARTIFACT_NAME} or {ORIGINAL_PRETRAINING_ARTIFACT_NAME} in {path}."
            )
    state_dict = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _ORIGINAL_ARTIFACT_KEYS:
            if pattern.search(key):
                key = pattern.sub(replacement, key)
                break
        renamed[key] = value
    target = _base_model(model)
    own = target.state_dict()
    # under DeepSpeed ZeRO-3 the parameters are partitioned (empty here): their full shape is `ds_shape`
    parameters = dict(target.named_parameters())
    shapes = {key: tuple(getattr(parameters.get(key), "ds_shape", None) or value.shape) for key, value in own.items()}
    expected = {key for key in own if key.startswith(tuple(f"{name}." for name in PRETRAINING_MODULES))}
    loaded = {key.removeprefix("model."): value for key, value in renamed.items()}
    missing = sorted(expected - set(loaded))
    unexpected = sorted(set(loaded) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a phase-1 artefact for this model: missing {missing}, unexpected {unexpected}."
        )
    for key, value in loaded.items():
        if shapes[key] != tuple(value.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {shapes[key]}.")
    partitioned = [parameters[key] for key in loaded if hasattr(parameters.get(key), "ds_id")]
    if partitioned:  # ZeRO-3: gather the full tensors, write them, and let DeepSpeed partition them again
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            target.load_state_dict(loaded, strict=False)
    else:
        target.load_state_dict(loaded, strict=False)
    return sorted(f"model.{key}" for key in loaded)


# --------------------------------------------------------------------------------------------------------------------
# Dataset checks
# --------------------------------------------------------------------------------------------------------------------


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset without known features
        names = list(next(iter(dataset)).keys())
    return list(names)


def validate_pretraining_dataset(
    dataset, num_alignment_levels: int, level_column: str = "alignment_level", warn_missing_top_level: bool = True
) -> None:
    """Raises `ValueError` when a row has no alignment level, a level that is not an integer, or one outside 0..N-1
    (read from Arrow, images are not decoded). For an `IterableDataset`, the first row is checked and the collator
    checks the rest.

    With `warn_missing_top_level` (the training data), logs a warning when no row has the top level N-1: its
    embedding, which inference adds to every image, would then never be trained.
    """
    if dataset is None:
        return
    if level_column not in _column_names(dataset):
        raise ValueError(
            f"The pre-training data has no {level_column!r} column: phase 1 needs the alignment level (0.."
            f"{num_alignment_levels - 1}) of every image-caption pair. Score the pairs with CLIP and bucket the scores "
            "with transformers_aligngpt.alignment_levels, or read an AlignGPT JSON whose records carry `similarity`."
        )
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return
    import pyarrow.compute as pc

    column = dataset.select_columns([level_column]).with_format("arrow")[level_column]
    nulls = column.null_count
    if nulls:
        first = next(i for i, value in enumerate(column.to_pylist()) if value is None)
        raise ValueError(
            f"{nulls} pre-training rows have no {level_column!r} (the first is row {first}); every pair needs a level. "
            "In a LLaVA-layout JSON the level is the record's `similarity`: compute the levels with `aligngpt levels` "
            "(transformers_aligngpt.alignment_levels), or drop the rows without one."
        )
    column = _integer_levels(column, level_column)
    if len(column):
        low, high = pc.min(column).as_py(), pc.max(column).as_py()
        if low < 0 or high >= num_alignment_levels:
            values = column.to_pylist()
            bad = next(i for i, value in enumerate(values) if not 0 <= value < num_alignment_levels)
            raise ValueError(
                f"{level_column} must lie in 0..{num_alignment_levels - 1} (the model has {num_alignment_levels} "
                f"alignment levels); row {bad} has {values[bad]} (range found: {low}..{high}). Build the model with "
                f"as many levels as the data (`--num-levels {high + 1}` / num_alignment_levels={high + 1} for a new "
                f"model), or recompute the levels for this one (`aligngpt levels --num-levels {num_alignment_levels}`)."
            )
        if warn_missing_top_level and high < num_alignment_levels - 1:
            # not an error: a small debugging subset may miss the top level; a whole data set that does was bucketed
            # into fewer levels than the model has
            logger.warning(
                f"The pre-training data's {level_column} goes up to {high} ({high + 1} levels), but the model has "
                f"{num_alignment_levels}: no row trains the top level's embedding E[{num_alignment_levels - 1}], which "
                f"inference adds to every image (the global alignment). Bucket the data into the model's levels "
                f"(`aligngpt levels --num-levels {num_alignment_levels}`), or build the model with the data's "
                f"(`--num-levels {high + 1}` / num_alignment_levels={high + 1})."
            )
    check_images_of_rows(dataset)
    # every row an image-caption pair: one image, a caption (records of other kinds read fine from a LLaVA file)
    names = set(dataset.column_names)
    if "images" in names or "image" in names:
        counts = [n for batch in _images_per_row(dataset, 10_000) for n in batch]
        wrong = [i for i, n in enumerate(counts) if n != 1]
        if wrong:
            raise ValueError(
                f"{len(wrong)} pre-training rows do not hold exactly one image (row {wrong[0]} has "
                f"{counts[wrong[0]]}): phase 1 trains on image-caption pairs. Drop those rows (dataset.filter)."
            )
    if "caption" in names:
        caption = dataset.select_columns(["caption"]).with_format("arrow")["caption"]
        empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(caption), ""), True).to_numpy(zero_copy_only=False)
        if empty.any():
            raise ValueError(
                f"{int(empty.sum())} pre-training rows have no caption (the first is row {int(empty.argmax())}; a "
                "LLaVA record that is not one human/gpt turn has none): drop those rows (dataset.filter)."
            )


def _integer_levels(column, level_column: str):
    """The level column as int64, or a `ValueError` when it holds strings or fractional numbers (an int() in the
    collator would silently truncate 0.5 to 0; integral floats such as 3.0 are fine)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        return column
    if not pa.types.is_floating(column.type):
        raise ValueError(
            f"{level_column} must hold integers (the alignment level 0..N-1 of each pair), but the column holds "
            f"{column.type} values{f' (e.g. {column[0].as_py()!r})' if len(column) else ''}. Convert it, e.g. "
            f"dataset.cast_column({level_column!r}, datasets.Value('int64')), or recompute it with `aligngpt levels`."
        )
    fractional = pc.invert(pc.fill_null(pc.equal(column, pc.floor(column)), True)).to_numpy(zero_copy_only=False)
    if fractional.any():
        row = int(fractional.argmax())
        raise ValueError(
            f"{int(fractional.sum())} rows have a non-integer {level_column} (row {row} has "
            f"{column[row].as_py()}): levels are the indices 0..N-1 of CLIP-score buckets, not scores. Bucket the "
            "scores with `aligngpt levels` (transformers_aligngpt.alignment_levels.add_alignment_levels)."
        )
    return pc.cast(column, pa.int64())


def _images_per_row(dataset, batch_size: int) -> Iterator[list[int]]:
    """Number of images of each row, from Arrow list lengths (nothing is decoded)."""
    import pyarrow.compute as pc

    names = set(dataset.column_names)
    column = "images" if "images" in names else "image" if "image" in names else None
    if column is None:
        for start in range(0, len(dataset), batch_size):
            yield [0] * min(batch_size, len(dataset) - start)
        return
    view = dataset.select_columns([column]).with_format("arrow")
    for table in view.iter(batch_size=batch_size):
        values = table[column]
        if column == "image":
            yield [0 if value is None else 1 for value in pc.is_null(values).to_pylist()]
        else:
            yield [n or 0 for n in pc.list_value_length(values).to_pylist()]


def _image_paths(cell) -> list[str]:
    """File paths of one `images` / `image` cell (paths, or `datasets.Image` dicts without bytes)."""
    items = cell if isinstance(cell, list) else [] if cell is None else [cell]
    paths = []
    for item in items:
        if isinstance(item, str):
            paths.append(item)
        elif isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
            paths.append(item["path"])
    return paths


def _placeholders_per_row(messages) -> np.ndarray | None:
    """Image content blocks per row of a `messages` column in the chat format (list of {role, content: [{type,
    ...}]}), from the Arrow layout without Python objects; None when the content is not in blocks."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = messages.combine_chunks()
    if not pa.types.is_list(rows.type) or not pa.types.is_struct(rows.type.value_type):
        return None
    turns = rows.values
    if turns.type.get_field_index("content") < 0:
        return None
    content = pc.struct_field(turns, "content")
    if not pa.types.is_list(content.type) or content.type.value_type.get_field_index("type") < 0:
        return None
    content = content.combine_chunks() if isinstance(content, pa.ChunkedArray) else content
    is_image = pc.fill_null(pc.equal(pc.struct_field(content.values, "type"), "image"), False).to_numpy(
        zero_copy_only=False
    )
    # per turn, then per row, through the list offsets (a running sum read at the boundaries)
    running = np.concatenate([[0], np.cumsum(is_image, dtype=np.int64)])
    per_turn = np.diff(running[content.offsets.to_numpy()])
    running = np.concatenate([[0], np.cumsum(per_turn, dtype=np.int64)])
    return np.diff(running[rows.offsets.to_numpy()])


def check_images_of_rows(dataset, batch_size: int = 10_000, limit: int = 5) -> None:
    """Raises `ValueError` before training when image files are missing, or when a row's images and its image
    placeholders (image blocks of `messages`) differ in number: both would stop a run mid-way, inside the data
    pipeline, without saying which row. Only for an in-memory or on-disk `datasets.Dataset` of paths."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return
    names = set(dataset.column_names)
    column = "images" if "images" in names else "image" if "image" in names else None
    if column is None:
        return
    view = dataset.select_columns([column] + (["messages"] if "messages" in names else []))
    missing, mismatched, row = [], [], 0
    # Arrow batches: image cells come as their stored paths / {bytes, path}, never decoded
    for table in view.with_format("arrow").iter(batch_size=batch_size):
        counts = None
        if "messages" in table.column_names:
            counts = _placeholders_per_row(table["messages"])
        cells = table[column].to_pylist()
        for j, cell in enumerate(cells):
            for path in _image_paths(cell):
                if not os.path.exists(path):
                    missing.append((row + j, path))
            n_images = len(cell) if isinstance(cell, list) else int(cell is not None)
            if counts is not None and counts[j] != n_images:
                mismatched.append((row + j, n_images, int(counts[j])))
        row += len(cells)
    if missing:
        listed = ", ".join(f"row {r}: {p}" for r, p in missing[:limit])
        raise ValueError(
            f"{len(missing)} image files do not exist ({listed}{', ...' if len(missing) > limit else ''}). Relative "
            "paths are read from the working directory: give the image folder (--image-folder, or "
            "load_llava_json(..., image_folder=)), or fix or drop those rows."
        )
    if mismatched:
        listed = ", ".join(f"row {r}: {n} images, {k} image placeholders" for r, n, k in mismatched[:limit])
        raise ValueError(
            f"{len(mismatched)} rows have a different number of images and of image placeholders in their messages "
            f"({listed}). Each image needs one image block (one `<image>` in a LLaVA turn); fix or drop those rows."
        )


def check_single_image_column(dataset, limit: int = 5) -> None:
    """Raises `ValueError` when a singular `image` column holds rows without an image (None): TRL wraps every `image`
    into a one-image list, so a text-only row would become `[None]` and crash the first training step. Text-only
    rows need an `images` list column (`[]` for them). Only for a `datasets.Dataset` (read from Arrow)."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or "image" not in dataset.column_names or "images" in dataset.column_names:
        return
    column = dataset.select_columns(["image"]).with_format("arrow")["image"]
    if not column.null_count:
        return
    rows = [i for i, value in enumerate(column.is_null().to_pylist()) if value][:limit]
    raise ValueError(
        f"{column.null_count} rows have no image in the `image` column (rows {', '.join(map(str, rows))}"
        f"{', ...' if column.null_count > limit else ''}): TRL turns each `image` into a one-image list, so these "
        "text-only rows would fail in the first training step. Use an `images` column of lists instead, empty for "
        "text-only rows: dataset.map(lambda row: {'images': [] if row['image'] is None else [row['image']]}, "
        "remove_columns='image')."
    )


def image_rows_longer_than(
    dataset,
    processor,
    max_length: int,
    chat_template: str | None = None,
    batch_size: int = 1000,
    limit: int = 5,
) -> tuple[list[tuple[int, int]], int]:
    """Rows whose image tokens would not fit in `max_length` tokens.

    Returns `([(row, tokens needed up to the last image token), ...] (at most `limit`), number of such rows)`. The
    rendered prompt's UTF-8 length bounds its token count, so only rows near the limit are tokenised.
    """
    from trl.data_utils import prepare_multimodal_messages

    image_token, num_image_tokens = processor.image_token, processor.num_image_tokens
    template = chat_template
    tokenizer = processor.tokenizer
    names = set(dataset.column_names)
    text_columns = [c for c in ("messages", "prompt", "completion", "text") if c in names]
    if not text_columns:
        return [], 0
    texts_view = dataset.select_columns(text_columns)
    found: list[tuple[int, int]] = []
    count = 0
    row = 0
    for counts, batch in zip(_images_per_row(dataset, batch_size), texts_view.iter(batch_size=batch_size)):
        candidates, prefixes, images = [], [], []
        for j, n in enumerate(counts):
            if n == 0:
                continue
            if "messages" in batch:
                conversation = prepare_multimodal_messages(batch["messages"][j], images=[None] * n)
                text = processor.apply_chat_template(conversation, chat_template=template, tokenize=False)
            elif "prompt" in batch and not isinstance(batch["prompt"][j], str):
                conversation = prepare_multimodal_messages(
                    batch["prompt"][j] + batch["completion"][j], images=[None] * n
                )
                text = processor.apply_chat_template(conversation, chat_template=template, tokenize=False)
            else:
                text = batch["prompt"][j] if "prompt" in batch else batch["text"][j]
            end = text.rfind(image_token)
            if end < 0:
                continue
            prefix = text[: end + len(image_token)]
            # one token per UTF-8 byte at most (+ a metaspace prefix, bos, <align>), each <image> then grows to P
            bound = len(prefix.encode("utf-8")) + 3 + n * (num_image_tokens - 1)
            if bound > max_length:
                candidates.append(row + j)
                prefixes.append(prefix)
                images.append(n)
        if prefixes:
            bos = tokenizer.bos_token
            ids = tokenizer(prefixes, add_special_tokens=False)["input_ids"]
            for index, prefix, token_ids, n in zip(candidates, prefixes, ids, images):
                needed = len(token_ids) + n * (num_image_tokens - 1) + 1  # + <align>
                if bos is not None and not prefix.startswith(bos):
                    needed += 1  # the processor adds bos
                if needed > max_length:
                    count += 1
                    if len(found) < limit:
                        found.append((index, needed))
        row += len(counts)
    return found, count


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: pre-training
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class AlignGPTPretrainingArguments(TrainingArguments):
    """`TrainingArguments` for phase 1, with the defaults of the paper where they differ from transformers'."""

    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator reads the images, captions and levels columns."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Phase 1 of the paper uses 1e-3."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Phase 1 of the paper uses cosine."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup: 3% of the steps in the paper."})
    weight_decay: float = field(default=0.0)
    max_length: int | None = field(default=2048, metadata={"help": "Longer captions are truncated."})
    pad_images_to_square: bool = field(
        default=False, metadata={"help": "Pre-training resizes images without padding them (LLaVA / AlignGPT)."}
    )
    image_column: str = field(default="images")
    caption_column: str = field(default="caption")
    alignment_level_column: str = field(default="alignment_level")
    save_pretraining_artifact: bool = field(
        default=True,
        metadata={"help": f"Write {PRETRAINING_ARTIFACT_NAME} (projector + alignment embeddings) with every save."},
    )


class AlignGPTPretrainer(Trainer):
    """Phase 1 of AlignGPT: a `Trainer` that trains only the projector and the alignment embeddings.

    The data: rows with `images` (one PIL image or path), `caption` and `alignment_level`. The trainer freezes the
    model itself ([`freeze_for_pretraining`]), checks every row's level before training starts, builds the batches with
    [`AlignGPTPretrainingCollator`] (loss on the caption only) and writes `mm_projector_align.safetensors` next to
    every checkpoint and the final model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        args: TrainingArguments | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        if args is None:
            args = AlignGPTPretrainingArguments(output_dir="aligngpt-pretrain")
        if args.remove_unused_columns:
            logger.info("remove_unused_columns is set to False: the collator reads images, captions and levels.")
            args.remove_unused_columns = False
        config: AlignGPTConfig = model.config
        level_column = getattr(args, "alignment_level_column", "alignment_level")
        validate_pretraining_dataset(train_dataset, config.num_alignment_levels, level_column)
        for dataset in eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]:
            validate_pretraining_dataset(
                dataset, config.num_alignment_levels, level_column, warn_missing_top_level=False
            )
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "AlignGPTPretrainer needs the model's processor (`processing_class`) to build batches."
                )
            data_collator = AlignGPTPretrainingCollator(
                processing_class,
                num_alignment_levels=config.num_alignment_levels,
                max_length=getattr(args, "max_length", None),
                pad_to_square=getattr(args, "pad_images_to_square", False),
                image_column=getattr(args, "image_column", "images"),
                caption_column=getattr(args, "caption_column", "caption"),
                level_column=level_column,
            )
        freeze_for_pretraining(model)
        if (args.bf16 or args.fp16) and getattr(args, "deepspeed_plugin", None) is None:
            # mixed precision autocasts the compute; the few trained weights keep fp32 for the optimizer updates
            # (DeepSpeed keeps fp32 master weights itself)
            base = _base_model(model)
            for name in PRETRAINING_MODULES:
                getattr(base, name).float()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The phase-1 weights are taken before `super()._save`: `save_pretrained` empties the state dict it is given
        # (which `Trainer.save_model` passes under DeepSpeed and FSDP: the gathered weights).
        artifact = None
        if self.args.should_save and getattr(self.args, "save_pretraining_artifact", True):
            artifact = pretraining_state_dict(
                state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
            )
        super()._save(output_dir, state_dict=state_dict)
        if artifact is not None:
            save_pretraining_artifact(artifact, output_dir if output_dir is not None else self.args.output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: instruction tuning
# --------------------------------------------------------------------------------------------------------------------


def _first_row(dataset) -> dict[str, Any]:
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        names = [c for c in dataset.column_names if c not in ("images", "image")]
        row = dataset.select_columns(names)[0] if len(dataset) else {}
        return {**row, **{c: None for c in dataset.column_names if c in ("images", "image")}}
    return next(iter(dataset))


def validate_sft_options(
    model: PreTrainedModel,
    processor,
    train_dataset,
    args,
    peft_config=None,
    gate_text_scope: str | None = None,
    eval_dataset=None,
) -> None:
    """Raises a `ValueError` for option combinations that cannot work, before any training step:

    packing or padding-free with images; a loss that is not restricted to the answers; a prompt-only gate input
    without labels that mark the prompt; a quantised module in PEFT's `modules_to_save`; a `max_length` that would
    cut image tokens of some row (computed from the data).
    """
    datasets = [train_dataset] + (
        list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset] if eval_dataset else []
    )
    sample = _first_row(train_dataset)
    is_vision = "images" in sample or "image" in sample
    prompt_completion = "prompt" in sample and "completion" in sample
    if is_vision and args.packing:
        raise ValueError(
            "packing=True cannot work with images: packing cuts and concatenates token sequences, which separates "
            "image tokens from their pixel_values. Set packing=False."
        )
    if is_vision and args.padding_free:
        raise ValueError("padding_free=True cannot work with images (TRL refuses it for vision data). Set it to False.")
    if prompt_completion:
        completion_only = args.completion_only_loss is not False
        if not completion_only:
            raise ValueError(
                "completion_only_loss=False would supervise the prompts; AlignGPT's instruction tuning trains on the "
                "answers only. Leave completion_only_loss unset (or True)."
            )
    elif not args.assistant_only_loss:
        raise ValueError(
            "AlignGPT's instruction tuning supervises the assistant's answers only: set assistant_only_loss=True "
            "(the chat template marks the answers with {% generation %})."
        )
    scope = gate_text_scope or model.config.gate_text_scope
    if scope not in GATE_TEXT_SCOPES:
        raise ValueError(f"gate_text_scope must be one of {', '.join(GATE_TEXT_SCOPES)}, got {scope!r}.")
    if peft_config is not None:
        for name in getattr(peft_config, "modules_to_save", None) or []:
            for module_name, module in model.named_modules():
                if (module_name == name or module_name.endswith("." + name)) and is_quantized_module(module):
                    raise ValueError(
                        f"modules_to_save names {name!r}, but {module_name!r} is quantised: a quantised module cannot "
                        "be trained fully. Keep it out of quantisation (llm_int8_skip_modules, see qlora_bnb_config()) "
                        "or drop it from modules_to_save."
                    )
    if is_vision:
        for dataset in datasets:
            check_single_image_column(dataset)
            check_images_of_rows(dataset)
    if is_vision and args.max_length is not None:
        from datasets import Dataset

        for dataset in datasets:
            if not isinstance(dataset, Dataset):
                continue  # streamed data: the collator raises on the first batch that is cut
            rows, count = image_rows_longer_than(dataset, processor, args.max_length)
            if count:
                listed = ", ".join(f"row {row} needs {needed}" for row, needed in rows)
                raise ValueError(
                    f"max_length={args.max_length} would cut image tokens in {count} rows ({listed} tokens to keep all "
                    f"of its {processor.num_image_tokens}-token images). Raise max_length to at least "
                    f"{max(needed for _, needed in rows)} to keep the images, plus the length of the answers that "
                    "follow them (those are what is trained on), or set it to None for no limit (`--max-length "
                    "none` with `aligngpt sft`)."
                )


def make_sft_trainer(
    model: PreTrainedModel | str,
    processor=None,
    train_dataset=None,
    args=None,
    peft_config=None,
    eval_dataset=None,
    gate_text_scope: str | None = None,
    data_collator=None,
    **trainer_kwargs,
):
    """Phase 2 of AlignGPT with TRL's `SFTTrainer`: checks the options, freezes, and builds the collator.

    Args:
        model: an AlignGPT model (full precision, or 4-bit from [`load_for_qlora`]) or a path / Hub id.
        processor: its `AlignGPTProcessor` (loaded from the model's path when omitted).
        train_dataset: `messages` + `images` rows (text-only rows have `images=[]`), or prompt/completion.
        args: an `SFTConfig`; defaults to `assistant_only_loss=True, max_length=2048`.
        peft_config: e.g. [`aligngpt_lora_config`]; without it the LLM is trained fully.
        gate_text_scope: `"prompt"` (the gate averages the prompt tokens only, as at inference) or `"conversation"`
            (answers included, the original's training behaviour); defaults to `model.config.gate_text_scope`, and
            is recorded in the config.
    """
    from trl import SFTConfig, SFTTrainer

    if args is None:
        args = SFTConfig(output_dir="aligngpt-sft", assistant_only_loss=True, max_length=2048)
    elif not isinstance(args, SFTConfig):
        raise TypeError(f"args must be an SFTConfig, got {type(args).__name__}.")
    if train_dataset is None:
        raise ValueError("train_dataset is required.")
    if isinstance(model, (str, os.PathLike)):
        model = AutoModelForImageTextToText.from_pretrained(model, **(args.model_init_kwargs or {}))
    if processor is None:
        processor = AutoProcessor.from_pretrained(model.config._name_or_path)

    scope = gate_text_scope or model.config.gate_text_scope
    validate_sft_options(model, processor, train_dataset, args, peft_config, scope, eval_dataset)
    model.config.gate_text_scope = scope

    from peft import PeftModel

    if peft_config is None and not isinstance(model, PeftModel):
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError("A quantised model can only be trained with an adapter: pass peft_config (QLoRA).")
        freeze_for_instruction_tuning(model)

    if data_collator is None:
        sample = _first_row(train_dataset)
        prompt_completion = "prompt" in sample and "completion" in sample
        data_collator = AlignGPTInstructionCollator(
            processor=processor,
            max_length=args.max_length,
            completion_only_loss=prompt_completion and args.completion_only_loss is not False,
            pad_to_multiple_of=args.pad_to_multiple_of,
            dataset_text_field=args.dataset_text_field,
            assistant_only_loss=args.assistant_only_loss,
            gate_text_scope=scope,
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        **trainer_kwargs,
    )
    _keep_fully_trained_modules_in_fp32(trainer.model, args)
    return trainer


def _keep_fully_trained_modules_in_fp32(model: torch.nn.Module, args) -> None:
    """Mixed precision without DeepSpeed trains the weights in their own dtype: in bf16, an AdamW step at a
    fine-tuning learning rate is below half a bf16 ulp for most entries, and rounds away (5 steps at 2e-5 leave 99% of
    the gate unchanged). As phase 1 does, the gate and projector (PEFT's `modules_to_save` copies under LoRA) train in
    fp32 under autocast: a few MB. A quantised (QLoRA) model keeps them in its compute dtype, as documented. A fully
    trained bf16 LLM is not upcast (that doubles its memory): a warning says how to get fp32 master weights."""
    if not (args.bf16 or args.fp16) or getattr(args, "deepspeed_plugin", None) is not None:
        return
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return  # (FSDP flattens each wrapped unit's weights into one tensor of one dtype, and manages precision itself)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return
    llm_dtype = None  # the dtype of a fully trained LLM weight left below fp32
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or not parameter.is_floating_point() or parameter.dtype == torch.float32:
            continue
        if "multi_modal_projector" in name or "alignment_gate" in name:
            parameter.data = parameter.data.float()
        elif "lora_" not in name:
            llm_dtype = parameter.dtype
    if llm_dtype is not None:
        logger.warning(
            "The language model is trained fully with %s weights and mixed precision but without DeepSpeed: its "
            "optimizer updates are applied to those weights, and at fine-tuning learning rates many round away. "
            "For fp32 master weights, train with DeepSpeed, as the paper (`accelerate launch --config_file "
            "examples/accelerate_configs/zero2.yaml ...`, or SFTConfig(deepspeed=...)), or load the model in fp32 "
            "(mixed precision still autocasts the compute); or train a LoRA adapter (`aligngpt sft --use-peft`).",
            llm_dtype,
        )


# --------------------------------------------------------------------------------------------------------------------
# Building a new AlignGPT from a pretrained LLM and vision tower (phase 1 starts here)
# --------------------------------------------------------------------------------------------------------------------


def build_aligngpt_from_pretrained(
    text_model: str | os.PathLike,
    vision_model: str | os.PathLike,
    num_alignment_levels: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    **config_kwargs,
):
    """(model, processor): a new AlignGPT from a pretrained causal LM (e.g. `lmsys/vicuna-7b-v1.5`) and a CLIP or
    SigLIP tower (e.g. `openai/clip-vit-large-patch14-336`), as phase 1 starts.

    The tokenizer gains `<image>` and `<align>` (embeddings resized), the projector, gate and alignment embeddings are
    initialised fresh; the LLM and the tower keep their weights. Nothing is built twice in memory: the new model is
    created on the `meta` device and receives the loaded modules.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil,
    )

    from .modeling_aligngpt import (
        AlignGPTAlignmentGate,
        AlignGPTForConditionalGeneration,
        AlignGPTMultiModalProjector,
    )
    from .convert import prepare_tokenizer
    from .processing_aligngpt import AlignGPTProcessor

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    new_tokens = [token for token in ("<image>", "<align>") if token not in tokenizer.get_vocab()]
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_extra_special_tokens=False)
    # prepared as the converter prepares the original's: pad = unk (as LLaVA-1.5 does for Vicuna), left padding for
    # generation, and every chunk's "▁" for sentencepiece (which the processor would also see to)
    prepare_tokenizer(tokenizer)

    language_model = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer))
    vision_config = AutoConfig.from_pretrained(vision_model)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    vision_tower = AutoModel.from_pretrained(vision_model, config=vision_config, dtype=dtype)

    config = AlignGPTConfig(
        vision_config=vision_config,
        text_config=language_model.config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"),
        num_alignment_levels=num_alignment_levels,
        **config_kwargs,
    )
    try:  # the shell's towers are replaced below: under DeepSpeed ZeRO-3 they must not go through zero.Init
        from transformers.modeling_utils import set_zero3_state as _no_nested_zero3_init
    except ImportError:  # older / newer transformers without it
        from contextlib import nullcontext as _no_nested_zero3_init
    with torch.device("meta"), _no_nested_zero3_init():
        model = AlignGPTForConditionalGeneration(config)
    base = model.model
    base.language_model = language_model.model
    model.lm_head = language_model.lm_head
    base.vision_tower = vision_tower
    torch.manual_seed(seed)
    base.multi_modal_projector = AlignGPTMultiModalProjector(config).to(dtype)
    base.alignment_gate = AlignGPTAlignmentGate(config).to(dtype)
    base.alignment_embeddings = torch.nn.Embedding(config.num_alignment_levels, config.text_config.hidden_size)
    torch.nn.init.xavier_uniform_(base.alignment_embeddings.weight)
    base.alignment_embeddings.to(dtype)
    model.generation_config = language_model.generation_config
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise RuntimeError("Some weights of the new AlignGPT model were not initialised.")

    image_processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(vision_model)
    size = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=image_processor_dict.get("image_mean"),
        image_std=image_processor_dict.get("image_std"),
    )
    processor = AlignGPTProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens
    )
    return model, processor


__all__ = [
    "LLM_LORA_TARGET_MODULES",
    "LORA_EXCLUDED_MODULES",
    "LORA_TARGET_MODULES",
    "LORA_MODULES_TO_SAVE",
    "NOT_QUANTIZED_MODULES",
    "PRETRAINING_ARTIFACT_NAME",
    "AlignGPTPretrainer",
    "AlignGPTPretrainingArguments",
    "aligngpt_lora_config",
    "build_aligngpt_from_pretrained",
    "freeze_for_instruction_tuning",
    "freeze_for_pretraining",
    "image_rows_longer_than",
    "is_quantized_module",
    "load_for_qlora",
    "load_pretraining_artifact",
    "load_qlora_adapter",
    "make_sft_trainer",
    "merge_qlora_adapter",
    "pretraining_state_dict",
    "qlora_bnb_config",
    "save_pretraining_artifact",
    "trainable_parameter_names",
    "check_images_of_rows",
    "check_single_image_column",
    "validate_pretraining_dataset",
    "validate_sft_options",
]
