"""Alignment levels for phase 1 (pre-training): CLIP image-caption similarity, ranked and cut into equal buckets.

AlignGPT gives every pre-training pair an *alignment level*: the pairs are scored with CLIP (cosine similarity of
the image embedding and the caption embedding), ranked, and the ranking is cut into `N` equal-count buckets, level
`N-1` holding the best-aligned pairs. The original ships the levels precomputed (field `similarity` of its data
file) without the code that made them; this module computes them for any data:

- `score_pairs(dataset, model_name_or_path)`: CLIP (or SigLIP) cosine similarity of each image with its caption,
  through transformers' `AutoModel` (`get_image_features` / `get_text_features`). Images are decoded and
  preprocessed by the model's image processor (transformers' torchvision backend where torchvision is installed:
  about 2x faster per worker than the PIL one, used otherwise) in `torch.utils.data.DataLoader` worker processes;
  the model runs batched on the accelerator (bf16 / fp16 on GPU). The dataset is cut into shards of consecutive
  rows at boundaries its content decides (content-defined chunking); each shard is scored with
  `datasets.Dataset.map(batched=True)` into its own Arrow cache file, named by a datasets fingerprint of the shard's
  rows (image paths or bytes, captions) and of the scorer (weights, processor, settings). An interrupted run
  therefore resumes where it stopped: finished shards load from their cache files, only the others are scored; rows
  removed, inserted or appended rescore only the shards they fall in. Under
  `accelerate launch` each process scores its share of the pending shards; the results are gathered through the
  cache files (one machine, or a shared file system).
- `assign_levels(scores, num_levels)`: stable ranking -> equal-count buckets.
- `aligngpt levels` / `python -m transformers_aligngpt.alignment_levels`: LLaVA-layout JSON in, AlignGPT-layout
  JSON out (`similarity` = level).

Bad input (no image, a missing or undecodable image file, an empty or absent caption, a duplicate id) never stops a run
half-way: such rows are collected in a `BadRowsReport` (count, ids, reasons) and either skipped
(`on_bad="skip"`) or reported with a `BadRowsError` (`on_bad="error"`). With `"error"`, what can be checked before
scoring (empty captions, duplicate ids, absent images and files) is checked first, before any work; images that
turn out undecodable are reported after all other pairs are scored and cached, and are tried again by the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import xxhash
from datasets import Dataset, Features, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from .cli import CommandError, _num_levels, _positive_int, check_model_source
from .data import without_image_decoding

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "BadRowsError",
    "BadRowsReport",
    "add_alignment_levels",
    "add_levels_subparser",
    "assign_levels",
    "level_statistics",
    "main",
    "run_levels",
    "score_pairs",
]

#: the CLIP of the paper (AlignGPT-7B / 13B use ViT-L/14 at 336 px)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14-336"

_CACHE_VERSION = "aligngpt-clip-scores-v2"  # v2: content-defined shards
_SCORE_FEATURES = Features({"clip_score": Value("float32"), "clip_error": Value("string")})

# reasons (the text before ':' is the category counted in reports)
_NO_IMAGE = "no image"
_MANY_IMAGES = "more than one image"
_EMPTY_CAPTION = "empty caption"
_NO_CAPTION = "no caption"  # a null text, e.g. load_llava_json's `caption` of a multi-turn record
_DUPLICATE_ID = "duplicate id"
_FILE_NOT_FOUND = "image file not found"
_UNDECODABLE = "undecodable image"
_IMAGE_ERRORS = (_FILE_NOT_FOUND, _UNDECODABLE)


# ----------------------------------------------------------------------------------------------------------------
# levels
# ----------------------------------------------------------------------------------------------------------------


def assign_levels(scores, num_levels: int = 8) -> np.ndarray:
    """Rank `scores` and cut the ranking into `num_levels` equal-count buckets.

    Level `num_levels - 1` holds the highest scores, level 0 the lowest. The ranking is a stable sort: equal scores
    keep their row order (the earlier row ranks lower), so the result is deterministic. With `n` rows, the row of
    rank `r` (0 = lowest) gets level `r * num_levels // n`: bucket sizes differ by at most one.

    Args:
        scores: 1-D array-like of finite numbers (numpy, list, torch tensor).
        num_levels: number of levels (the paper uses 8).

    Returns:
        int64 array of levels, aligned with `scores`.
    """
    if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    n = scores.shape[0]
    if n < num_levels:
        raise ValueError(
            f"cannot cut {n} scores into {num_levels} equal-count levels: every level needs at least one row "
            f"(use at least {num_levels} rows or fewer levels)"
        )
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} scores are NaN or infinite; drop those rows before assigning levels")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n, dtype=np.int64)
    return ranks * num_levels // n


def add_alignment_levels(
    dataset: Dataset,
    num_levels: int = 8,
    *,
    score_column: str = "clip_score",
    level_column: str = "alignment_level",
) -> Dataset:
    """`dataset` with `level_column` (int32) set to `assign_levels(dataset[score_column], num_levels)`."""
    scores = dataset.with_format("arrow")[score_column].to_numpy()
    levels = assign_levels(scores, num_levels).astype(np.int32)
    if level_column in dataset.column_names:
        dataset = dataset.remove_columns(level_column)
    return dataset.add_column(level_column, levels, feature=Value("int32"))


def level_statistics(
    dataset: Dataset,
    num_levels: int,
    *,
    level_column: str = "alignment_level",
    score_column: str = "clip_score",
) -> list[dict[str, Any]]:
    """One row per level, `{"level", "pairs"}`, plus `"CLIP score min"` / `"CLIP score max"` where the pairs have
    scores (`aligngpt levels --include-clip-score`): what the model card's "Alignment levels" table shows. Empty
    when `dataset` has no `level_column`."""
    if level_column not in dataset.column_names:
        return []
    levels = dataset.with_format("arrow")[level_column].to_numpy(zero_copy_only=False)
    scores = None
    if score_column in dataset.column_names:
        scores = dataset.with_format("arrow")[score_column].to_numpy(zero_copy_only=False).astype(np.float64)
    rows = []
    for level in range(num_levels):
        in_level = levels == level
        row: dict[str, Any] = {"level": level, "pairs": int(in_level.sum())}
        if scores is not None:
            level_scores = scores[in_level]
            level_scores = level_scores[~np.isnan(level_scores)]  # (rows written without a score read as NaN)
            if level_scores.size:
                row["CLIP score min"], row["CLIP score max"] = float(level_scores.min()), float(level_scores.max())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# bad rows
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BadRowsReport:
    """Rows that could not be scored: their positions in the input dataset, ids and reasons."""

    rows: list[int] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        """Number of bad rows per kind of problem."""
        return dict(Counter(reason.split(":", 1)[0] for reason in self.reasons))

    def summary(self, max_ids: int = 20) -> str:
        if not self.rows:
            return "no bad rows"
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.counts().items()))
        shown = ", ".join(str(i) for i in self.ids[:max_ids])
        more = f", ... ({len(self) - max_ids} more)" if len(self) > max_ids else ""
        return f"{len(self)} bad rows ({kinds}); ids: {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": len(self),
            "counts": self.counts(),
            "rows": [{"row": r, "id": i, "reason": why} for r, i, why in zip(self.rows, self.ids, self.reasons)],
        }

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)


class BadRowsError(ValueError):
    """Raised by `score_pairs(on_bad="error")`; `.report` holds the bad rows, `.after_scoring` says whether every
    other pair was scored (and cached) first."""

    def __init__(self, report: BadRowsReport, when: str = "", after_scoring: bool = False):
        self.report, self.after_scoring = report, after_scoring
        super().__init__(f"{report.summary()}{when} (use on_bad='skip' to drop them)")


def _report_from(reasons: np.ndarray, ids: np.ndarray) -> BadRowsReport:
    rows = np.flatnonzero(reasons != None)
    return BadRowsReport(rows=rows.tolist(), ids=ids[rows].tolist(), reasons=reasons[rows].tolist())


# ----------------------------------------------------------------------------------------------------------------
# the input view: image + caption columns, images never decoded in the main process
# ----------------------------------------------------------------------------------------------------------------


class _PairView:
    """The image and text columns of a dataset; `Image` features are cast to `decode=False` (paths / bytes)."""

    def __init__(self, dataset: Dataset, image_column: str, text_column: str, id_column: str | None, image_folder):
        for column in (image_column, text_column):
            if column not in dataset.column_names:
                raise ValueError(f"column {column!r} not in the dataset (columns: {dataset.column_names})")
        caption_feature = dataset.features[text_column]
        string_types = ("string", "large_string", "string_view", "null")
        if not (isinstance(caption_feature, Value) and caption_feature.dtype in string_types):
            raise ValueError(
                f"column {text_column!r} must hold one caption string per row, not {caption_feature}: pick one caption "
                "per image (several captions per image: one row per caption)."
            )
        self.image_column, self.text_column = image_column, text_column
        self.image_folder = os.path.abspath(os.fspath(image_folder)) if image_folder is not None else None
        columns = [image_column, text_column]
        self.id_column = id_column if id_column is not None and id_column in dataset.column_names else None
        view = dataset.select_columns(columns + ([self.id_column] if self.id_column else []))
        if caption_feature.dtype == "string_view":  # (Arrow's string kernels used below take plain strings)
            view = view.cast_column(text_column, Value("string"))
        self.view = without_image_decoding(view, image_column).with_format(None)
        self.pairs = self.view.select_columns(columns)

    def __len__(self) -> int:
        return len(self.view)

    def table(self) -> pa.Table:
        return self.view.with_format("arrow")[:]

    def ids(self, table: pa.Table) -> np.ndarray:
        if self.id_column is None:
            return np.arange(len(self)).astype(str).astype(object)
        return np.asarray(table.column(self.id_column).to_pylist(), dtype=object)

    def image_source(self, value) -> tuple[str | None, bytes | None]:
        """(path, bytes) of one image cell; lists hold one image."""
        if isinstance(value, list):
            value = value[0]
        if isinstance(value, dict):
            path, data = value.get("path"), value.get("bytes")
        else:
            path, data = value, None
        if data is None and path is not None and self.image_folder is not None and not os.path.isabs(path):
            path = os.path.join(self.image_folder, path)
        return path, data


def _prescan(view: _PairView, table: pa.Table, ids: np.ndarray, check_files: bool) -> np.ndarray:
    """Per-row reason (None = fine) for what can be seen without decoding: no image, empty caption, duplicate id."""
    n = len(view)
    reasons = np.full(n, None, dtype=object)

    image = table.column(view.image_column).combine_chunks()
    if pa.types.is_list(image.type) or pa.types.is_large_list(image.type):
        lengths = pc.fill_null(pc.list_value_length(image), 0).to_numpy(zero_copy_only=False)
        missing, many = lengths == 0, lengths > 1
        # first element of every list (null for empty lists): the child values at the list offsets
        value_type = image.type.value_type
        if len(image.values) == 0:
            first = pa.nulls(n, value_type)
        else:
            starts = np.where(lengths > 0, image.offsets.to_numpy()[:-1], 0)
            first = pc.if_else(pa.array(lengths > 0), image.values.take(pa.array(starts)), pa.nulls(n, value_type))
        first_is_null = (~np.asarray(pc.is_valid(first).to_numpy(zero_copy_only=False), dtype=bool)) & ~missing
        missing |= first_is_null
    else:
        missing = ~np.asarray(pc.is_valid(image).to_numpy(zero_copy_only=False), dtype=bool)
        many = np.zeros(n, dtype=bool)
        first = image
    if pa.types.is_struct(first.type):  # datasets.Image(decode=False): {bytes, path}
        no_bytes = ~np.asarray(pc.is_valid(pc.struct_field(first, "bytes")).to_numpy(zero_copy_only=False), bool)
        no_path = ~np.asarray(pc.is_valid(pc.struct_field(first, "path")).to_numpy(zero_copy_only=False), bool)
        missing |= no_bytes & no_path
    elif pa.types.is_string(first.type) or pa.types.is_large_string(first.type):
        missing |= np.asarray(pc.fill_null(pc.equal(first, ""), True).to_numpy(zero_copy_only=False), dtype=bool)

    text = table.column(view.text_column).combine_chunks()
    no_text = ~np.asarray(pc.is_valid(text).to_numpy(zero_copy_only=False), dtype=bool)
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), False)
    empty = np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)

    duplicate = np.zeros(n, dtype=bool)
    if view.id_column is not None:
        import pandas as pd

        series = pd.Series(ids)
        duplicate = series.duplicated(keep="first").to_numpy() & series.notna().to_numpy()

    reasons[duplicate] = _DUPLICATE_ID
    reasons[empty] = _EMPTY_CAPTION
    reasons[no_text] = _NO_CAPTION
    reasons[many] = _MANY_IMAGES
    reasons[missing] = _NO_IMAGE

    if check_files:  # stat the files up front (on_bad="error" fails before any work)
        candidates = np.flatnonzero(reasons == None)
        cells = view.pairs.select_columns([view.image_column])[candidates.tolist()][view.image_column]
        for row, cell in zip(candidates, cells):
            path, data = view.image_source(cell)
            if data is None and not os.path.isfile(path):
                reasons[row] = f"{_FILE_NOT_FOUND}: {path}"
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# shards: content-defined, so that inserting or removing rows rescores only the shards they are in
# ----------------------------------------------------------------------------------------------------------------


def _update_digest(digest, value) -> None:
    """Feeds one image or text cell (a path, bytes, a {bytes, path} dict, a list of those, None) into `digest`."""
    if isinstance(value, (list, tuple)):
        digest.update(b"[%d" % len(value))
        for item in value:
            _update_digest(digest, item)
    elif isinstance(value, dict):
        _update_digest(digest, value.get("path"))
        _update_digest(digest, value.get("bytes"))
    elif isinstance(value, bytes):
        digest.update(b"b%d:" % len(value))
        digest.update(value)
    elif value is None:
        digest.update(b"n")
    else:
        text = str(value).encode("utf-8")
        digest.update(b"s%d:" % len(text))
        digest.update(text)


def _row_digests(view: _PairView, table: pa.Table, chunk: int = 4096) -> np.ndarray:
    """(n,) uint64: an xxhash of each row's image cell and text, read `chunk` rows at a time (embedded image bytes
    are not all held at once)."""
    n = table.num_rows
    digests = np.empty(n, dtype=np.uint64)
    for start in range(0, n, chunk):
        part = table.slice(start, chunk)
        images = part.column(view.image_column).to_pylist()
        texts = part.column(view.text_column).to_pylist()
        for j, (image, text) in enumerate(zip(images, texts)):
            digest = xxhash.xxh64()
            _update_digest(digest, image)
            _update_digest(digest, text)
            digests[start + j] = digest.intdigest()
    return digests


def _shard_ranges(digests: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges of about `shard_size` rows (on average) that end after each row whose digest is 0 modulo
    `shard_size` (content-defined chunking): a boundary depends on that row alone, so rows inserted, removed or
    changed in one shard leave the others, and their cache files, as they were. A run of 4 x shard_size rows
    without a boundary is cut there (rare: e^-4 of the shards)."""
    n, longest = len(digests), 4 * shard_size
    ends = (np.flatnonzero(digests % np.uint64(shard_size) == 0) + 1).tolist()
    if not ends or ends[-1] != n:
        ends.append(n)
    ranges, start = [], 0
    for end in ends:
        while end - start > longest:
            ranges.append((start, start + longest))
            start += longest
        if end > start:
            ranges.append((start, end))
            start = end
    return ranges


# ----------------------------------------------------------------------------------------------------------------
# the scorer: model + image processor + tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r} (use 'auto', 'float32', 'bfloat16' or 'float16')")


IMAGE_BACKENDS = ("auto", "torchvision", "pil")


def _resolve_image_backend(backend: str) -> str:
    """`auto` is transformers' own choice: torchvision if installed, else PIL. Asking for torchvision where it is
    not installed is an error (transformers would fall back to PIL with a warning only)."""
    import importlib.util

    if backend not in IMAGE_BACKENDS:
        raise ValueError(f"image_backend must be one of {IMAGE_BACKENDS}, got {backend!r}")
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    if backend == "torchvision" and not has_torchvision:
        raise ValueError(
            "image_backend='torchvision' needs torchvision: `pip install torchvision` (the build matching your "
            "torch), or use image_backend='pil'"
        )
    if backend != "auto":
        return backend
    return "torchvision" if has_torchvision else "pil"


def _load_image_processor(name, backend: str = "auto", **kwargs):
    """The checkpoint's image processor with the given backend (`_resolve_image_backend`)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name, backend=_resolve_image_backend(backend), **kwargs)
    except TypeError:  # transformers without backends
        return AutoImageProcessor.from_pretrained(name, **kwargs)


def _embedding(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` return a tensor or (transformers >= 5) an output object."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


def _weights_digest(model: torch.nn.Module) -> str:
    """xxhash of every parameter and buffer, bit for bit: the cache key of the weights."""
    h = xxhash.xxh64()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.numel():
            h.update(flat.view(torch.uint8).cpu().numpy())
    return h.hexdigest()


class _ClipScorer:
    """Cosine similarity of image and text embeddings of a CLIP-like model (CLIP, SigLIP: `get_*_features`)."""

    def __init__(
        self,
        model,
        image_processor,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        *,
        normalize_on_device: bool,
        jpeg_draft: bool,
        max_text_length: int | None,
        compile: bool = False,
        batch_size: int | None = None,
    ):
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise TypeError(f"{type(model).__name__} has no `{method}`: pass a CLIP or SigLIP checkpoint")
        if getattr(model.config, "model_type", None) == "siglip2":
            # (its NaFlex processor gives patch sequences with a mask and shapes, not (N, C, H, W) images)
            raise ValueError(
                "SigLIP 2 (NaFlex) checkpoints are not supported for scoring: pass a CLIP or SigLIP checkpoint "
                "(the paper's is openai/clip-vit-large-patch14-336)."
            )
        self.device, self.dtype = device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.image_processor, self.tokenizer = image_processor, tokenizer
        config = model.config
        text_config = getattr(config, "text_config", config)
        limit = getattr(text_config, "max_position_embeddings", None)
        model_max = getattr(tokenizer, "model_max_length", None)
        if max_text_length is None:
            candidates = [v for v in (limit, model_max) if isinstance(v, int) and 0 < v < 1_000_000]
            max_text_length = min(candidates) if candidates else None
        # SigLIP was trained on texts padded to the full length (and without attention mask)
        siglip = str(getattr(config, "model_type", "")).startswith("siglip")
        self.text_kwargs = {
            "padding": "max_length" if siglip else "longest",
            "truncation": max_text_length is not None,
            "max_length": max_text_length,
            "return_tensors": "pt",
        }
        # resize / crop in the workers by the image processor; rescale + normalise (an affine map with the
        # processor's own factors) on the accelerator, so workers ship uint8 (4x less) and skip two numpy passes
        self.normalize_on_device = normalize_on_device and all(
            hasattr(image_processor, a) for a in ("do_rescale", "rescale_factor", "do_normalize", "image_mean")
        )
        self.processor_kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self.normalize_on_device:
            self.processor_kwargs.update(do_rescale=False, do_normalize=False)
            scale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
            if image_processor.do_normalize:
                mean = torch.as_tensor(image_processor.image_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
                std = torch.as_tensor(image_processor.image_std, dtype=torch.float32).reshape(1, -1, 1, 1)
            else:
                mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
            # x * scale - mean) / std  ==  x * a + b
            self._affine = ((scale / std).to(device), (-mean / std).to(device))
        self.jpeg_draft = jpeg_draft
        self.draft_size = self._draft_size() if jpeg_draft else None
        # the vision tower is nearly all of the work: compiling it fuses its elementwise ops (worth it for long runs)
        self.image_features = torch.compile(model.get_image_features) if compile else model.get_image_features
        # Compiled, the tower sees one shape only: a short batch (a shard's last one, or one with bad rows) is padded
        # with blank images up to `batch_size` rather than recompiled for (about a minute on a GPU, each time).
        self.pad_images_to = batch_size if compile else None

    def _draft_size(self) -> tuple[int, int] | None:
        size = getattr(self.image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
        if get("shortest_edge"):
            return (int(get("shortest_edge")), int(get("shortest_edge")))
        if get("height") and get("width"):
            return (int(get("width")), int(get("height")))
        return None

    def fingerprint(self) -> str:
        tokenizer_state = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            tokenizer_state = backend.to_str()
        else:
            tokenizer_state = (type(self.tokenizer).__name__, sorted(self.tokenizer.get_vocab().items()))
        return Hasher.hash(
            {
                "version": _CACHE_VERSION,
                "model_class": type(self.model).__name__,
                "config": self.model.config.to_json_string(use_diff=False),
                "weights": _weights_digest(self.model),
                "dtype": str(self.dtype),
                "image_processor": self.image_processor.to_json_string(),
                # the JSON is the same for the PIL and the torchvision backend, whose pixels differ slightly
                "image_processor_class": type(self.image_processor).__name__,
                "tokenizer": tokenizer_state,
                "text_kwargs": {k: v for k, v in self.text_kwargs.items() if k != "return_tensors"},
                "normalize_on_device": self.normalize_on_device,
                "jpeg_draft": self.draft_size,
            }
        )

    @torch.inference_mode()
    def launch(self, batch: dict[str, Any]) -> tuple[np.ndarray, torch.Tensor | None, Any]:
        """Queues the batch's forward pass and the copy of its scores to the host, without waiting for either on a
        GPU: `(ok rows, host scores, event)` for `finish`. The caller prepares the next batch meanwhile, so the GPU
        never waits for the Python between batches."""
        ok = np.asarray(batch["ok"], dtype=bool)
        if not ok.any():
            return ok, None, None
        # a batch may come in worker chunks: each goes to the device on its own (from pinned memory), joined there
        parts = batch["pixel_values"] if isinstance(batch["pixel_values"], list) else [batch["pixel_values"]]
        parts = [part.to(self.device, non_blocking=True) for part in parts]
        n = int(ok.sum())
        if self.pad_images_to is not None and n < self.pad_images_to:
            parts.append(parts[0].new_zeros((self.pad_images_to - n, *parts[0].shape[1:])))
        pixel_values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.normalize_on_device:
            a, b = self._affine
            pixel_values = pixel_values.float() * a + b
        pixel_values = pixel_values.to(self.dtype)
        text = {k: v.to(self.device, non_blocking=True) for k, v in batch["text"].items()}
        image_embeds = _embedding(self.image_features(pixel_values=pixel_values))[:n]
        text_embeds = _embedding(self.model.get_text_features(**text))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        if self.device.type != "cuda":
            return ok, cosine.cpu(), None
        host = torch.empty(cosine.shape, dtype=cosine.dtype, pin_memory=True)
        host.copy_(cosine, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return ok, host, done

    def finish(self, batch: dict[str, Any], launched) -> dict[str, Any]:
        """Waits for a launched batch's scores (and for nothing queued after them)."""
        ok, host, done = launched
        if done is not None:
            done.synchronize()
        scores = np.full(ok.shape[0], np.nan, dtype=np.float32)
        if host is not None:
            scores[ok] = host.numpy()
        return {"clip_score": scores, "clip_error": list(batch["errors"])}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.finish(batch, self.launch(batch))


# ----------------------------------------------------------------------------------------------------------------
# worker side: one item = one chunk of a batch's rows, decoded and preprocessed
# ----------------------------------------------------------------------------------------------------------------


def _identity(x):
    return x


class _PairBatches(torch.utils.data.Dataset):
    """Item `b` = rows `batches[b]` (a batch, or a chunk of one): decode their images, run the image processor and
    the tokenizer (in a worker process)."""

    def __init__(self, view: _PairView, batches: list[np.ndarray], reasons: np.ndarray, scorer: _ClipScorer):
        self.view, self.batches, self.reasons = view, batches, reasons
        self.image_processor, self.tokenizer = scorer.image_processor, scorer.tokenizer
        self.processor_kwargs, self.text_kwargs = scorer.processor_kwargs, scorer.text_kwargs
        self.draft_size = scorer.draft_size

    def __len__(self) -> int:
        return len(self.batches)

    def _open(self, cell):
        from PIL import Image

        path, data = self.view.image_source(cell)
        image = Image.open(_io_bytes(data) if data is not None else path)
        if self.draft_size is not None and image.format == "JPEG":
            image.draft("RGB", self.draft_size)
        image.load()
        return image

    def __getitem__(self, b: int) -> dict[str, Any]:
        indices = self.batches[b]
        errors = self.reasons[indices].tolist()
        todo = [j for j, e in enumerate(errors) if e is None]
        rows = (
            self.view.pairs[indices[todo].tolist()]
            if todo
            else {self.view.image_column: [], self.view.text_column: []}
        )
        images, texts, keep = [], [], []
        for j, cell, text in zip(todo, rows[self.view.image_column], rows[self.view.text_column]):
            try:
                images.append(self._open(cell))
            except FileNotFoundError as e:
                errors[j] = f"{_FILE_NOT_FOUND}: {e.filename}"
                continue
            except Exception as e:  # noqa: BLE001  (PIL raises many kinds)
                errors[j] = f"{_UNDECODABLE}: {type(e).__name__}: {e}"
                continue
            texts.append(text)
            keep.append(j)
        pixel_values = None
        if images:
            try:
                pixel_values = self.image_processor(images=images, **self.processor_kwargs)["pixel_values"]
            except Exception:  # noqa: BLE001  one odd image must not sink the batch: find it
                good, arrays = [], []
                for j, image in zip(keep, images):
                    try:
                        arrays.append(self.image_processor(images=[image], **self.processor_kwargs)["pixel_values"])
                        good.append(j)
                    except Exception as e:  # noqa: BLE001
                        errors[j] = f"{_UNDECODABLE}: {type(e).__name__}: {e}"
                texts = [t for j, t in zip(keep, texts) if j in set(good)]
                keep = good
                pixel_values = torch.cat(arrays) if arrays else None
        ok = np.zeros(len(indices), dtype=bool)
        ok[keep] = True
        text = dict(self.tokenizer(texts, **self.text_kwargs)) if keep else {}
        text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask", "position_ids")}
        return {"indices": indices, "ok": ok, "errors": errors, "pixel_values": pixel_values, "text": text}


def _io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def _merge_chunks(chunks: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One batch from consecutive worker chunks: rows concatenated, the tokenised captions padded to the longest
    chunk (pad id, attention 0: as the tokenizer pads a whole batch), images left as a list of chunk tensors."""
    if len(chunks) == 1:
        return chunks[0]
    texts = [c["text"] for c in chunks if c["text"]]
    text = {}
    if texts:
        length = max(t["input_ids"].shape[1] for t in texts)
        for key in texts[0]:
            fill = pad_token_id if key == "input_ids" else 0
            text[key] = torch.cat(
                [torch.nn.functional.pad(t[key], (0, length - t[key].shape[1]), value=fill) for t in texts]
            )
    return {
        "indices": np.concatenate([c["indices"] for c in chunks]),
        "ok": np.concatenate([c["ok"] for c in chunks]),
        "errors": [e for c in chunks for e in c["errors"]],
        "pixel_values": [c["pixel_values"] for c in chunks if c["pixel_values"] is not None],
        "text": text,
    }


def _scored_batches(view, batches, reasons, scorer, num_workers: int, prefetch_factor: int):
    """Generator of (batch, scores) in order; decoding runs in `num_workers` DataLoader worker processes.

    Each batch is decoded in chunks of about batch_size / workers rows, one per worker, so that the first batch is
    ready after one chunk's decoding rather than a whole batch's (the pipeline fill, seconds at batch 256)."""
    if not batches:
        return
    workers = min(num_workers, sum(len(b) for b in batches))
    size = max(1, -(-max(len(b) for b in batches) // workers)) if workers > 0 else None
    chunks, owner = [], []
    for k, rows in enumerate(batches):
        parts = [rows[i : i + size] for i in range(0, len(rows), size)] if size else [rows]
        chunks += parts
        owner += [k] * len(parts)
    loader = torch.utils.data.DataLoader(
        _PairBatches(view, chunks, reasons, scorer),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=scorer.device.type == "cuda",
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )
    pad_token_id = getattr(scorer.tokenizer, "pad_token_id", None) or 0
    iterator = iter(loader)
    try:
        pending = []
        in_flight = None  # (batch, launched): queued on the device, scores not read yet
        for j, chunk in enumerate(iterator):
            pending.append(chunk)
            if j + 1 < len(chunks) and owner[j + 1] == owner[j]:
                continue  # the batch's other chunks are still to come
            batch = _merge_chunks(pending, pad_token_id)
            pending = []
            # batch k+1 is queued before batch k's scores are read: the GPU goes on while they are written
            try:
                launched = (batch, scorer.launch(batch))
            except BaseException:
                if in_flight is not None:  # the batch before it is done: hand it over (cached), then fail
                    yield in_flight[0], scorer.finish(*in_flight)
                raise
            if in_flight is not None:
                yield in_flight[0], scorer.finish(*in_flight)
            in_flight = launched
        if in_flight is not None:
            yield in_flight[0], scorer.finish(*in_flight)
    finally:
        del iterator  # stops the workers, also when the consumer raised


class _ScoreStream:
    """The scored rows of `_scored_batches`, in order, handed out in runs of any length: `take(rows)` returns the
    scores of exactly those rows (the next ones in the stream), reading further batches as needed."""

    def __init__(self, results):
        self.results = results
        self.indices = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0, dtype=np.float32)
        self.errors: list = []

    def take(self, rows: np.ndarray) -> dict[str, Any]:
        while len(self.indices) < len(rows):
            batch, result = next(self.results)
            self.indices = np.concatenate([self.indices, batch["indices"]])
            self.scores = np.concatenate([self.scores, result["clip_score"]])
            self.errors += result["clip_error"]
        n = len(rows)
        if not np.array_equal(self.indices[:n], rows):
            raise RuntimeError("internal error: data loader and map are out of step")
        out = {"clip_score": self.scores[:n], "clip_error": self.errors[:n]}
        self.indices, self.scores, self.errors = self.indices[n:], self.scores[n:], self.errors[n:]
        return out


# ----------------------------------------------------------------------------------------------------------------
# score_pairs
# ----------------------------------------------------------------------------------------------------------------


def _partial_state(device):
    """accelerate's process state; CPU runs launched with several processes (torchrun) need `cpu=True` for gloo."""
    from accelerate import PartialState

    if device is not None:
        cpu = torch.device(device).type == "cpu"
    else:
        accelerator = getattr(torch, "accelerator", None)
        cpu = not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _default_cache_dir() -> str:
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "aligngpt_clip_scores")


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_num_workers(num_processes: int) -> int:
    return max(1, min(32, _available_cpus() // max(1, num_processes) - 1))


def score_pairs(
    dataset: Dataset,
    model_name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL,
    *,
    model=None,
    image_processor=None,
    tokenizer=None,
    image_column: str = "images",
    text_column: str = "caption",
    id_column: str | None = "id",
    image_folder: str | os.PathLike | None = None,
    score_column: str = "clip_score",
    batch_size: int = 128,
    num_workers: int | None = None,
    prefetch_factor: int = 4,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    shard_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    overwrite_cache: bool = False,
    on_bad: str = "skip",
    normalize_on_device: bool = True,
    jpeg_draft: bool = False,
    image_backend: str = "auto",
    max_text_length: int | None = None,
    compile: bool = False,
    progress: bool = True,
    return_report: bool = False,
    **from_pretrained_kwargs,
):
    """CLIP cosine similarity of every image with its caption, added as column `score_column` (float32).

    Args:
        dataset: rows with an image (`image_column`: a path, a one-element list of paths such as the `images` column
            of `load_llava_json`, or a `datasets.Image` / `List(Image)` feature) and a caption (`text_column`).
        model_name_or_path: a CLIP or SigLIP checkpoint (Hub id or local folder) loaded with `AutoModel`,
            `AutoImageProcessor` (see `image_backend`) and `AutoTokenizer`; ignored for what `model` /
            `image_processor` / `tokenizer` provide.
        model, image_processor, tokenizer: already-built components (e.g. a model built from a config).
        id_column: ids, for the report and the duplicate check (row numbers when absent).
        image_folder: folder that relative image paths are relative to.
        batch_size: pairs per forward pass. num_workers: DataLoader worker processes that decode and preprocess
            (default: the CPUs of this process's share of the machine, minus one); 0 decodes in this process.
        prefetch_factor: chunks each worker prepares ahead (a batch is decoded in chunks of about
            batch_size / num_workers rows, one per worker; they wait in shared memory, /dev/shm).
        device, dtype: default: accelerate's device for this process; bf16 (fp16 without bf16) on GPU, fp32 on CPU.
        shard_size: average rows per cache file (boundaries follow the content, at most 4x this); an interrupted
            run loses at most the shards in flight.
        cache_dir: where the shard files live (default: `<HF datasets cache>/aligngpt_clip_scores`);
            `overwrite_cache=True` rescores everything.
        on_bad: `"skip"` drops bad rows from the result, `"error"` raises `BadRowsError` (see the module docstring).
        normalize_on_device: rescale and normalise on the accelerator (the processor's own factors) instead of in
            the workers; `False` runs the whole image processor in the workers.
        jpeg_draft: let libjpeg decode large JPEGs at a reduced scale (still at least the processor's resize size):
            much faster for big images, slightly different pixels.
        image_backend: the image processor's backend when it is loaded here: `"auto"` (torchvision if installed,
            else PIL), `"torchvision"` or `"pil"`. With the torchvision one a worker decodes and preprocesses
            about 2x faster (BENCHMARKS.md); the two differ by at most 2 of 255 in a pixel, so scores differ
            slightly (their caches are separate).
        max_text_length: token limit of captions (default: the text model's position limit, 77 for CLIP).
        compile: `torch.compile` the image tower (a minute of compilation, faster afterwards on GPU); short
            batches are padded to `batch_size` so that it compiles once.
        progress: show a progress bar (on the main process).
        return_report: also return the `BadRowsReport`.
        **from_pretrained_kwargs: passed to every `from_pretrained` (`revision`, `local_files_only`, ...).

    Returns:
        the dataset with `score_column` added (bad rows dropped with `on_bad="skip"`), or `(dataset, report)`.
    """
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    image_backend = _resolve_image_backend(image_backend)  # checked before the model is loaded (a download)
    state = _partial_state(device)
    device = torch.device(device) if device is not None else state.device
    dtype = _resolve_dtype(dtype, device)
    if num_workers is None:
        num_workers = _default_num_workers(state.num_processes)

    if model is None:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_name_or_path, dtype=dtype, **from_pretrained_kwargs)
    if image_processor is None:
        image_processor = _load_image_processor(model_name_or_path, image_backend, **from_pretrained_kwargs)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
    scorer = _ClipScorer(
        model,
        image_processor,
        tokenizer,
        device,
        dtype,
        normalize_on_device=normalize_on_device,
        jpeg_draft=jpeg_draft,
        max_text_length=max_text_length,
        compile=compile,
        batch_size=batch_size,
    )

    view = _PairView(dataset, image_column, text_column, id_column, image_folder)
    n = len(view)
    table = view.table()
    ids = view.ids(table)
    reasons = _prescan(view, table, ids, check_files=on_bad == "error")
    if on_bad == "error" and (reasons != None).any():
        raise BadRowsError(_report_from(reasons, ids), " found before scoring")

    # shards: runs of consecutive rows cut where the rows' content says (so an edit moves no other shard), each
    # cached under a fingerprint of its rows and of the scorer
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else _default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    scorer_key = scorer.fingerprint()
    digests = _row_digests(view, table)
    ranges = _shard_ranges(digests, shard_size)
    keys, files = [], []
    for start, end in ranges:
        key = Hasher.hash(
            {
                "scorer": scorer_key,
                "rows": digests[start:end].tobytes(),
                "image_folder": view.image_folder,
                "skipped": reasons[start:end].tolist(),
            }
        )
        keys.append(key)
        files.append(os.path.join(cache_dir, f"clip-scores-{key}.arrow"))
    # shards with the same rows (repeated blocks of a corpus) share one cache file: scored once, read by each
    first_of_key = {}
    for k, key in enumerate(keys):
        first_of_key.setdefault(key, k)
    pending = [
        k for k, f in enumerate(files) if first_of_key[keys[k]] == k and (overwrite_cache or not os.path.exists(f))
    ]
    state.wait_for_everyone()  # every process has seen the same cache state before anything is written
    with state.split_between_processes(pending) as mine:
        mine = list(mine)

    n_mine = sum(ranges[k][1] - ranges[k][0] for k in mine)
    if state.is_main_process:
        logger.info(
            "scoring %d pairs: %d shards of ~%d, %d cached, %d to score on %d process(es); %d rows here on %s "
            "(%s), %d decoding workers",
            n,
            len(ranges),
            shard_size,
            len(ranges) - len(pending),
            len(pending),
            state.num_processes,
            n_mine,
            device,
            dtype,
            num_workers,
        )
    from tqdm.auto import tqdm

    bar = tqdm(total=n_mine, unit="pair", desc="CLIP scores", disable=not progress or not state.is_main_process)
    # the model's batches run over this process's rows regardless of shard boundaries (full batches but the last:
    # no short batch at every shard's end); each shard's `map` takes its rows' scores from the stream in order
    rows = np.concatenate([np.arange(*ranges[k], dtype=np.int64) for k in mine]) if mine else np.empty(0, np.int64)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    results = _scored_batches(view, batches, reasons, scorer, num_workers, prefetch_factor)
    stream = _ScoreStream(results)
    texts_only = view.pairs.select_columns([view.text_column])

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # one bar for the whole run, not one per shard
    threads = torch.get_num_threads()
    if device.type == "cpu" and num_workers > 0 and batches:
        # the model shares the CPUs with the decoding workers: oversubscribed OpenMP threads crawl
        torch.set_num_threads(max(1, min(threads, _available_cpus() - num_workers)))
    try:
        for k in mine:
            start, end = ranges[k]

            def score_batch(_texts, local_indices, _start=start):
                scores = stream.take(np.asarray(local_indices, dtype=np.int64) + _start)
                bar.update(len(local_indices))
                return scores

            texts_only.select(range(start, end)).map(
                score_batch,
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                input_columns=[view.text_column],
                remove_columns=[view.text_column],
                features=_SCORE_FEATURES,
                cache_file_name=files[k],
                new_fingerprint=keys[k],
                load_from_cache_file=not overwrite_cache,
            )
    finally:
        results.close()
        bar.close()
        torch.set_num_threads(threads)
        if not bars_were_disabled:
            enable_progress_bars()
    state.wait_for_everyone()

    # gather every shard (scored here, by another process, or in an earlier run)
    if files:
        scored = concatenate_datasets([Dataset.from_file(f) for f in files]).with_format("arrow")[:]
    else:
        scored = pa.table({"clip_score": pa.array([], pa.float32()), "clip_error": pa.array([], pa.string())})
    scores = scored.column("clip_score").to_numpy().astype(np.float32)  # nulls never occur: NaN marks failures
    error_column = scored.column("clip_error")
    errors = np.asarray(error_column.to_pylist(), dtype=object)

    # images that failed in an earlier run are tried again (they may have been fixed since): a small pass, uncached
    failed_image = pc.fill_null(
        pc.or_(pc.starts_with(error_column, _FILE_NOT_FOUND), pc.starts_with(error_column, _UNDECODABLE)), False
    ).to_numpy()
    from_earlier_run = np.ones(n, dtype=bool)
    scored_now = {keys[k] for k in pending}
    for k, key in enumerate(keys):
        if key in scored_now:
            from_earlier_run[ranges[k][0] : ranges[k][1]] = False
    retry = np.flatnonzero(failed_image & from_earlier_run)
    if retry.size:
        logger.info("trying again %d images that failed in an earlier run", retry.size)
        retry_batches = [retry[i : i + batch_size] for i in range(0, retry.size, batch_size)]
        for batch, result in _scored_batches(view, retry_batches, reasons, scorer, 0, prefetch_factor):
            scores[batch["indices"]] = result["clip_score"]
            errors[batch["indices"]] = np.asarray(result["clip_error"], dtype=object)

    report = _report_from(errors, ids)
    if len(report):
        (logger.warning if state.is_main_process else logger.debug)("CLIP scoring: %s", report.summary())
    if on_bad == "error" and len(report):
        raise BadRowsError(report, " (all other pairs are scored and cached)", after_scoring=True)

    out = dataset.remove_columns(score_column) if score_column in dataset.column_names else dataset
    out = out.add_column(score_column, scores, feature=Value("float32"))
    if len(report):
        keep = np.flatnonzero(errors == None)
        out = out.select(keep)
    return (out, report) if return_report else out


# ----------------------------------------------------------------------------------------------------------------
# command line: aligngpt levels / python -m transformers_aligngpt.alignment_levels
# ----------------------------------------------------------------------------------------------------------------


def _add_levels_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", required=True, help="LLaVA-layout JSON (e.g. blip_laion_cc_sbu_558k.json)")
    parser.add_argument("--image-folder", default=None, help="folder the `image` fields are relative to")
    parser.add_argument(
        "--output", required=True, help="where to write the input records with their level added in `similarity`"
    )
    parser.add_argument("--clip", default=DEFAULT_CLIP_MODEL, help="CLIP / SigLIP checkpoint: Hub id or folder")
    parser.add_argument("--num-levels", type=_num_levels, default=8, help="number of alignment levels (default 8)")
    parser.add_argument("--batch-size", type=_positive_int, default=128)
    parser.add_argument("--num-workers", type=int, default=None, help="image-decoding worker processes")
    parser.add_argument("--device", default=None, help="default: accelerate's device for this process")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--shard-size", type=_positive_int, default=8192, help="average rows per resumable cache file")
    parser.add_argument("--cache-dir", default=None, help="default: <HF datasets cache>/aligngpt_clip_scores")
    parser.add_argument("--overwrite-cache", action="store_true", help="rescore everything")
    parser.add_argument(
        "--on-bad",
        default="skip",
        choices=["skip", "error"],
        help="rows with a missing/undecodable image, an empty or absent caption or a duplicate id: drop them from "
        "the output (skip) or stop with a report before writing (error)",
    )
    parser.add_argument("--bad-rows-report", default=None, help="write the bad rows (row, id, reason) as JSON here")
    parser.add_argument("--include-clip-score", action="store_true", help="also write `clip_score` per record")
    parser.add_argument("--jpeg-draft", action="store_true", help="decode large JPEGs at reduced scale (faster)")
    parser.add_argument(
        "--image-backend",
        default="auto",
        choices=IMAGE_BACKENDS,
        help="image processor backend (auto: torchvision when installed, about 2x faster decoding, else PIL)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower (long runs on GPU)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def add_levels_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `levels` on an argparse sub-parser collection (`aligngpt levels ...`); `run_levels` handles it."""
    parser = subparsers.add_parser(
        "levels",
        help="compute alignment levels (CLIP similarity buckets) for a LLaVA-layout data file",
        description=__doc__.split("\n\n")[0],
    )
    _add_levels_arguments(parser)
    parser.set_defaults(func=run_levels)
    return parser


def _check_levels_args(args: argparse.Namespace) -> None:
    """Raises `CommandError` for paths that cannot work, before the model is loaded and anything is scored (an
    output folder that does not exist would otherwise only show after the whole data set was scored)."""
    if not os.path.isfile(args.data):
        raise CommandError(f"--data {args.data}: no such file")
    if args.image_folder and not os.path.isdir(args.image_folder):
        raise CommandError(f"--image-folder {args.image_folder}: no such folder")
    # a local path that is not there would otherwise fail as a confusing "not a valid Hub repo id"
    args.clip = check_model_source("--clip", args.clip)
    for flag, path in (("--output", args.output), ("--bad-rows-report", args.bad_rows_report)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise CommandError(f"{flag} {path}: is a folder; give the file to write")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise CommandError(f"{flag} {path}: the folder {parent} does not exist (create it first)")


def run_levels(args: argparse.Namespace) -> int:
    """Score, bucket and write; returns the exit status (0, or 1 when bad rows or too few rows stop the run).
    Raises `CommandError` (usage + exit status 2 from the command line) for flags that cannot work.

    The output holds the input file's own records, unchanged but for the level in `similarity` (and `clip_score`
    with `--include-clip-score`), skipped rows left out."""
    from .data import load_llava_json, write_llava_json

    _check_levels_args(args)

    state = _partial_state(args.device)
    if state.is_main_process and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    def fail(message: str, report: BadRowsReport | None = None) -> int:
        if state.is_main_process:
            if args.bad_rows_report and report is not None:
                report.save(args.bad_rows_report)
            print(f"error: {message}", file=sys.stderr)
        return 1

    dataset = load_llava_json(args.data, args.image_folder)
    if len(dataset) < args.num_levels:
        return fail(f"{args.data} holds {len(dataset)} records, fewer than --num-levels {args.num_levels}")
    try:
        scored, report = score_pairs(
            dataset,
            args.clip,
            image_column="images",
            text_column="caption",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            shard_size=args.shard_size,
            cache_dir=args.cache_dir,
            overwrite_cache=args.overwrite_cache,
            on_bad=args.on_bad,
            jpeg_draft=args.jpeg_draft,
            image_backend=args.image_backend,
            compile=args.compile,
            progress=not args.no_progress,
            return_report=True,
        )
    except BadRowsError as error:
        hint = "; fix the files or remove those rows, or pass `--on-bad skip` to leave them out"
        if error.after_scoring:
            hint += " (either way the next run reads the other pairs' scores from the cache)"
        return fail(f"{error}{hint}", error.report)
    if len(scored) < args.num_levels:
        return fail(
            f"{len(scored)} pairs are left after skipping {len(report)} bad rows, fewer than --num-levels "
            f"{args.num_levels}: {report.summary()}",
            report,
        )
    leveled = add_alignment_levels(scored, args.num_levels)
    if state.is_main_process:
        if args.bad_rows_report:
            report.save(args.bad_rows_report)
        written = write_llava_json(leveled, args.output, include_clip_score=args.include_clip_score, source=args.data)
        sizes = np.bincount(leveled.with_format("arrow")["alignment_level"].to_numpy(), minlength=args.num_levels)
        print(
            json.dumps(
                {
                    "output": os.fspath(args.output),
                    "records": written,
                    "skipped": len(report),
                    "skipped_by_reason": report.counts(),
                    "skipped_ids": report.ids[:20],
                    "level_sizes": sizes.tolist(),
                }
            )
        )
    state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformers_aligngpt.alignment_levels", description=__doc__.split("\n\n")[0]
    )
    _add_levels_arguments(parser)
    try:
        return run_levels(parser.parse_args(argv))
    except CommandError as error:
        parser.error(str(error))  # usage and the message, exit status 2


if __name__ == "__main__":
    sys.exit(main())
