"""Phase 2 of AlignGPT: instruction tuning with TRL's `SFTTrainer` (full, LoRA or QLoRA).

A script form of `aligngpt sft` (same flags; `python examples/sft.py --help` lists them), for `accelerate launch` and
for reading: the recipe itself is `transformers_aligngpt.recipes.run_sft`.

Offline, tiny random model and built-in synthetic conversations (text-only rows mixed in; nothing is downloaded):

    python examples/sft.py --output runs/sft-tiny --max-steps 20
    python examples/sft.py --use-peft --load-in-4bit --output runs/sft-tiny-qlora --max-steps 20
    python examples/sft.py --model runs/pretrain-tiny --output runs/sft-tiny   # after pretrain.py

The paper's phase 2 (LLaVA-1.5 665K mix, 8 GPUs, ZeRO-3), starting from Vicuna + CLIP and the phase-1 artefact:

    accelerate launch --config_file examples/accelerate_configs/zero3.yaml examples/sft.py \
        --language-model lmsys/vicuna-7b-v1.5 --vision-tower openai/clip-vit-large-patch14-336 \
        --pretrain-artifact runs/aligngpt-7b-pretrain/mm_projector_align.safetensors \
        --data llava_v1_5_mix665k.json --image-folder data \
        --per-device-train-batch-size 16 --learning-rate 2e-5 --num-train-epochs 1 --bf16 \
        --output runs/aligngpt-7b

QLoRA on one GPU, from a phase-1 checkpoint (a full checkpoint written by pretrain.py):

    python examples/sft.py --model runs/aligngpt-7b-pretrain --use-peft --load-in-4bit \
        --data llava_v1_5_mix665k.json --image-folder data --bf16 --output runs/aligngpt-7b-qlora

`--gate-text-scope conversation` reproduces the original's gate input in training (answers included);
`prompt` (the default of the config) averages the prompt only, as at inference. The older flag names
(`--output-dir`, `--text-model`, `--vision-model`, `--model-name-or-path`, `--num-alignment-levels`) still work.
An interrupted run continues from its last checkpoint with the same flags plus `--resume-from-checkpoint last`.
"""

import sys

from transformers_aligngpt.recipes import sft_main


def main(argv=None):
    """Parses `argv` (default: the command line), runs phase 2 and returns the trainer."""
    return sft_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
