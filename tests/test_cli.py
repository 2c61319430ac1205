"""The `aligngpt` command line: help for every subcommand, clear errors, chat over stdin, push --dry-run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import chat
from huggingface_hub import ModelCard

from transformers_aligngpt.cli import ChatSession, build_parser, main

SUBCOMMANDS = ["demo", "levels", "pretrain", "sft", "chat", "convert", "push"]
BIN = Path(sys.executable).parent


def run_cli(*args, stdin=None, timeout=300):
    exe = BIN / "aligngpt"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "transformers_aligngpt"]
    return subprocess.run(command + list(args), input=stdin, check=False, capture_output=True, text=True, timeout=timeout)


def test_console_script_and_module_list_every_subcommand():
    for result in (run_cli("--help"), subprocess.run([sys.executable, "-m", "transformers_aligngpt", "--help"],
                                                     check=False, capture_output=True, text=True, timeout=300)):
        assert result.returncode == 0, result.stderr
        for name in SUBCOMMANDS:
            assert f"\n    {name} " in result.stdout, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: aligngpt {name}")
    assert len(out.splitlines()) > 3


def test_every_subcommand_is_available():
    """`levels`, `pretrain`, `sft` and `convert` come from other modules: none may fall back to a placeholder."""
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(SUBCOMMANDS) <= set(choices)
    for name in SUBCOMMANDS:
        assert "not available" not in (choices[name].description or "").lower(), name


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "subcommands" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["chat", "--model", "m", "--bogus"], "aligngpt chat: error: unrecognized arguments: --bogus"),
        (["chat"], "aligngpt chat: error: the following arguments are required: --model"),
        (["chat", "--model", "m", "--max-new-tokens", "0"], "expected a positive integer, got '0'"),
        (["chat", "--model", "m", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["chat", "--model", "m", "--image", "/no/such/image.png"], "--image /no/such/image.png: no such file"),
        (["chat", "--model", "./no/such/checkpoint"], "--model ./no/such/checkpoint: no such folder"),
        (["push", "--model", "m", "--repo-id", "user/x", "--dry-run"], "--dry-run needs --staging-dir"),
        (["push", "--model", "m", "--repo-id", "justaname", "--dry-run", "--staging-dir", "s"],
         "--repo-id must look like user/name"),
        (["push", "--model", "m", "--repo-id", "u/x", "--eval-results", "/no/file.json"], "no such file"),
        (["demo", "--data", "x.json"], "--data / --instruct-data need --image-folder"),
        (["demo", "--num-levels", "two"], "expected a positive integer, got 'two'"),
        (["frobnicate"], "aligngpt: error: argument <subcommand>: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("usage: aligngpt")


@pytest.fixture
def checkpoint(model, processor, images, tmp_path):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    images[0].save(tmp_path / "image.png")
    return path


def reference_answer(model, processor, image, messages, max_new_tokens):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_chat_session_keeps_the_conversation(model, processor, images):
    session = ChatSession(model, processor)
    session.image = images[0]
    first, weights = session.ask("What is shown?", max_new_tokens=6, show_gate=True)
    second, _ = session.ask("How many squares are there?", max_new_tokens=6)
    assert first == reference_answer(model, processor, images[0], chat("What is shown?"), 6)
    # the second prompt holds the first turn (with the image) and the first answer
    history = chat("What is shown?", answer=first) + [
        {"role": "user", "content": [{"type": "text", "text": "How many squares are there?"}]}
    ]
    assert second == reference_answer(model, processor, images[0], history, 6)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert len(weights) == model.config.num_alignment_levels - 1 and sum(weights) == pytest.approx(1, abs=1e-5)
    session.reset()
    assert session.ask("What is shown?", max_new_tokens=6)[0] == first


def test_chat_reads_questions_from_stdin(checkpoint, model, processor, images):
    image = checkpoint.parent / "image.png"
    result = run_cli("chat", "--model", str(checkpoint), "--image", str(image), "--max-new-tokens", "6",
                     "--show-gate", stdin="What is shown?\n\n/reset\nWhat is shown?\n/image /nope.png\n/quit\nignored\n")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    from PIL import Image

    expected = reference_answer(model, processor, Image.open(image).convert("RGB"), chat("What is shown?"), 6)
    answers = [line for line in lines if line.startswith("ASSISTANT:")]
    assert answers == [f"ASSISTANT: {expected}".rstrip()] * 2
    assert sum(line.startswith("  gate: L0=") for line in lines) == 2
    assert "(conversation cleared)" in lines
    assert "error: image /nope.png: no such file" in lines
    assert "USER: ignored" not in lines  # /quit ends the session


def test_push_dry_run_writes_the_upload_folder(checkpoint, tmp_path):
    eval_file = tmp_path / "results.json"
    eval_file.write_text('{"pope": {"accuracy": 0.5}}')
    stage = tmp_path / "stage"
    result = run_cli("push", "--model", str(checkpoint), "--repo-id", "someone/tiny", "--dry-run", "--staging-dir",
                     str(stage), "--base-model", "lmsys/vicuna-7b-v1.5", "--dataset", "liuhaotian/LLaVA-Pretrain",
                     "--eval-results", str(eval_file), "--license", "mit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: nothing uploaded" in result.stdout
    data = ModelCard.load(stage / "README.md").data.to_dict()
    assert data["license"] == "mit" and data["base_model"] == ["lmsys/vicuna-7b-v1.5"]
    assert data["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.5}]
    assert sorted(p.name for p in stage.glob("*.py")) == [
        "configuration_aligngpt.py", "modeling_aligngpt.py", "processing_aligngpt.py"
    ]
    assert os.path.getsize(stage / "model.safetensors") > 0
