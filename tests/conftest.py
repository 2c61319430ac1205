"""Shared tiny builders: a BPE tokenizer trained offline, tiny AlignGPT configs and models, images."""

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from transformers_aligngpt import AlignGPTForConditionalGeneration
from transformers_aligngpt.tiny import build_processor, build_tiny_tokenizer, tiny_config

FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "aligngpt-original-tiny"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def config(tokenizer):
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer, config):
    return build_processor(tokenizer, config)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(copy.deepcopy(config)).eval()
    # random init leaves the gate nearly uniform; spread its weights so level mixes differ between prompts
    with torch.no_grad():
        model.model.alignment_gate.fc2.weight.normal_(0, 1.0)
        model.model.alignment_gate.fc1.weight.normal_(0, 1.0)
    return model


def solid_image(color, size=(20, 12)):
    return Image.new("RGB", size, color)


@pytest.fixture
def images():
    """Two non-square images of different content (one wide, one tall)."""
    red = solid_image((220, 30, 30), (24, 14))
    tall = Image.new("RGB", (10, 22), (30, 30, 220))
    tall.paste((250, 250, 0), (2, 2, 8, 10))
    return [red, tall]


def chat(question, with_image=True, answer=None):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


# --- CLIP fixtures (alignment levels) ---
# A tiny random CLIP saved like a Hub checkpoint (model, offline-trained BPE tokenizer, PIL image processor), and
# JPEG image-caption pairs on disk. Used by tests/test_alignment_levels.py and tests/test_data.py.

CLIP_WORDS = (
    "a photo of the red blue green yellow circle square triangle dog cat bird car house tree sky grass on in "
    "with and two three small large white black background top left right picture painting drawing close view"
).split()


def _clip_tokenizer():
    from transformers_aligngpt.tiny import build_tiny_clip_tokenizer

    return build_tiny_clip_tokenizer(CLIP_WORDS, vocab_size=400, model_max_length=24)


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The tiny CLIP's BPE tokenizer (byte-level, lower-cased, bos/eos added, vocab 400), trained offline."""
    return _clip_tokenizer()


@pytest.fixture(scope="session")
def clip_tiny_dir(tmp_path_factory):
    """Folder holding a tiny random CLIPModel (hidden 32, 2 layers, 32 px images, patch 8), loadable by name."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=24,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = tmp_path_factory.mktemp("clip-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def clip_tiny(clip_tiny_dir):
    """(model, image_processor, tokenizer) of `clip_tiny_dir`, loaded independently, for reference computations."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_tiny_dir).eval()
    # transformers' default backend, as score_pairs' default "auto": torchvision when installed, else PIL
    image_processor = AutoImageProcessor.from_pretrained(clip_tiny_dir)
    return model, image_processor, AutoTokenizer.from_pretrained(clip_tiny_dir)


def clip_write_pairs(folder, n, seed=0, start=0):
    """Write `n` random JPEGs (varied sizes, smooth colour fields plus noise) under `folder/imgs/`.

    Returns (relative image paths, captions); captions are random word sequences, all distinct.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    (Path(folder) / "imgs").mkdir(parents=True, exist_ok=True)
    files, captions = [], []
    for i in range(start, start + n):
        h, w = (int(v) for v in rng.integers(24, 72, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3)), 0, 255)
        name = f"imgs/{i:05d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(Path(folder) / name, quality=90)
        files.append(name)
        captions.append(" ".join(rng.choice(CLIP_WORDS, size=int(rng.integers(2, 9)))) + f" {i}")
    return files, captions


@pytest.fixture
def clip_pairs(tmp_path):
    """Factory: `clip_pairs(n, seed=0)` -> (folder, relative image paths, captions) in a fresh temp folder."""

    def make(n, seed=0):
        files, captions = clip_write_pairs(tmp_path, n, seed=seed)
        return tmp_path, files, captions

    return make


# --- original-format fixture (converter) ---
# `../shared/fixtures/aligngpt-original-tiny`: a checkpoint of the original release format with the original code's
# outputs, and that checkpoint converted once per session with the converter's command line.


@pytest.fixture(scope="session")
def original_fixture_dir():
    if not (FIXTURE_DIR / "reference.json").is_file():
        pytest.skip(f"the original-format fixture is not at {FIXTURE_DIR}")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def original_reference(original_fixture_dir):
    """(reference.json as a dict, reference_tensors.safetensors as a dict of tensors)."""
    import json

    from safetensors.torch import load_file

    reference = json.loads((original_fixture_dir / "reference.json").read_text())
    return reference, load_file(str(original_fixture_dir / "reference_tensors.safetensors"))


@pytest.fixture(scope="session")
def converted_original_dir(original_fixture_dir, tmp_path_factory):
    """The fixture checkpoint converted (float32) by `python -m transformers_aligngpt.convert`."""
    from transformers_aligngpt.convert import main

    output = tmp_path_factory.mktemp("aligngpt-converted")
    main([
        "--checkpoint", str(original_fixture_dir / "checkpoint"),
        "--vision-tower", str(original_fixture_dir / "clip-vit-tiny"),
        "--output", str(output),
        "--dtype", "float32",
    ])
    return output


# --- training fixtures ---
TRAINING_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}


def _training_image(index):
    """A solid-colour image with a white square whose place depends on the row (different sizes, not square)."""
    name = list(TRAINING_COLOURS)[index % 4]
    image = Image.new("RGB", (20 + 2 * (index % 3), 14 + index % 5), TRAINING_COLOURS[name])
    image.paste((255, 255, 255), (index % 6, index % 4, index % 6 + 5, index % 4 + 5))
    return name, image


@pytest.fixture(scope="session")
def pretraining_dataset():
    """8 plain-format image-caption pairs, one alignment level (0..7) each."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    rows = {"images": [], "caption": [], "alignment_level": []}
    for i in range(8):
        name, image = _training_image(i)
        rows["images"].append([image])
        rows["caption"].append(f"a {name} square" + (" on the left" if i % 2 else ""))
        rows["alignment_level"].append(i)
    features = Features({"images": List(ImageFeature()), "caption": Value("string"), "alignment_level": Value("int32")})
    return Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="session")
def instruction_dataset():
    """8 single-turn chats in `messages` + `images`: 6 about an image, 2 text-only, mixed."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    def message(role, text, image=False):
        return {"role": role, "content": ([{"type": "image", "text": None}] if image else []) + [{"type": "text", "text": text}]}

    rows = {"images": [], "messages": []}
    for i in range(8):
        if i in (2, 5):
            rows["images"].append([])
            rows["messages"].append([message("user", f"What is {i} plus 3?"), message("assistant", str(i + 3))])
            continue
        name, image = _training_image(i)
        rows["images"].append([image])
        rows["messages"].append([message("user", "What colour is the shape?", image=True), message("assistant", name)])
    features = Features({
        "images": List(ImageFeature()),
        "messages": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
    })
    return Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, config, processor):
    """A saved random tiny AlignGPT (code + auto_map) with its processor."""
    path = tmp_path_factory.mktemp("tiny-aligngpt")
    torch.manual_seed(0)
    AlignGPTForConditionalGeneration(copy.deepcopy(config)).save_pretrained(path)
    processor.save_pretrained(path)
    return path
