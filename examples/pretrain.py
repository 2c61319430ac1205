"""Phase 1 of AlignGPT: pre-train the projector and the alignment embeddings (`AlignGPTPretrainer`).

A script form of `aligngpt pretrain` (same flags; `python examples/pretrain.py --help` lists them), for
`accelerate launch` and for reading: the recipe itself is `transformers_aligngpt.recipes.run_pretrain`.

Offline, tiny random model and built-in synthetic data (nothing is downloaded):

    python examples/pretrain.py --output runs/pretrain-tiny --max-steps 20
    accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml examples/pretrain.py \
        --output runs/pretrain-ddp --max-steps 2     # two processes on the CPU (gloo)

The paper's phase 1 (Vicuna-7B-v1.5 + CLIP ViT-L/14-336, 558K captions with alignment levels, 8 GPUs, ZeRO-2):

    accelerate launch --config_file examples/accelerate_configs/zero2.yaml examples/pretrain.py \
        --language-model lmsys/vicuna-7b-v1.5 --vision-tower openai/clip-vit-large-patch14-336 \
        --data blip_laion_cc_sbu_558k_aligngpt.json --image-folder data/LLaVA-Pretrain/images \
        --per-device-train-batch-size 32 --learning-rate 1e-3 --num-train-epochs 1 --bf16 \
        --output runs/aligngpt-7b-pretrain

The data is a LLaVA-layout JSON whose records carry `similarity` (the alignment level: `aligngpt levels` computes it
from CLIP scores), or a dataset saved with `save_to_disk` with `images`, `caption` and `alignment_level` columns. The
output folder holds a normal checkpoint plus `mm_projector_align.safetensors` (projector + alignment embeddings),
which `examples/sft.py --pretrain-artifact` reads. The older flag names (`--output-dir`, `--text-model`,
`--vision-model`, `--model-name-or-path`, `--num-alignment-levels`) still work.
An interrupted run continues from its last checkpoint with the same flags plus `--resume-from-checkpoint last`.
"""

import sys

from transformers_aligngpt.recipes import pretrain_main


def main(argv=None):
    """Parses `argv` (default: the command line), runs phase 1 and returns the trainer."""
    return pretrain_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
