"""The demo data generator is deterministic, its images show what its captions and answers claim, and its
caption quality labels are what they say.

The checks read scenes back from the pixels (`read_scene`) and count caption errors with the parser, so
they do not rely on the generator's own bookkeeping.
"""

import random
import re
import time

import numpy as np
import pytest

from transformers_aligngpt.demo import scenes as S
from transformers_aligngpt.demo import (
    COLOURS,
    DEMO_SEED,
    POSITIONS,
    QUALITY_NAMES,
    SYSTEM_PROMPT,
    Scene,
    SceneObject,
    build_instruction_data,
    build_pretraining_data,
    build_yes_no_eval,
    caption_errors,
    caption_for,
    demo_corpus,
    demo_datasets,
    random_scene,
)

WHITE = (255, 255, 255)
COLOUR_OF_RGB = {rgb: name for name, rgb in COLOURS.items()}


def read_scene(image) -> set[tuple[str, str, str]]:
    """(colour, shape, position) of every object in a rendered image, read from pixels only.

    Colour: the pixel at the cell centre. Shape: walk right from the centre to the edge (half-width w), then
    look at (w, -w) and (w, +w): a square fills both corners, a triangle (apex up) only the lower one, a
    circle neither (they lie at 1.41 radii).
    """
    px, n = image.convert("RGB").load(), image.size[0]
    found = set()
    for i, position in enumerate(POSITIONS):
        cx, cy = S.cell_centre(i, n)
        colour = px[cx, cy]
        if colour == WHITE:
            continue
        w = 0
        while px[cx + w + 1, cy] == colour:
            w += 1
        shape = "square" if px[cx + w, cy - w] == colour else "triangle" if px[cx + w, cy + w] == colour else "circle"
        found.add((COLOUR_OF_RGB[colour], shape, position))
    return found


def as_scene(objects: set[tuple[str, str, str]]) -> Scene:
    return Scene([SceneObject(shape, colour, position) for colour, shape, position in objects])


def layout(scene: Scene) -> set[tuple[str, str, str]]:
    return {(o.colour, o.shape, o.position) for o in scene.objects}


def pixels(image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


def answer_from_pixels(objects: set[tuple[str, str, str]], question: str) -> str:
    """The expected short answer to a demo question, worked out from the objects read off the image."""
    words = S.NUMBER_WORDS
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return words[sum(s == m[1] for _, s, _ in objects)].capitalize() + "."
    if m := re.fullmatch(r"What colour is the object at the (.+)\?", question):
        return next(c for c, _, p in objects if p == m[1]).capitalize() + "."
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (colour,) = [c for c, s, _ in objects if s == m[1]]
        return colour.capitalize() + "."
    if m := re.fullmatch(r"What shape is at the (.+)\?", question):
        return next(s for _, s, p in objects if p == m[1]).capitalize() + "."
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (shape,) = [s for c, s, _ in objects if c == m[1]]
        return shape.capitalize() + "."
    if m := re.fullmatch(r"Where (?:is|are) the (\w+) (\w+?)s?\?", question):
        where = sorted((p for c, s, p in objects if (c, s) == (m[1], m[2])), key=POSITIONS.index)
        text = where[0] if len(where) == 1 else ", ".join(where[:-1]) + " and " + where[-1]
        return text.capitalize() + "."
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "Yes." if (m[1], m[2]) in {(c, s) for c, s, _ in objects} else "No."
    raise AssertionError(f"unexpected question {question!r}")


# ------------------------------------------------------------------------------------------ scenes
def test_random_scene_is_deterministic_and_uses_its_own_rng():
    a = [random_scene(random.Random(7)) for _ in range(2)]
    random.seed(0)
    b = random_scene(random.Random(7))
    random.seed(1)
    c = random_scene(random.Random(7))
    assert a[0] == a[1] == b == c
    assert pixels(a[0].render(48)) == pixels(c.render(48))
    assert len({random_scene(random.Random(s)).describe() for s in range(20)}) > 10


def test_scenes_have_one_to_three_objects_in_distinct_cells():
    for seed in range(300):
        scene = random_scene(random.Random(seed))
        positions = [o.position for o in scene.objects]
        assert 1 <= len(positions) <= 3 and len(set(positions)) == len(positions)


@pytest.mark.parametrize("size", [48, 64, 96])
def test_render_puts_the_right_colour_and_shape_in_each_cell(size):
    for seed in range(200):
        scene = random_scene(random.Random(seed))
        image = scene.render(size)
        assert image.size == (size, size) and image.mode == "RGB"
        px = image.load()
        for i, position in enumerate(POSITIONS):
            centre = px[S.cell_centre(i, size)]
            objs = [o for o in scene.objects if o.position == position]
            assert centre == (COLOURS[objs[0].colour] if objs else WHITE)
        assert read_scene(image) == layout(scene)
        assert px[0, 0] == px[size - 1, size - 1] == WHITE


def test_describe_is_the_exact_caption():
    scene = Scene(
        [
            SceneObject("circle", "red", "top left"),
            SceneObject("square", "orange", "right"),
            SceneObject("circle", "red", "center"),
        ]
    )
    assert scene.describe() == "two red circles at the top left and the center and an orange square at the right"
    assert caption_errors(scene, scene.describe()) == 0


# ------------------------------------------------------------------------------------------ captions
def test_caption_errors_counts_wrong_attributes_on_hand_written_captions():
    scene = Scene(
        [
            SceneObject("circle", "red", "top left"),
            SceneObject("circle", "red", "center"),
            SceneObject("square", "blue", "right"),
        ]
    )
    cases = {
        "a blue square at the right and two red circles at the center and the top left": 0,  # order is free
        "three red circles at the top left and the center and a blue square at the right": 1,  # count
        "two green circles at the top left and the center and a blue square at the right": 1,  # colour
        "two red circles at the top left and the center and a blue triangle at the right": 1,  # shape
        "two red circles at the top left and the bottom and a blue square at the right": 1,  # a position
        "two red squares at the top left and the center and a blue square at the left": 2,
        "two red circles at the top left and the center": 4,  # the square is missing
        "a dog running along the beach": 8,  # nothing the scene has
    }
    for caption, errors in cases.items():
        assert caption_errors(scene, caption) == errors, caption


@pytest.mark.parametrize("quality", range(len(QUALITY_NAMES)))
def test_caption_quality_labels_are_what_they_claim(quality):
    name = QUALITY_NAMES[quality]
    for seed in range(300):
        rng = random.Random(seed)
        scene = random_scene(rng)
        caption, label = caption_for(scene, name, rng)
        assert label == quality
        assert caption_for(scene, quality, random.Random(seed + 1))[1] == quality  # int grades too
        errors, total = caption_errors(scene, caption), 4 * len(scene.groups())
        expected = {
            "exact": lambda e: e == 0,
            "one_attribute_wrong": lambda e: e == 1,
            "two_attributes_wrong": lambda e: e == 2,
            "mostly_wrong": lambda e: total / 2 < e < total,
            "unrelated": lambda e: e >= total,  # every attribute of the scene is wrong or missing
        }[name]
        assert expected(errors), (name, scene.describe(), caption, errors)
        if name == "exact":
            assert caption == scene.describe()
        else:
            assert caption != scene.describe()


def test_caption_for_rejects_unknown_grades():
    scene = random_scene(random.Random(0))
    for bad in (5, -1, "perfect"):
        with pytest.raises(ValueError):
            caption_for(scene, bad, random.Random(0))


# ------------------------------------------------------------------------------------------ datasets
def test_pretraining_data_is_deterministic_balanced_and_labelled_truthfully():
    a = build_pretraining_data(60, seed=3, image_size=48)
    b = build_pretraining_data(60, seed=3, image_size=48)
    c = build_pretraining_data(60, seed=4, image_size=48)
    assert a.column_names == ["id", "images", "caption", "caption_quality", "caption_quality_name"]
    assert a["caption"] == b["caption"] and a["caption_quality"] == b["caption_quality"] and a["id"] == b["id"]
    assert [pixels(r["images"][0]) for r in a] == [pixels(r["images"][0]) for r in b]
    assert a["caption"] != c["caption"]
    assert [pixels(r["images"][0]) for r in a] != [pixels(r["images"][0]) for r in c]
    assert len(set(a["id"])) == 60
    assert np.bincount(a["caption_quality"]).tolist() == [12] * 5
    for row in a:
        assert len(row["images"]) == 1 and row["images"][0].size == (48, 48)
        assert row["caption_quality_name"] == QUALITY_NAMES[row["caption_quality"]]
        scene = as_scene(read_scene(row["images"][0]))  # the truth, from the pixels
        assert S.quality_of_errors(scene, caption_errors(scene, row["caption"])) == row["caption_quality"]


def test_instruction_data_messages_answers_and_text_only_fraction():
    a = build_instruction_data(200, seed=5, image_size=48)
    b = build_instruction_data(200, seed=5, image_size=48)
    c = build_instruction_data(200, seed=6, image_size=48)
    assert a.column_names == ["id", "images", "messages"]
    assert a["messages"] == b["messages"] and a["messages"] != c["messages"]
    assert [[pixels(i) for i in r["images"]] for r in a] == [[pixels(i) for i in r["images"]] for r in b]
    assert sum(not r["images"] for r in a) == round(200 * 0.15)
    assert sum(not r["images"] for r in build_instruction_data(100, 5, 48, text_only_fraction=0.3)) == 30
    yes_no = {"Yes.": 0, "No.": 0}
    kinds = set()
    for row in a:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert [c["type"] for c in assistant["content"]] == ["text"]
        question, answer = user["content"][-1]["text"], assistant["content"][0]["text"]
        types = [c["type"] for c in user["content"]]
        if row["images"]:
            assert types == ["image", "text"] and len(row["images"]) == 1
            assert answer == answer_from_pixels(read_scene(row["images"][0]), question), question
            kinds.add(question.split()[0] + " " + question.split()[1])
            if answer in yes_no:
                yes_no[answer] += 1
        else:
            assert types == ["text"]
            facts = {
                "What colour do you get when you mix red and yellow?": "Orange.",
                "What colour do you get when you mix blue and yellow?": "Green.",
                "What colour do you get when you mix red and blue?": "Purple.",
                "How many corners does a triangle have?": "Three.",
                "How many corners does a square have?": "Four.",
                "How many corners does a circle have?": "Zero.",
            }
            if m := re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", question):
                x, y = int(m[1]), int(m[3])
                assert answer == f"{x + y if m[2] == 'plus' else x - y}."
            else:
                assert facts[question] == answer
    assert {"How many", "What colour", "What shape", "Is there"} <= kinds and ({"Where is", "Where are"} & kinds)
    assert abs(yes_no["Yes."] - yes_no["No."]) <= 1 and yes_no["Yes."] > 10


def test_yes_no_eval_is_balanced_correct_and_disjoint_from_training_scenes():
    ev = build_yes_no_eval(64, seed=DEMO_SEED, image_size=48)
    assert ev.column_names == ["id", "image", "question", "answer", "category"]
    assert ev["question"] == build_yes_no_eval(64, seed=DEMO_SEED, image_size=48)["question"]
    for category in ("random", "adversarial"):
        answers = [r["answer"] for r in ev if r["category"] == category]
        assert answers.count("yes") == answers.count("no") == 16
    eval_layouts = set()
    for row in ev:
        objects = read_scene(row["image"])
        assert row["answer"] + "." == answer_from_pixels(objects, row["question"]).lower()
        eval_layouts.add(frozenset(objects))
        if row["category"] == "adversarial" and row["answer"] == "no":  # a hard negative: shares colour or shape
            colour, shape = row["question"].rstrip("?").split()[-2:]
            assert any(c == colour or s == shape for c, s, _ in objects)
    train_layouts = {frozenset(read_scene(r["images"][0])) for r in build_pretraining_data(400, DEMO_SEED, 48)}
    instruct = build_instruction_data(400, DEMO_SEED, 48)
    train_layouts |= {frozenset(read_scene(r["images"][0])) for r in instruct if r["images"]}
    assert len(eval_layouts) > 40 and len(train_layouts) > 300
    assert not eval_layouts & train_layouts


def test_demo_datasets_are_fast_and_can_be_saved(tmp_path):
    from datasets import load_from_disk

    start = time.perf_counter()
    demo = demo_datasets("small")
    assert time.perf_counter() - start < 5
    assert (len(demo.pretrain), len(demo.instruct), len(demo.yes_no_eval)) == (512, 512, 64)
    assert demo.pretrain[0]["images"][0].size == (64, 64)
    tiny = demo_datasets("tiny")
    tiny.instruct.save_to_disk(tmp_path / "instruct")
    reloaded = load_from_disk(tmp_path / "instruct")
    assert reloaded["messages"] == tiny.instruct["messages"]
    def all_pixels(ds):
        return [[pixels(i) for i in r["images"]] for r in ds]

    assert all_pixels(reloaded) == all_pixels(tiny.instruct)
    with pytest.raises(ValueError):
        demo_datasets("huge")


def test_demo_corpus_covers_every_string_the_demo_produces():
    corpus = demo_corpus()
    assert len(corpus) == len(set(corpus))
    assert {SYSTEM_PROMPT, "USER:", "ASSISTANT:"} <= set(corpus)
    words = set(" ".join(corpus).replace(",", " ").split())
    demo = demo_datasets("tiny")
    texts = [c["text"] for m in demo.instruct["messages"] for turn in m for c in turn["content"] if c["text"]]
    texts += list(demo.yes_no_eval["question"]) + list(demo.yes_no_eval["answer"])
    assert set(texts) <= set(corpus)  # questions and answers verbatim
    for caption in build_pretraining_data(100, seed=1, image_size=32)["caption"]:
        assert set(caption.replace(",", " ").split()) <= words, caption
