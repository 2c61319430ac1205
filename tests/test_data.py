"""LLaVA data layout: reader, writer, round trip, conversion to the transformers chat format."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from transformers_aligngpt.data import (
    LLAVA_FEATURES,
    llava_conversations_to_messages,
    load_llava_json,
    messages_to_llava_conversations,
    write_llava_json,
)

PRETRAIN = [
    {
        "id": "004539375",
        "image": "00453/004539375.jpg",
        "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
        ],
        "similarity": 5,
    },
    {
        "id": "GCC_train_002582585",
        "image": "GCC_train_002582585.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nGive a brief description of the image."},
            {"from": "gpt", "value": "olive oil is a healthy ingredient used liberally ."},
        ],
        "similarity": 0,
    },
    {
        "id": "no-level",
        "image": "sub/dir/x.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a caption"}],
    },
]

INSTRUCT = [
    {  # multi-turn with an image (LLaVA-665K style)
        "id": "000000033471",
        "image": "coco/train2017/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {  # text-only (ShareGPT rows have no image key)
        "id": "i6IyJda_0",
        "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "1. Homogeneity\n2. Distinctiveness\n\n3. Stability"},
        ],
    },
    {  # placeholder in the middle, several newlines around it
        "id": "mid",
        "image": "m.jpg",
        "conversations": [
            {"from": "human", "value": "Look:\n\n<image>\nthen answer."},
            {"from": "gpt", "value": ""},
        ],
    },
]


def write(path, records):
    Path(path).write_text(json.dumps(records, indent=2))
    return path


def test_read_pretraining_file(tmp_path):
    ds = load_llava_json(write(tmp_path / "blip_laion_cc_sbu_558k.json", PRETRAIN), tmp_path / "images")
    assert ds.features == LLAVA_FEATURES
    assert ds["id"] == ["004539375", "GCC_train_002582585", "no-level"]
    assert ds["image_file"] == [r["image"] for r in PRETRAIN]
    assert ds["images"] == [[str(tmp_path / "images" / r["image"])] for r in PRETRAIN]
    assert ds["caption"] == [r["conversations"][1]["value"] for r in PRETRAIN]
    assert ds["alignment_level"] == [5, 0, None]
    assert ds["clip_score"] == [None, None, None]
    first = ds[0]["messages"]
    assert first[0] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Render a clear and concise summary of the photo."},
            {"type": "image", "text": None},
        ],
    }
    assert first[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": PRETRAIN[0]["conversations"][1]["value"]}],
    }
    assert ds[1]["messages"][0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": "Give a brief description of the image."},
    ]
    assert ds[2]["messages"][0]["content"] == [{"type": "image", "text": None}]


def test_read_instruction_file_with_text_only_rows(tmp_path):
    ds = load_llava_json(write(tmp_path / "mix.json", INSTRUCT))  # no image folder: paths as written
    assert ds["images"] == [["coco/train2017/000000033471.jpg"], [], ["m.jpg"]]
    assert ds["image_file"] == ["coco/train2017/000000033471.jpg", None, "m.jpg"]
    assert ds["caption"] == [None, INSTRUCT[1]["conversations"][1]["value"], ""]
    assert [m["role"] for m in ds[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ds[1]["messages"][0]["content"] == [{"type": "text", "text": INSTRUCT[1]["conversations"][0]["value"]}]
    assert ds[2]["messages"][0]["content"] == [
        {"type": "text", "text": "Look:\n"},
        {"type": "image", "text": None},
        {"type": "text", "text": "then answer."},
    ]
    # one image block per image row, none for the text-only row
    counts = [sum(b["type"] == "image" for m in msgs for b in m["content"]) for msgs in ds["messages"]]
    assert counts == [1, 0, 1]


@pytest.mark.parametrize("records", [PRETRAIN, INSTRUCT, PRETRAIN + INSTRUCT], ids=["pretrain", "instruct", "mix"])
def test_round_trip(tmp_path, records):
    source = write(tmp_path / "in.json", records)
    ds = load_llava_json(source, tmp_path)
    assert write_llava_json(ds, tmp_path / "out.json") == len(records)
    assert json.loads((tmp_path / "out.json").read_text()) == records
    again = load_llava_json(tmp_path / "out.json", tmp_path)
    assert again.to_list() == ds.to_list()


def test_conversation_conversion_is_inverse():
    for record in PRETRAIN + INSTRUCT:
        conversations = record["conversations"]
        assert messages_to_llava_conversations(llava_conversations_to_messages(conversations)) == conversations
    with pytest.raises(ValueError, match="unknown speaker"):
        llava_conversations_to_messages([{"from": "robot", "value": "x"}])
    # an opening gpt turn answers no question: dropped, as LLaVA's preprocess drops it (after a system turn too)
    opening = [{"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "<image>\nSay hi"},
               {"from": "gpt", "value": "hi"}]
    for prefix in ([], [{"from": "system", "value": "Be brief."}]):
        messages = llava_conversations_to_messages(prefix + opening)
        assert [m["role"] for m in messages] == ["system"] * len(prefix) + ["user", "assistant"]
        assert messages[-1]["content"] == [{"type": "text", "text": "hi"}]
    with pytest.raises(ValueError, match="opens with a gpt turn that holds <image>"):
        llava_conversations_to_messages([{"from": "gpt", "value": "<image>\nLook"}, {"from": "human", "value": "ok"}])
    # a record left with nothing to train on is named when the file is read, not mid-run by the chat template
    for lone in ([{"from": "gpt", "value": "Hello!"}], []):
        with pytest.raises(ValueError, match="holds no human turn"):
            llava_conversations_to_messages(lone)


def test_reader_names_a_record_without_a_question(tmp_path):
    records = INSTRUCT + [{"id": "greeting", "conversations": [{"from": "gpt", "value": "Hello!"}]}]
    expected = rf"record {len(INSTRUCT)} \('greeting'\): a LLaVA conversation holds no human"
    with pytest.raises(ValueError, match=expected):
        load_llava_json(write(tmp_path / "bad.json", records))
    # plain string contents (another common chat format) are written as they are
    assert messages_to_llava_conversations([{"role": "user", "content": "hi"}]) == [{"from": "human", "value": "hi"}]


def test_numeric_ids_and_bad_similarity(tmp_path):
    records = [dict(PRETRAIN[0], id=12), dict(PRETRAIN[1], similarity=3.0)]
    ds = load_llava_json(write(tmp_path / "a.json", records))
    assert ds["id"] == ["12", PRETRAIN[1]["id"]] and ds["alignment_level"] == [5, 3]
    with pytest.raises(ValueError, match="integer alignment level"):
        load_llava_json(write(tmp_path / "b.json", [dict(PRETRAIN[0], similarity=0.2734)]))


def test_levels_and_scores_written_back(tmp_path):
    ds = load_llava_json(write(tmp_path / "in.json", PRETRAIN))
    ds = ds.remove_columns(["alignment_level", "clip_score"])
    ds = ds.add_column("alignment_level", [7, 1, 4]).add_column("clip_score", np.array([0.31, 0.12, 0.25], np.float32))
    write_llava_json(ds, tmp_path / "out.json", include_clip_score=True)
    written = json.loads((tmp_path / "out.json").read_text())
    assert [r["similarity"] for r in written] == [7, 1, 4]
    np.testing.assert_allclose([r["clip_score"] for r in written], [0.31, 0.12, 0.25], rtol=1e-6)
    back = load_llava_json(tmp_path / "out.json")
    assert back["alignment_level"] == [7, 1, 4]
    np.testing.assert_allclose(back["clip_score"], [0.31, 0.12, 0.25], rtol=1e-6)
    # without the flag the original's format exactly: no clip_score key
    write_llava_json(ds, tmp_path / "plain.json")
    assert all("clip_score" not in r for r in json.loads((tmp_path / "plain.json").read_text()))


def test_decoded_images_and_writing_from_images_column(tmp_path):
    folder = tmp_path / "images"
    (folder / "00453").mkdir(parents=True)
    (folder / "sub" / "dir").mkdir(parents=True)
    Image.new("RGB", (7, 5), (255, 0, 0)).save(folder / "00453" / "004539375.jpg")
    Image.new("RGB", (4, 9), (0, 255, 0)).save(folder / "GCC_train_002582585.jpg")
    Image.new("RGB", (3, 3), (0, 0, 255)).save(folder / "sub" / "dir" / "x.png")
    ds = load_llava_json(write(tmp_path / "in.json", PRETRAIN), folder, decode_images=True)
    assert [img[0].size for img in ds["images"]] == [(7, 5), (4, 9), (3, 3)]
    # a dataset that only has the `images` column (e.g. built by hand for TRL) is written relative to the folder
    only_images = ds.remove_columns(["image_file"])
    write_llava_json(only_images, tmp_path / "out.json", image_folder=folder)
    assert json.loads((tmp_path / "out.json").read_text()) == PRETRAIN
    # ... and one with a single `image` column (what score_pairs(image_column="image") and HF caption sets use),
    # as paths or as datasets.Image
    single = only_images.map(lambda row: {"image": row["images"][0]}, remove_columns=["images"])
    for variant in (single, single.cast_column("image", datasets.Image())):
        write_llava_json(variant, tmp_path / "single.json", image_folder=folder)
        assert json.loads((tmp_path / "single.json").read_text()) == PRETRAIN
    # (an `image_file` column without a value does not hide the row's `image`)
    with_empty_file = single.add_column("image_file", [None] * len(single))
    write_llava_json(with_empty_file, tmp_path / "single.json", image_folder=folder)
    assert json.loads((tmp_path / "single.json").read_text()) == PRETRAIN


def test_caption_only_dataset_is_written_as_pretraining_records(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "image_file": ["a.jpg", "b.jpg"], "caption": ["a cat", "a dog"], "alignment_level": [0, 1]}
    )
    write_llava_json(ds, tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written[1] == {
        "id": "b",
        "image": "b.jpg",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a dog"}],
        "similarity": 1,
    }
    assert load_llava_json(tmp_path / "out.json")["caption"] == ["a cat", "a dog"]


def test_source_writes_the_files_own_records(tmp_path):
    """Given the file the dataset came from, the writer keeps every record as it is (extra fields, numeric ids,
    image lists, the turn texts' exact whitespace), sets the level, and leaves out rows that were filtered away."""
    odd = [
        dict(PRETRAIN[0], id=12345, source="laion", extra={"nested": [1, 2]}),
        dict(PRETRAIN[1], image=["GCC_train_002582585.jpg"]),
        {"id": "t", "image": "t.jpg", "conversations": [
            {"from": "human", "value": "\n<image>Describe <image> this.\n"}, {"from": "gpt", "value": "<image> in it"}]},
        dict(INSTRUCT[0], image=["a.jpg", "b.jpg"]),  # a record that lists two images
        INSTRUCT[1],
    ]
    source = write(tmp_path / "odd.json", odd)
    ds = load_llava_json(source, tmp_path)
    assert ds["record_index"] == [0, 1, 2, 3, 4]
    assert ds["images"][3] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")] and ds["image_file"][3] is None
    kept = ds.select([0, 1, 2, 3]).remove_columns("alignment_level").add_column("alignment_level", [3, 1, 0, 2])
    assert write_llava_json(kept, tmp_path / "out.json", source=source) == 4
    written = json.loads((tmp_path / "out.json").read_text())
    assert written == [dict(odd[i], similarity=level) for i, level in zip(range(4), [3, 1, 0, 2])]
    # rebuilt without the source, a record with two images cannot be written in the one-image layout: it says so
    with pytest.raises(ValueError, match="source="):
        write_llava_json(kept, tmp_path / "rebuilt.json")
    # a source that is not the dataset's file is refused, not silently mismatched
    other = write(tmp_path / "other.json", list(reversed(odd)))
    with pytest.raises(ValueError, match="must be the file the dataset was read from"):
        write_llava_json(kept, tmp_path / "wrong.json", source=other)
    with pytest.raises(ValueError, match="record_index"):
        write_llava_json(kept.remove_columns("record_index"), tmp_path / "x.json", source=source)
    # a file that already has levels and scores (an earlier run's output): the row's values replace them, and a row
    # without a level or score gets neither, as without `source`: no stale score beside a new level
    scored = write(tmp_path / "scored.json", [dict(r, similarity=7, clip_score=0.9) for r in odd])
    ds = load_llava_json(scored, tmp_path).select([0, 1]).remove_columns("alignment_level")
    write_llava_json(ds.add_column("alignment_level", [2, None]), tmp_path / "again.json", source=scored)
    without_level = {k: v for k, v in odd[1].items() if k != "similarity"}
    assert json.loads((tmp_path / "again.json").read_text()) == [dict(odd[0], similarity=2), without_level]


def test_reader_accepts_bom_and_json_lines_and_explains_a_wrapped_list(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_text(json.dumps(PRETRAIN), encoding="utf-8-sig")
    assert load_llava_json(bom)["id"] == [r["id"] for r in PRETRAIN]
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in PRETRAIN) + "\n\n")
    assert load_llava_json(lines)["id"] == [r["id"] for r in PRETRAIN]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": PRETRAIN}, indent=2))
    with pytest.raises(ValueError, match=r"line 1 is not a JSON record.*write the list itself"):
        load_llava_json(wrapped)
    wrapped.write_text(json.dumps({"data": PRETRAIN}))  # on one line it reads as one JSON-lines record
    with pytest.raises(ValueError, match=r"wrapped in an object, under 'data'"):
        load_llava_json(wrapped)
