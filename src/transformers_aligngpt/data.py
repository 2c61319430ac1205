"""Datasets for AlignGPT training.

LLaVA data layout
-----------------
LLaVA (and the original AlignGPT) keep their training data as one JSON file holding a list of records plus a folder
of images::

    [{"id": "004539375", "image": "00453/004539375.jpg",
      "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\\n<image>"},
                        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}],
      "similarity": 5},
     ...]

`image` is relative to the image folder and absent for text-only records (LLaVA-1.5's 665K mix has them); the
pre-training file `blip_laion_cc_sbu_558k.json` has one human/gpt turn per record, the gpt answer being the caption.
AlignGPT's pre-training file adds `similarity`: the record's alignment level (an integer, `N-1` = best aligned).

`load_llava_json` turns such a file into a `datasets.Dataset` in the transformers / TRL chat format and
`write_llava_json` writes one back in the original format (the alignment level in `similarity`). Given the file the
dataset was read from (`source=`), it writes those records themselves, untouched but for `similarity` (and
`clip_score`): extra fields, numeric ids and the exact turn texts are kept.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterator
from typing import Any

import datasets
from datasets import Dataset, Features, List, Value

__all__ = [
    "IMAGE_PLACEHOLDER",
    "LLAVA_FEATURES",
    "llava_conversations_to_messages",
    "load_llava_json",
    "messages_to_llava_conversations",
    "without_image_decoding",
    "write_llava_json",
]

IMAGE_PLACEHOLDER = "<image>"

_ROLE_FROM_LLAVA = {"human": "user", "gpt": "assistant", "system": "system"}
_LLAVA_FROM_ROLE = {role: speaker for speaker, role in _ROLE_FROM_LLAVA.items()}

#: Columns of the dataset `load_llava_json` returns.
#: - `id`: the record's id (always a string; LLaVA's files mix strings and numbers);
#: - `record_index`: the record's position in the file (it survives filtering: `write_llava_json(source=...)`);
#: - `image_file`: the `image` field as written in the file (relative to the image folder), None for text-only
#:   records and for records that list several images;
#: - `images`: the image path(s) resolved against the image folder: `[path]` (several for a record whose `image` is
#:   a list), or `[]` for text-only records (the column TRL's `SFTTrainer` reads; cast it with
#:   `datasets.List(datasets.Image())` to decode);
#: - `messages`: the conversation in the transformers chat format;
#: - `caption`: the gpt answer for single-turn records (the pre-training captions), else None (multi-turn records
#:   have no caption: CLIP scoring reports them as "no caption");
#: - `alignment_level`: the `similarity` field (None when absent); `clip_score`: a score written by
#:   `write_llava_json(include_clip_score=True)` (None when absent).
LLAVA_FEATURES = Features(
    {
        "id": Value("string"),
        "record_index": Value("int64"),
        "image_file": Value("string"),
        "images": List(Value("string")),
        "messages": List(
            {
                "role": Value("string"),
                "content": List({"type": Value("string"), "text": Value("string")}),
            }
        ),
        "caption": Value("string"),
        "alignment_level": Value("int32"),
        "clip_score": Value("float32"),
    }
)


def _value_to_content(value: str) -> list[dict[str, Any]]:
    """LLaVA turn text -> chat content blocks; each `<image>` becomes an image block.

    The newline that LLaVA puts between the placeholder and the text (`"<image>\\nQ"`, `"Q\\n<image>"`) belongs to the
    placeholder and is dropped; `_content_to_value` puts it back.
    """
    pieces = value.split(IMAGE_PLACEHOLDER)
    last = len(pieces) - 1
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image", "text": None})
            piece = piece.removeprefix("\n")
        if i < last and piece.endswith("\n"):
            piece = piece[:-1]
        if piece or last == 0:
            content.append({"type": "text", "text": piece})
    return content


def _content_to_value(content: str | list[dict[str, Any]] | None) -> str:
    """Chat content blocks -> LLaVA turn text, inverse of `_value_to_content` (`<image>` joined with a newline)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out: list[str] = []
    previous = None
    for block in content:
        kind = block.get("type")
        if kind == "image":
            if previous == "text":
                out.append("\n")
            out.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            if previous == "image":
                out.append("\n")
            out.append(block.get("text") or "")
        else:
            raise ValueError(f"cannot write a content block of type {kind!r} in the LLaVA layout")
        previous = kind
    return "".join(out)


def llava_conversations_to_messages(conversations: list[dict[str, str]]) -> list[dict[str, Any]]:
    """`[{"from": "human"|"gpt"|"system", "value": ...}]` -> `[{"role": ..., "content": [blocks]}]`.

    A `gpt` turn that opens the conversation (after any system turn) is dropped, as LLaVA's and AlignGPT's
    `preprocess` drop it: an answer to no question would be trained on (ShareGPT-derived mixes hold such records)."""
    messages = []
    for turn in conversations:
        speaker = turn.get("from")
        if speaker not in _ROLE_FROM_LLAVA:
            raise ValueError(f"unknown speaker {speaker!r} in a LLaVA conversation (expected human, gpt or system)")
        message = {"role": _ROLE_FROM_LLAVA[speaker], "content": _value_to_content(turn.get("value") or "")}
        if message["role"] == "assistant" and all(m["role"] == "system" for m in messages):
            if any(block.get("type") == "image" for block in message["content"]):
                raise ValueError(
                    "a LLaVA conversation opens with a gpt turn that holds <image>: LLaVA drops an opening gpt turn, "
                    "which would drop the image too. Move <image> into the first human turn."
                )
            continue
        messages.append(message)
    if not any(message["role"] != "system" for message in messages):
        # (nothing to train on, and a chat template would fail on it mid-run)
        raise ValueError(
            "a LLaVA conversation holds no human turn (an opening gpt turn is dropped, as LLaVA does): remove the "
            "record or give it a question."
        )
    return messages


def messages_to_llava_conversations(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Inverse of `llava_conversations_to_messages`."""
    conversations = []
    for message in messages:
        role = message["role"]
        if role not in _LLAVA_FROM_ROLE:
            raise ValueError(f"role {role!r} has no equivalent in the LLaVA layout (user, assistant or system)")
        conversations.append({"from": _LLAVA_FROM_ROLE[role], "value": _content_to_value(message.get("content"))})
    return conversations


def _read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list of records, or JSON lines (a UTF-8 byte-order mark is allowed)."""
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            records = json.load(f)
        else:
            records = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    hint = ""
                    if number == 1 and head.startswith("{"):
                        hint = (
                            " The file does not start with '[': if it is one JSON object wrapping the list (e.g. "
                            '{"data": [...]}), write the list itself.'
                        )
                    raise ValueError(
                        f"{path}: line {number} is not a JSON record ({error.msg}). Expected a JSON list of "
                        f"records (LLaVA layout) or one record per line.{hint}"
                    ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of objects (LLaVA layout)")
    return records


def integer_level(value: Any) -> int | None:
    """`value` as an int when it is an integer (Python or NumPy, or an integral float such as 3.0), else None
    (strings, booleans, 0.5, NaN): alignment levels are bucket indices, which `int()` would silently truncate."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        return None
    return int(value) if float(value).is_integer() else None


def _level_from_similarity(value: Any, record_id: Any) -> int | None:
    if value is None:
        return None
    level = integer_level(value)
    if level is None:
        raise ValueError(
            f"record {record_id!r}: `similarity` is {value!r}, expected an integer alignment level "
            "(AlignGPT stores the level there, not the raw CLIP score)"
        )
    return level


def load_llava_json(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    decode_images: bool = False,
) -> Dataset:
    """Read a LLaVA-layout JSON file (e.g. `blip_laion_cc_sbu_558k.json`) into a `datasets.Dataset`.

    Args:
        path: the JSON file (a list of `{id, image, conversations[, similarity]}` records; JSON lines also work).
        image_folder: folder the `image` fields are relative to; the `images` column holds the joined paths.
        decode_images: cast `images` to `datasets.List(datasets.Image())` so rows hold PIL images (lazily decoded).

    Returns:
        a Dataset with the columns of `LLAVA_FEATURES`: `id`, `image_file`, `images`, `messages`, `caption`,
        `alignment_level` (from `similarity`), `clip_score`.
    """
    records = _read_records(path)
    folder = os.path.abspath(os.fspath(image_folder)) if image_folder is not None else None

    columns: dict[str, list] = {name: [] for name in LLAVA_FEATURES}
    for i, record in enumerate(records):
        record_id = record.get("id")
        image_file = record.get("image")
        image_files = [image_file] if image_file is not None else []
        if isinstance(image_file, list):  # some LLaVA derivatives store a list; the original holds one image
            image_files = image_file
            image_file = image_file[0] if len(image_file) == 1 else None
        conversations = record.get("conversations")
        if not isinstance(conversations, list):
            wrapped = [k for k, v in record.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            hint = f" (is the list of records wrapped in an object, under {wrapped[0]!r}? write the list itself)"
            raise ValueError(
                f"record {i} ({record_id!r}) has no `conversations` list{hint if wrapped and len(records) == 1 else ''}"
            )
        try:
            messages = llava_conversations_to_messages(conversations)
        except ValueError as error:
            raise ValueError(f"{path}: record {i} ({record_id!r}): {error}") from None
        caption = None
        if [m["role"] for m in messages] == ["user", "assistant"]:
            caption = conversations[-1].get("value")  # (after an opening gpt turn, dropped from the messages)
        clip_score = record.get("clip_score")

        columns["id"].append(None if record_id is None else str(record_id))
        columns["record_index"].append(i)
        columns["image_file"].append(image_file)
        columns["images"].append([os.path.join(folder, f) if folder is not None else f for f in image_files])
        columns["messages"].append(messages)
        columns["caption"].append(caption)
        columns["alignment_level"].append(_level_from_similarity(record.get("similarity"), record_id))
        columns["clip_score"].append(None if clip_score is None else float(clip_score))

    dataset = Dataset.from_dict(columns, features=LLAVA_FEATURES)
    if decode_images:
        dataset = dataset.cast_column("images", List(datasets.Image()))
    return dataset


def without_image_decoding(dataset: Dataset, column: str) -> Dataset:
    """`dataset` with its `datasets.Image` column (or list of them) cast to `decode=False`: rows then hold
    `{"bytes", "path"}` instead of PIL images, for code that only needs where the images are."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, List) and isinstance(feature.feature, datasets.Image):
        return dataset.cast_column(column, List(datasets.Image(decode=False)))
    return dataset


def _iter_llava_records(
    dataset: Dataset,
    *,
    level_column: str | None,
    score_column: str | None,
    image_folder: str | None,
    batch_size: int = 10_000,
) -> Iterator[dict[str, Any]]:
    names = set(dataset.column_names)
    if "messages" not in names and "caption" not in names:
        raise ValueError("the dataset needs a `messages` column (or a `caption` column for pre-training data)")
    # (a single `image` column, as score_pairs(image_column="image") and the pre-training collator read, works too)
    wanted = [c for c in ("id", "image_file", "images", "image", "messages", "caption") if c in names]
    for c in (level_column, score_column):
        if c is not None and c in names:
            wanted.append(c)
    view = dataset.select_columns(wanted)
    for column in ("images", "image"):
        if column in names:  # only paths are written: never decode the images
            view = without_image_decoding(view, column)
    row_number = 0
    for batch in view.iter(batch_size=batch_size):
        n = len(next(iter(batch.values())))
        for j in range(n):
            record: dict[str, Any] = {"id": batch["id"][j] if "id" in batch else str(row_number)}
            image_file = _image_file_of(batch, j, image_folder)
            if image_file is not None:
                record["image"] = image_file
            messages = batch["messages"][j] if "messages" in batch else None
            if messages is None:
                caption = batch.get("caption", [None] * n)[j]
                conversations = [
                    {"from": "human", "value": IMAGE_PLACEHOLDER if image_file is not None else ""},
                    {"from": "gpt", "value": caption or ""},
                ]
            else:
                conversations = messages_to_llava_conversations(messages)
            record["conversations"] = conversations
            _set_level_and_score(record, batch, j, level_column, score_column)
            row_number += 1
            yield record


def _set_level_and_score(record: dict, batch: dict[str, list], j: int, level_column, score_column) -> None:
    """Row `j`'s level as `similarity` and its score as `clip_score`, each left out where the row has none."""
    if level_column is not None and level_column in batch and batch[level_column][j] is not None:
        record["similarity"] = int(batch[level_column][j])
    if score_column is not None and score_column in batch:
        score = batch[score_column][j]
        if score is not None and not math.isnan(score):
            record["clip_score"] = float(score)


def _image_file_of(batch: dict[str, list], j: int, image_folder: str | None) -> str | None:
    if "image_file" in batch and (batch["image_file"][j] is not None or not {"images", "image"} & batch.keys()):
        return batch["image_file"][j]
    if "images" in batch:
        row_images = batch["images"][j] or []
    else:  # a single `image` column: one image per row, or None
        row_images = [] if batch.get("image") is None or batch["image"][j] is None else [batch["image"][j]]
    if not row_images:
        return None
    if len(row_images) > 1:
        raise ValueError(
            f"row {j}: {len(row_images)} images; the LLaVA layout holds one per record (to write records that list "
            "several images, pass the file they were read from: write_llava_json(..., source=FILE))"
        )
    image = row_images[0]
    path = image.get("path") if isinstance(image, dict) else image
    if path is None:
        raise ValueError("an image without a file path cannot be written in the LLaVA layout")
    if image_folder is not None:
        path = os.path.relpath(os.path.abspath(path), os.path.abspath(image_folder))
    return path


def _source_records(
    dataset: Dataset,
    source: str | os.PathLike,
    *,
    level_column: str | None,
    score_column: str | None,
    batch_size: int = 10_000,
) -> Iterator[dict[str, Any]]:
    """The records of `source` behind the dataset's rows (`record_index`), each with the row's level in `similarity`
    (and its score in `clip_score`); every other field as in the file."""
    names = set(dataset.column_names)
    if "record_index" not in names:
        raise ValueError(
            "write_llava_json(source=...) needs the `record_index` column that load_llava_json adds (it maps each "
            "row to its record in the file); keep it, or write without `source` to rebuild the records"
        )
    records = _read_records(source)
    wanted = ["record_index"] + [c for c in ("id", level_column, score_column) if c is not None and c in names]
    for batch in dataset.select_columns(wanted).with_format(None).iter(batch_size=batch_size):
        for j, index in enumerate(batch["record_index"]):
            if index is None or not 0 <= index < len(records):
                raise ValueError(f"record_index {index} is not a record of {source} ({len(records)} records)")
            record = dict(records[index])
            if "id" in batch and batch["id"][j] != (None if record.get("id") is None else str(record.get("id"))):
                raise ValueError(
                    f"row with id {batch['id'][j]!r} maps to record {index} of {source}, whose id is "
                    f"{record.get('id')!r}: `source` must be the file the dataset was read from"
                )
            # the file's own `similarity` / `clip_score` are replaced, or removed where the row has none (a stale
            # score beside a new level would read back as this level's score)
            record.pop("similarity", None)
            record.pop("clip_score", None)
            _set_level_and_score(record, batch, j, level_column, score_column)
            yield record


def write_llava_json(
    dataset: Dataset,
    path: str | os.PathLike,
    *,
    level_column: str | None = "alignment_level",
    include_clip_score: bool = False,
    score_column: str = "clip_score",
    image_folder: str | os.PathLike | None = None,
    indent: int | None = None,
    source: str | os.PathLike | None = None,
) -> int:
    """Write a dataset back in the LLaVA / AlignGPT layout; returns the number of records written.

    With `source`, the LLaVA file the dataset was read with `load_llava_json`: each row's own record of that file
    (found by `record_index`, checked by `id`), unchanged but for `similarity` and `clip_score`, which are the row's
    (left out where the row has none, as without `source`), in the dataset's row order: rows filtered out (e.g.
    skipped by `score_pairs`) are left out.

    Without it, each row is rebuilt as `{"id", "image", "conversations", "similarity"}`: `image` from `image_file`
    (or from `images`, made relative to `image_folder` when given), omitted for text-only rows; `conversations` from
    `messages` (or, without `messages`, a pre-training turn `<image>` -> caption), where the turn texts come back
    in LLaVA's usual shape (`"<image>\\nQ"`); `similarity` from `level_column`, omitted where the level is None.

    `include_clip_score=True` also writes `clip_score`, which `load_llava_json` reads back. The file is written to
    a temporary name and renamed, so an interrupted write never leaves a truncated file.
    """
    path = os.fspath(path)
    score_column = score_column if include_clip_score else None
    if source is not None:
        records = _source_records(dataset, source, level_column=level_column, score_column=score_column)
    else:
        records = _iter_llava_records(
            dataset,
            level_column=level_column,
            score_column=score_column,
            image_folder=os.fspath(image_folder) if image_folder is not None else None,
        )
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            for record in records:
                if count:
                    f.write(",\n")
                f.write(json.dumps(record, ensure_ascii=False, indent=indent))
                count += 1
            f.write("\n]\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count
