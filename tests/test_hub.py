"""Model card rendering and the folder `aligngpt push` uploads (written locally, loaded without the package)."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import chat
from huggingface_hub import ModelCard
from test_hub_loading import NO_PACKAGE

from transformers_aligngpt.hub import (
    CARD_INFO_FILENAME,
    HubPushError,
    build_model_card,
    check_repo_id,
    normalize_eval_results,
    prepare_push_folder,
    push_to_hub,
    template_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

CARD_FACTS = {
    "base_models": ["openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"],
    "datasets": ["liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K"],
    "training": {"phase 1 (pre-training)": {"learning rate": 1e-3, "steps": 12, "trained": "projector, alignment"},
              "phase 2 (instruction tuning)": {"learning rate": 2e-5, "steps": 30}},
    "alignment_levels": [{"level": i, "pairs": 4, "mean CLIP score": 0.1 * i} for i in range(8)],
    "gate_statistics": {"mean": [0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02], "std": [0.01] * 7, "num_samples": 6,
                     "source": "held-out demo questions"},
    "eval_results": {"pope": {"accuracy": 0.81, "f1": 0.79}},
}


def test_template_ships_in_the_package_and_model_cards_points_to_it():
    assert template_path().is_file()
    top_level = REPO_ROOT / "model_cards" / "template.md"
    # one source: the repo's model_cards/template.md is the package's file, not a copy
    assert top_level.resolve() == template_path().resolve()


def test_card_renders_with_valid_metadata(config):
    card = build_model_card(config, "someone/aligngpt-tiny", license="mit", tags=["demo"], **CARD_FACTS)
    parsed = ModelCard(str(card))  # parse the rendered text back, as the Hub does
    data = parsed.data.to_dict()
    assert data["license"] == "mit"
    assert data["base_model"] == CARD_FACTS["base_models"]
    assert data["datasets"] == CARD_FACTS["datasets"]
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] == "transformers"
    assert {"aligngpt", "custom_code", "demo"} <= set(data["tags"])
    (result,) = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "aligngpt-tiny"
    assert result["dataset"]["type"] == "pope"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.81, "f1": 0.79}
    # the body: usage with the repo id, architecture, training setup, levels, gate statistics and results
    text = parsed.text
    assert 'repo = "someone/aligngpt-tiny"' in text
    assert "trust_remote_code=True" in text
    assert f"{config.num_alignment_levels} (level {config.num_alignment_levels - 1} = global)" in text
    assert "| learning rate | 0.001 | 2e-05 |" in text
    assert "| 7 | 4 | 0.7 |" in text
    assert "| 0 | 0.5 | 0.01 |" in text and "averaged over 6 held-out demo questions" in text
    assert "| pope | accuracy | 0.81 |" in text
    assert "{{" not in text and "}}" not in text


def test_card_without_facts_says_so(config):
    text = str(build_model_card(config, "someone/bare"))
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "model-index" not in data
    assert data["pipeline_tag"] == "image-text-to-text" and data["license"] == "apache-2.0"
    assert "No training information was recorded" in text and "No gate statistics were recorded" in text


def test_eval_results_formats():
    lmms = {"results": {"pope": {"alias": "pope", "pope_accuracy,none": 0.85, "pope_accuracy_stderr,none": 0.01,
                                 "pope_accuracy_stderr_clt,none": 0.03},
                        "mme": {"mme_perception_score,none": 1400.5}}}
    assert normalize_eval_results(lmms) == [
        {"task": "pope", "metric": "pope_accuracy", "value": 0.85},
        {"task": "mme", "metric": "mme_perception_score", "value": 1400.5},
    ]
    assert normalize_eval_results({"gqa": 62.9}) == [{"task": "gqa", "metric": "score", "value": 62.9}]
    rows = [{"task": "vqav2", "metric": "accuracy", "value": 79.1, "split": "test-dev"}]
    assert normalize_eval_results(rows) == rows
    with pytest.raises(ValueError, match="needs 'task', 'metric' and 'value'"):
        normalize_eval_results([{"task": "x"}])


def test_card_numbers_and_snippet_survive_awkward_values(config):
    """Scores keep their integer digits (MME 1527.4), learning rates stay readable, and an example question with
    quotes and a newline (LLaVA's "\nAnswer the question using a single word or phrase.") leaves the usage snippet
    valid Python."""
    question = 'Is the "red" shape a square?\nAnswer the question using a single word or phrase.'
    card = str(build_model_card(config, "someone/x", example_question=question, eval_results={
        "mme": {"mme_perception_score,none": 1527.4, "mme_cognition_score,none": 355.71},
        "big": {"total": 12345.678}}, training={"phase": {"learning rate": 2e-5}}))
    text = ModelCard(card).text
    assert "| mme | mme_perception_score | 1527.4 |" in text and "| mme | mme_cognition_score | 355.71 |" in text
    assert "| big | total | 12345.678 |" in text and "| learning rate | 2e-05 |" in text
    snippet = usage_snippet(text)
    compile(snippet, "snippet", "exec")
    assert repr(question) in snippet


def test_push_by_hub_id_does_not_read_the_id_as_a_card_file(tmp_path, monkeypatch):
    """`aligngpt push --model user/name`: the card facts come from the repo (none here: offline), and the failure
    is the model's, named as such, not a FileNotFoundError for 'user/name'."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot load the processor from someuser/aligngpt-7b"):
        prepare_push_folder("someuser/aligngpt-7b", tmp_path / "stage", "you/x")


def test_an_adapter_folder_is_refused_before_anything_is_staged(tmp_path):
    adapter = tmp_path / "sft-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a LoRA adapter, not a whole model: push the merged model"):
        prepare_push_folder(adapter, tmp_path / "stage", "you/x")
    assert not (tmp_path / "stage").exists()


def test_prepare_push_folder_reads_card_info_and_flags_override(model, processor, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    (ckpt / CARD_INFO_FILENAME).write_text(json.dumps({"license": "mit", **CARD_FACTS}))
    folder = prepare_push_folder(ckpt, tmp_path / "stage", "someone/from-folder", license="cc-by-4.0")
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["license"] == "cc-by-4.0"  # the keyword wins over the file
    assert data["base_model"] == CARD_FACTS["base_models"]
    saved = json.loads((folder / CARD_INFO_FILENAME).read_text())
    assert saved["license"] == "cc-by-4.0"
    # results are kept as their normalised rows (an lmms-eval results file also holds local paths and settings)
    assert saved["eval_results"] == normalize_eval_results(CARD_FACTS["eval_results"])
    with pytest.raises(TypeError, match="unexpected card arguments"):
        prepare_push_folder(model, tmp_path / "bad", "someone/x", processor=processor, licence="mit")


def usage_snippet(card_text: str) -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    return snippet


def test_pushed_folder_loads_without_the_package_and_its_usage_snippet_runs(model, processor, images, tmp_path):
    folder = prepare_push_folder(model, tmp_path / "stage", "someone/aligngpt-tiny", processor=processor,
                                 **CARD_FACTS)
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md",
                 "configuration_aligngpt.py", "modeling_aligngpt.py", "processing_aligngpt.py"):
        assert (folder / name).is_file(), name
    images[0].save(tmp_path / "image.png")

    # what the card's snippet prints, computed here with the package
    text = processor.apply_chat_template(chat("What is shown in the image?"), add_generation_prompt=True)
    inputs = processor(images=images[0], text=text, return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**inputs, max_new_tokens=64, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        weights = model(**inputs).alignment_weights[0]
    expected_answer = processor.decode(answer, skip_special_tokens=True)

    # the snippet, run verbatim in an interpreter without the package, with the repo id pointing at the folder
    snippet = usage_snippet((folder / "README.md").read_text())
    snippet = snippet.replace('"someone/aligngpt-tiny"', repr(str(folder)))
    script = NO_PACKAGE + textwrap.dedent(
        """
        try:
            import transformers_aligngpt
            raise SystemExit("the package must not be importable in this test")
        except ModuleNotFoundError:
            pass
        """
    ) + snippet + textwrap.dedent(
        """
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
        out = pipe(text=[{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "What is shown in the image?"}]}],
                   generate_kwargs={"max_new_tokens": 64, "do_sample": False}, return_full_text=False)
        print("PIPELINE:" + repr(out[0]["generated_text"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    gate_line = next(line for line in lines if line.startswith("{'level 0'"))
    printed = eval(gate_line)  # a dict literal printed by the snippet
    assert list(printed) == [f"level {i}" for i in range(len(weights))]
    assert list(printed.values()) == pytest.approx(weights.tolist(), abs=1e-3)
    answer_text = "\n".join(lines[: lines.index(gate_line)])
    assert answer_text == expected_answer
    pipeline_line = next(line for line in lines if line.startswith("PIPELINE:"))
    assert eval(pipeline_line[len("PIPELINE:"):]).strip() == expected_answer.strip()


# ---------------------------------------------------------------------------------------------- checks before staging
def test_what_cannot_be_pushed_is_refused_before_anything_is_staged(original_fixture_dir, tiny_checkpoint, tmp_path):
    stage = tmp_path / "stage"
    with pytest.raises(ValueError, match="original AlignGPT release format .* convert it first ..aligngpt convert --checkpoint"):
        prepare_push_folder(original_fixture_dir / "checkpoint", stage, "you/x")
    with pytest.raises(ValueError, match="not an AlignGPT checkpoint .config.json has model_type 'clip_vision_model'"):
        prepare_push_folder(original_fixture_dir / "clip-vit-tiny", stage, "you/x")
    assert not stage.exists()
    # everything in the staging folder is uploaded: a stray file there would be published
    stage.mkdir()
    (stage / "secrets.txt").write_text("token")
    with pytest.raises(ValueError, match="staging folder .* is not empty"):
        prepare_push_folder(tiny_checkpoint, stage, "you/x")
    assert [p.name for p in stage.iterdir()] == ["secrets.txt"]
    with pytest.raises(ValueError, match="'me/bad name' is not a valid repo id"):
        check_repo_id("me/bad name")
    with pytest.raises(ValueError, match="must look like user/name"):
        check_repo_id("justaname")


def test_unreachable_hub_is_one_line_naming_the_endpoint_before_staging(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    stage = tmp_path / "stage"
    with pytest.raises(HubPushError, match=r"^the Hub at http://127.0.0.1:9 cannot be reached") as info:
        push_to_hub(tiny_checkpoint, "you/x", token="hf_x", staging_dir=stage)
    assert "\n" not in str(info.value)
    assert not stage.exists()  # the repo is created (and the Hub reached) before minutes of staging


def test_converted_checkpoint_card_names_its_source_and_warns_about_the_license_fallback(
    original_fixture_dir, converted_original_dir, tmp_path, caplog
):
    with caplog.at_level("WARNING", logger="transformers_aligngpt.hub"):
        folder = prepare_push_folder(converted_original_dir, tmp_path / "stage", "you/aligngpt-conv")
    assert "the card's license is the apache-2.0 fallback" in caplog.text and "--license" in caplog.text
    card = (folder / "README.md").read_text()
    assert f"| converted from | `{original_fixture_dir / 'checkpoint'}` |" in card  # the source as it was given
    caplog.clear()
    with caplog.at_level("WARNING", logger="transformers_aligngpt.hub"):
        folder = prepare_push_folder(converted_original_dir, tmp_path / "stage2", "you/x", license="llama2")
    assert "fallback" not in caplog.text
    assert ModelCard.load(folder / "README.md").data.to_dict()["license"] == "llama2"
