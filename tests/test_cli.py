"""The `aligngpt` command line: help for every subcommand, clear errors, chat over stdin, push --dry-run."""

import json
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
        (["pretrain", "--bogus"], "aligngpt pretrain: error: unrecognized arguments: --bogus"),
        (["pretrain", "--num-levels", "0"], "--num-levels/--num-alignment-levels: expected a positive integer"),
        (["pretrain", "--language-model", "lmsys/vicuna-7b-v1.5"], "--language-model and --vision-tower go together"),
        (["pretrain", "--model", "./no/such/checkpoint"], "--model ./no/such/checkpoint: no such folder"),
        (["pretrain", "--data", "/no/such/data.json"], "--data /no/such/data.json: no such file or folder"),
        (["pretrain", "--image-folder", "/no/such/folder", "--data", "/"], "--image-folder /no/such/folder: no such"),
        (["sft", "--use-peft", "--max-steps", "x"], "argument --max-steps: invalid int value: 'x'"),
        (["sft", "--load-in-4bit"], "aligngpt sft: error: --load-in-4bit trains an adapter: add --use-peft"),
        (["sft", "--use-peft", "--load-in-4bit", "--language-model", "a", "--vision-tower", "b"],
         "--load-in-4bit loads a saved AlignGPT checkpoint"),
        (["sft", "--model", "m/x", "--vision-model", "b", "--text-model", "a"], "give one or the other"),
        (["sft", "--gate-text-scope", "answers"], "argument --gate-text-scope: invalid choice: 'answers'"),
        (["sft", "--merge"], "--merge merges a LoRA adapter: add --use-peft"),
        (["sft", "--pretrain-artifact", "/no/such/mm_projector_align.safetensors"], "no such file or folder"),
        (["sft", "--pretrain-artefact", "/no/such/mm_projector_align.safetensors"], "no such file or folder"),
        (["sft", "--language-model", "/no/llm", "--vision-tower", "b"], "--language-model /no/llm: no such folder"),
        (["pretrain", "--language-model", "a", "--vision-tower", "/no/clip"], "--vision-tower /no/clip: no such"),
        # a model has at least 2 levels (the global one and one the gate mixes)
        (["pretrain", "--num-levels", "1"], "--num-levels/--num-alignment-levels: expected at least 2 alignment"),
        (["sft", "--num-levels", "1"], "--num-levels/--num-alignment-levels: expected at least 2 alignment levels"),
        (["demo", "--num-levels", "1"], "argument --num-levels: expected at least 2 alignment levels"),
        # a learning rate or number of epochs of 0 is never meant (and was silently replaced by the default)
        (["sft", "--learning-rate", "0"], "argument --learning-rate: expected a positive number, got '0'"),
        (["pretrain", "--learning-rate", "-0.001"], "argument --learning-rate: expected a positive number"),
        (["sft", "--num-train-epochs", "0"], "argument --num-train-epochs: expected a positive number, got '0'"),
        (["sft", "--max-length", "nothing"], "argument --max-length: expected a positive integer, got 'nothing'"),
        (["demo", "--clip", "/no/such/clip"], "--clip /no/such/clip: no such folder"),
        (["demo", "--language-model", "./no/llm"], "--language-model ./no/llm: no such folder"),
        (["pretrain", "--resume-from-checkpoint", "/no/such/checkpoint-2"],
         "--resume-from-checkpoint /no/such/checkpoint-2: no such folder"),
        (["sft", "--resume-from-checkpoint", "last", "--output", "/no/such/run"],
         "--resume-from-checkpoint last: no checkpoint-* folder in --output /no/such/run"),
        (["sft", "--model", "some-user/some-model", "--num-levels", "3"], "--model some-user/some-model keeps its own"),
    ],
)
def test_bad_flags_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("usage: aligngpt")


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_a_model_that_is_neither_here_nor_on_the_hub_is_one_line(command, capsys, monkeypatch):
    """`runs/x` (one slash) reads as a Hub id: when the Hub cannot give it either, the error names the flag, without
    a traceback. (Offline mode stands in for an unreachable or missing repository, without the network's retries.)"""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", "runs/no-such-run"])
    assert exit_info.value.code == 2
    assert "--model runs/no-such-run: cannot load it: not a checkpoint folder here" in capsys.readouterr().err


def test_levels_bad_input_is_a_usage_error_before_any_work(tmp_path, capsys, monkeypatch):
    """Used to be tracebacks, some only after scoring the whole file (--output), some misleading (a --clip folder
    that is not there read as an invalid Hub id)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing may be loaded anyway
    data = tmp_path / "pairs.json"
    data.write_text("[]")
    base = ["levels", "--data", str(data), "--output", str(tmp_path / "out.json")]
    cases = [
        (["levels", "--data", str(tmp_path / "none.json"), "--output", "o.json"],
         f"--data {tmp_path / 'none.json'}: no such file"),
        (base + ["--clip", str(tmp_path / "no-clip")],
         f"--clip {tmp_path / 'no-clip'}: no such folder (and not a Hub id)"),
        (base + ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        (base + ["--num-levels", "1"], "argument --num-levels: expected at least 2 alignment levels"),
        (["levels", "--data", str(data), "--output", str(tmp_path / "no" / "out.json")],
         f"--output {tmp_path / 'no' / 'out.json'}: the folder {tmp_path / 'no'} does not exist"),
        (base + ["--image-folder", str(tmp_path / "imgs")], f"--image-folder {tmp_path / 'imgs'}: no such folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("usage: aligngpt levels") and message in err, err
    # the module's own command line says the same
    from transformers_aligngpt.alignment_levels import main as levels_main

    with pytest.raises(SystemExit) as exit_info:
        levels_main(base[1:] + ["--clip", str(tmp_path / "no-clip")])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_num_levels_must_match_a_checkpoint_and_max_length_takes_none(tiny_checkpoint, capsys):
    """A checkpoint keeps its levels: a different --num-levels used to be ignored without a word."""
    from transformers_aligngpt.recipes import pretrain_parser, sft_parser

    for command in ("sft", "pretrain"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--model", str(tiny_checkpoint), "--num-levels", "3"])
        assert exit_info.value.code == 2
        assert f"--num-levels 3, but --model {tiny_checkpoint} has 8 alignment levels" in capsys.readouterr().err
    assert sft_parser().parse_args(["--max-length", "none"]).max_length is None
    assert pretrain_parser().parse_args(["--max-length", "None"]).max_length is None
    assert sft_parser().parse_args(["--learning-rate", "1e-5"]).learning_rate == 1e-5


def test_sft_adapter_of_a_relative_model_path_loads_from_anywhere(tiny_checkpoint, tmp_path, monkeypatch):
    """The adapter config records its base model's path: a relative --model made it load only from the same cwd."""
    from transformers_aligngpt.recipes import run_sft, sft_parser

    monkeypatch.chdir(tiny_checkpoint.parent)
    run_sft(sft_parser().parse_args([
        "--model", tiny_checkpoint.name, "--use-peft", "--lora-r", "4", "--max-steps", "1", "--num-rows", "4",
        "--per-device-train-batch-size", "4", "--no-gradient-checkpointing", "--output", str(tmp_path / "out"),
    ]))
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_checkpoint.resolve())


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_resume_from_checkpoint_continues_the_run(command, tmp_path, monkeypatch):
    from transformers import Trainer

    from transformers_aligngpt import recipes

    parser, run = {"pretrain": (recipes.pretrain_parser, recipes.run_pretrain),
                   "sft": (recipes.sft_parser, recipes.run_sft)}[command]
    common = ["--num-rows", "8", "--per-device-train-batch-size", "4", "--save-steps", "2", "--output",
              str(tmp_path / "run")] + (["--no-gradient-checkpointing"] if command == "sft" else [])
    run(parser().parse_args(common + ["--max-steps", "2"]))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    steps = []
    training_step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: steps.append(1) or training_step(self, *a, **k))
    trainer = run(parser().parse_args(common + ["--max-steps", "3", "--resume-from-checkpoint", "last"]))
    assert trainer.state.global_step == 3 and len(steps) == 1  # steps 1-2 came from checkpoint-2


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
                     "--show-gate", stdin="What is shown?\n\n/reset please\n/imgae x.png\nwhat is <align>?\nWhat is shown?\n"
                     f"/image /nope.png\n/image\n/image {checkpoint.parent}\n/quit now\nignored\n")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    from PIL import Image

    expected = reference_answer(model, processor, Image.open(image).convert("RGB"), chat("What is shown?"), 6)
    answers = [line for line in lines if line.startswith("ASSISTANT:")]
    assert answers == [f"ASSISTANT: {expected}".rstrip()] * 2
    assert sum(line.startswith("  gate: L0=") for line in lines) == 2
    assert "(conversation cleared)" in lines
    assert "error: image /nope.png: no such file" in lines
    assert "error: /image needs a file: /image FILE" in lines
    assert f"error: image {checkpoint.parent}: is a folder, not an image file" in lines
    assert any(line.startswith("error: unknown command /imgae") for line in lines)  # a typo is not a question
    assert any(line.startswith("error: Text 0 holds '<align>'") for line in lines)  # the session goes on
    assert "USER: ignored" not in lines  # /quit ends the session


def test_chat_on_a_checkpoint_that_is_not_image_text_to_text_is_one_line(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "llm")
    result = run_cli("chat", "--model", str(tmp_path / "llm"), stdin="")
    assert result.returncode == 2
    assert "not an image-text-to-text checkpoint" in result.stderr and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the usage: one line, not ~200 config class names
    assert error.startswith("aligngpt chat: error: --model") and len(error) < 500


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


# ---------------------------------------------------------------------------------------------- pretrain / sft
@pytest.mark.parametrize("name, trains", [("pretrain", "trains only the projector and the N alignment embeddings"),
                                          ("sft", "trains the projector, the alignment gate and the LLM")])
def test_training_help_says_what_is_trained_and_shows_examples(name, trains, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the description is wrapped
    assert trains in out
    assert "examples: offline, tiny model and built-in data" in out and f"aligngpt {name} --max-steps 20 --output" in out
    for flag in ("--model", "--language-model", "--vision-tower", "--num-levels", "--data", "--image-folder",
                 "--output DIR, --output-dir DIR"):
        assert flag in out, flag


def test_training_flags_match_the_other_subcommands_and_keep_the_old_names():
    parser = build_parser()
    new = parser.parse_args(["pretrain", "--output", "o", "--language-model", "lm", "--vision-tower", "vt",
                             "--num-levels", "3", "--data", "d.json", "--image-folder", "imgs"])
    old = parser.parse_args(["pretrain", "--output-dir", "o", "--text-model", "lm", "--vision-model", "vt",
                             "--num-alignment-levels", "3", "--data", "d.json", "--image-folder", "imgs"])
    assert vars(new) == vars(old)
    assert (new.output, new.language_model, new.vision_tower, new.num_levels) == ("o", "lm", "vt", 3)
    sft = parser.parse_args(["sft", "--model-name-or-path", "ckpt", "--output-dir", "o", "--use-peft"])
    assert (sft.model, sft.output, sft.use_peft, sft.load_in_4bit) == ("ckpt", "o", True, False)
    assert parser.parse_args(["sft"]).output == "runs/aligngpt-sft"
    assert parser.parse_args(["pretrain"]).output == "runs/aligngpt-pretrain"


def test_examples_are_the_package_commands(tmp_path):
    """examples/*.py only call the package: the same parser, so the same flags and errors."""
    root = Path(__file__).resolve().parents[1]
    for script in ("pretrain.py", "sft.py"):
        result = subprocess.run([sys.executable, str(root / "examples" / script), "--num-levels", "0"],
                                check=False, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        assert f"{script}: error: argument --num-levels/--num-alignment-levels: expected a positive integer" in (
            result.stderr)


def test_pretrain_refuses_levels_outside_the_model_before_training(tmp_path, capsys):
    import json

    record = {"id": "0", "image": "a.png", "similarity": 7,
              "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([record]))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(data), "--image-folder", str(tmp_path), "--num-levels", "5",
              "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aligngpt pretrain")
    assert "aligngpt pretrain: error: alignment_level must lie in 0..4 (the model has 5 alignment levels)" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pretrain_records_the_pairs_per_level_of_its_data_for_the_card(tmp_path, capsys):
    """`aligngpt levels` -> `aligngpt pretrain --data` -> `aligngpt push`: the card's "Alignment levels" table shows
    the pairs per level of the data and their CLIP score range (`--include-clip-score`)."""
    import json

    from PIL import Image

    records = []
    for i, (level, score) in enumerate([(0, 0.11), (0, 0.13), (1, 0.20), (2, 0.31), (2, 0.35), (2, 0.33)]):
        Image.new("RGB", (12, 10), (40 * i, 200, 90)).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "similarity": level, "clip_score": score,
                        "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": f"pair {i}"}]})
    data = tmp_path / "levels.json"
    data.write_text(json.dumps(records))
    main(["pretrain", "--data", str(data), "--image-folder", str(tmp_path), "--num-levels", "3", "--max-steps", "1",
          "--output", str(tmp_path / "out")])
    info = json.loads((tmp_path / "out" / "aligngpt_card_info.json").read_text())
    assert info["alignment_levels"] == [
        {"level": 0, "pairs": 2, "CLIP score min": pytest.approx(0.11), "CLIP score max": pytest.approx(0.13)},
        {"level": 1, "pairs": 1, "CLIP score min": pytest.approx(0.20), "CLIP score max": pytest.approx(0.20)},
        {"level": 2, "pairs": 3, "CLIP score min": pytest.approx(0.31), "CLIP score max": pytest.approx(0.35)},
    ]
    assert main(["push", "--model", str(tmp_path / "out"), "--repo-id", "you/x", "--dry-run",
                 "--staging-dir", str(tmp_path / "stage")]) in (0, None)
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "No level statistics were recorded" not in card and "| 2 | 3 | 0.31" in card


def run_module(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", WANDB_DISABLED="true", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    return subprocess.run([sys.executable, "-m", "transformers_aligngpt", *args], check=False, capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def load_checkpoint(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def tiny_start(**config_kwargs):
    """The model `aligngpt pretrain` / `sft` start from without model flags (seed 0)."""
    from transformers_aligngpt.demo import demo_corpus
    from transformers_aligngpt.tiny import build_tiny_model

    return build_tiny_model(texts=demo_corpus(), seed=0, **config_kwargs)[0]


def answers(model, processor, image):
    prompt = processor.apply_chat_template(chat("What is shown?"), add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def changed(before, after, prefix):
    keys = [key for key in before if key.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[key], after[key]) for key in keys)


def test_pretrain_then_sft_end_to_end_with_python_m(tmp_path, images):
    from safetensors.torch import load_file

    from transformers_aligngpt.demo import NUM_QUALITIES

    result = run_module("pretrain", "--max-steps", "2", "--output", "phase1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '{"world_size": 1, "global_step": 2}' in result.stdout
    model, processor = load_checkpoint(tmp_path / "phase1")
    assert model.config.num_alignment_levels == NUM_QUALITIES
    start, trained = tiny_start(num_alignment_levels=NUM_QUALITIES).state_dict(), model.state_dict()
    # phase 1 trains the projector and the alignment embeddings, and nothing else
    assert changed(start, trained, "model.multi_modal_projector.") and changed(start, trained, "model.alignment_emb")
    for prefix in ("model.language_model.", "model.vision_tower.", "model.alignment_gate.", "lm_head."):
        assert not changed(start, trained, prefix), prefix
    artefact = load_file(tmp_path / "phase1" / "mm_projector_align.safetensors")
    assert torch.equal(artefact["model.alignment_embeddings.weight"], trained["model.alignment_embeddings.weight"])
    assert answers(model, processor, images[0])

    # phase 2 from the built-in tiny model, and from the phase-1 checkpoint (with the old flag names)
    result = run_module("sft", "--max-steps", "2", "--output", "phase2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase-2 model saved to phase2" in result.stdout
    # the folder's card is AlignGPT's (TRL's own save writes a text-generation card with base model "None")
    local_card = (tmp_path / "phase2" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in local_card and "phase 2 (instruction tuning)" in local_card
    assert "[None]" not in local_card
    model, processor = load_checkpoint(tmp_path / "phase2")
    start, tuned = tiny_start().state_dict(), model.state_dict()
    assert changed(start, tuned, "model.alignment_gate.") and changed(start, tuned, "model.language_model.")
    assert not changed(start, tuned, "model.alignment_embeddings.") and not changed(start, tuned, "model.vision_tower.")
    assert answers(model, processor, images[1])

    result = run_module("sft", "--max-steps", "2", "--model-name-or-path", "phase1", "--output-dir", "phase2b",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = load_checkpoint(tmp_path / "phase2b")[0].state_dict()
    assert torch.equal(tuned["model.alignment_embeddings.weight"], trained["model.alignment_embeddings.weight"])
    assert changed(trained, tuned, "model.alignment_gate.")
    # each run records its setup for the model card, after the base checkpoint's (phase 1, then phase 2)
    info = json.loads((tmp_path / "phase2b" / "aligngpt_card_info.json").read_text())
    assert list(info["training"]) == ["phase 1 (pre-training)", "phase 2 (instruction tuning)"]
    assert info["training"]["phase 1 (pre-training)"]["optimizer steps"] == 2
    assert info["training"]["phase 2 (instruction tuning)"]["trained"] == "full (LLM, gate, projector)"
    card = (tmp_path / "stage" / "README.md")
    assert run_module("push", "--model", "phase2b", "--repo-id", "you/x", "--dry-run", "--staging-dir", "stage",
                      cwd=tmp_path).returncode == 0
    assert "No training information was recorded" not in card.read_text()
    assert "phase 2 (instruction tuning)" in card.read_text()

    # QLoRA on the tiny model with the phase-1 artefact: an adapter saves only what it trains, so the artefact's
    # (frozen) alignment embeddings must be in the base it points to, and in the merged model
    result = run_module("sft", "--max-steps", "2", "--pretrain-artifact", "phase1", "--use-peft", "--load-in-4bit",
                        "--merge", "--lora-r", "4", "--output", "phase2q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((tmp_path / "phase2q" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == (tmp_path / "phase2q" / "base-model").resolve()
    table = trained["model.alignment_embeddings.weight"]
    for folder in ("phase2q/base-model", "phase2q/merged"):
        weights = load_checkpoint(tmp_path / folder)[0].state_dict()["model.alignment_embeddings.weight"]
        torch.testing.assert_close(weights, table.to(weights.dtype), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- push / convert input checks
def test_push_checks_every_input_before_staging(tiny_checkpoint, original_fixture_dir, tmp_path, capsys):
    stage = tmp_path / "stage"
    bad_card, bad_eval, stray = tmp_path / "card.json", tmp_path / "eval.json", tmp_path / "stray"
    bad_card.write_text('{"licence": "mit"}')
    bad_eval.write_text("nope")
    stray.mkdir()
    (stray / "secrets.txt").write_text("token")
    push = ["push", "--model", str(tiny_checkpoint), "--dry-run", "--staging-dir", str(stage)]
    for argv, message in [
        (push + ["--repo-id", "me/bad name"], "--repo-id 'me/bad name' is not a valid repo id"),
        (push + ["--repo-id", "me/t", "--card-info", str(bad_card)], "unknown card info keys ['licence']"),
        (push + ["--repo-id", "me/t", "--eval-results", str(bad_eval)], "not evaluation results"),
        (["push", "--model", str(original_fixture_dir / "checkpoint"), "--repo-id", "me/t"],
         "is a checkpoint of the original AlignGPT release format (LLaVA-style mm_* keys): convert it first"),
        (["push", "--model", str(tiny_checkpoint), "--repo-id", "me/t", "--dry-run", "--staging-dir", str(stray)],
         "--staging-dir: staging folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("usage: aligngpt push") and message in err, err
        assert "Traceback" not in err
    assert not stage.exists() and [p.name for p in stray.iterdir()] == ["secrets.txt"]


def test_push_to_an_unreachable_hub_is_one_line(tiny_checkpoint, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--model", str(tiny_checkpoint), "--repo-id", "me/t", "--token", "hf_x"])
    assert exit_info.value.code == 2
    assert "aligngpt push: error: the Hub at http://127.0.0.1:9 cannot be reached" in capsys.readouterr().err


def test_convert_errors_are_usage_errors(tiny_checkpoint, tmp_path, capsys):
    """A ConversionError is `aligngpt convert: error: ...`, exit status 2, as the other subcommands' input errors."""
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"aligngpt convert: error: {tiny_checkpoint} is already converted" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--checkpoint", str(tiny_checkpoint), "--push-to-hub", "me/bad name"])
    assert exit_info.value.code == 2 and "--push-to-hub 'me/bad name' is not a valid repo id" in capsys.readouterr().err
