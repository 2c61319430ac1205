"""The lmms-eval model `aligngpt` (extra `[eval]`): local mini tasks run through `python -m lmms_eval`, and the
model class's batching, prompts, text-only rows, alignment arguments and likelihoods checked in-process."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from lmms_eval.api.instance import Instance  # noqa: E402

from transformers_aligngpt import VICUNA_V1_SYSTEM_PROMPT, AlignGPTForConditionalGeneration  # noqa: E402
from transformers_aligngpt.demo.scenes import build_yes_no_eval  # noqa: E402
from transformers_aligngpt.evaluation import prompts  # noqa: E402
from transformers_aligngpt.evaluation.lmms_eval_model import AlignGPTLmmsEval  # noqa: E402
from transformers_aligngpt.evaluation.local_tasks import (  # noqa: E402
    mme_style_dataset,
    offline_env,
    pope_style_dataset,
    run_lmms_eval,
    write_choice_task,
    write_mme_task,
    write_pope_task,
)
from transformers_aligngpt.tiny import (  # noqa: E402
    build_processor,
    build_tiny_tokenizer,
    tiny_config,
    tiny_text_config,
)

POPE_TASK, MME_TASK, CHOICE_TASK = "aligngpt_pope_mini", "aligngpt_mme_mini", "aligngpt_choice_mini"
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random AlignGPT saved with its processor. A wide weight init (0.3) makes its greedy answers depend on
    the prompt and the image, so comparing answers between batch sizes means something."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, text_config=tiny_text_config(len(tokenizer), initializer_range=0.3))
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("aligngpt-tiny")
    model.save_pretrained(path)
    build_processor(tokenizer, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A POPE-style set (save_to_disk) and an MME-style set (parquet), images drawn offline."""
    path = tmp_path_factory.mktemp("lmms_eval_tasks")
    write_pope_task(path, pope_style_dataset(build_yes_no_eval(12, image_size=IMAGE_SIZE)), POPE_TASK, max_new_tokens=6)
    write_mme_task(path, mme_style_dataset(4, seed=0, image_size=IMAGE_SIZE), MME_TASK, max_new_tokens=6)
    write_choice_task(path, pope_style_dataset(build_yes_no_eval(4, image_size=IMAGE_SIZE)), CHOICE_TASK)
    return path


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model_manifest("aligngpt").simple_class_path.endswith("lmms_eval_model.AlignGPTLmmsEval")
    assert get_model("aligngpt") is AlignGPTLmmsEval


def test_lmms_eval_cli_on_local_tasks(checkpoint, task_dir, tmp_path):
    tasks = [POPE_TASK, MME_TASK, CHOICE_TASK]
    env = offline_env(OMP_NUM_THREADS="1")  # the two runs go side by side, one thread each

    def run(size):
        return run_lmms_eval(checkpoint, tasks, task_dir, tmp_path / f"bs{size}", batch_size=size, env=env,
                             timeout=300)

    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip((1, 2), pool.map(run, (1, 2))))
    for run in runs.values():
        pope, mme = run["results"]["results"][POPE_TASK], run["results"]["results"][MME_TASK]
        for metric in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score"):
            assert 0.0 <= pope[f"{metric},none"] <= 1.0
        assert pope["pope_yes_ratio,none"] == 0.5  # the set is balanced: this comes from the ground truth
        assert 0.0 <= mme["mme_perception_score,none"] <= 4 * 200.0  # 4 categories, at most 200 each
        assert len(run["samples"][POPE_TASK]) == 12 and len(run["samples"][MME_TASK]) == 8
        # multiple_choice (loglikelihood requests): scored, each doc with its two candidates' (log-prob, greedy)
        assert 0.0 <= run["results"]["results"][CHOICE_TASK]["acc,none"] <= 1.0
        for sample in run["samples"][CHOICE_TASK]:  # (the log writes them as strings)
            assert len(sample["filtered_resps"]) == 2
            assert all(float(logprob) < 0 and greedy in ("True", "False")
                       for logprob, greedy in sample["filtered_resps"])

    def answers(run, task):
        return {s["doc_id"]: s["filtered_resps"] for s in run["samples"][task]}

    for task in tasks:
        assert answers(runs[1], task) == answers(runs[2], task), f"batch size 2 changed answers of {task}"
    one = answers(runs[1], POPE_TASK)
    assert len(set(map(str, one.values()))) > 1, "the tiny model answers every question alike"
    # the prompt lmms-eval built carries POPE's short-answer suffix, MME's replaces "Please answer yes or no."
    pope_inputs = [s["input"] for s in runs[1]["samples"][POPE_TASK]]
    assert all(i.endswith("?\nAnswer the question using a single word or phrase.") for i in pope_inputs)
    mme_inputs = [s["input"] for s in runs[1]["samples"][MME_TASK]]
    assert all("Please answer yes or no" not in i and i.endswith(prompts.SHORT_ANSWER) for i in mme_inputs)


# ---------------------------------------------------------------------------------------------- in-process
def _requests(docs, task="mini", gen_kwargs=None):
    gen_kwargs = gen_kwargs or {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": ["\n\n"]}

    def doc_to_visual(doc):
        return [] if doc["image"] is None else [doc["image"]]

    return [
        Instance("generate_until", (doc["question"], dict(gen_kwargs), doc_to_visual, i, task, "test"), i,
                 metadata={"task": task, "doc_id": i, "repeats": 1})
        for i, doc in enumerate(docs)
    ]


@pytest.fixture(scope="module")
def mixed_docs():
    """Image questions and text-only questions, interleaved."""
    yes_no = build_yes_no_eval(4, image_size=IMAGE_SIZE)
    docs = [{"question": q, "image": im} for q, im in zip(yes_no["question"], yes_no["image"])]
    text_only = [{"question": "What is 2 plus 3?", "image": None}, {"question": "How many corners does a square have?",
                                                                     "image": None}]
    return [docs[0], text_only[0], docs[1], docs[2], text_only[1], docs[3]]


def _load(checkpoint, **kwargs):
    lm = AlignGPTLmmsEval(pretrained=str(checkpoint), device="cpu", **kwargs)
    return lm


def _reference_answer(lm, doc):
    """Greedy answer from a prompt written out by hand (Vicuna v1), one row, no lmms-eval machinery."""
    image_part = "<image>\n" if doc["image"] is not None else ""
    text = f"{VICUNA_V1_SYSTEM_PROMPT} USER: {image_part}{doc['question']} ASSISTANT:"
    images = [doc["image"]] if doc["image"] is not None else None
    inputs = lm.processor(text=[text], images=images, return_tensors="pt")
    if doc["image"] is None:
        assert lm.processor.alignment_token_id not in inputs["input_ids"][0]  # text-only rows get no <align>
    else:
        assert (inputs["input_ids"][0] == lm.processor.alignment_token_id).sum() == 1
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_batched_generation_matches_single_rows(checkpoint, mixed_docs):
    lm = _load(checkpoint, batch_size=1)
    lm.task_dict = {"mini": {"test": mixed_docs}}
    single = lm.generate_until(_requests(mixed_docs))
    lm.batch_size_per_gpu = 4  # rows of different lengths, with and without an image, in one left-padded batch
    batched = lm.generate_until(_requests(mixed_docs))
    assert single == batched
    assert single == [_reference_answer(lm, doc) for doc in mixed_docs]
    assert len(set(single)) > 1


def test_alignment_arguments(checkpoint, mixed_docs):
    lm = _load(checkpoint, alignment_level=2)
    assert (lm.config.alignment_mode, lm.config.fixed_alignment_level) == ("fixed", 2)
    lm.task_dict = {"mini": {"test": mixed_docs}}
    fixed = lm.generate_until(_requests(mixed_docs))
    assert fixed == [_reference_answer(lm, doc) for doc in mixed_docs]
    assert _load(checkpoint, alignment_mode="global").config.alignment_mode == "global"
    with pytest.raises(ValueError, match="alignment_mode"):
        _load(checkpoint, alignment_mode="sometimes")
    with pytest.raises(ValueError, match="fixed"):
        _load(checkpoint, alignment_mode="adaptive", alignment_level=1)
    with pytest.raises(ValueError, match="Unknown model_args"):
        _load(checkpoint, conv_template="vicuna_v1")


def test_prompt_style_and_image_aspect(checkpoint):
    lm = _load(checkpoint)
    mmvet = {"question": "What is the price of the pear?"}
    context = "First please perform reasoning, and think step by step ...\n\nWhat is the price of the pear?"
    assert lm.question_text(context, "mmvet", mmvet) == "What is the price of the pear?"
    assert lm.question_text("Is there a dog?\nAnswer ...", "pope", {}) == "Is there a dog?\nAnswer ..."
    assert lm.pads_images("pope") and not lm.pads_images("scienceqa_img")
    # model_vqa.py (LLaVA-Bench, MM-Vet) calls the image processor directly, as model_vqa_science.py does
    assert not lm.pads_images("llava_in_the_wild") and not lm.pads_images("mmvet")
    # VizWiz: the question as asked (lmms-eval's capitalize() lower-cases all but its first letter)
    vizwiz = {"question": "Is this Pepsi or Coke? I can't tell."}
    assert lm.question_text("Is this pepsi or coke? i can't tell.\n...", "vizwiz_vqa_test", vizwiz) == (
        "Is this Pepsi or Coke? I can't tell.\nWhen the provided information is insufficient, respond with "
        "'Unanswerable'.\nAnswer the question using a single word or phrase."
    )
    lm_lmms = _load(checkpoint, prompt_style="lmms_eval", image_aspect_ratio="pad")
    assert lm_lmms.question_text(context, "mmvet", mmvet) == context and lm_lmms.pads_images("scienceqa_img")

    doc = {"question": "Which animal is shown?", "hint": "nan", "A": "cat", "B": "dog", "C": float("nan"), "D": None}
    assert prompts.mmbench_prompt(doc) == f"Which animal is shown?\nA. cat\nB. dog\n{prompts.OPTION_LETTER_EN}"
    doc["hint"] = "A pet."
    assert prompts.mmbench_cn_prompt(doc).startswith("A pet.\nWhich animal")
    assert prompts.mmbench_cn_prompt(doc).endswith("\n请直接回答选项字母。")
    # the README's MMBench-dev without an OpenAI key: mmbench_en_dev_static, the same documents
    assert lm.question_text("lmms-eval's layout", "mmbench_en_dev_static", doc) == prompts.mmbench_prompt(doc)
    ocr = {"question": "what brand is this?", "ocr_tokens": ["dakota", "camera"]}
    assert prompts.textvqa_prompt(ocr) == (
        "what brand is this?\nReference OCR token: dakota, camera\nAnswer the question using a single word or phrase."
    )

    # original aspect ratio = no padding: a wide image is cropped, not padded, so the pixels differ
    wide = build_yes_no_eval(1, image_size=IMAGE_SIZE)["image"][0].crop((0, 0, IMAGE_SIZE, IMAGE_SIZE // 2))
    prompt = lm.build_prompt("Is there a circle?", 1)
    padded = lm.encode([prompt], [wide], True)["pixel_values"]
    cropped = lm.encode([prompt], [wide], False)["pixel_values"]
    assert padded.shape == cropped.shape and not torch.allclose(padded, cropped)


def test_loglikelihood(checkpoint, mixed_docs):
    lm = _load(checkpoint)
    lm.task_dict = {"mini": {"test": mixed_docs}}
    doc = mixed_docs[0]
    request = Instance("loglikelihood", (doc["question"], "Yes", lambda d: [d["image"]], 0, "mini", "test"), 0,
                       metadata={"task": "mini", "doc_id": 0, "repeats": 1})
    result, = lm.loglikelihood([request])
    logprob, greedy = getattr(result, "text", result)  # (lmms-eval >= 0.7.3 gets it wrapped in a GenerationResult)

    prompt = f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n{doc['question']} ASSISTANT:"
    context = lm.processor(text=[prompt], images=[doc["image"]], return_tensors="pt")["input_ids"][0]
    full = lm.processor(text=[prompt + " Yes"], images=[doc["image"]], return_tensors="pt")
    assert torch.equal(full["input_ids"][0, : len(context)], context)
    # as generation conditions the answer: the prompt's forward (its <align> vector from the prompt alone), then the
    # answer's tokens one at a time through the cache
    targets = full["input_ids"][0, len(context) :]
    with torch.no_grad():
        prompt_inputs = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
        out = lm.model(input_ids=context[None], attention_mask=torch.ones_like(context[None]), **prompt_inputs)
        steps = [out.logits[0, -1]]
        for token in targets[:-1]:
            out = lm.model(input_ids=token.view(1, 1), cache=out.cache)
            steps.append(out.logits[0, -1])
    expected = torch.log_softmax(torch.stack(steps).float(), -1).gather(-1, targets[:, None]).sum()
    assert math.isclose(logprob, float(expected), rel_tol=1e-5, abs_tol=1e-5)
    assert logprob < 0 and isinstance(greedy, bool)


def test_same_answers_as_the_original_implementation(tmp_path):
    """The fixture checkpoint in the original release format, converted, answers the fixture's two questions through
    this model class (Vicuna v1 prompt, pad-to-square, one left-padded batch, greedy) with exactly the tokens that
    the original implementation generated (`inference_generated_ids`, 12 new tokens each)."""
    convert = pytest.importorskip("transformers_aligngpt.convert")
    from conftest import FIXTURE_DIR
    from PIL import Image

    if not FIXTURE_DIR.exists():
        pytest.skip(f"no fixture at {FIXTURE_DIR}")
    reference = json.loads((FIXTURE_DIR / "reference.json").read_text())
    convert.convert_checkpoint(FIXTURE_DIR / "checkpoint", output_dir=tmp_path / "converted", dtype="float32")
    docs = []
    for prompt, name in zip(reference["prompts"], reference["image_files"]):
        question = prompt.split("USER: <image>\n", 1)[1].rsplit(" ASSISTANT:", 1)[0]
        docs.append({"question": question, "image": Image.open(FIXTURE_DIR / "images" / name).convert("RGB")})
    lm = _load(tmp_path / "converted", batch_size=2)
    assert [lm.build_prompt(doc["question"], 1).replace("<image>\n", "") for doc in docs] == [
        p.replace("<image>\n", "") for p in reference["prompts"]
    ]
    lm.task_dict = {"mini": {"test": docs}}
    answers = lm.generate_until(_requests(docs, gen_kwargs={"max_new_tokens": 12, "temperature": 0}))
    expected = [
        lm.tokenizer.decode(ids[-12:], skip_special_tokens=True).strip() for ids in reference["inference_generated_ids"]
    ]
    assert answers == expected
