"""`aligngpt demo`: the whole AlignGPT method end to end, on data that ships with the package, in minutes on a CPU.

Steps (each prints what it did; the trainers show progress bars):

1. data: the built-in synthetic scenes (`demo.scenes`): image-caption pairs whose captions have a known quality
   (exact ... unrelated), single-turn questions for instruction tuning, held-out scenes for evaluation.
2. alignment levels: a CLIP-like scorer (a tiny `CLIPModel` built from a config and trained contrastively on the demo's
   exact captions, or `--clip ID`) scores every pair; `alignment_levels.assign_levels` buckets the scores into N
   equal-count levels. The mean caption quality per level shows that the levels measure alignment.
3. backbones: the vision tower is the scorer's image tower (as in AlignGPT, where CLIP ViT-L is both), or
   `--vision-tower ID`; the language model is a tiny Llama built from a config and warmed up on the demo's texts, or
   `--language-model ID`. `training.build_aligngpt_from_pretrained` joins them into a new AlignGPT.
4. phase 1 (`training.AlignGPTPretrainer`): projector + alignment embeddings on the leveled captions.
5. phase 2 (`training.make_sft_trainer`, TRL): projector + gate + LLM on the questions.
6. the checkpoint (model, processor, `aligngpt_card_info.json` for `aligngpt push`) is saved; held-out questions are
   answered with `generate`, the gate's weights per level are printed and drawn (`gate_weights.png`), the loss
   curves are written (`loss_curves.json`, `loss_curves.png`) and a held-out yes/no accuracy is measured.

Everything is deterministic for a given `--seed` (up to floating-point differences between machines).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import scenes

# ---------------------------------------------------------------------------------------------- settings


# tiny backbones (built from configs when no model id is given)
# 48 px scenes cut into 3 x 3 patches of 16 px: one image token per cell of the scenes' 3 x 3 grid
TINY_IMAGE_SIZE, TINY_PATCH_SIZE = 48, 16
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY_TEXT_LM = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_GATE_HIDDEN = 64


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of one demo profile."""

    pretrain_pairs: int  # phase-1 image-caption pairs (every caption grade equally often)
    instruct_rows: int  # phase-2 chats (15% text-only)
    image_size: int  # pixels of the rendered scenes
    clip_families: int  # scene families for the tiny CLIP: a scene and variants that differ in one attribute
    clip_epochs: float
    clip_batch: int  # families per batch (x CLIP_FAMILY_SIZE pairs)
    lm_epochs: float  # warm-up of the tiny language model on the demo's texts
    phase1_epochs: float
    phase1_batch: int
    phase2_epochs: float
    phase2_batch: int
    num_questions: int  # held-out questions answered and shown with their gate weights
    num_yes_no: int  # held-out yes/no questions for the accuracy
    logging_steps: int = 5  # loss-curve resolution
    extra_yes_no: int = 0  # extra phase-2 "Is there a <colour> <shape>?" chats (binding colour to shape needs many)
    train_vision_tower: bool = False  # also train the tiny CLIP's image tower in phase 2 (its features bind per cell)


FULL = DemoSettings(2048, 2048, TINY_IMAGE_SIZE, 1024, 5, 16, 1, 1, 16, 6, 16, 6, 64, extra_yes_no=3072)
QUICK = DemoSettings(128, 128, TINY_IMAGE_SIZE, 128, 2, 16, 1, 1, 16, 3, 16, 4, 16, logging_steps=2)
CLIP_FAMILY_SIZE = 4

# learning rates: tiny models from scratch learn fast with large steps; real checkpoints get the paper's
TINY_LR = {"clip": 2e-3, "lm": 2e-3, "phase1": 1e-3, "phase2": 1e-3}
PAPER_LR = {"phase1": 1e-3, "phase2": 2e-5}


def _say(message: str = "", start: float | None = None) -> None:
    stamp = f" [{time.perf_counter() - start:5.1f} s]" if start is not None else ""
    print(f"{message}{stamp}", flush=True)


def _header(title: str, start: float) -> None:
    print(flush=True)
    _say(f"== {title}", start)


# ---------------------------------------------------------------------------------------------- helpers


def _training_args(cls, output_dir: Path, *, epochs: float, batch: int, lr: float, seed: int, device, **kwargs):
    """Shared TrainingArguments: progress bars on, logging every few steps, nothing saved by the trainer."""
    return cls(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=device not in ("cpu", None),
        disable_tqdm=False,
        **kwargs,
    )


def _losses(trainer) -> list[dict[str, float]]:
    return [{"step": entry["step"], "epoch": round(entry.get("epoch", 0.0), 4), "loss": entry["loss"]}
            for entry in trainer.state.log_history if "loss" in entry]


def _train(trainer, name: str, start: float) -> dict[str, Any]:
    began = time.perf_counter()
    result = trainer.train()
    losses = _losses(trainer)
    seconds = time.perf_counter() - began
    first, last = losses[0]["loss"], losses[-1]["loss"]
    _say(f"{name}: {trainer.state.global_step} steps, loss {first:.3f} -> {last:.3f} in {seconds:.0f} s", start)
    return {"losses": losses, "steps": trainer.state.global_step, "seconds": round(seconds, 1),
            "train_loss": round(result.training_loss, 4), "first_loss": first, "last_loss": last}


def _set_seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# ---------------------------------------------------------------------------------------------- 1. data


def load_data(args: Namespace, settings: DemoSettings, start: float) -> dict[str, Any]:
    """Phase-1 pairs, phase-2 chats and held-out questions: the demo's, or LLaVA-layout files."""
    _header("1/6 data", start)
    data: dict[str, Any] = {}
    if args.data:
        from .. import data as llava

        pretrain = llava.load_llava_json(args.data, args.image_folder)
        pretrain = pretrain.filter(lambda row: bool(row["images"]) and row["caption"] is not None)
        data["pretrain"] = pretrain
        data["pretrain_source"] = os.path.basename(args.data)
        _say(f"pre-training pairs: {len(pretrain)} from {args.data}")
    if args.instruct_data:
        from datasets import Image, List

        from .. import data as llava

        instruct = llava.load_llava_json(args.instruct_data, args.image_folder)
        instruct = instruct.cast_column("images", List(Image())).select_columns(["id", "images", "messages"])
        with_image = [i for i, n in enumerate(instruct.with_format("arrow")["images"].to_pylist()) if n]
        held_out = with_image[-settings.num_questions:]
        keep = sorted(set(range(len(instruct))) - set(held_out))
        data["questions"] = [_question_from_row(instruct[i]) for i in held_out]
        data["instruct"] = instruct.select(keep)
        data["instruct_source"] = os.path.basename(args.instruct_data)
        _say(f"instruction rows: {len(keep)} from {args.instruct_data} ({len(held_out)} held out as questions)")
    if "pretrain" not in data or "instruct" not in data:
        seed, size = scenes.DEMO_SEED, settings.image_size
        if "pretrain" not in data:
            pretrain = scenes.build_pretraining_data(settings.pretrain_pairs, seed, size)
            data["pretrain"] = pretrain
            data["pretrain_source"] = f"{len(pretrain)} built-in demo scene captions"
            counts = [pretrain["caption_quality"].count(q) for q in range(scenes.NUM_QUALITIES)]
            grades = ", ".join(f"{name} {n}" for name, n in zip(scenes.QUALITY_NAMES, counts))
            _say(f"pre-training pairs: {len(pretrain)} demo scenes ({size} px) with captions graded {grades}")
            _say(f"  e.g. {pretrain[4]['caption']!r} (exact) / {pretrain[3]['caption']!r} (one attribute wrong)")
        if "instruct" not in data:
            instruct = scenes.build_instruction_data(settings.instruct_rows, seed, size)
            if settings.extra_yes_no:
                from datasets import concatenate_datasets

                extra_rows = extra_yes_no_chats(settings.extra_yes_no, seed, size)
                instruct = concatenate_datasets([instruct.select_columns(["images", "messages"]), extra_rows])
                instruct = instruct.shuffle(seed=seed)
            data["instruct"] = instruct.select_columns(["images", "messages"])
            data["instruct_source"] = f"{len(instruct)} built-in demo chats"
            data["questions"] = held_out_questions(settings.num_questions, size)
            data["yes_no"] = scenes.build_yes_no_eval(settings.num_yes_no, seed, size)
            _say(f"instruction rows: {len(instruct)} single-turn chats about demo scenes (some text-only)")
            _say(f"held out: {len(data['questions'])} questions and {settings.num_yes_no} yes/no questions about "
                 "scenes whose layouts never occur in training")
    return data


def extra_yes_no_chats(count: int, seed: int, image_size: int):
    """Extra "Is there a <colour> <shape>?" chats on training-split scenes (balanced yes/no, half the "no" ones
    adversarial): the binding of colour to shape needs more examples than the other kinds."""
    from datasets import Dataset, Features

    rng = random.Random(seed + 3)
    images, messages = [], []
    for i in range(count):
        scene = scenes.random_scene(rng, split="train")
        colour, shape = scenes.yes_no_pair(scene, rng, present=i % 2 == 0, adversarial=(i // 2) % 2 == 0)
        question = f"Is there {scenes._article(colour)} {colour} {shape}?"
        answer = "Yes." if scene.count(shape, colour) else "No."
        images.append([scene.render(image_size)])
        messages.append([scenes._message("user", question, image=True), scenes._message("assistant", answer)])
    return Dataset.from_dict({"images": images, "messages": messages},
                             features=Features({k: v for k, v in scenes.INSTRUCT_FEATURES.items() if k != "id"}))


def held_out_questions(count: int, image_size: int, seed: int = scenes.DEMO_SEED) -> list[dict[str, Any]]:
    """`count` questions of every kind in turn about held-out scenes (layouts never used for training)."""
    rng = random.Random(seed + 2 * scenes.EVAL_SEED_OFFSET)
    questions = []
    for i in range(count):
        scene = scenes.random_scene(rng, split="eval")
        kind = scenes.QUESTION_KINDS[i % len(scenes.QUESTION_KINDS)]
        question, answer = scenes.ask(scene, kind, rng, answer_yes=(i // len(scenes.QUESTION_KINDS)) % 2 == 0)
        questions.append({"image": scene.render(image_size), "question": question, "expected": answer,
                          "scene": scene.describe(), "kind": kind})
    return questions


def _question_from_row(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    question = " ".join(item["text"] for item in messages[0]["content"] if item["type"] == "text" and item["text"])
    answer = " ".join(item["text"] for item in messages[1]["content"] if item["type"] == "text" and item["text"])
    return {"image": row["images"][0].convert("RGB"), "question": question, "expected": answer, "kind": "held out"}


# ---------------------------------------------------------------------------------------------- 2. levels


def _clip_tokenizer(texts):
    """A BPE tokenizer for the tiny CLIP text tower: captions end with `<|endoftext|>`, whose position CLIP pools."""
    import string

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, initial_alphabet=list(string.printable),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=64, padding_side="right")


def _variant(scene, rng: random.Random):
    """The scene with one attribute of one object changed (colour, shape or cell), or None if that hit a held-out
    layout or left the description unchanged."""
    from dataclasses import replace

    objects = list(scene.objects)
    index = rng.randrange(len(objects))
    obj = objects[index]
    what = rng.choice(("colour", "shape", "position"))
    if what == "colour":
        obj = replace(obj, colour=rng.choice([c for c in scenes.COLOURS if c != obj.colour]))
    elif what == "shape":
        obj = replace(obj, shape=rng.choice([s for s in scenes.SHAPES if s != obj.shape]))
    else:
        used = {o.position for o in objects}
        obj = replace(obj, position=rng.choice([p for p in scenes.POSITIONS if p not in used]))
    objects[index] = obj
    variant = scenes.Scene(sorted(objects, key=lambda o: scenes.POSITIONS.index(o.position)))
    if variant.describe() == scene.describe() or scenes.scene_split(variant) != "train":
        return None
    return variant


def _clip_families(count: int, image_size: int, seed: int) -> list[list[dict[str, Any]]]:
    """Families of exact (image, caption) pairs: a training-split scene and variants that differ from it in one
    attribute. A family shares a batch, so CLIP's in-batch negatives include captions one attribute away."""
    rng = random.Random(seed)
    families = []
    for _ in range(count):
        members = [scenes.random_scene(rng, split="train")]
        while len(members) < CLIP_FAMILY_SIZE:
            variant = _variant(rng.choice(members), rng)
            if variant is not None and variant.describe() not in {m.describe() for m in members}:
                members.append(variant)
        families.append([{"image": m.render(image_size), "caption": m.describe()} for m in members])
    return families


class _ClipCollator:
    """Flattens families into CLIP batches (`return_loss=True`: CLIP's symmetric contrastive loss)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, families):
        examples = [pair for family in families for pair in family]
        text = self.tokenizer([e["caption"] for e in examples], padding=True, return_tensors="pt")
        pixels = self.image_processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels,
                "return_loss": True}


def train_tiny_clip(output: Path, settings: DemoSettings, seed: int, device, start: float, curves: dict) -> Path:
    """A tiny CLIPModel from a config, trained contrastively (CLIP's own loss) on exact demo captions; saved."""
    import torch
    from transformers import CLIPConfig, CLIPModel, Trainer, TrainingArguments
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _clip_tokenizer(scenes.demo_corpus())
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 64, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = dict(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, **TINY_VISION)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=64)
    _set_seed(seed)
    model = CLIPModel(config)
    size = TINY_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    families = _clip_families(settings.clip_families, settings.image_size, seed + 17)
    _say(f"tiny CLIP ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) trained contrastively "
         f"(CLIPModel(return_loss=True)) on {len(families) * CLIP_FAMILY_SIZE} exact scene captions, in families of "
         f"{CLIP_FAMILY_SIZE} scenes that differ in one attribute (hard negatives)")
    args = _training_args(TrainingArguments, output / "runs" / "clip", epochs=settings.clip_epochs,
                          batch=settings.clip_batch, lr=TINY_LR["clip"], seed=seed, device=device, logging_steps=settings.logging_steps,
                          remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=families,
                      data_collator=_ClipCollator(tokenizer, image_processor))
    curves["clip"] = _train(trainer, "tiny CLIP", start)
    path = output / "clip"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    del trainer
    torch.set_grad_enabled(True)
    return path


def assign_demo_levels(data, clip: str, num_levels: int, output: Path, device, start: float) -> dict[str, Any]:
    """CLIP scores -> `alignment_level` on the pre-training pairs (or the file's own levels); returns a report."""
    import numpy as np

    from ..alignment_levels import add_alignment_levels, level_statistics, score_pairs

    pretrain = data["pretrain"]
    scored = score_pairs(pretrain, clip, image_column="images", text_column="caption", id_column="id",
                         batch_size=64, num_workers=0, device=device, cache_dir=output / "runs" / "clip_scores",
                         progress=True)
    if len(scored) < len(pretrain):
        _say(f"{len(pretrain) - len(scored)} pairs could not be scored and are left out")
    leveled = add_alignment_levels(scored, num_levels)
    data["pretrain"] = leveled
    scores = np.asarray(leveled["clip_score"], dtype=np.float64)
    levels = np.asarray(leveled["alignment_level"])
    quality = (np.asarray(leveled["caption_quality"], dtype=np.float64)
               if "caption_quality" in leveled.column_names else None)
    rows = level_statistics(leveled, num_levels)
    if quality is not None:
        for row in rows:
            mask = levels == row["level"]
            row["mean caption quality"] = round(float(quality[mask].mean()), 2)
            row["exact captions"] = f"{100 * float((quality[mask] == scenes.NUM_QUALITIES - 1).mean()):.0f}%"
    report: dict[str, Any] = {"rows": rows, "clip": clip}
    print()
    print(_text_table(rows))
    if quality is not None:
        rho = _spearman(scores, quality)
        means = [r["mean caption quality"] for r in rows]
        increasing = all(b >= a for a, b in itertools.pairwise(means))
        report.update(spearman=round(rho, 3), monotonic=increasing)
        _say(f"caption quality (0 = unrelated ... {scenes.NUM_QUALITIES - 1} = exact) vs CLIP score: Spearman "
             f"{rho:.2f}; mean quality per level {'increases' if increasing else 'does NOT increase'} with the level")
    return report


def _spearman(a, b) -> float:
    import numpy as np

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        # average ranks of ties
        for value in np.unique(x):
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------- 3. backbones


def lm_texts(data) -> list[str]:
    """What the tiny language model reads before it sees images: the demo's phrases, captions and chats (as text)."""
    from ..processing_aligngpt import VICUNA_V1_SYSTEM_PROMPT

    texts = list(scenes.demo_corpus())
    texts += [f"{caption}\n" for caption in data["pretrain"]["caption"]]
    for messages in data["instruct"]["messages"]:
        turns = [VICUNA_V1_SYSTEM_PROMPT]
        for message in messages:
            text = " ".join(item["text"] for item in message["content"] if item["type"] == "text" and item["text"])
            turns.append(("USER: " if message["role"] == "user" else "ASSISTANT: ") + text)
        texts.append(" ".join(turns) + "</s>")
    return texts


def train_tiny_language_model(data, output: Path, settings, seed: int, device, start: float, curves: dict) -> Path:
    """A tiny Llama from a config (tokenizer: BPE trained on the demo's texts), warmed up on those texts; saved."""
    from datasets import Dataset
    from transformers import (
        DataCollatorForLanguageModeling,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
    )

    from ..tiny import build_tiny_tokenizer, tiny_text_config

    texts = lm_texts(data)
    tokenizer = build_tiny_tokenizer(texts)
    tokenizer.padding_side = "right"
    config = tiny_text_config(len(tokenizer), **TINY_TEXT_LM)
    _set_seed(seed)
    model = LlamaForCausalLM(config)
    _say(f"tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary "
         f"{len(tokenizer)}) warmed up on {len(texts)} demo texts (captions, questions, answers; no images)")
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"]), batched=True,  # (no truncation: it would be saved with the tokenizer)
        remove_columns=["text"],
    )
    args = _training_args(TrainingArguments, output / "runs" / "language_model", epochs=settings.lm_epochs,
                          batch=32, lr=TINY_LR["lm"], seed=seed, device=device, logging_steps=settings.logging_steps)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    curves["language_model"] = _train(trainer, "tiny language model", start)
    path = output / "language_model"
    tokenizer.padding_side = "left"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- 4-5. training


def run_phase1(model, processor, data, output: Path, settings, lr: float, seed: int, device, start, curves):
    from ..training import AlignGPTPretrainer, AlignGPTPretrainingArguments

    columns = [c for c in ("id", "images", "caption", "alignment_level") if c in data["pretrain"].column_names]
    dataset = data["pretrain"].select_columns(columns)
    args = _training_args(AlignGPTPretrainingArguments, output / "runs" / "phase1", epochs=settings.phase1_epochs,
                          batch=settings.phase1_batch, lr=lr, seed=seed, device=device, logging_steps=settings.logging_steps, max_length=None)
    trainer = AlignGPTPretrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _say(f"phase 1: {len(dataset)} leveled pairs, training projector + alignment embeddings ({trained:,} "
         "parameters); the pair's level picks the <align> token's vector")
    curves["phase1"] = _train(trainer, "phase 1", start)
    return trainer


def run_phase2(model, processor, data, output: Path, settings, lr: float, seed: int, device, start, curves,
               train_vision_tower: bool = False):
    from trl import SFTConfig

    from ..training import make_sft_trainer

    dataset = data["instruct"].select_columns(["images", "messages"])
    args = _training_args(SFTConfig, output / "runs" / "phase2", epochs=settings.phase2_epochs,
                          batch=settings.phase2_batch, lr=lr, seed=seed, device=device, logging_steps=settings.logging_steps, bf16=False,
                          assistant_only_loss=True, max_length=2048, activation_checkpointing=False)
    trainer = make_sft_trainer(model, processor, dataset, args=args)
    if train_vision_tower:  # (the demo's tiny tower only: a real CLIP stays frozen, as in AlignGPT)
        from ..training import _base_model
        _base_model(model).vision_tower.requires_grad_(True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _say(f"phase 2: {len(dataset)} chats, training projector + gate + language model ({trained:,} parameters); "
         "alignment embeddings frozen, the gate mixes the local levels")
    curves["phase2"] = _train(trainer, "phase 2", start)
    return trainer


# ---------------------------------------------------------------------------------------------- 6. results


def answer_questions(model, processor, questions, max_new_tokens: int = 16):
    """Greedy answers and gate weights (one row of N-1 weights per question), batched with left padding."""
    import torch

    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}],
        add_generation_prompt=True) for q in questions]
    images = [[q["image"]] for q in questions]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        weights = model(**inputs, logits_to_keep=1).alignment_weights
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    gate = None if weights is None else weights.float().cpu().tolist()
    return [a.strip() for a in answers], gate


def _normalise(answer: str) -> str:
    return answer.strip().strip(".").lower()


def yes_no_accuracy(model, processor, dataset, batch_size: int = 32) -> tuple[float, list[list[float]]]:
    correct, gate = 0, []
    for begin in range(0, len(dataset), batch_size):
        rows = dataset[begin:begin + batch_size]
        questions = [{"image": image.convert("RGB"), "question": q} for image, q in zip(rows["image"], rows["question"])]
        answers, weights = answer_questions(model, processor, questions, max_new_tokens=3)
        correct += sum(_normalise(a).startswith(e) for a, e in zip(answers, rows["answer"]))
        gate += weights or []
    return correct / len(dataset), gate


def _text_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(cell(row.get(c, "")).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots (PIL only)

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def plot_loss_curves(curves: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per training run: loss against step."""
    from PIL import Image, ImageDraw

    names = [name for name in curves if curves[name]["losses"]]
    panel_w, panel_h, pad = 420, 260, 50
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    image = Image.new("RGB", (cols * panel_w, rows * panel_h), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    for index, name in enumerate(names):
        points = [(p["step"], p["loss"]) for p in curves[name]["losses"]]
        x0, y0 = (index % cols) * panel_w, (index // cols) * panel_h
        left, top, right, bottom = x0 + pad, y0 + 30, x0 + panel_w - 15, y0 + panel_h - 35
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        s_min, s_max = min(steps), max(max(steps), min(steps) + 1)
        l_min, l_max = min(losses), max(losses)
        if l_max - l_min < 1e-9:
            l_max = l_min + 1.0
        draw.text((left, y0 + 8), f"{name}: loss", fill="black", font=font)
        draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
        for frac in (0.0, 0.5, 1.0):
            y = bottom - frac * (bottom - top)
            draw.line([left - 4, y, left, y], fill=(90, 90, 90))
            draw.text((x0 + 4, y - 6), f"{l_min + frac * (l_max - l_min):.2f}", fill="black", font=small)
        draw.text((left, bottom + 6), f"step {s_min}", fill="black", font=small)
        draw.text((right - 60, bottom + 6), f"step {s_max}", fill="black", font=small)
        xy = [(left + (s - s_min) / (s_max - s_min) * (right - left),
               bottom - (v - l_min) / (l_max - l_min) * (bottom - top)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=_PALETTE[index % len(_PALETTE)], width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_PALETTE[index % len(_PALETTE)])
    image.save(path)
    return path


def plot_gate_weights(rows: list[dict[str, Any]], path: Path) -> Path:
    """A bar chart per row (a held-out question, or the mean): the gate's weight of every local level."""
    from PIL import Image, ImageDraw

    panel_w, panel_h = 360, 210
    cols = min(3, len(rows))
    grid = math.ceil(len(rows) / cols)
    image = Image.new("RGB", (cols * panel_w, grid * panel_h + 30), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    draw.text((10, 8), "Gate weights over the local alignment levels (the global level is always added with weight 1)",
              fill="black", font=font)
    for index, row in enumerate(rows):
        weights = row["weights"]
        x0, y0 = (index % cols) * panel_w, (index // cols) * panel_h + 30
        left, top, right, bottom = x0 + 40, y0 + 40, x0 + panel_w - 15, y0 + panel_h - 30
        title = row["title"] if len(row["title"]) <= 52 else row["title"][:49] + "..."
        draw.text((x0 + 10, y0 + 8), title, fill="black", font=small)
        top_weight = max(max(weights), 1e-6)
        scale = max(0.25, math.ceil(top_weight * 4) / 4)  # axis to the next quarter above the largest weight
        draw.line([left, bottom, right, bottom], fill=(90, 90, 90))
        draw.line([left, top, left, bottom], fill=(90, 90, 90))
        draw.text((x0 + 6, top - 6), f"{scale:.2f}", fill="black", font=small)
        draw.text((x0 + 6, bottom - 6), "0", fill="black", font=small)
        slot = (right - left) / len(weights)
        for level, weight in enumerate(weights):
            bx = left + level * slot
            height = weight / scale * (bottom - top)
            draw.rectangle([bx + slot * 0.15, bottom - height, bx + slot * 0.85, bottom],
                           fill=_PALETTE[level % len(_PALETTE)])
            draw.text((bx + slot * 0.3, bottom + 4), f"L{level}", fill="black", font=small)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------- the pipeline


def _all_tiny(args: Namespace) -> bool:
    return not (args.language_model or args.vision_tower or args.clip)


def run_demo(args: Namespace) -> dict[str, Any]:
    """Runs the demo with the flags of `aligngpt demo`; returns a summary (also written as `summary.json`)."""
    start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    device = args.device
    seed = args.seed
    num_levels = args.num_levels
    curves: dict[str, dict[str, Any]] = {}
    _say(f"AlignGPT demo ({'quick' if args.quick else 'full'} run) -> {output.resolve()}")

    import torch
    from transformers.utils import logging as hf_logging

    threads = args.threads or (1 if _all_tiny(args) else None)
    if threads:
        # the tiny models' matrices are too small to gain from more threads, and OpenMP threads lose a lot when
        # another process shares the cores
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_warning()
    import transformers_aligngpt  # noqa: F401  (Auto registration)

    from ..cli import CommandError
    from ..training import build_aligngpt_from_pretrained

    data = load_data(args, settings, start)

    _header(f"2/6 alignment levels (N = {num_levels})", start)
    clip = args.clip
    if clip is None and args.data and "alignment_level" in data["pretrain"].column_names and all(
        level is not None for level in data["pretrain"]["alignment_level"]
    ):
        levels_report = {"rows": [], "clip": "levels from the data file (`similarity`)"}
        _say(f"using the levels stored in {args.data} (pass --clip to score the pairs again)")
    else:
        if clip is None:
            if args.data:
                raise CommandError("--data without levels (`similarity`) needs --clip to score the pairs")
            clip = str(train_tiny_clip(output, settings, seed, device, start, curves))
        else:
            _say(f"scoring with {clip}")
        levels_report = assign_demo_levels(data, clip, num_levels, output, device, start)

    _header("3/6 backbones", start)
    vision_tower = args.vision_tower or clip
    if vision_tower is None:
        raise CommandError("give --vision-tower (or --clip, whose image tower is then used)")
    language_model = args.language_model or str(
        train_tiny_language_model(data, output, settings, seed, device, start, curves)
    )
    tiny = args.language_model is None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # (loading a tower from a full CLIP checkpoint reports the unused text weights)
    try:
        model, processor = build_aligngpt_from_pretrained(
            language_model, vision_tower, num_alignment_levels=num_levels, dtype=torch.float32, seed=seed,
            **({"alignment_gate_hidden_size": TINY_GATE_HIDDEN} if tiny else {}),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    _say(f"AlignGPT from {language_model} + the image tower of {vision_tower}: "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.config.num_image_tokens} image "
         f"tokens, {num_levels} alignment levels", start)

    lr = TINY_LR if tiny else PAPER_LR
    _header("4/6 phase 1: pre-training with alignment levels", start)
    run_phase1(model, processor, data, output, settings, lr["phase1"], seed, device, start, curves)
    _header("5/6 phase 2: instruction tuning (TRL SFTTrainer)", start)
    run_phase2(model, processor, data, output, settings, lr["phase2"], seed, device, start, curves,
               train_vision_tower=settings.train_vision_tower and not (args.vision_tower or args.clip))

    _header("6/6 checkpoint, answers and gate weights", start)
    model.eval()
    checkpoint = output / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    _say(f"checkpoint: {checkpoint}", start)

    questions = data["questions"]
    (output / "held_out").mkdir(exist_ok=True)
    for i, q in enumerate(questions):  # so that `aligngpt chat --image` has something to look at
        q["image"].save(output / "held_out" / f"{i}.png")
    answers, gate = answer_questions(model, processor, questions)
    table = []
    for q, a in zip(questions, answers):
        ok = _normalise(a) == _normalise(q["expected"])
        table.append({"question": q["question"], "expected": q["expected"], "answer": a, "correct": "yes" if ok else
                      "no"})
    print()
    print(_text_table(table))
    accuracy = sum(row["correct"] == "yes" for row in table) / len(table)

    gate_rows, gate_table = [], []
    if gate is not None:
        for q, weights in zip(questions, gate):
            gate_rows.append({"title": q["question"], "weights": weights})
            gate_table.append({"question": q["question"], **{f"L{i}": round(w, 3) for i, w in enumerate(weights)},
                               "top level": max(range(len(weights)), key=weights.__getitem__)})
        print()
        print(f"gate weights per local level (L0 .. L{num_levels - 2}; L{num_levels - 1}, the global level, is always "
              "added with weight 1):")
        print(_text_table(gate_table))

    yes_no = None
    all_weights = list(gate or [])
    if "yes_no" in data:
        yes_no, yes_no_gate = yes_no_accuracy(model, processor, data["yes_no"])
        all_weights += yes_no_gate
        _say(f"held-out yes/no questions ({len(data['yes_no'])}, balanced; chance = 50%): accuracy "
             f"{100 * yes_no:.0f}%", start)
    gate_stats = None
    if all_weights:
        weights = torch.tensor(all_weights)
        gate_stats = {"mean": [round(v, 4) for v in weights.mean(0).tolist()],
                      "std": [round(v, 4) for v in weights.std(0).tolist()] if len(weights) > 1 else None,
                      "num_samples": len(weights), "source": "held-out demo questions"}
        gate_rows.append({"title": f"mean over {len(weights)} held-out questions", "weights": gate_stats["mean"]})

    # artefacts
    losses = {name: curve["losses"] for name, curve in curves.items()}
    (output / "loss_curves.json").write_text(json.dumps(losses, indent=1) + "\n")
    plot_loss_curves(curves, output / "loss_curves.png")
    if gate_rows:
        plot_gate_weights(gate_rows, output / "gate_weights.png")
    (output / "answers.json").write_text(json.dumps(
        [{**row, "gate_weights": (gate[i] if gate else None)} for i, row in enumerate(table)], indent=1) + "\n")

    training = {}
    for name, title, curve_lr, batch, epochs, data_key, trained in (
        ("phase1", "phase 1 (pre-training)", lr["phase1"], settings.phase1_batch, settings.phase1_epochs,
         "pretrain_source", "projector, alignment embeddings"),
        ("phase2", "phase 2 (instruction tuning)", lr["phase2"], settings.phase2_batch, settings.phase2_epochs,
         "instruct_source", "projector, gate, language model"),
    ):
        curve = curves[name]
        training[title] = {"data": data[data_key], "trained": trained, "learning rate": curve_lr,
                           "batch size": batch, "epochs": epochs, "steps": curve["steps"], "schedule": "cosine",
                           "first / last logged loss": f"{curve['first_loss']:.3f} / {curve['last_loss']:.3f}",
                           "time on this machine": f"{curve['seconds']:.0f} s"}
    eval_results = {}
    if yes_no is not None:
        eval_results["demo-yes-no"] = {"accuracy": round(yes_no, 4)}
    base_models = [m for m in (args.language_model, args.vision_tower or args.clip) if m and not os.path.exists(m)]
    card_info = {
        "summary": (
            "A tiny demonstration model trained by `aligngpt demo` on the synthetic scenes that ship with "
            "`transformers-aligngpt` (coloured shapes on a 3x3 grid): it shows the pipeline, it is not a useful "
            "assistant." if tiny and not args.data else "Trained by `aligngpt demo`."
        ),
        "base_models": base_models,
        "training": training,
        "alignment_levels": levels_report["rows"],
        "gate_statistics": gate_stats,
        "eval_results": eval_results,
        "example_question": questions[0]["question"] if questions else "What is shown in the image?",
        "tags": ["demo"] if tiny else [],
    }
    (checkpoint / "aligngpt_card_info.json").write_text(json.dumps(card_info, indent=1, default=str) + "\n")

    elapsed = time.perf_counter() - start
    summary = {
        "output": str(output), "checkpoint": str(checkpoint), "settings": asdict(settings), "seconds": round(elapsed, 1),
        "levels": {k: v for k, v in levels_report.items() if k != "rows"}, "level_rows": levels_report["rows"],
        "answers": table, "question_accuracy": accuracy, "yes_no_accuracy": yes_no, "gate_statistics": gate_stats,
        "final_losses": {name: curve["last_loss"] for name, curve in curves.items()},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print()
    _say(f"done in {elapsed:.0f} s. Written to {output}: checkpoint/ (model, processor, card info), "
         "loss_curves.json + .png, gate_weights.png, answers.json, summary.json, held_out/ (question images)")
    _say(f"next: aligngpt chat --model {checkpoint} --image {output / 'held_out' / '0.png'}")
    _say(f"      aligngpt push --model {checkpoint} --repo-id <user/name> [--dry-run --staging-dir DIR]")
    return summary


def demo(output: str = "outputs/demo", quick: bool = False, **kwargs) -> dict[str, Any]:
    """Python entry point: the same as `aligngpt demo --output OUTPUT [--quick] ...`."""
    defaults = {"seed": 0, "num_levels": 8, "threads": None, "clip": None, "vision_tower": None, "language_model": None, "data": None,
                    "instruct_data": None, "image_folder": None, "device": None}
    return run_demo(Namespace(output=output, quick=quick, **{**defaults, **kwargs}))


__all__ = ["FULL", "QUICK", "DemoSettings", "demo", "held_out_questions", "run_demo"]
