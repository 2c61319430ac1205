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
