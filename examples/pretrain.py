"""Phase 1 of AlignGPT: pre-train the projector and the alignment embeddings (`AlignGPTPretrainer`).

Offline, tiny random model and built-in synthetic data (nothing is downloaded):

    python examples/pretrain.py --output-dir runs/pretrain-tiny --max-steps 20
    accelerate launch --num_processes 2 --cpu examples/pretrain.py --output-dir runs/pretrain-ddp --max-steps 2

The paper's phase 1 (Vicuna-7B-v1.5 + CLIP ViT-L/14-336, 558K captions with alignment levels, 8 GPUs, ZeRO-2):

    accelerate launch --config_file examples/accelerate_configs/zero2.yaml examples/pretrain.py \
        --text-model lmsys/vicuna-7b-v1.5 --vision-model openai/clip-vit-large-patch14-336 \
        --data blip_laion_cc_sbu_558k_aligngpt.json --image-folder data/LLaVA-Pretrain/images \
        --per-device-train-batch-size 32 --learning-rate 1e-3 --num-train-epochs 1 --bf16 \
        --output-dir runs/aligngpt-7b-pretrain

The data is a LLaVA-layout JSON whose records carry `similarity` (the alignment level, see
`transformers_aligngpt.alignment_levels` to compute it from CLIP scores), or a dataset saved with `save_to_disk`
with `images`, `caption` and `alignment_level` columns. The output folder holds a normal checkpoint plus
`mm_projector_align.safetensors` (projector + alignment embeddings), which `examples/sft.py --pretrain-artifact` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model (none: a tiny random model, no download)")
    model.add_argument("--model-name-or-path", help="an AlignGPT checkpoint to continue from")
    model.add_argument("--text-model", help="a causal LM id or path, e.g. lmsys/vicuna-7b-v1.5")
    model.add_argument("--vision-model", help="a CLIP / SigLIP id or path, e.g. openai/clip-vit-large-patch14-336")
    model.add_argument("--num-alignment-levels", type=int, default=None,
                       help="N for a new model (default 8; the tiny model: 5, the grades of the built-in captions)")
    data = parser.add_argument_group("data (none: built-in synthetic image-caption pairs)")
    data.add_argument("--data", help="LLaVA-layout JSON with `similarity`, or a folder saved with save_to_disk")
    data.add_argument("--image-folder", help="folder the JSON's `image` fields are relative to")
    data.add_argument("--num-rows", type=int, default=64, help="rows of built-in data")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/aligngpt-pretrain")
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--num-train-epochs", type=float, default=1.0)
    train.add_argument("--per-device-train-batch-size", type=int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--max-length", type=int, default=2048)
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--logging-steps", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--dataloader-num-workers", type=int, default=0)
    train.add_argument("--report-to", default="none")
    return parser.parse_args(argv)


def build_model_and_processor(args):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_aligngpt  # noqa: F401  (registers the Auto classes)

    if args.model_name_or_path:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
        return model, AutoProcessor.from_pretrained(args.model_name_or_path)
    if args.text_model or args.vision_model:
        if not (args.text_model and args.vision_model):
            raise SystemExit("--text-model and --vision-model go together")
        from transformers_aligngpt.training import build_aligngpt_from_pretrained

        # the frozen parts stay in bf16 with --bf16; trained parts are upcast by the trainer's mixed precision
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        return build_aligngpt_from_pretrained(
            args.text_model, args.vision_model, num_alignment_levels=args.num_alignment_levels or 8, dtype=dtype
        )
    from transformers_aligngpt.demo import NUM_QUALITIES, demo_corpus
    from transformers_aligngpt.tiny import build_tiny_model

    # the demo's caption grades (0 = unrelated .. 4 = exact) are the alignment levels of the tiny model
    levels = args.num_alignment_levels or NUM_QUALITIES
    return build_tiny_model(texts=demo_corpus(), seed=args.seed, num_alignment_levels=levels)


def build_dataset(args):
    if args.data:
        if os.path.isdir(args.data):
            from datasets import load_from_disk

            return load_from_disk(args.data)
        from transformers_aligngpt.data import load_llava_json

        return load_llava_json(args.data, image_folder=args.image_folder)
    from transformers_aligngpt.demo import build_pretraining_data

    dataset = build_pretraining_data(num_pairs=args.num_rows, image_size=48)
    return dataset.rename_column("caption_quality", "alignment_level")


def main(argv=None):
    args = parse_args(argv)
    from transformers_aligngpt.training import (
        AlignGPTPretrainer,
        AlignGPTPretrainingArguments,
    )

    # the arguments come first: under DeepSpeed they set up the distributed state the model loading reads
    training_args = AlignGPTPretrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
    )
    model, processor = build_model_and_processor(args)
    dataset = build_dataset(args)
    trainer = AlignGPTPretrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=processor
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(f"phase-1 checkpoint and mm_projector_align.safetensors saved to {args.output_dir}")
        print(json.dumps({"world_size": training_args.world_size, "global_step": trainer.state.global_step}))
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
