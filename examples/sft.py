"""Phase 2 of AlignGPT: instruction tuning with TRL's `SFTTrainer` (full, LoRA or QLoRA).

Offline, tiny random model and built-in synthetic conversations (text-only rows mixed in; nothing is downloaded):

    python examples/sft.py --output-dir runs/sft-tiny --max-steps 20
    python examples/sft.py --use-peft --load-in-4bit --output-dir runs/sft-tiny-qlora --max-steps 20
    python examples/sft.py --model-name-or-path runs/pretrain-tiny --output-dir runs/sft-tiny   # after pretrain.py

The paper's phase 2 (LLaVA-1.5 665K mix, 8 GPUs, ZeRO-3), starting from Vicuna + CLIP and the phase-1 artefact:

    accelerate launch --config_file examples/accelerate_configs/zero3.yaml examples/sft.py \
        --text-model lmsys/vicuna-7b-v1.5 --vision-model openai/clip-vit-large-patch14-336 \
        --pretrain-artifact runs/aligngpt-7b-pretrain/mm_projector_align.safetensors \
        --data llava_v1_5_mix665k.json --image-folder data \
        --per-device-train-batch-size 16 --learning-rate 2e-5 --num-train-epochs 1 --bf16 \
        --output-dir runs/aligngpt-7b

QLoRA on one GPU, from a phase-1 checkpoint (a full checkpoint written by pretrain.py):

    python examples/sft.py --model-name-or-path runs/aligngpt-7b-pretrain --use-peft --load-in-4bit \
        --data llava_v1_5_mix665k.json --image-folder data --bf16 --output-dir runs/aligngpt-7b-qlora

`--gate-text-scope conversation` reproduces the original's gate input in training (answers included);
`prompt` (the default of the config) averages the prompt only, as at inference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model (none: a tiny random model, no download)")
    model.add_argument("--model-name-or-path", help="an AlignGPT checkpoint (e.g. the output of pretrain.py)")
    model.add_argument("--text-model", help="a causal LM id or path, e.g. lmsys/vicuna-7b-v1.5")
    model.add_argument("--vision-model", help="a CLIP / SigLIP id or path, e.g. openai/clip-vit-large-patch14-336")
    model.add_argument("--pretrain-artifact", help="mm_projector_align.safetensors (or the original .bin) to load")
    model.add_argument("--num-alignment-levels", type=int, default=None,
                       help="N for a model built from --text-model/--vision-model (default: the artefact's, else 8)")
    model.add_argument("--gate-text-scope", choices=["prompt", "conversation"], default=None)
    peft = parser.add_argument_group("LoRA / QLoRA")
    peft.add_argument("--use-peft", action="store_true", help="LoRA on the LLM, gate and projector trained fully")
    peft.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the LLM in 4-bit NF4 (needs --use-peft)")
    peft.add_argument("--lora-r", type=int, default=128)
    peft.add_argument("--lora-alpha", type=int, default=256)
    peft.add_argument("--lora-dropout", type=float, default=0.05)
    peft.add_argument("--merge", action="store_true", help="also save the adapter merged into the model")
    data = parser.add_argument_group("data (none: built-in synthetic conversations)")
    data.add_argument("--data", help="LLaVA-layout JSON (e.g. llava_v1_5_mix665k.json) or a save_to_disk folder")
    data.add_argument("--image-folder", help="folder the JSON's `image` fields are relative to")
    data.add_argument("--num-rows", type=int, default=64, help="rows of built-in data")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/aligngpt-sft")
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--num-train-epochs", type=float, default=1.0)
    train.add_argument("--per-device-train-batch-size", type=int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=None, help="default: 2e-4 with LoRA, 2e-5 without")
    train.add_argument("--max-length", type=int, default=2048)
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--logging-steps", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 (GPUs; QLoRA always computes in bf16)")
    train.add_argument("--no-gradient-checkpointing", action="store_true")
    train.add_argument("--optim", default=None, help="default: paged_adamw_8bit with QLoRA on GPU, adamw_torch else")
    train.add_argument("--dataloader-num-workers", type=int, default=0)
    train.add_argument("--report-to", default="none")
    args = parser.parse_args(argv)
    if args.load_in_4bit and not args.use_peft:
        parser.error("--load-in-4bit trains an adapter: add --use-peft")
    return args


def artifact_levels(path) -> int | None:
    """Number of alignment levels stored in a phase-1 artefact (ours or the original's)."""
    if path is None:
        return None
    if os.path.isdir(path):
        path = os.path.join(path, "mm_projector_align.safetensors")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return f.get_slice("model.alignment_embeddings.weight").get_shape()[0]
    state = torch.load(path, weights_only=True)
    return state["align_indicators.indicator_embs"].shape[0]


def build_model_and_processor(args):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_aligngpt  # noqa: F401  (registers the Auto classes)
    from transformers_aligngpt.training import (
        build_aligngpt_from_pretrained,
        load_for_qlora,
        load_pretraining_artifact,
    )

    dtype = torch.bfloat16 if (args.bf16 or args.load_in_4bit) else torch.float32
    path = args.model_name_or_path
    if path is None and (args.text_model or args.vision_model):
        if not (args.text_model and args.vision_model):
            raise SystemExit("--text-model and --vision-model go together")
        if args.load_in_4bit:
            raise SystemExit(
                "--load-in-4bit loads a saved AlignGPT checkpoint: run pretrain.py first (its output is a full "
                "checkpoint) and pass it with --model-name-or-path"
            )
        levels = args.num_alignment_levels or artifact_levels(args.pretrain_artifact) or 8
        model, processor = build_aligngpt_from_pretrained(
            args.text_model, args.vision_model, num_alignment_levels=levels, dtype=dtype
        )
    elif path is None:
        from transformers_aligngpt.demo import demo_corpus
        from transformers_aligngpt.tiny import build_tiny_model

        model, processor = build_tiny_model(texts=demo_corpus(), seed=args.seed)
        if args.load_in_4bit:  # quantisation happens while loading: save the tiny model first
            path = tempfile.mkdtemp(prefix="aligngpt-tiny-")
            model.save_pretrained(path)
            processor.save_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path)
        model = None
    if args.load_in_4bit:
        model = load_for_qlora(path, compute_dtype=torch.bfloat16)
    elif model is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if args.pretrain_artifact:
        load_pretraining_artifact(model, args.pretrain_artifact)
    return model, processor


def build_dataset(args):
    if args.data:
        if os.path.isdir(args.data):
            from datasets import load_from_disk

            return load_from_disk(args.data)
        from transformers_aligngpt.data import load_llava_json

        dataset = load_llava_json(args.data, image_folder=args.image_folder)
        return dataset.select_columns(["images", "messages"])
    from transformers_aligngpt.demo import build_instruction_data

    return build_instruction_data(num_rows=args.num_rows, image_size=48).select_columns(["images", "messages"])


def main(argv=None):
    args = parse_args(argv)
    from trl import SFTConfig

    from transformers_aligngpt.training import (
        aligngpt_lora_config,
        make_sft_trainer,
        merge_qlora_adapter,
    )

    on_gpu = torch.cuda.is_available()
    learning_rate = args.learning_rate or (2e-4 if args.use_peft else 2e-5)
    optim = args.optim or ("paged_adamw_8bit" if args.load_in_4bit and on_gpu else "adamw_torch")
    # the arguments come first: under DeepSpeed ZeRO-3 they make from_pretrained shard the weights while loading
    training_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_length=args.max_length,
        assistant_only_loss=True,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=args.bf16 or args.load_in_4bit,
        use_cpu=not on_gpu,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=optim,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
    )
    model, processor = build_model_and_processor(args)
    dataset = build_dataset(args)
    peft_config = (
        aligngpt_lora_config(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout) if args.use_peft else None
    )
    trainer = make_sft_trainer(
        model,
        processor,
        train_dataset=dataset,
        args=training_args,
        peft_config=peft_config,
        gate_text_scope=args.gate_text_scope,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if args.merge and args.use_peft and trainer.is_world_process_zero():
        base = args.model_name_or_path or getattr(model, "name_or_path", None)
        merged = merge_qlora_adapter(base, args.output_dir) if args.load_in_4bit else trainer.model.merge_and_unload()
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        processor.save_pretrained(os.path.join(args.output_dir, "merged"))
    if trainer.is_world_process_zero():
        print(f"phase-2 {'adapter' if args.use_peft else 'model'} saved to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
