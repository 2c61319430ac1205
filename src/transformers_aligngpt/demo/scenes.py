"""A tiny synthetic world of coloured shapes, used as the package's built-in demo data.

Why synthetic: the demo must work offline, in seconds, on a CPU, and it must exercise what AlignGPT is about,
namely image-caption pairs of *different* alignment quality. Here the quality is known by construction: a
caption is the exact description of the scene with a controlled number of attributes changed, and
`caption_errors` parses any caption back and counts the mismatches, so the labels can be checked.

Everything is driven by `random.Random(seed)` (never the global RNG) and drawn with PIL without
anti-aliasing, so the same seed gives the same pixels, captions and messages on every machine.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
# 3x3 grid in reading order; index = 3 * row + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_OBJECTS = 3

# Caption grades, index = `caption_quality` (higher = better aligned).
QUALITY_NAMES = ("unrelated", "mostly_wrong", "two_attributes_wrong", "one_attribute_wrong", "exact")
NUM_QUALITIES = len(QUALITY_NAMES)
FIELDS_PER_GROUP = 4  # colour, shape, count, positions: the attributes a caption states about each group

UNRELATED_SENTENCES = (
    "a cup of coffee on a wooden table",
    "a dog running along the beach",
    "a city skyline at night",
    "people riding bicycles in a park",
    "a bowl of fruit on a kitchen counter",
    "snow on the mountains at sunrise",
    "an old car parked in front of a house",
    "a cat sleeping on a sofa",
)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
COLOUR_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
CORNERS = {"triangle": 3, "square": 4, "circle": 0}

DEMO_SEED = 1234
EVAL_SEED_OFFSET = 1_000_003  # eval scenes come from another seed stream *and* from the held-out half of scene space
HELD_OUT_BUCKETS = 8  # 1 in 8 scene layouts is reserved for evaluation
SIZES = {  # name -> (pre-training pairs, instruction rows, yes/no eval rows, image size)
    "tiny": (32, 32, 16, 48),
    "small": (512, 512, 64, 64),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str
    size: float = 0.75  # radius as a fraction of half a grid cell


class Group(NamedTuple):
    """What a caption says about all objects that share a colour and a shape."""

    colour: str
    shape: str
    count: int
    positions: tuple[str, ...]


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _group_text(g: Group) -> str:
    where = " and ".join(f"the {p}" for p in g.positions)
    count = COUNT_WORDS.get(g.count, str(g.count))
    count = _article(g.colour) if count == "a" else count
    return f"{count} {g.colour} {_plural(g.shape, g.count)} at {where}"


def groups_text(groups: list[Group]) -> str:
    """Caption for a list of groups, e.g. "two red circles at the top and the center and a blue square at the left"."""
    return _join([_group_text(g) for g in groups])


@dataclass
class Scene:
    """1-3 shapes, each in its own cell of a 3x3 grid, on a white background."""

    objects: list[SceneObject] = field(default_factory=list)

    def groups(self) -> list[Group]:
        """Objects grouped by (colour, shape) in reading order: the unit a caption talks about."""
        out: dict[tuple[str, str], list[str]] = {}
        for o in sorted(self.objects, key=lambda o: POSITIONS.index(o.position)):
            out.setdefault((o.colour, o.shape), []).append(o.position)
        return [Group(c, s, len(p), tuple(p)) for (c, s), p in out.items()]

    def describe(self) -> str:
        """The exact caption (quality "exact")."""
        return groups_text(self.groups())

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape in (None, o.shape)) and (colour in (None, o.colour)) for o in self.objects)

    def render(self, size: int = 64) -> PILImage.Image:
        """Draw the scene; no anti-aliasing, so an object's centre pixel has exactly its palette colour."""
        img = PILImage.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        cell = size / 3
        for o in self.objects:
            i = POSITIONS.index(o.position)
            cx, cy = cell_centre(i, size)
            r = o.size * cell / 2
            fill = COLOURS[o.colour]
            if o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif o.shape == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:  # apex up; the centre pixel lies inside (half-width r/2 at mid-height)
                draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        return img


def cell_centre(index: int, size: int) -> tuple[int, int]:
    """Pixel centre of grid cell `index` (whole pixels, so shapes are symmetric about a pixel)."""
    cell = size / 3
    return round((index % 3 + 0.5) * cell), round((index // 3 + 0.5) * cell)


def scene_split(scene: Scene) -> str:
    """"eval" for a fixed 1/8 of all layouts (by a stable hash of the exact caption), "train" otherwise.

    Training builders only draw "train" scenes and the yes/no evaluation only "eval" scenes, so the evaluation
    never shows a layout seen in training, whatever seeds or sizes are used.
    """
    return "eval" if zlib.crc32(scene.describe().encode()) % HELD_OUT_BUCKETS == 0 else "train"


def random_scene(rng: random.Random, split: str | None = None) -> Scene:
    """A random scene with 1-3 objects in distinct cells; repeats are likely so counting questions matter."""
    while True:
        n = rng.randint(1, MAX_OBJECTS)
        objects: list[SceneObject] = []
        for pos in rng.sample(POSITIONS, n):
            if objects and rng.random() < 0.4:  # another copy of an earlier object -> counts of 2 or 3
                shape, colour = rng.choice([(o.shape, o.colour) for o in objects])
            else:
                shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            objects.append(SceneObject(shape, colour, pos, round(rng.uniform(0.55, 0.85), 2)))
        scene = Scene(sorted(objects, key=lambda o: POSITIONS.index(o.position)))
        if split is None or scene_split(scene) == split:
            return scene


# ---------------------------------------------------------------------------------------------- captions
_WORD_COUNTS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBER_WORDS)}}
_GROUP_RE = re.compile(
    r"\b(%s|\d+) (%s) (%s)s?\b" % ("|".join(_WORD_COUNTS), "|".join(COLOURS), "|".join(SHAPES))
)
_POS_RE = re.compile(r"\b(%s)\b" % "|".join(sorted(POSITIONS, key=len, reverse=True)))


def parse_caption(caption: str) -> list[Group]:
    """Read the groups a caption claims ("<count> <colour> <shape>[s] at the <pos> [and the <pos>]...").

    Any text without such phrases (an unrelated sentence) parses to no groups.
    """
    heads = list(_GROUP_RE.finditer(caption.lower()))
    groups = []
    for h, nxt in itertools.zip_longest(heads, heads[1:]):
        tail = caption.lower()[h.end() : nxt.start() if nxt else None]
        count = _WORD_COUNTS[h[1]] if h[1] in _WORD_COUNTS else int(h[1])
        groups.append(Group(h[2], h[3], count, tuple(m[1] for m in _POS_RE.finditer(tail))))
    return groups


def _group_cost(a: Group | None, b: Group | None) -> int:
    if a is None or b is None:  # a missing or hallucinated group: all its attributes are wrong
        return FIELDS_PER_GROUP
    return (a.colour != b.colour) + (a.shape != b.shape) + (a.count != b.count) + (set(a.positions) != set(b.positions))


def caption_errors(scene: Scene, caption: str) -> int:
    """Number of wrong attributes in `caption`, independent of how the caption was made.

    Each (colour, shape) group has 4 attributes: colour, shape, count and the set of positions. The caption's
    groups are matched to the scene's groups with the cheapest assignment (order does not matter); an
    unmatched group on either side counts 4. 0 = exact; an unrelated sentence scores 4 per scene group.
    """
    truth, claim = scene.groups(), parse_caption(caption)
    n = max(len(truth), len(claim))
    truth, claim = truth + [None] * (n - len(truth)), claim + [None] * (n - len(claim))
    return min(sum(_group_cost(t, claim[j]) for t, j in zip(truth, perm)) for perm in itertools.permutations(range(n)))


def num_attributes(scene: Scene) -> int:
    return FIELDS_PER_GROUP * len(scene.groups())


def errors_for_quality(scene: Scene, quality: int | str) -> int:
    """How many wrong attributes a caption of this grade has (minimum, for "unrelated")."""
    q = QUALITY_NAMES.index(quality) if isinstance(quality, str) else quality
    total = num_attributes(scene)
    return {4: 0, 3: 1, 2: 2, 1: total // 2 + 1, 0: total}[q]


def quality_of_errors(scene: Scene, errors: int) -> int:
    """Inverse of `errors_for_quality`: the grade a caption with `errors` wrong attributes deserves."""
    total = num_attributes(scene)
    if errors >= total:
        return 0
    if errors > total // 2:
        return 1
    return {0: 4, 1: 3, 2: 2}.get(errors, 1)


def _corrupt(scene: Scene, k: int, rng: random.Random) -> list[Group]:
    """Change k distinct (group, attribute) slots of the exact description to other values."""
    groups = [list(g) for g in scene.groups()]
    used = {o.position for o in scene.objects}
    for gi, f in rng.sample([(gi, f) for gi in range(len(groups)) for f in range(FIELDS_PER_GROUP)], k):
        g = groups[gi]
        if f == 0:
            g[0] = rng.choice([c for c in COLOURS if c != g[0]])
        elif f == 1:
            g[1] = rng.choice([s for s in SHAPES if s != g[1]])
        elif f == 2:
            g[2] = rng.choice([c for c in range(1, MAX_OBJECTS + 1) if c != g[2]])
        else:  # move one of the group's objects to an empty cell
            pos = list(g[3])
            pos[rng.randrange(len(pos))] = rng.choice([p for p in POSITIONS if p not in used])
            g[3] = tuple(sorted(pos, key=POSITIONS.index))
    return [Group(*g) for g in groups]


def caption_for(scene: Scene, quality: int | str, rng: random.Random) -> tuple[str, int]:
    """A caption of the requested grade and that grade as an int (index into QUALITY_NAMES).

    The grade is guaranteed by checking the result with `caption_errors`: a corruption that happens to match
    another group of the scene better (and so has fewer errors than asked) is redrawn.
    """
    q = QUALITY_NAMES.index(quality) if isinstance(quality, str) else int(quality)
    if not 0 <= q < NUM_QUALITIES:
        raise ValueError(f"quality must be in 0..{NUM_QUALITIES - 1} or one of {QUALITY_NAMES}, got {quality!r}")
    k = errors_for_quality(scene, q)
    if q == 4:
        return scene.describe(), q
    if q == 0:  # another scene's caption if it is wrong everywhere, else a sentence about something else
        if rng.random() < 0.5:
            other = groups_text(random_scene(rng).groups())
            if caption_errors(scene, other) >= k:
                return other, q
        return rng.choice(UNRELATED_SENTENCES), q
    for _ in range(100):
        caption = groups_text(_corrupt(scene, k, rng))
        if caption_errors(scene, caption) == k:
            return caption, q
    raise RuntimeError(f"could not corrupt {scene.describe()!r} with {k} errors")  # never seen in practice


# ---------------------------------------------------------------------------------------------- questions
def _cap(word: str) -> str:
    return word[0].upper() + word[1:] + "."


def ask(scene: Scene, kind: str, rng: random.Random, answer_yes: bool | None = None) -> tuple[str, str]:
    """One (question, short answer) about the scene; `kind` in count, colour, shape, position, yes_no."""
    obj = rng.choice(scene.objects)
    if kind == "count":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", _cap(NUMBER_WORDS[scene.count(shape)])
    if kind == "colour":
        if scene.count(obj.shape) == 1 and rng.random() < 0.5:
            return f"What colour is the {obj.shape}?", _cap(obj.colour)
        return f"What colour is the object at the {obj.position}?", _cap(obj.colour)
    if kind == "shape":
        if scene.count(colour=obj.colour) == 1 and rng.random() < 0.5:
            return f"What shape is the {obj.colour} object?", _cap(obj.shape)
        return f"What shape is at the {obj.position}?", _cap(obj.shape)
    if kind == "position":
        where = [o.position for o in scene.objects if (o.shape, o.colour) == (obj.shape, obj.colour)]
        if len(where) == 1:
            return f"Where is the {obj.colour} {obj.shape}?", _cap(where[0])
        return f"Where are the {obj.colour} {obj.shape}s?", _cap(_join(where))
    if kind == "yes_no":
        colour, shape = yes_no_pair(scene, rng, rng.random() < 0.5 if answer_yes is None else answer_yes)
        return f"Is there {_article(colour)} {colour} {shape}?", "Yes." if scene.count(shape, colour) else "No."
    raise ValueError(f"unknown question kind {kind!r}")


def yes_no_pair(scene: Scene, rng: random.Random, present: bool, adversarial: bool = False) -> tuple[str, str]:
    """A (colour, shape) that is present in the scene, or absent; adversarial absent pairs share a colour or a
    shape with something in the scene (POPE's hard negatives)."""
    if present:
        o = rng.choice(scene.objects)
        return o.colour, o.shape
    absent = [(c, s) for c in COLOURS for s in SHAPES if not scene.count(s, c)]
    if adversarial:
        near = [(c, s) for c, s in absent if scene.count(colour=c) or scene.count(shape=s)]
        absent = near or absent
    return rng.choice(absent)


# Every text-only question, by topic (so each topic is equally likely, however many questions it has).
TEXT_ONLY_QA = {
    "plus": [(f"What is {a} plus {b}?", f"{a + b}.") for a in range(10) for b in range(10)],
    "minus": [(f"What is {a} minus {b}?", f"{a - b}.") for a in range(10) for b in range(a + 1)],
    "mix": [(f"What colour do you get when you mix {a} and {b}?", _cap(m)) for (a, b), m in COLOUR_MIXES.items()],
    "corners": [(f"How many corners does a {s} have?", _cap(NUMBER_WORDS[n])) for s, n in CORNERS.items()],
}


def text_only_qa(rng: random.Random) -> tuple[str, str]:
    """A question that needs no image (arithmetic, colour mixing, corners of a shape): LLaVA's mix keeps
    text-only chats so the language model does not forget how to answer without an image."""
    return rng.choice(TEXT_ONLY_QA[rng.choice(list(TEXT_ONLY_QA))])


# ---------------------------------------------------------------------------------------------- datasets
QUESTION_KINDS = ("count", "colour", "shape", "position", "yes_no")
YES_NO_CATEGORIES = ("random", "adversarial")
_TEXT = Value("string")
PRETRAIN_FEATURES = Features(
    {
        "id": _TEXT,
        "images": List(Image()),  # one image a row, as TRL's vision collators expect
        "caption": _TEXT,
        "caption_quality": Value("int32"),
        "caption_quality_name": _TEXT,
    }
)
_CONTENT = List({"type": _TEXT, "text": _TEXT})  # transformers chat format; {"type": "image"} has text None
INSTRUCT_FEATURES = Features(
    {"id": _TEXT, "images": List(Image()), "messages": List({"role": _TEXT, "content": _CONTENT})}
)
YES_NO_FEATURES = Features({"id": _TEXT, "image": Image(), "question": _TEXT, "answer": _TEXT, "category": _TEXT})


def _message(role: str, text: str, image: bool = False) -> dict:
    content = ([{"type": "image", "text": None}] if image else []) + [{"type": "text", "text": text}]
    return {"role": role, "content": content}


def build_pretraining_data(num_pairs: int = 512, seed: int = DEMO_SEED, image_size: int = 64) -> Dataset:
    """Image-caption pairs for phase 1, an equal number of each caption grade (row i has grade i % 5)."""
    rng = random.Random(seed)
    rows = {"id": [], "images": [], "caption": [], "caption_quality": [], "caption_quality_name": []}
    for i in range(num_pairs):
        scene = random_scene(rng, split="train")
        caption, q = caption_for(scene, i % NUM_QUALITIES, rng)
        rows["id"].append(f"pretrain-{seed}-{i:06d}")
        rows["images"].append([scene.render(image_size)])
        rows["caption"].append(caption)
        rows["caption_quality"].append(q)
        rows["caption_quality_name"].append(QUALITY_NAMES[q])
    return Dataset.from_dict(rows, features=PRETRAIN_FEATURES)


def build_instruction_data(
    num_rows: int = 512, seed: int = DEMO_SEED, image_size: int = 64, text_only_fraction: float = 0.15
) -> Dataset:
    """Single-turn chats for phase 2: questions about a scene (kinds in turn, yes/no answers alternating, so
    both are balanced) plus `round(num_rows * text_only_fraction)` text-only rows, in shuffled order."""
    rng = random.Random(seed + 1)
    num_text = round(num_rows * text_only_fraction)
    rows = []
    for i in range(num_rows - num_text):
        scene = random_scene(rng, split="train")
        kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        yes = (i // len(QUESTION_KINDS)) % 2 == 0
        question, answer = ask(scene, kind, rng, answer_yes=yes)
        rows.append(([scene.render(image_size)], question, answer))
    rows += [([], *text_only_qa(rng)) for _ in range(num_text)]
    rng.shuffle(rows)
    data = {
        "id": [f"instruct-{seed}-{i:06d}" for i in range(len(rows))],
        "images": [images for images, _, _ in rows],
        "messages": [[_message("user", q, image=bool(im)), _message("assistant", a)] for im, q, a in rows],
    }
    return Dataset.from_dict(data, features=INSTRUCT_FEATURES)


def build_yes_no_eval(num_rows: int = 64, seed: int = DEMO_SEED, image_size: int = 64) -> Dataset:
    """POPE-style held-out probe: "Is there a <colour> <shape>?" on scenes never used for training.

    Row i has category YES_NO_CATEGORIES[i % 2] and answer "yes" when (i // 2) is even, so categories and
    answers are balanced; scenes come from the held-out part of scene space (`scene_split`) and another seed.
    """
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    rows = {"id": [], "image": [], "question": [], "answer": [], "category": []}
    for i in range(num_rows):
        scene = random_scene(rng, split="eval")
        category, present = YES_NO_CATEGORIES[i % 2], (i // 2) % 2 == 0
        colour, shape = yes_no_pair(scene, rng, present, adversarial=category == "adversarial")
        rows["id"].append(f"yes-no-{seed}-{i:06d}")
        rows["image"].append(scene.render(image_size))
        rows["question"].append(f"Is there {_article(colour)} {colour} {shape}?")
        rows["answer"].append("yes" if scene.count(shape, colour) else "no")
        rows["category"].append(category)
    return Dataset.from_dict(rows, features=YES_NO_FEATURES)


class DemoDatasets(NamedTuple):
    pretrain: Dataset
    instruct: Dataset
    yes_no_eval: Dataset


def demo_datasets(size: str = "small", seed: int = DEMO_SEED) -> DemoDatasets:
    """The three demo datasets at one of the preset `SIZES` ("small": 512 / 512 / 64 rows at 64 px)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    n_pre, n_ins, n_eval, px = SIZES[size]
    pretrain, instruct = build_pretraining_data(n_pre, seed, px), build_instruction_data(n_ins, seed, px)
    return DemoDatasets(pretrain, instruct, build_yes_no_eval(n_eval, seed, px))


def demo_corpus() -> list[str]:
    """Every string the demo can produce (caption phrases, questions, answers, chat frame), for training a
    tiny tokenizer offline. Full captions are joins of the group phrases listed here with ", " and " and "."""
    out = [SYSTEM_PROMPT, "USER:", "ASSISTANT:", *UNRELATED_SENTENCES]
    for colour, shape in itertools.product(COLOURS, SHAPES):
        for count in range(1, MAX_OBJECTS + 1):
            out += [_group_text(Group(colour, shape, count, (p,))) for p in POSITIONS]
        out += [
            f"Is there {_article(colour)} {colour} {shape}?",
            f"Where is the {colour} {shape}?",
            f"Where are the {colour} {shape}s?",
            f"What shape is the {colour} object?",
            f"What colour is the {shape}?",
            f"How many {shape}s are there?",
        ]
    out += [f"What colour is the object at the {p}?" for p in POSITIONS]
    out += [f"What shape is at the {p}?" for p in POSITIONS]
    out += [_cap(_join(list(ps))) for n in (1, 2, 3) for ps in itertools.combinations(POSITIONS, n)]
    out += [_cap(w) for w in [*COLOURS, *SHAPES, *NUMBER_WORDS]]
    out += ["Yes.", "No.", "yes", "no"]
    for q, a in itertools.chain(*TEXT_ONLY_QA.values()):
        out += [q, a]
    return list(dict.fromkeys(out))
