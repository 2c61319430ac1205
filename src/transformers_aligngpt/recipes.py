"""The two training phases of AlignGPT as commands: `aligngpt pretrain` (phase 1) and `aligngpt sft` (phase 2).

Each phase has an argument parser (`add_pretrain_arguments` / `add_sft_arguments`), a run function that trains and
saves (`run_pretrain` / `run_sft`, returning the trainer), a `*_main(argv)` for scripts (`examples/pretrain.py`,
`examples/sft.py`, `accelerate launch`) and an `add_*_subparser` for the `aligngpt` command line. Without model or
data flags both phases run offline on a tiny random model and the built-in synthetic data.

Only `argparse` is imported at module level: torch, transformers and TRL are imported when a phase runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Sequence

from .cli import CommandError, _num_levels, _positive_float, _positive_int, check_model_sources, loading


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of the description; keeps blocks with line breaks (the example commands) as written."""

    def _fill_text(self, text, width, indent):
        import textwrap

        blocks = []
        for block in text.split("\n\n"):
            if "\n" in block.strip("\n"):
                blocks.append(textwrap.indent(block, indent))
            else:
                blocks.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                            subsequent_indent=indent))
        return "\n\n".join(blocks)


def _parser(prog, description: str, epilog: str, add_arguments) -> argparse.ArgumentParser:
    """A phase's stand-alone parser (`examples/*.py`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter)
    return add_arguments(parser)


def _main(parser: argparse.ArgumentParser, run, argv: Sequence[str] | None):
    """Parses `argv` and runs the phase: its trainer, or usage + exit 2 for flags that cannot work."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CommandError as error:
        parser.error(str(error))


def _add_subparser(subparsers, name: str, help: str, description: str, epilog: str, add_arguments, run):
    """Registers `aligngpt <name>`, which runs the phase and exits with 0."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=_HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=functools.partial(_run_command, run))
    return parser


def _run_command(run, args: argparse.Namespace) -> int:
    run(args)
    return 0


# ---------------------------------------------------------------------------------------------- phase 1
PRETRAIN_HELP = "phase 1: pre-train the projector and the alignment embeddings on image-caption pairs with levels"
PRETRAIN_DESCRIPTION = (
    "Phase 1 of AlignGPT (AlignGPTPretrainer): trains only the projector and the N alignment embeddings; the vision "
    "tower and the LLM stay frozen. Every image-caption pair carries its alignment level (0..N-1, from CLIP scores: "
    "see `aligngpt levels`) and the model learns which embedding goes with which quality of caption; the loss is on "
    "the caption. The output folder holds a full checkpoint (model + processor, loadable with "
    "AutoModelForImageTextToText / AutoProcessor) and mm_projector_align.safetensors (projector + alignment "
    "embeddings), which `aligngpt sft --pretrain-artifact` reads.\n\n"
    "Without --model / --language-model / --vision-tower a tiny random model is built (nothing is downloaded); "
    "without --data the built-in synthetic image-caption pairs are used. --data is a LLaVA-layout JSON whose records "
    "carry `similarity` (the level), or a folder written by datasets' save_to_disk with `images`, `caption` and "
    "`alignment_level` columns."
)
PRETRAIN_EPILOG = """examples:
  offline, tiny model and built-in data (seconds on a CPU):
    aligngpt pretrain --max-steps 20 --output runs/pretrain-tiny

  the paper's phase 1 (Vicuna-7B-v1.5 + CLIP ViT-L/14-336, 558K leveled captions, 8 GPUs with ZeRO-2):
    accelerate launch --config_file examples/accelerate_configs/zero2.yaml -m transformers_aligngpt pretrain \\
        --language-model lmsys/vicuna-7b-v1.5 --vision-tower openai/clip-vit-large-patch14-336 \\
        --data blip_laion_cc_sbu_558k_aligngpt.json --image-folder data/LLaVA-Pretrain/images \\
        --per-device-train-batch-size 32 --learning-rate 1e-3 --num-train-epochs 1 --bf16 \\
        --output runs/aligngpt-7b-pretrain
"""


def _add_model_arguments(parser: argparse.ArgumentParser, model_help: str, levels_help: str):
    group = parser.add_argument_group(
        "model (default: a tiny random model, nothing downloaded)",
        "either --model, or --language-model with --vision-tower",
    )
    group.add_argument("--model", "--model-name-or-path", dest="model", metavar="PATH_OR_ID", help=model_help)
    group.add_argument("--language-model", "--text-model", dest="language_model", metavar="PATH_OR_ID",
                       help="causal LM to build a new AlignGPT from, e.g. lmsys/vicuna-7b-v1.5")
    group.add_argument("--vision-tower", "--vision-model", dest="vision_tower", metavar="PATH_OR_ID",
                       help="CLIP / SigLIP to build a new AlignGPT from, e.g. openai/clip-vit-large-patch14-336")
    group.add_argument("--num-levels", "--num-alignment-levels", dest="num_levels", type=_num_levels, default=None,
                       metavar="N", help=levels_help)
    return group


def _add_data_arguments(parser: argparse.ArgumentParser, title: str, data_help: str):
    group = parser.add_argument_group(title)
    group.add_argument("--data", metavar="PATH", help=data_help)
    group.add_argument("--image-folder", metavar="DIR", help="folder the JSON's `image` paths are relative to")
    group.add_argument("--num-rows", metavar="N", type=_positive_int, default=64, help="rows of built-in data (64)")
    return group


def _add_training_arguments(parser: argparse.ArgumentParser, output: str):
    group = parser.add_argument_group("training")
    group.add_argument("--output", "--output-dir", dest="output", default=output, metavar="DIR",
                       help=f"folder for the checkpoint ({output})")
    group.add_argument("--max-steps", metavar="N", type=int, default=-1, help="stop after this many steps (-1: run the epochs)")
    group.add_argument("--num-train-epochs", metavar="EPOCHS", type=_positive_float, default=1.0, help="(1)")
    group.add_argument("--per-device-train-batch-size", metavar="N", type=_positive_int, default=8, help="(8)")
    group.add_argument("--gradient-accumulation-steps", metavar="N", type=_positive_int, default=1, help="(1)")
    group.add_argument("--max-length", metavar="N", type=_max_length, default=2048,
                       help="tokens per row (2048; none: no limit)")
    group.add_argument("--save-steps", metavar="N", type=_positive_int, default=500, help="checkpoint every this many steps (500)")
    group.add_argument("--logging-steps", metavar="N", type=_positive_int, default=1, help="(1)")
    group.add_argument("--seed", metavar="N", type=int, default=0, help="(0)")
    group.add_argument("--dataloader-num-workers", metavar="N", type=int, default=0, help="(0)")
    group.add_argument("--report-to", metavar="NAME", default="none", help="wandb, tensorboard, ... (none)")
    group.add_argument("--resume-from-checkpoint", metavar="PATH", default=None,
                       help="continue an interrupted run from this checkpoint folder, or from the last checkpoint-* "
                       "in --output with `last` (or `true`)")
    return group


def _max_length(value: str) -> int | None:
    """`--max-length`: a positive number of tokens, or `none` for no limit."""
    if value.strip().lower() == "none":
        return None
    return _positive_int(value)


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_model_arguments(
        parser,
        model_help="an AlignGPT checkpoint (folder or Hub id) to continue from",
        levels_help="number of alignment levels of a new model (8; the tiny model: 5, the grades of the built-in "
        "captions)",
    )
    _add_data_arguments(parser, "data (default: built-in synthetic image-caption pairs)",
                        "LLaVA-layout JSON with `similarity`, or a save_to_disk folder")
    train = _add_training_arguments(parser, "runs/aligngpt-pretrain")
    train.add_argument("--learning-rate", metavar="LR", type=_positive_float, default=1e-3, help="(1e-3, the paper's)")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    return parser


def pretrain_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return _parser(prog, PRETRAIN_DESCRIPTION, PRETRAIN_EPILOG, add_pretrain_arguments)


def _check_model_flags(args) -> None:
    if args.model and (args.language_model or args.vision_tower):
        raise CommandError(
            "--model loads a whole AlignGPT checkpoint, --language-model / --vision-tower build a new one: give one "
            "or the other"
        )
    if bool(args.language_model) != bool(args.vision_tower):
        raise CommandError("--language-model and --vision-tower go together (a new AlignGPT needs both)")
    check_model_sources(args, "--model", "--language-model", "--vision-tower")
    if args.model and args.num_levels is not None:
        _check_checkpoint_levels(args.model, args.num_levels)


def _check_checkpoint_levels(model: str, num_levels: int) -> None:
    """A checkpoint keeps the alignment levels it was built with: a different --num-levels would be ignored."""
    config = os.path.join(model, "config.json")
    if not os.path.isfile(config):  # a Hub id (or a folder without a config): not read here
        raise CommandError(
            f"--num-levels sets the levels of a new model; --model {model} keeps its own. Drop --num-levels (or "
            "build a new model with --language-model / --vision-tower)"
        )
    with open(config, encoding="utf-8") as f:
        saved = json.load(f).get("num_alignment_levels", 8)  # AlignGPTConfig's default
    if saved != num_levels:
        raise CommandError(
            f"--num-levels {num_levels}, but --model {model} has {saved} alignment levels (a checkpoint keeps its "
            f"own): drop --num-levels, or pass {saved}"
        )


def _check_resume_flag(args) -> None:
    """Resolves --resume-from-checkpoint (`last` / `true`: the last checkpoint-* in --output) to a folder that
    exists, before anything is loaded."""
    value = args.resume_from_checkpoint
    if value is None:
        return
    if value.strip().lower() in ("last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output) if os.path.isdir(args.output) else None
        if last is None:
            raise CommandError(
                f"--resume-from-checkpoint {value}: no checkpoint-* folder in --output {args.output} to resume from"
            )
        args.resume_from_checkpoint = last
    elif not os.path.isdir(value):
        raise CommandError(f"--resume-from-checkpoint {value}: no such folder (a checkpoint-* folder, or `last`)")


def _check_data_flags(args) -> None:
    if args.data and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data}: no such file or folder")
    if args.image_folder and not os.path.isdir(args.image_folder):
        raise CommandError(f"--image-folder {args.image_folder}: no such folder")
    if args.image_folder and not args.data:
        raise CommandError("--image-folder goes with --data (the built-in data has its images inline)")


def check_pretrain_args(args: argparse.Namespace) -> None:
    """Raises `CommandError` for flags that cannot work, before anything is loaded."""
    _check_model_flags(args)
    _check_data_flags(args)
    _check_resume_flag(args)


def _dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else torch.float32


def build_pretrain_model_and_processor(args: argparse.Namespace):
    """(model, processor) for phase 1: a checkpoint, a new AlignGPT from an LLM and a tower, or the tiny model."""
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from . import AlignGPTConfig  # noqa: F401  (registers AlignGPT with the Auto classes)

        with loading("--model", args.model):
            model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=_dtype(args.bf16))
            return model, AutoProcessor.from_pretrained(args.model)
    if args.language_model:
        from .training import build_aligngpt_from_pretrained

        # the frozen parts stay in bf16 with --bf16; trained parts are upcast by the trainer's mixed precision
        with loading("--language-model / --vision-tower", f"{args.language_model} / {args.vision_tower}"):
            return build_aligngpt_from_pretrained(
                args.language_model, args.vision_tower, num_alignment_levels=args.num_levels or 8,
                dtype=_dtype(args.bf16),
            )
    from .demo import NUM_QUALITIES, demo_corpus
    from .tiny import build_tiny_model

    # the demo's caption grades (0 = unrelated .. 4 = exact) are the alignment levels of the tiny model
    return build_tiny_model(texts=demo_corpus(), seed=args.seed, num_alignment_levels=args.num_levels or NUM_QUALITIES)


def build_pretrain_dataset(args: argparse.Namespace):
    if args.data:
        if os.path.isdir(args.data):
            from datasets import load_from_disk

            return load_from_disk(args.data)
        from .data import load_llava_json

        return load_llava_json(args.data, image_folder=args.image_folder)
    from .demo import build_pretraining_data

    dataset = build_pretraining_data(num_pairs=args.num_rows, image_size=48)
    return dataset.rename_column("caption_quality", "alignment_level")


def write_card_info(trainer, folders, phase: str, settings: dict, base: str | None,
                    alignment_levels: list | None = None) -> None:
    """Records the run's training setup in `aligngpt_card_info.json` of each output folder, after the base
    checkpoint's own entries (phase 1's, for a phase-2 run), so that `aligngpt push` can put both in the card;
    and, for phase 1, the pairs per alignment level of its data ([`level_statistics`])."""
    from .hub import load_card_info, save_card_info

    info = {}
    if base and os.path.isdir(base):
        info = load_card_info(base)
    if alignment_levels:
        info["alignment_levels"] = alignment_levels
    args = trainer.args
    info["training"] = {
        **info.get("training", {}),
        phase: {
            **settings,
            "optimizer steps": trainer.state.global_step,
            "learning rate": args.learning_rate,
            "batch size per device": args.per_device_train_batch_size,
            "processes": args.world_size,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        },
    }
    for folder in folders:
        if os.path.isdir(folder):
            save_card_info(folder, info)
            _write_model_card(folder, trainer.model.config, info)


def _write_model_card(folder: str, config, info: dict) -> None:
    """The package's model card as the folder's README.md, in place of what the trainer may have written there (TRL
    writes a generic text-generation card: "fine-tuned version of None", a text pipeline), so that a folder uploaded
    by other means than `aligngpt push` (which renders the card anew) still describes an AlignGPT model."""
    from .hub import build_model_card

    name = os.path.basename(os.path.abspath(folder))
    build_model_card(config, repo_id=name, **info).save(os.path.join(folder, "README.md"))


def print_run_summary(trainer) -> None:
    """The last line of `aligngpt pretrain|sft` (one JSON object: processes and optimizer steps), read by scripts."""
    print(json.dumps({"world_size": trainer.args.world_size, "global_step": trainer.state.global_step}))


def run_pretrain(args: argparse.Namespace):
    """Phase 1 with the parsed flags: trains, saves the checkpoint and the artefact to `args.output`; the trainer."""
    check_pretrain_args(args)
    import torch

    from .training import AlignGPTPretrainer, AlignGPTPretrainingArguments

    # the arguments come first: under DeepSpeed they set up the distributed state the model loading reads
    training_args = AlignGPTPretrainingArguments(
        output_dir=args.output,
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
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
    )
    model, processor = build_pretrain_model_and_processor(args)
    dataset = build_pretrain_dataset(args)
    try:
        trainer = AlignGPTPretrainer(model=model, args=training_args, train_dataset=dataset, processing_class=processor)
    except ValueError as error:  # data that does not fit the model (no levels, levels out of range), before training
        raise CommandError(str(error)) from error
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        from datasets import Dataset

        from .alignment_levels import level_statistics

        # (the built-in demo pairs' levels are their caption quality, not CLIP buckets: no table for them)
        levels = None
        if args.data and isinstance(dataset, Dataset):
            levels = level_statistics(dataset, model.config.num_alignment_levels)
        write_card_info(trainer, [args.output], "phase 1 (pre-training)",
                        {"trained": "projector, alignment embeddings", "data": args.data or "built-in demo pairs"},
                        args.model, alignment_levels=levels)
        print(f"phase-1 checkpoint and mm_projector_align.safetensors saved to {args.output}")
        print_run_summary(trainer)
    return trainer


def pretrain_main(argv: Sequence[str] | None = None, prog: str | None = None):
    """`examples/pretrain.py`: parses `argv`, runs phase 1 and returns the trainer (bad flags: usage + exit 2)."""
    return _main(pretrain_parser(prog), run_pretrain, argv)


def add_pretrain_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers `aligngpt pretrain`."""
    return _add_subparser(subparsers, "pretrain", PRETRAIN_HELP, PRETRAIN_DESCRIPTION, PRETRAIN_EPILOG,
                          add_pretrain_arguments, run_pretrain)


# ---------------------------------------------------------------------------------------------- phase 2
SFT_HELP = "phase 2: instruction tuning (projector, gate and LLM; full, LoRA or QLoRA) with TRL"
SFT_DESCRIPTION = (
    "Phase 2 of AlignGPT (TRL's SFTTrainer via make_sft_trainer): trains the projector, the alignment gate and the "
    "LLM on conversations about images (text-only rows mixed in), with the loss on the assistant's answers. The "
    "vision tower and the alignment embeddings learnt in phase 1 stay frozen; the gate learns to weigh the "
    "alignment levels for each instruction. --use-peft trains LoRA on the LLM (the gate and the projector fully); "
    "--load-in-4bit adds QLoRA (the LLM in 4-bit NF4). The output folder holds the model and processor (with "
    "--use-peft: the adapter, and with --merge a merged model in <output>/merged).\n\n"
    "Start from a phase-1 checkpoint (--model, the output of `aligngpt pretrain`), or build a new AlignGPT from "
    "--language-model and --vision-tower and load the phase-1 artefact with --pretrain-artifact. Without model flags "
    "a tiny random model is built, without --data the built-in synthetic conversations are used (nothing is "
    "downloaded). --data is a LLaVA-layout JSON (e.g. llava_v1_5_mix665k.json) or a save_to_disk folder with "
    "`images` and `messages` columns. --gate-text-scope conversation reproduces the original's gate input in training "
    "(answers included); prompt (the config's default) averages the prompt only, as at inference."
)
SFT_EPILOG = """examples:
  offline, tiny model and built-in data (seconds on a CPU), full or QLoRA:
    aligngpt sft --max-steps 20 --output runs/sft-tiny
    aligngpt sft --use-peft --load-in-4bit --max-steps 20 --output runs/sft-tiny-qlora
    aligngpt sft --model runs/pretrain-tiny --output runs/sft-tiny          # after `aligngpt pretrain`

  the paper's phase 2 (LLaVA-1.5 665K mix, 8 GPUs with ZeRO-3), from Vicuna + CLIP and the phase-1 artefact:
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml -m transformers_aligngpt sft \\
        --language-model lmsys/vicuna-7b-v1.5 --vision-tower openai/clip-vit-large-patch14-336 \\
        --pretrain-artifact runs/aligngpt-7b-pretrain/mm_projector_align.safetensors \\
        --data llava_v1_5_mix665k.json --image-folder data \\
        --per-device-train-batch-size 16 --learning-rate 2e-5 --num-train-epochs 1 --bf16 --output runs/aligngpt-7b

  QLoRA on one GPU from a phase-1 checkpoint:
    aligngpt sft --model runs/aligngpt-7b-pretrain --use-peft --load-in-4bit \\
        --data llava_v1_5_mix665k.json --image-folder data --bf16 --output runs/aligngpt-7b-qlora
"""


def add_sft_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    model = _add_model_arguments(
        parser,
        model_help="an AlignGPT checkpoint (folder or Hub id), e.g. the output of `aligngpt pretrain`",
        levels_help="number of alignment levels of a model built from --language-model / --vision-tower (default: "
        "the --pretrain-artifact's, else 8)",
    )
    model.add_argument("--pretrain-artifact", "--pretrain-artefact", dest="pretrain_artifact", metavar="PATH",
                       help="phase-1 artefact to load: mm_projector_align.safetensors (or the original's .bin), or a "
                       "folder holding it")
    model.add_argument("--gate-text-scope", choices=["prompt", "conversation"], default=None,
                       help="what the gate reads in training (default: the model config's, prompt)")
    peft = parser.add_argument_group("LoRA / QLoRA")
    peft.add_argument("--use-peft", action="store_true", help="LoRA on the LLM, gate and projector trained fully")
    peft.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the LLM in 4-bit NF4 (needs --use-peft)")
    peft.add_argument("--lora-r", metavar="R", type=_positive_int, default=128, help="(128)")
    peft.add_argument("--lora-alpha", metavar="ALPHA", type=_positive_int, default=256, help="(256)")
    peft.add_argument("--lora-dropout", metavar="P", type=float, default=0.05, help="(0.05)")
    peft.add_argument("--merge", action="store_true", help="also save the adapter merged into the model (<output>/merged)")
    _add_data_arguments(parser, "data (default: built-in synthetic conversations)",
                        "LLaVA-layout JSON (e.g. llava_v1_5_mix665k.json) or a save_to_disk folder")
    train = _add_training_arguments(parser, "runs/aligngpt-sft")
    train.add_argument("--learning-rate", metavar="LR", type=_positive_float, default=None,
                       help="(2e-4 with --use-peft, else 2e-5)")
    train.add_argument("--bf16", action="store_true", help="bf16 (GPUs; QLoRA always computes in bf16)")
    train.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    train.add_argument("--optim", metavar="NAME", default=None, help="optimizer (paged_adamw_8bit with QLoRA on a GPU, else adamw_torch)")
    return parser


def sft_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return _parser(prog, SFT_DESCRIPTION, SFT_EPILOG, add_sft_arguments)


def check_sft_args(args: argparse.Namespace) -> None:
    """Raises `CommandError` for flags that cannot work, before anything is loaded."""
    _check_model_flags(args)
    _check_data_flags(args)
    _check_resume_flag(args)
    if args.load_in_4bit and not args.use_peft:
        raise CommandError("--load-in-4bit trains an adapter: add --use-peft")
    if args.load_in_4bit and args.language_model:
        raise CommandError(
            "--load-in-4bit loads a saved AlignGPT checkpoint: run `aligngpt pretrain` first (its output is a full "
            "checkpoint) and pass it with --model"
        )
    if args.merge and not args.use_peft:
        raise CommandError("--merge merges a LoRA adapter: add --use-peft (without it the model is saved whole)")
    if args.pretrain_artifact and not os.path.exists(args.pretrain_artifact):
        raise CommandError(f"--pretrain-artifact {args.pretrain_artifact}: no such file or folder")


def artifact_levels(path) -> int | None:
    """Number of alignment levels stored in a phase-1 artefact (ours or the original's), or None without one."""
    if path is None:
        return None
    from .training import ORIGINAL_PRETRAINING_ARTIFACT_NAME, PRETRAINING_ARTIFACT_NAME

    if os.path.isdir(path):
        ours = os.path.join(path, PRETRAINING_ARTIFACT_NAME)
        path = ours if os.path.exists(ours) else os.path.join(path, ORIGINAL_PRETRAINING_ARTIFACT_NAME)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return f.get_slice("model.alignment_embeddings.weight").get_shape()[0]
    import torch

    state = torch.load(path, weights_only=True)
    for key in ("align_indicators.indicator_embs", "model.align_indicators.indicator_embs",
                "model.alignment_embeddings.weight"):
        if key in state:
            return state[key].shape[0]
    raise CommandError(f"--pretrain-artifact {path}: no alignment embeddings in it (not a phase-1 artefact)")


def build_sft_model_and_processor(args: argparse.Namespace):
    """(model, processor) for phase 2: a checkpoint (4-bit with --load-in-4bit), a new AlignGPT, or the tiny model,
    with the phase-1 artefact loaded when given."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .training import (
        build_aligngpt_from_pretrained,
        load_for_qlora,
        load_pretraining_artifact,
    )

    dtype = _dtype(args.bf16 or args.load_in_4bit)
    path = args.model
    if path is not None and os.path.isdir(path):
        # an adapter records the path its model was loaded from as its base: not cwd-relative
        path = os.path.abspath(path)
    model = None
    if args.language_model:
        levels = args.num_levels or artifact_levels(args.pretrain_artifact) or 8
        with loading("--language-model / --vision-tower", f"{args.language_model} / {args.vision_tower}"):
            model, processor = build_aligngpt_from_pretrained(
                args.language_model, args.vision_tower, num_alignment_levels=levels, dtype=dtype
            )
    elif path is None:
        from .demo import demo_corpus
        from .tiny import build_tiny_model

        levels = args.num_levels or artifact_levels(args.pretrain_artifact)  # the artefact's, as for a new model
        levels = {"num_alignment_levels": levels} if levels else {}
        model, processor = build_tiny_model(texts=demo_corpus(), seed=args.seed, **levels)
    else:
        with loading("--model", path):
            processor = AutoProcessor.from_pretrained(path)
    # An adapter holds what it trains only (LoRA, gate, projector); its base is whatever `base_model_name_or_path`
    # names. A base built here (new, tiny) or changed here (the artefact's alignment embeddings, frozen in phase 2)
    # is therefore saved in the run folder first, and the adapter points there (4-bit: quantised while loading it).
    materialize = args.use_peft and (model is not None or args.pretrain_artifact)
    # a full-precision model is needed unless a 4-bit one is loaded from `path` as it is
    if model is None and (args.pretrain_artifact or not args.load_in_4bit):
        with loading("--model", path):
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if args.pretrain_artifact:
        try:
            load_pretraining_artifact(model, args.pretrain_artifact)
        except (ValueError, FileNotFoundError) as error:
            raise CommandError(f"--pretrain-artifact: {error}") from error
    if materialize:
        path = _save_peft_base(model, processor, args.output)
        model.name_or_path = path
    if args.load_in_4bit:
        model = None  # (the full-precision copy, if any, goes before the 4-bit one loads)
        with loading("--model", path):
            model = load_for_qlora(path, compute_dtype=torch.bfloat16)
    return model, processor


def _save_peft_base(model, processor, output: str) -> str:
    """Saves the model an adapter will be trained on to `<output>/base-model` (the main process writes, the others
    wait) and returns that folder."""
    from accelerate import PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # ZeRO-3 has already partitioned the weights: a save here would be empty
        raise CommandError(
            "--use-peft on a new or tiny model, or with --pretrain-artifact, needs the base model saved first, which "
            "ZeRO-3 cannot do here: build it once (e.g. `aligngpt convert --pretrain-artefact ... --output BASE`) and "
            "pass --model BASE"
        )
    path = os.path.abspath(os.path.join(output, "base-model"))  # the adapter config records it: not cwd-relative
    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(path)
        processor.save_pretrained(path)
    state.wait_for_everyone()
    return path


def build_sft_dataset(args: argparse.Namespace):
    if args.data:
        if os.path.isdir(args.data):
            from datasets import load_from_disk

            return load_from_disk(args.data)
        from .data import load_llava_json

        return load_llava_json(args.data, image_folder=args.image_folder).select_columns(["images", "messages"])
    from .demo import build_instruction_data

    return build_instruction_data(num_rows=args.num_rows, image_size=48).select_columns(["images", "messages"])


def run_sft(args: argparse.Namespace):
    """Phase 2 with the parsed flags: trains and saves to `args.output` (and `<output>/merged`); the trainer."""
    check_sft_args(args)
    import torch
    from trl import SFTConfig

    from .training import aligngpt_lora_config, make_sft_trainer, merge_qlora_adapter

    on_gpu = torch.cuda.is_available()
    learning_rate = args.learning_rate if args.learning_rate is not None else 2e-4 if args.use_peft else 2e-5
    optim = args.optim or ("paged_adamw_8bit" if args.load_in_4bit and on_gpu else "adamw_torch")
    # the arguments come first: under DeepSpeed ZeRO-3 they make from_pretrained shard the weights while loading
    training_args = SFTConfig(
        output_dir=args.output,
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
        activation_checkpointing=not args.no_gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=optim,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
    )
    model, processor = build_sft_model_and_processor(args)
    dataset = build_sft_dataset(args)
    peft_config = (
        aligngpt_lora_config(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout) if args.use_peft else None
    )
    try:
        trainer = make_sft_trainer(model, processor, train_dataset=dataset, args=training_args,
                                   peft_config=peft_config, gate_text_scope=args.gate_text_scope)
    except ValueError as error:  # options or data that cannot work (e.g. --max-length cutting images), before training
        raise CommandError(str(error)) from error
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output)
    if args.merge and trainer.is_world_process_zero():
        base = getattr(model, "name_or_path", None) or args.model  # the adapter's base (see build_sft_model...)
        merged = merge_qlora_adapter(base, args.output) if args.load_in_4bit else trainer.model.merge_and_unload()
        merged.save_pretrained(os.path.join(args.output, "merged"))
        processor.save_pretrained(os.path.join(args.output, "merged"))
    if trainer.is_world_process_zero():
        recipe = "QLoRA (NF4 LLM)" if args.load_in_4bit else "LoRA" if args.use_peft else "full (LLM, gate, projector)"
        settings = {"trained": recipe, "data": args.data or "built-in demo conversations",
                    "gate text scope": model.config.gate_text_scope}
        if args.use_peft:
            settings["LoRA rank"] = args.lora_r
        write_card_info(trainer, [args.output, os.path.join(args.output, "merged")], "phase 2 (instruction tuning)",
                        settings, args.model)
        print(f"phase-2 {'adapter' if args.use_peft else 'model'} saved to {args.output}")
        print_run_summary(trainer)
    return trainer


def sft_main(argv: Sequence[str] | None = None, prog: str | None = None):
    """`examples/sft.py`: parses `argv`, runs phase 2 and returns the trainer (bad flags: usage + exit 2)."""
    return _main(sft_parser(prog), run_sft, argv)


def add_sft_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers `aligngpt sft`."""
    return _add_subparser(subparsers, "sft", SFT_HELP, SFT_DESCRIPTION, SFT_EPILOG, add_sft_arguments, run_sft)


__all__ = [
    "add_pretrain_arguments",
    "add_pretrain_subparser",
    "add_sft_arguments",
    "add_sft_subparser",
    "artifact_levels",
    "check_pretrain_args",
    "check_sft_args",
    "pretrain_main",
    "pretrain_parser",
    "run_pretrain",
    "run_sft",
    "sft_main",
    "sft_parser",
]
