"""Remote-code loading without the package, and pipeline("image-text-to-text")."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import pipeline

from conftest import chat

# A fresh interpreter in which `import transformers_aligngpt` fails, as on a machine without the package.
NO_PACKAGE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "transformers_aligngpt":
                raise ModuleNotFoundError("transformers_aligngpt is not installed here")
    sys.meta_path.insert(0, Block())
    """
)


def test_checkpoint_loads_with_trust_remote_code_without_the_package(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_aligngpt.AlignGPTForConditionalGeneration"
    images[0].save(tmp_path / "image.png")
    text = processor.apply_chat_template(chat("What is shown?"), add_generation_prompt=True)
    inputs = processor(images=images[:1], text=text, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = NO_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        try:
            import transformers_aligngpt
            raise SystemExit("the package must not be importable in this test")
        except ModuleNotFoundError:
            pass
        path = {str(tmp_path / "ckpt")!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(images=Image.open({str(tmp_path / "image.png")!r}), text={text!r}, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE-OK", type(model).__name__, type(processor).__name__)
        """
    )
    # a private module cache: the remote code is copied there, never mixed with other runs' copies
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK AlignGPTForConditionalGeneration AlignGPTProcessor" in result.stdout


def test_trust_remote_code_runs_the_checkpoints_code_in_the_packages_own_tools(model, processor, tmp_path):
    # transformers prefers the classes this package registers over a checkpoint's code, so `aligngpt chat
    # --trust-remote-code` and the lmms-eval model take the checkpoint's own classes from its auto_map
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    for name in ("modeling_aligngpt.py", "processing_aligngpt.py"):  # checkpoint code that differs from the package's
        code = tmp_path / "ckpt" / name
        code.write_text(code.read_text() + "\nCHECKPOINT_CODE_MARKER = True\n")
    script = textwrap.dedent(
        f"""
        import sys
        from transformers_aligngpt.cli import ChatSession
        path = {str(tmp_path / "ckpt")!r}
        for trust in (True, False):
            session = ChatSession.load(path, device="cpu", trust_remote_code=trust)
            for part in (session.model, session.processor):
                module = sys.modules[type(part).__module__]
                print(trust, type(part).__name__, module.__name__.split(".")[0],
                      getattr(module, "CHECKPOINT_CODE_MARKER", False))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "True AlignGPTForConditionalGeneration transformers_modules True",
        "True AlignGPTProcessor transformers_modules True",
        "False AlignGPTForConditionalGeneration transformers_aligngpt False",
        "False AlignGPTProcessor transformers_aligngpt False",
    ]


def test_image_text_to_text_pipeline_answers_chat_messages(model, processor, images):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    conversations = []
    for image, question in zip(images, ["What is shown?", "How many squares are there?"]):
        messages = chat(question)
        messages[0]["content"][0]["image"] = image
        conversations.append(messages)
    generate_kwargs = {"max_new_tokens": 5, "do_sample": False}
    one_by_one = [pipe(text=c, generate_kwargs=generate_kwargs, return_full_text=False)[0]["generated_text"]
                  for c in conversations]
    batched = pipe(text=conversations, batch_size=2, generate_kwargs=generate_kwargs, return_full_text=False)
    assert [out[0]["generated_text"] for out in batched] == one_by_one
    # the answer is what generate() gives on the same prompt
    inputs = processor(images=images[:1], text=processor.apply_chat_template(chat("What is shown?"),
                                                                             add_generation_prompt=True),
                       return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert one_by_one[0].strip() == processor.decode(new, skip_special_tokens=True).strip()
