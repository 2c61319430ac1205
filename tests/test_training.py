"""Training: phase 1 (Trainer), phase 2 (TRL SFTTrainer, full / LoRA / QLoRA), checkpoints, multi-process, TRL CLI.

Tiny random models (hidden 64, 2 layers) and a few solid-colour images; every run takes a few steps on the CPU.
"""

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import chat
from transformers import TrainerCallback

from transformers_aligngpt import AlignGPTForConditionalGeneration
from transformers_aligngpt.collators import (
    AlignGPTInstructionCollator,
    AlignGPTPretrainingCollator,
)
from transformers_aligngpt.training import (
    LLM_LORA_TARGET_MODULES,
    PRETRAINING_ARTIFACT_NAME,
    AlignGPTPretrainer,
    AlignGPTPretrainingArguments,
    aligngpt_lora_config,
    build_aligngpt_from_pretrained,
    is_quantized_module,
    load_for_qlora,
    load_pretraining_artifact,
    load_qlora_adapter,
    make_sft_trainer,
    merge_qlora_adapter,
    qlora_bnb_config,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = ROOT.parent / "shared" / "fixtures" / "aligngpt-original-tiny"


def new_model(config, seed=0):
    torch.manual_seed(seed)
    # a copy: the model keeps its config object, and training recipes write to it (gate_text_scope ...)
    return AlignGPTForConditionalGeneration(copy.deepcopy(config))


def snapshot(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def changed(before, model, prefix=""):
    return sorted(
        name for name, value in model.state_dict().items()
        if name.startswith(prefix) and name in before and not torch.equal(before[name], value)
    )


def pretraining_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_steps": 3,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return AlignGPTPretrainingArguments(**kwargs)


def sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    kwargs = {
        "output_dir": str(tmp_path),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "assistant_only_loss": True,
        "max_length": None,
        "activation_checkpointing": False,
        "seed": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def subprocess_env(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        WANDB_DISABLED="true",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


# ------------------------------------------------------------------------------------------------------ phase 1


def test_pretraining_collator_supervises_the_caption_only(processor, pretraining_dataset):
    collator = AlignGPTPretrainingCollator(processor, num_alignment_levels=8)
    rows = [pretraining_dataset[i] for i in (0, 3)]
    batch = collator(rows)
    assert batch["alignment_levels"].tolist() == [0, 3]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    tok = processor.tokenizer
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids = ids[mask.bool()].tolist()
        assert ids[:2] == [tok.bos_token_id, processor.alignment_token_id]
        assert ids[2 : 2 + 16] == [processor.image_token_id] * 16
        supervised = [t for t in labels.tolist() if t != -100]
        assert supervised == ids[18:]  # everything after the image, nothing before
        assert tok.decode(supervised).strip() == row["caption"]
    # pre-training resizes without padding to square (LLaVA / AlignGPT)
    padded = AlignGPTPretrainingCollator(processor, pad_to_square=True)(rows)
    assert not torch.allclose(padded["pixel_values"], batch["pixel_values"])


def test_pretraining_collator_rejects_bad_rows(processor, pretraining_dataset):
    collator = AlignGPTPretrainingCollator(processor, num_alignment_levels=8)
    row = dict(pretraining_dataset[0])
    with pytest.raises(ValueError, match="alignment_level"):
        collator([{k: v for k, v in row.items() if k != "alignment_level"}])
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        collator([{**row, "alignment_level": 8}])
    with pytest.raises(ValueError, match="exactly one image"):
        collator([{**row, "images": row["images"] * 2}])
    with pytest.raises(ValueError, match="cut the image tokens"):
        AlignGPTPretrainingCollator(processor, max_length=10)


def test_phase1_trains_only_projector_and_alignment_embeddings(config, processor, pretraining_dataset, tmp_path):
    model = new_model(config)
    before = snapshot(model)
    trainer = AlignGPTPretrainer(
        model, pretraining_args(tmp_path, max_steps=8), train_dataset=pretraining_dataset, processing_class=processor
    )
    trainer.train()
    assert changed(before, model) == [
        "model.alignment_embeddings.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.multi_modal_projector.linear_2.weight",
    ]
    # only the levels present in the data moved... and all 8 are present here
    assert not torch.equal(before["model.alignment_embeddings.weight"][7], model.model.alignment_embeddings.weight[7])
    history = losses(trainer)
    assert sum(history[-2:]) < sum(history[:2]), history

    # the phase-1 artefact sits next to every checkpoint and the final model
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-3", tmp_path / "checkpoint-6", tmp_path / "final"):
        assert (folder / PRETRAINING_ARTIFACT_NAME).exists() and (folder / "model.safetensors").exists()
    from safetensors.torch import load_file

    artefact = load_file(str(tmp_path / "final" / PRETRAINING_ARTIFACT_NAME))
    assert sorted(artefact) == changed(before, model)
    fresh = new_model(config, seed=1)
    loaded = load_pretraining_artifact(fresh, tmp_path / "final")
    assert loaded == sorted(artefact)
    for name, value in artefact.items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_phase1_rejects_bad_data_before_training(config, processor, pretraining_dataset, tmp_path):
    args = pretraining_args(tmp_path)
    with pytest.raises(ValueError, match="no 'alignment_level' column"):
        AlignGPTPretrainer(
            new_model(config), args, train_dataset=pretraining_dataset.remove_columns("alignment_level"),
            processing_class=processor,
        )
    out_of_range = pretraining_dataset.map(lambda row, i: {"alignment_level": 9 if i == 5 else row["alignment_level"]},
                                           with_indices=True)
    with pytest.raises(ValueError, match=r"0\.\.7.*row 5 has 9"):
        AlignGPTPretrainer(new_model(config), args, train_dataset=out_of_range, processing_class=processor)
    # rows that are not image-caption pairs (a LLaVA file may hold them): refused before training, not mid-run
    two_images = pretraining_dataset.map(lambda row, i: {"images": row["images"] * (2 if i == 3 else 1)},
                                         with_indices=True)
    with pytest.raises(ValueError, match=r"1 pre-training rows do not hold exactly one image \(row 3 has 2\)"):
        AlignGPTPretrainer(new_model(config), args, train_dataset=two_images, processing_class=processor)
    no_caption = pretraining_dataset.map(lambda row, i: {"caption": None if i == 6 else row["caption"]},
                                         with_indices=True)
    with pytest.raises(ValueError, match=r"1 pre-training rows have no caption \(the first is row 6"):
        AlignGPTPretrainer(new_model(config), args, train_dataset=no_caption, processing_class=processor)
    from datasets import Dataset

    missing_files = Dataset.from_dict({"images": [[f"imgs/{i}.png"] for i in range(8)], "caption": ["a box"] * 8,
                                       "alignment_level": list(range(8))})
    with pytest.raises(ValueError, match=r"8 image files do not exist \(row 0: imgs/0\.png"):
        AlignGPTPretrainer(new_model(config), args, train_dataset=missing_files, processing_class=processor)
    with pytest.raises(ValueError, match="cut the image tokens"):
        AlignGPTPretrainer(
            new_model(config), pretraining_args(tmp_path, max_length=12), train_dataset=pretraining_dataset,
            processing_class=processor,
        )


def test_phase1_warns_when_no_row_has_the_models_top_level(config, processor, pretraining_dataset, tmp_path, caplog):
    """Data bucketed into 4 levels, a model with 8: E[7], added to every image at inference, would never train."""
    low = pretraining_dataset.filter(lambda row: row["alignment_level"] < 4)
    with caplog.at_level(logging.WARNING, logger="transformers_aligngpt.training"):
        AlignGPTPretrainer(new_model(config), pretraining_args(tmp_path), train_dataset=low, processing_class=processor)
    assert "goes up to 3 (4 levels), but the model has 8" in caplog.text
    assert "E[7]" in caplog.text and "--num-levels 8" in caplog.text and "--num-levels 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers_aligngpt.training"):  # every level, or eval data only
        AlignGPTPretrainer(new_model(config), pretraining_args(tmp_path), train_dataset=pretraining_dataset,
                           eval_dataset=low, processing_class=processor)
    assert "goes up to" not in caplog.text


def test_phase1_refuses_levels_that_are_not_integers(config, processor, pretraining_dataset, tmp_path):
    from datasets import Value

    def trainer(dataset):
        return AlignGPTPretrainer(new_model(config), pretraining_args(tmp_path), train_dataset=dataset,
                                  processing_class=processor)

    as_float = pretraining_dataset.cast_column("alignment_level", Value("float32"))
    assert trainer(as_float) is not None  # 3.0 is level 3
    halves = as_float.map(lambda row: {"alignment_level": row["alignment_level"] + (0.5 if row["alignment_level"] == 2
                                                                                     else 0)})
    with pytest.raises(ValueError, match=r"1 rows have a non-integer alignment_level \(row 2 has 2\.5\)"):
        trainer(halves)
    with pytest.raises(ValueError, match=r"alignment_level must hold integers.*holds string values \(e\.g\. '0'\)"):
        trainer(pretraining_dataset.cast_column("alignment_level", Value("string")))
    # the collator (streamed data is checked there) refuses them too, instead of truncating 0.5 to 0
    collator = AlignGPTPretrainingCollator(processor, num_alignment_levels=8)
    row = dict(pretraining_dataset[0])
    for bad in (0.5, "3", float("nan"), True):
        with pytest.raises(ValueError, match="not an integer"):
            collator([{**row, "alignment_level": bad}])
    for good in (3, 3.0, torch.tensor(3)):
        assert collator([{**row, "alignment_level": good}])["alignment_levels"].tolist() == [3]


def test_original_phase1_artefact_loads(config):
    original = FIXTURE_DIR / "pretrain" / "mm_projector_align.bin"
    if not original.exists():
        pytest.skip("the original-format fixture is not available")
    state = torch.load(original, weights_only=True)
    model = new_model(config)
    load_pretraining_artifact(model, original)
    base = model.model
    assert torch.equal(base.alignment_embeddings.weight, state["align_indicators.indicator_embs"])
    assert torch.equal(base.multi_modal_projector.linear_1.weight, state["mm_projector.0.weight"])
    assert torch.equal(base.multi_modal_projector.linear_2.bias, state["mm_projector.2.bias"])


class StopAt(TrainerCallback):
    """Interrupts training after `step` (after that step's checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_interrupted_and_resumed_run_ends_with_the_same_weights(config, processor, pretraining_dataset, tmp_path):
    def trainer(folder, callbacks=()):
        args = pretraining_args(tmp_path / folder, max_steps=6, save_steps=3, per_device_train_batch_size=2)
        return AlignGPTPretrainer(
            new_model(config), args, train_dataset=pretraining_dataset, processing_class=processor,
            callbacks=list(callbacks),
        )

    uninterrupted = trainer("full")
    uninterrupted.train()

    interrupted = trainer("resumed", [StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert checkpoint.exists()

    resumed = trainer("resumed")  # a fresh process would build the model from scratch, as here
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    expected, actual = uninterrupted.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(
        expected["model.alignment_embeddings.weight"],
        interrupted.model.state_dict()["model.alignment_embeddings.weight"],
    )


def test_artefact_is_written_when_save_gets_a_state_dict(config, processor, pretraining_dataset, tmp_path):
    # Trainer.save_model passes the gathered state dict under DeepSpeed / FSDP, and save_pretrained empties it
    trainer = AlignGPTPretrainer(
        new_model(config), pretraining_args(tmp_path), train_dataset=pretraining_dataset, processing_class=processor
    )
    trainer._save(str(tmp_path / "out"), state_dict=dict(trainer.model.state_dict()))
    assert (tmp_path / "out" / PRETRAINING_ARTIFACT_NAME).exists()


def cpu_variant_of(config_name: str, tmp_path) -> str:
    """The shipped accelerate config with only the machine keys changed: 2 CPU processes, no mixed precision."""
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "accelerate_configs" / config_name).read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    path = tmp_path / config_name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_two_process_cpu_run_through_accelerate_launch(tmp_path):
    output = tmp_path / "ddp"
    command = [  # the `accelerate` command itself, as documented (it imports timm where timm is installed)
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", str(ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
        str(ROOT / "examples" / "pretrain.py"),
        "--output-dir", str(output), "--max-steps", "2", "--num-rows", "8", "--per-device-train-batch-size", "2",
    ]
    env = subprocess_env(tmp_path)
    result = run_launcher(command, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith('{"world_size"')][-1])
    assert summary == {"world_size": 2, "global_step": 2}
    assert (output / PRETRAINING_ARTIFACT_NAME).exists() and (output / "model.safetensors").exists()


def run_launcher(command: list, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs an `accelerate launch` command in its own process group; on a timeout (a hang) the launcher and its
    worker processes are killed together and the test fails with their output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"no result after {timeout} s (hung?)\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory):
    """Where DeepSpeed compiles its CPU communication op (~70 s on two cores, once per test session): a fresh folder,
    so a build of another torch version or a lock left by a killed build elsewhere cannot stall the tests."""
    return tmp_path_factory.mktemp("torch_extensions")


def deepspeed_launch(config_name: str, script: str, args: list, tmp_path, extensions_dir) -> dict:
    """Runs `script` under the shipped DeepSpeed config on two CPU processes; its world_size/global_step line."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", cpu_variant_of(config_name, tmp_path),
        str(ROOT / "examples" / script), *map(str, args),
    ]
    env = subprocess_env(tmp_path)
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions_dir))
    result = run_launcher(command, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith('{"world_size"')][-1])


def test_deepspeed_paper_route_zero2_phase1_then_zero3_phase2(tmp_path, torch_extensions_dir):
    # the paper's recipe from a plain LLM + CLIP tower: phase 1 under ZeRO-2 (the artefact comes from the gathered
    # state dict), phase 2 under ZeRO-3 (the model is built while ZeRO-3 is on; the artefact loads into
    # partitioned parameters)
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    llm_dir, clip_dir, _, _ = save_plain_llm_and_tower(tmp_path)
    base = ["--language-model", llm_dir, "--vision-tower", clip_dir, "--per-device-train-batch-size", 2]
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    summary = deepspeed_launch("zero2.yaml", "pretrain.py", base + ["--output", phase1, "--max-steps", 2,
                                                                     "--num-rows", 8], tmp_path, torch_extensions_dir)
    assert summary == {"world_size": 2, "global_step": 2}
    artefact = load_file(phase1 / PRETRAINING_ARTIFACT_NAME)
    summary = deepspeed_launch("zero3.yaml", "sft.py", base + [
        "--pretrain-artifact", phase1 / PRETRAINING_ARTIFACT_NAME, "--output", phase2, "--max-steps", 4,
        "--num-rows", 16], tmp_path, torch_extensions_dir)
    assert summary == {"world_size": 2, "global_step": 4}
    trained = AlignGPTForConditionalGeneration.from_pretrained(phase2).model
    table = next(v for k, v in artefact.items() if k.endswith("alignment_embeddings.weight"))
    assert torch.equal(trained.alignment_embeddings.weight, table)  # loaded from phase 1, frozen in phase 2


def test_deepspeed_zero3_sft_on_two_processes_with_text_only_batches(tiny_checkpoint, tmp_path, torch_extensions_dir):
    # ZeRO-3 gathers each module's weights collectively: a text-only batch on one process while the other has
    # images hung before the image branch ran on a blank image; 16 rows at 2 per process give such a step
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero3"
    summary = deepspeed_launch("zero3.yaml", "sft.py", ["--model", tiny_checkpoint, "--output", output,
                                                        "--max-steps", 4, "--num-rows", 16,
                                                        "--per-device-train-batch-size", 2], tmp_path,
                        torch_extensions_dir)
    assert summary == {"world_size": 2, "global_step": 4}
    # the 16-bit model gathered from the shards is whole; phase 2 trained the gate, not the alignment table
    start = AlignGPTForConditionalGeneration.from_pretrained(tiny_checkpoint).model
    trained = AlignGPTForConditionalGeneration.from_pretrained(output).model
    assert all(p.numel() > 0 for p in trained.parameters())
    assert torch.equal(trained.alignment_embeddings.weight, start.alignment_embeddings.weight)
    assert not torch.equal(trained.alignment_gate.fc1.weight, start.alignment_gate.fc1.weight)


# ------------------------------------------------------------------------------------------------------ phase 2


def test_instruction_collator_labels_bos_and_gate_mask(processor, instruction_dataset):
    rows = [instruction_dataset[i] for i in range(4)]  # rows 0, 1, 3 have an image, row 2 is text-only
    prompt = AlignGPTInstructionCollator(processor, assistant_only_loss=True, gate_text_scope="prompt")(
        [dict(r) for r in rows]
    )
    tok = processor.tokenizer
    assert prompt["pixel_values"].shape[0] == 3
    for row, ids, labels, mask in zip(rows, prompt["input_ids"], prompt["labels"], prompt["attention_mask"]):
        ids = ids[mask.bool()].tolist()
        has_image = bool(row["images"])
        assert ids[0] == tok.bos_token_id  # as at inference, although TRL tokenises without special tokens
        assert (ids[1] == processor.alignment_token_id) == has_image
        assert ids.count(processor.image_token_id) == (16 if has_image else 0)
        supervised = [t for t in labels.tolist() if t != -100]
        assert tok.decode(supervised).replace(" ", "") == row["messages"][1]["content"][0]["text"] + "</s>"
    assert torch.equal(prompt["gate_text_mask"], prompt["labels"] == -100)

    # the whole conversation supervised (not what make_sft_trainer allows, but the collator still never
    # supervises placeholders) and the original's gate input: no gate mask
    conversation = AlignGPTInstructionCollator(processor, gate_text_scope="conversation")([dict(r) for r in rows])
    placeholders = (conversation["input_ids"] == processor.image_token_id) | (
        conversation["input_ids"] == processor.alignment_token_id
    )
    assert placeholders.any() and (conversation["labels"][placeholders] == -100).all()
    assert "gate_text_mask" not in conversation
    with pytest.raises(ValueError, match="assistant_only_loss"):
        AlignGPTInstructionCollator(processor, gate_text_scope="prompt")


def test_prompt_completion_rows_equal_the_same_conversation_as_messages(processor, instruction_dataset):
    """Conversational prompt/completion data (TRL tokenises the completions in a second processor call) gives the
    tokens, labels and gate mask of the same chat written as `messages`: one bos per row, none before the answer."""
    def rows():  # (fresh each time: TRL's collator rewrites the examples it is given)
        return [dict(instruction_dataset[i]) for i in range(4)]  # rows 0, 1, 3 with an image, row 2 text-only

    def split():
        return [{"images": r["images"], "prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows()]

    as_messages = AlignGPTInstructionCollator(processor, assistant_only_loss=True, gate_text_scope="prompt")(rows())
    as_completions = AlignGPTInstructionCollator(processor, completion_only_loss=True,
                                                 gate_text_scope="prompt")(split())
    tok = processor.tokenizer
    for key in ("input_ids", "labels", "gate_text_mask"):
        for row in range(4):
            expected = as_messages[key][row][as_messages["attention_mask"][row].bool()]
            found = as_completions[key][row][as_completions["attention_mask"][row].bool()]
            assert found.tolist() == expected.tolist(), (key, row, tok.decode(as_completions["input_ids"][row]))
    assert (as_completions["input_ids"] == tok.bos_token_id).sum(-1).tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(as_completions["pixel_values"], as_messages["pixel_values"])
    # a max_length that cuts into the answers cuts both the same way (the dropped bos takes no room)
    # (the rows with an image: their answers are cut, not their images)
    cut = int(as_messages["attention_mask"].sum(-1)[[0, 1, 3]].min()) - 1
    as_messages = AlignGPTInstructionCollator(processor, assistant_only_loss=True, gate_text_scope="prompt",
                                              max_length=cut)(rows())
    as_completions = AlignGPTInstructionCollator(processor, completion_only_loss=True, gate_text_scope="prompt",
                                                 max_length=cut)(split())
    assert as_completions["input_ids"].shape[1] == cut
    for key in ("input_ids", "attention_mask", "labels"):
        assert as_completions[key].tolist() == as_messages[key].tolist(), key


def test_prompt_gate_scope_sees_at_training_what_it_sees_at_inference(model, processor, instruction_dataset):
    row = dict(instruction_dataset[0])
    image = row["images"][0]
    prompt = processor.apply_chat_template(chat("What colour is the shape?"), add_generation_prompt=True)
    inference_inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        at_inference = model.model(**inference_inputs).alignment_weights
        weights = {}
        for scope in ("prompt", "conversation"):
            collator = AlignGPTInstructionCollator(processor, assistant_only_loss=True, gate_text_scope=scope)
            batch = collator([dict(row)])
            batch.pop("labels")
            weights[scope] = model.model(**batch).alignment_weights
    torch.testing.assert_close(weights["prompt"], at_inference, rtol=1e-5, atol=1e-6)
    assert (weights["conversation"] - at_inference).abs().max() > 1e-4


def test_phase2_full_freezes_alignment_embeddings_trains_gate_and_lowers_loss(
    config, processor, instruction_dataset, tmp_path
):
    model = new_model(config)
    before = snapshot(model)
    trainer = make_sft_trainer(
        model, processor, train_dataset=instruction_dataset, args=sft_args(tmp_path, max_steps=10)
    )
    trainer.train()
    moved = changed(before, model)
    assert not any(name.startswith("model.alignment_embeddings") for name in moved)
    assert not any(name.startswith("model.vision_tower") for name in moved)
    for prefix in ("model.alignment_gate.", "model.multi_modal_projector.", "model.language_model.", "lm_head."):
        assert any(name.startswith(prefix) for name in moved), prefix
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3, history


def test_phase2_lora_trains_gate_projector_and_adapter_only(config, processor, instruction_dataset, tmp_path):
    model = new_model(config)
    before = snapshot(model)
    trainer = make_sft_trainer(
        model, processor, train_dataset=instruction_dataset, args=sft_args(tmp_path, max_steps=3),
        peft_config=aligngpt_lora_config(r=4, alpha=8, dropout=0.0), gate_text_scope="conversation",
    )
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "language_model" in n for n in trainable)
    assert not any("vision_tower" in n or "alignment_embeddings" in n for n in trainable)
    state = trainer.model.state_dict()
    gate = next(n for n in state if "alignment_gate.modules_to_save" in n and n.endswith("fc1.weight"))
    assert not torch.equal(state[gate], before["model.alignment_gate.fc1.weight"])
    embeddings = next(n for n in state if n.endswith("alignment_embeddings.weight"))
    assert torch.equal(state[embeddings], before["model.alignment_embeddings.weight"])
    assert model.config.gate_text_scope == "conversation"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_mixed_precision_keeps_gate_and_projector_updates(config, processor, instruction_dataset, tmp_path,
                                                                 lora, caplog):
    """A bf16-loaded model with bf16 mixed precision and no DeepSpeed: the gate and projector (or their LoRA
    `modules_to_save` copies) train in fp32, so that fine-tuning-sized AdamW steps are not rounded away; a fully trained
    bf16 LLM gets a warning (no fp32 master weights)."""
    model = new_model(config).to(torch.bfloat16)
    before = snapshot(model)
    with caplog.at_level("WARNING", logger="transformers_aligngpt.training"):
        trainer = make_sft_trainer(
            model, processor, train_dataset=instruction_dataset,
            args=sft_args(tmp_path, max_steps=2, bf16=True, learning_rate=2e-5),
            peft_config=aligngpt_lora_config(r=4, alpha=8, dropout=0.0) if lora else None,
        )
    assert ("without DeepSpeed" in caplog.text) != lora
    small = {n: p for n, p in trainer.model.named_parameters()
             if p.requires_grad and ("alignment_gate" in n or "multi_modal_projector" in n)}
    assert small and {p.dtype for p in small.values()} == {torch.float32}
    # FSDP flattens each unit's weights into one tensor of one dtype (and manages precision itself): left alone
    from types import SimpleNamespace

    from transformers_aligngpt.training import _keep_fully_trained_modules_in_fp32

    other = new_model(config).to(torch.bfloat16)
    _keep_fully_trained_modules_in_fp32(other, SimpleNamespace(bf16=True, fp16=False, fsdp="full_shard"))
    assert {p.dtype for p in other.parameters()} == {torch.bfloat16}
    trainer.train()
    gate = next(p for n, p in small.items() if "alignment_gate" in n and n.endswith("fc1.weight"))
    # every entry of the gate's first layer moves (in bf16, 2e-5 steps left 99% of them unchanged)
    assert (gate.detach().cpu() != before["model.alignment_gate.fc1.weight"].float()).float().mean() > 0.95


@pytest.mark.parametrize("family", ["llama", "phi", "phi3"])
def test_default_lora_targets_every_linear_layer_of_the_llm_and_nothing_else(tokenizer, config, family):
    """Phi-3 fuses q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`), Phi names its layers `dense`, `fc1`, `fc2`: the
    default targets are the LLM's linear layers whatever their names, as the Llama names were for Llama."""
    from peft import get_peft_model
    from transformers import Phi3Config, PhiConfig

    from transformers_aligngpt.tiny import tiny_config

    sizes = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": tokenizer.pad_token_id}
    text_config = {"llama": None, "phi": PhiConfig(**sizes), "phi3": Phi3Config(**sizes)}[family]
    model = new_model(tiny_config(tokenizer, text_config=text_config) if text_config else config)
    llm_linears = {name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")}
    if family == "llama":  # the same layers as the Llama names always gave
        assert llm_linears == {name for name, _ in model.named_modules() if re.fullmatch(LLM_LORA_TARGET_MODULES, name)}
    peft_model = get_peft_model(model, aligngpt_lora_config(r=4))
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A")
               for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert adapted == llm_linears
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    expected = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
                "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}[family]
    assert leaves == expected
    # vision tower, projector and gate: no adapter; projector and gate trained fully
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n or "lm_head" in n or "alignment_embeddings" in n for n in trainable)
    assert any("alignment_gate.modules_to_save" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)


def test_phase2_rejects_unworkable_options_before_training(config, processor, instruction_dataset, tmp_path, caplog):
    with pytest.raises(ValueError, match="packing"):
        make_sft_trainer(new_model(config), processor, instruction_dataset,
                         args=sft_args(tmp_path, packing=True, max_length=512))
    with pytest.raises(ValueError, match="assistant's answers only"):
        make_sft_trainer(new_model(config), processor, instruction_dataset,
                         args=sft_args(tmp_path, assistant_only_loss=False))
    # the image rows need 16 image tokens after a ~45-token prompt prefix
    with pytest.raises(ValueError, match=r"max_length=40 would cut image tokens in 6 rows \(row 0 needs \d+") as info:
        make_sft_trainer(new_model(config), processor, instruction_dataset, args=sft_args(tmp_path, max_length=40))
    # the bare minimum keeps the images but cuts the answers after them: the collator says those rows train nothing
    assert "plus the length of the answers" in str(info.value)
    minimum = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    trainer = make_sft_trainer(new_model(config), processor, instruction_dataset,
                               args=sft_args(tmp_path, max_length=minimum))
    with caplog.at_level(logging.WARNING):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"] == -100).all(-1).any()
    assert "without any supervised token" in caplog.text
    trainer = make_sft_trainer(new_model(config), processor, instruction_dataset,
                               args=sft_args(tmp_path, max_length=80, max_steps=1))
    assert trainer.data_collator.max_length == 80


def test_missing_image_files_and_placeholder_mismatch_stop_before_training(config, processor, images, tmp_path):
    """Both used to stop a run mid-way inside the data pipeline (transformers' "Incorrect image source", TRL's
    placeholder count), without the row."""
    from transformers_aligngpt.data import load_llava_json

    folder = tmp_path / "imgs"
    folder.mkdir()
    images[0].save(folder / "a.png")

    def records(*changes):
        base = [{"id": str(i), "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A square."}]}
            for i in range(4)]
        for i, change in changes:
            base[i] = {**base[i], **change}
            if change.get("image") is None and "image" in change:
                del base[i]["image"]
        path = tmp_path / f"data{len(list(tmp_path.glob('data*.json')))}.json"
        path.write_text(json.dumps(base))
        return path

    def build(data, image_folder=folder):
        dataset = load_llava_json(data, image_folder).select_columns(["images", "messages"])
        return make_sft_trainer(new_model(config), processor, dataset, args=sft_args(tmp_path, max_steps=1))

    assert build(records()).train_dataset is not None  # the clean file passes
    with pytest.raises(ValueError, match=r"1 image files do not exist \(row 2: .*gone\.png\).*image folder"):
        build(records((2, {"image": "gone.png"})))
    with pytest.raises(ValueError, match=r"4 image files do not exist"):
        build(records(), image_folder=None)  # relative paths without the folder
    text_only_with_placeholder = {"image": None}  # keeps "<image>" in its text
    with pytest.raises(ValueError, match=r"1 rows have a different number .*row 3: 0 images, 1 image placeholders"):
        build(records((3, text_only_with_placeholder)))


def test_singular_image_column_with_text_only_rows_stops_before_training(config, processor, instruction_dataset,
                                                                         tmp_path):
    """TRL makes `[None]` of a missing `image`: the first training step would fail, far from the cause."""
    single = instruction_dataset.map(lambda row: {"image": row["images"][0] if row["images"] else None},
                                     remove_columns="images")
    with pytest.raises(ValueError, match=r"2 rows have no image in the `image` column \(rows 2, 5\).*`images` column"):
        make_sft_trainer(new_model(config), processor, single, args=sft_args(tmp_path, max_steps=1))
    # the fix the message gives works
    fixed = single.map(lambda row: {"images": [] if row["image"] is None else [row["image"]]}, remove_columns="image")
    assert make_sft_trainer(new_model(config), processor, fixed, args=sft_args(tmp_path, max_steps=1)) is not None


def test_quantised_module_in_modules_to_save_is_refused(tiny_checkpoint, processor, instruction_dataset, tmp_path):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    # TRL's --load_in_4bit config: only lm_head (and the model's own keep-list) stay unquantised
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    assert is_quantized_module(model.model.vision_tower)
    assert not is_quantized_module(model.model.alignment_gate)  # never quantised, so trainable in modules_to_save
    lora = aligngpt_lora_config(r=4, modules_to_save=["alignment_gate", "vision_tower"])
    with pytest.raises(ValueError, match="'model.vision_tower' is quantised"):
        make_sft_trainer(model, processor, instruction_dataset, args=sft_args(tmp_path, bf16=True), peft_config=lora)


def test_qlora_on_cpu_saves_reloads_and_merges_with_equal_outputs(
    tiny_checkpoint, processor, instruction_dataset, tmp_path
):
    from peft import PeftModel

    model = load_for_qlora(tiny_checkpoint)
    quantised = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantised and all(n.startswith("model.language_model.layers.") for n in quantised)
    for name in ("vision_tower", "multi_modal_projector", "alignment_gate", "alignment_embeddings"):
        assert not is_quantized_module(getattr(model.model, name))
        assert all(p.dtype == torch.bfloat16 for p in getattr(model.model, name).parameters())  # nothing upcast
    assert not is_quantized_module(model.lm_head)
    embeddings_before = model.model.alignment_embeddings.weight.detach().clone()
    gate_before = model.model.alignment_gate.fc2.weight.detach().clone()

    trainer = make_sft_trainer(
        model, processor, instruction_dataset,
        args=sft_args(tmp_path / "run", bf16=True, max_steps=3, learning_rate=1e-2),
        peft_config=aligngpt_lora_config(r=8, alpha=16, dropout=0.0),
    )
    trainer.train()
    peft_model = trainer.model
    assert torch.equal(peft_model.base_model.model.model.alignment_embeddings.weight, embeddings_before)
    gate = peft_model.base_model.model.model.alignment_gate.modules_to_save["default"]
    assert not torch.equal(gate.fc2.weight.to(gate_before.dtype), gate_before)
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert (adapter / "adapter_model.safetensors").exists()

    collator = AlignGPTInstructionCollator(processor, assistant_only_loss=True, gate_text_scope="prompt")
    batch = collator([dict(instruction_dataset[i]) for i in range(4)])
    batch.pop("labels")

    def logits(m):
        m.eval()
        with torch.no_grad():
            return m(**batch).logits.float()

    trained = logits(peft_model)
    reloaded = load_qlora_adapter(tiny_checkpoint, adapter)
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=0)
    merged = merge_qlora_adapter(tiny_checkpoint, adapter)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    # RoPE's frequencies stay fp32, as in training and in the merged checkpoint once saved and reloaded: in bf16 the
    # angles drift with the position (~0.15 in cos at 1000 tokens)
    assert {buffer.dtype for name, buffer in merged.named_buffers() if name.endswith("inv_freq")} == {torch.float32}
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    merged_logits = logits(merged)
    # bf16 weights: the merge rounds W + BA once, the adapter adds BA x at run time (differences ~ bf16 epsilon)
    torch.testing.assert_close(merged_logits, trained, rtol=0.01, atol=0.01)
    top2 = trained.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.02
    assert torch.equal(merged_logits.argmax(-1)[clear], trained.argmax(-1)[clear])


# ------------------------------------------------------------------------------------------------- Hub / TRL CLI


def write_parquet_dataset(dataset, folder):
    folder.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "train.parquet"))
    return folder


def test_sft_trainer_loads_our_checkpoint_from_a_path(tiny_checkpoint, instruction_dataset, tmp_path):
    from trl import SFTTrainer

    import transformers_aligngpt  # noqa: F401  (the package is installed: the Auto classes know AlignGPT)

    trainer = SFTTrainer(model=str(tiny_checkpoint), args=sft_args(tmp_path, max_steps=1),
                         train_dataset=instruction_dataset)
    assert type(trainer.model).__name__ == "AlignGPTForConditionalGeneration"
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("quantised", [False, True], ids=["full", "qlora"])
def test_trl_sft_cli_on_a_saved_checkpoint(tiny_checkpoint, instruction_dataset, tmp_path, quantised):
    data = write_parquet_dataset(instruction_dataset, tmp_path / "data")
    trl = Path(sys.executable).with_name("trl")
    command = [
        str(trl), "sft", "--model_name_or_path", str(tiny_checkpoint), "--trust_remote_code",
        "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--assistant_only_loss", "--report_to", "none", "--use_cpu",
        "--logging_steps", "1", "--save_strategy", "no",
    ]
    if quantised:
        command += [
            "--use_peft", "--load_in_4bit", "--dtype", "bfloat16", "--lora_r", "4",
            "--lora_target_modules", LLM_LORA_TARGET_MODULES,
            "--lora_modules_to_save", "multi_modal_projector", "alignment_gate",
        ]
    # the checkpoint's own code (auto_map) is what runs: not this package
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = ""
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "'loss'" in result.stdout + result.stderr
    # TRL's fused LM head never hands the labels to the model: the prompt-scoped gate got its mask from the processor
    assert json.loads((tiny_checkpoint / "config.json").read_text())["gate_text_scope"] == "prompt"
    assert "got neither labels nor gate_text_mask" not in result.stdout + result.stderr
    saved = tmp_path / "out" / ("adapter_model.safetensors" if quantised else "model.safetensors")
    assert saved.exists()


# ------------------------------------------------------------------------------------------------------ helpers


def save_plain_llm_and_tower(tmp_path):
    """A "Vicuna" without the placeholder tokens and a "CLIP" with its preprocessor config, saved locally:
    (llm_dir, clip_dir, llm, clip)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from transformers_aligngpt.tiny import build_tiny_tokenizer, tiny_text_config, tiny_vision_config

    llm_dir, clip_dir = tmp_path / "llm", tmp_path / "clip"
    plain_tokenizer = build_tiny_tokenizer()
    plain_tokenizer.save_pretrained(llm_dir)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_text_config(len(plain_tokenizer)))
    llm.save_pretrained(llm_dir)
    clip = CLIPVisionModel(tiny_vision_config())
    clip.save_pretrained(clip_dir)
    LlavaImageProcessorPil(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(clip_dir)
    return llm_dir, clip_dir, llm, clip


def test_build_from_a_pretrained_llm_and_vision_tower(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    llm_dir, clip_dir, llm, clip = save_plain_llm_and_tower(tmp_path)

    model, processor = build_aligngpt_from_pretrained(llm_dir, clip_dir, num_alignment_levels=6, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(llm_dir).convert_tokens_to_ids("<image>") == processor.image_token_id
    assert model.config.num_alignment_levels == 6 and model.model.alignment_embeddings.weight.shape == (6, 64)
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.state_dict().keys()
    assert all(torch.equal(tower[name], value) for name, value in clip.state_dict().items())
    assert list(processor.image_processor.image_mean) == [0.4, 0.5, 0.6]
    inputs = processor(images=[[torch.zeros(3, 20, 30).numpy().transpose(1, 2, 0).astype("uint8")]],
                       text=["<image>a red square\n"], return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"], alignment_levels=torch.tensor([5]))
    assert torch.isfinite(out.loss)


def test_build_tokenises_a_sentencepiece_llm_as_the_original(original_fixture_dir, original_reference, tmp_path):
    """A Llama sentencepiece tokenizer that transformers loads non-legacy (the first word alone gets "▁") still gives
    the original's ids: the processor writes bos and <align> into the text, so the first word follows a special
    token, where the original (each chunk tokenised alone) gives it its "▁"."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from transformers_aligngpt.tiny import tiny_text_config

    reference, _ = original_reference
    llm_dir, clip_dir, _, _ = save_plain_llm_and_tower(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(original_fixture_dir / "checkpoint", legacy=False)
    text = reference["text_only_prompt"]
    assert processor_free_first_word_differs(tokenizer, text)  # (the case at hand: "first" would cut the "▁")
    tokenizer.save_pretrained(llm_dir)
    LlamaForCausalLM(tiny_text_config(len(tokenizer))).save_pretrained(llm_dir)
    _, processor = build_aligngpt_from_pretrained(llm_dir, clip_dir, dtype=torch.float32)
    assert processor(text=[text])["input_ids"][0] == reference["text_only_input_ids"]
    # ... and so does a processor built by hand around the tokenizer as transformers loads it (LlavaProcessor-style)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from transformers_aligngpt import AlignGPTProcessor

    by_hand = AutoTokenizer.from_pretrained(original_fixture_dir / "checkpoint", legacy=False)
    by_hand.add_special_tokens({"additional_special_tokens": ["<image>", "<align>"]}, replace_extra_special_tokens=False)
    by_hand_processor = AlignGPTProcessor(image_processor=LlavaImageProcessorPil(), tokenizer=by_hand,
                                          num_image_tokens=16)
    assert by_hand_processor(text=[text])["input_ids"][0] == reference["text_only_input_ids"]
    question = reference["prompts"][0]
    from PIL import Image

    ids = processor(text=[question], images=[Image.new("RGB", (20, 12))])["input_ids"][0]
    assert ids[:3] == [tokenizer.bos_token_id, processor.alignment_token_id, reference["text_only_input_ids"][1]]


def processor_free_first_word_differs(tokenizer, text):
    """Whether tokenising bos + text without special tokens loses the first word's "▁" (Metaspace "first")."""
    with_bos = tokenizer(tokenizer.bos_token + text, add_special_tokens=False)["input_ids"]
    return with_bos != tokenizer(text)["input_ids"]


def test_qlora_bnb_config_keeps_the_small_modules_out(config):
    bnb = qlora_bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert set(bnb.llm_int8_skip_modules) == {
        "model.vision_tower", "model.multi_modal_projector", "model.alignment_embeddings", "model.alignment_gate",
        "lm_head",
    }


def test_examples_run_offline(tmp_path):
    import runpy

    sft = runpy.run_path(str(ROOT / "examples" / "sft.py"))
    common = ["--max-steps", "2", "--num-rows", "8", "--per-device-train-batch-size", "4", "--lora-r", "4"]
    trainer = sft["main"](["--output-dir", str(tmp_path / "full"), *common])
    assert trainer.state.global_step == 2 and (tmp_path / "full" / "model.safetensors").exists()
    trainer = sft["main"](["--output", str(tmp_path / "qlora"), "--use-peft", "--load-in-4bit", "--merge", *common])
    assert trainer.state.global_step == 2
    assert (tmp_path / "qlora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "qlora" / "merged" / "model.safetensors").exists()


def test_benchmark_quick_smoke_run():
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_qlora.py"))
    rows = bench["main"](["--quick", "--runs", "llava:kbit,aligngpt:lean"])
    assert [(r["model"], r["recipe"]) for r in rows] == [("llava", "kbit"), ("aligngpt", "lean")]
    assert all(r["measured_steps"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    # the kbit recipe upcasts the frozen modules to fp32, the lean one keeps them in bf16
    assert rows[0]["frozen_fp32_params"] > 0 and rows[1]["frozen_fp32_params"] == 0
    plan = {(r["model"], r["recipe"]): r for r in bench["plan"](bench["argparse"].Namespace(lora_r=64))}
    assert plan[("aligngpt", "lean")]["nf4_params"] == plan[("llava", "lean")]["nf4_params"] == 6_476_005_376
    lean, kbit = plan[("aligngpt", "lean")], plan[("llava", "kbit")]
    assert lean["weights_and_adapter_gib"] < kbit["weights_and_adapter_gib"] - 1


def test_prefill_length_benchmark_quick_smoke_run(capsys):
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_prefill_length.py"))
    with pytest.raises(SystemExit):  # a bad length list is refused before any model is built
        bench["main"](["--quick", "--question-max", "28,x"])
    assert "--question-max takes positive question lengths" in capsys.readouterr().err
    records = bench["main"](["--quick", "--profile", "--profile-calls", "1", "--repeats", "1"])
    summaries = [r for r in records if r["case"] == "prefill_length_ratios"]
    assert [r["question_max"] for r in summaries] == [28, 29]
    for summary in summaries:
        # AlignGPT's prompt is LLaVA's plus <align>; the same-length reference has AlignGPT's length
        assert summary["aligngpt_len"] == summary["llava_len"] + 1 == 612 + summary["question_max"]
        rows = {r["model"]: r for r in records if r["case"] == "prefill_length" and r["question_max"] == summary["question_max"]}
        assert rows["llava_same_len"]["prompt_len"] == rows["aligngpt"]["prompt_len"] == summary["aligngpt_len"]
        # the CPU profile finds the SDPA op and the matmuls (the GPU run reads the same groups from kernel names)
        assert all(rows[m]["attention_ms"] > 0 and rows[m]["matmul_ms"] > 0 for m in rows)
        assert any("scaled_dot_product" in name for _, name, _ in rows["aligngpt"]["attention_kernels"])
    # kernel names of an H100 / H200 profile, grouped as the GPU run reads them
    group = bench["kernel_group"]
    assert group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1") == "attention"
    assert group("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)") == "attention"
    assert group("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert group("void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor<c10::BFloat16>>") == "other"


def test_trl_fused_lm_head_gets_the_prompt_scope_from_the_processor(model, processor, images, caplog):
    # SFTTrainer patches the model with TRL's fused LM head, which calls the backbone without the labels: the gate's
    # prompt-only text mean must then come from the batch (the processor's gate_text_mask), not from the labels
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    from transformers_aligngpt import modeling_aligngpt

    model.config.gate_text_scope = "prompt"
    examples = [{"messages": chat("What is shown?", answer="A red box with a long answer."), "images": [images[0]]},
                {"messages": chat("And here?", answer="Blue."), "images": [images[1]]}]
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(examples)
    assert "gate_text_mask" in batch
    without_mask = {k: v for k, v in batch.items() if k != "gate_text_mask"}
    gate_logits = []
    model.model.alignment_gate.register_forward_hook(lambda module, args, out: gate_logits.append(out))
    model.train()  # (the tiny config has no dropout)
    with torch.no_grad():
        expected = model(**without_mask).loss  # the model's own forward: prompt scope from the labels
        add_fused_lm_head(model)
        fused = model(**batch, fused_lm_head=True).loss
        type(modeling_aligngpt.logger).warning_once.cache_clear()
        with caplog.at_level(logging.WARNING):
            model(**without_mask, fused_lm_head=True)
        model.config.gate_text_scope = "conversation"  # ignores the batch's mask: the gate reads the answers too
        model(**batch, fused_lm_head=True)
    prompt_only, fused_gate, unscoped, conversation = gate_logits
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_gate, prompt_only)
    assert not torch.allclose(unscoped, prompt_only, atol=1e-4, rtol=1e-4)
    assert "this training forward got neither labels nor gate_text_mask" in caplog.text
    torch.testing.assert_close(conversation, unscoped)


def test_a_frozen_vision_tower_stays_out_of_the_backward(config, processor, images):
    # PEFT / TRL call enable_input_require_grads with activation checkpointing, which also hooks the tower's patch
    # embeddings: a frozen tower would then recompute its layers and run its backward for nothing. Same gradients,
    # less work; a tower with a trainable layer still trains under reentrant checkpointing.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    text = processor.apply_chat_template(chat("What is shown?", answer="A red box."))
    inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()

    def step(trainable_tower_layer=False, pixels_need_grads=False):
        model = new_model(config)
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        if trainable_tower_layer:
            model.model.vision_tower.encoder.layers[0].requires_grad_(True)  # (the -2 feature layer reads it)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model.train()
        tower_out = []
        model.model.vision_tower.register_forward_hook(
            lambda module, args, out: tower_out.append(out.last_hidden_state.requires_grad))
        batch = dict(inputs, pixel_values=inputs["pixel_values"].clone().requires_grad_(pixels_need_grads))
        loss = model(**batch).loss
        with CountOps() as counter:
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return tower_out[0], counter.calls, grads

    frozen, calls, grads = step()
    # the same frozen model made to back-propagate through its tower (pixel gradients asked for): the old work
    through_tower, reference_calls, reference_grads = step(pixels_need_grads=True)
    assert through_tower and not frozen
    assert calls < reference_calls
    assert grads.keys() == reference_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name])
    trained, _, grads = step(trainable_tower_layer=True)
    assert trained
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "vision_tower" in n)
