"""QLoRA instruction tuning at the real 7B shapes: AlignGPT next to transformers' LLaVA, in the same run.

Both models are Vicuna-7B + CLIP ViT-L/14-336 shapes built from configs with random weights (nothing is downloaded),
directly on the GPU in bf16, then their LLM linear layers are replaced by bitsandbytes NF4 `Linear4bit` (double
quantisation, bf16 compute) one by one, so fp32 7B weights never exist and no checkpoint is written. Training is TRL's
`SFTTrainer` (fused chunked LM-head loss), PEFT LoRA r=64 on the LLM projections (projector, and AlignGPT's gate, in
`modules_to_save`), activation checkpointing, paged 8-bit AdamW, batch 1, sequence 2048 (576 image tokens).

Recipes (how the non-quantised rest of the model is prepared):
- `kbit`: the usual PEFT recipe, `prepare_model_for_kbit_training`, which upcasts every non-quantised module (the
  frozen vision tower, embeddings, `lm_head`, norms) to fp32;
- `lean`: what `transformers_aligngpt.training` does: nothing is upcast, the frozen vision tower stays in bf16;
- `lean_offload`: `lean` plus TRL's `activation_offloading` (the checkpointed layer inputs wait in pinned CPU memory;
  GPU only).

Rows (`--runs`, default `llava:kbit,aligngpt:lean,aligngpt:lean_offload,llava:lean` on the GPU, in that order of
importance): each prints one JSON line as soon as it is measured, with the peak allocated /
reserved GiB over the training steps (`torch.cuda.max_memory_*`; bitsandbytes' paged optimizer states live in CUDA
managed memory outside PyTorch's allocator), tokens/s over the measured steps (after `--warmup` steps), and sizes.

    python benchmarks/bench_qlora.py                      # GPU: the 7B comparison (about 2-3 minutes on an H100)
    python benchmarks/bench_qlora.py --quick              # CPU smoke run on tiny shapes (< 1 minute)
    python benchmarks/bench_qlora.py --plan               # CPU: weight / adapter / optimizer sizes of the 7B shapes
    python benchmarks/bench_qlora.py --paired 6 --steps 10 --warmup 2   # GPU: throughput ratio, paired rounds
    python benchmarks/bench_qlora.py --paired 2 --paired-first llava --profile-step   # ... and where a gap goes

Throughput across separate runs drifts (the same configuration gave 3359 and 2901 tokens/s on one H200), so the
tokens/s comparison has `--paired`: both models resident in one process, trained in alternating blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import self_times

from transformers_aligngpt.training import LLM_LORA_TARGET_MODULES as LORA_TARGETS
from transformers_aligngpt.training import NOT_QUANTIZED_MODULES as ALIGNGPT_SKIP

LLAVA_SKIP = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
RECIPES = ("kbit", "lean", "lean_offload")
VOCAB = 32064  # llava-hf/llava-1.5-7b-hf; both models get the same vocabulary
IMAGE_TOKEN_ID, ALIGN_TOKEN_ID = 32000, 32001
QUICK_VOCAB, QUICK_IMAGE_TOKEN_ID, QUICK_ALIGN_TOKEN_ID = 512, 500, 501


def token_ids(quick: bool) -> tuple[int, int, int]:
    """(vocabulary size, `<image>` id, `<align>` id)."""
    if quick:
        return QUICK_VOCAB, QUICK_IMAGE_TOKEN_ID, QUICK_ALIGN_TOKEN_ID
    return VOCAB, IMAGE_TOKEN_ID, ALIGN_TOKEN_ID


# ------------------------------------------------------------------------------------------------------------ configs
def text_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=QUICK_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    # lmsys/vicuna-7b-v1.5
    return LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def vision_config(quick: bool):
    from transformers import CLIPVisionConfig

    if quick:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14, projection_dim=32)
    # openai/clip-vit-large-patch14-336
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def build_config(kind: str, quick: bool):
    if kind == "llava":
        from transformers import LlavaConfig

        grid = vision_config(quick).image_size // vision_config(quick).patch_size
        return LlavaConfig(vision_config=vision_config(quick), text_config=text_config(quick),
                           image_token_id=token_ids(quick)[1], projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=grid * grid)
    from transformers_aligngpt import AlignGPTConfig

    return AlignGPTConfig(vision_config=vision_config(quick), text_config=text_config(quick),
                          image_token_id=token_ids(quick)[1], alignment_token_id=token_ids(quick)[2],
                          gate_text_scope="prompt")


def model_class(kind: str):
    if kind == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    from transformers_aligngpt import AlignGPTForConditionalGeneration

    return AlignGPTForConditionalGeneration


def num_image_tokens(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


# ------------------------------------------------------------------------------------------------------ quantisation
def _skipped(name: str, skip) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@torch.no_grad()
def quantize_linear_layers_(model: nn.Module, skip, compute_dtype=torch.bfloat16) -> int:
    """Replaces every `nn.Linear` outside `skip` by an NF4 `Linear4bit` (double quantisation), in place, layer by
    layer (the bf16 weight is freed as soon as its 4-bit copy exists). Returns the number of layers replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or _skipped(full, skip):
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=layer).to(device)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            replaced += 1
    # what `from_pretrained(quantization_config=...)` records, read by PEFT, TRL and Trainer
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    return replaced


def build_quantized(kind: str, quick: bool, device: torch.device):
    config = build_config(kind, quick)
    cls = model_class(kind)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16)
    replaced = quantize_linear_layers_(model, LLAVA_SKIP if kind == "llava" else ALIGNGPT_SKIP)
    return model, replaced


# -------------------------------------------------------------------------------------------------------------- data
class SyntheticConversations:
    """Batches of one 2048-token conversation: [bos, (<align>), text, 576 image tokens, text]; the second half of the
    text after the image is supervised (the answers); AlignGPT also gets its prompt-only `gate_text_mask`."""

    def __init__(self, kind: str, config, seq_len: int, quick: bool, seed: int = 0):
        self.kind, self.seq_len = kind, seq_len
        self.vocab, self.image_token_id, self.align_token_id = token_ids(quick)
        self.num_image_tokens = num_image_tokens(config)
        self.image_size = config.vision_config.image_size
        self.generator = torch.Generator().manual_seed(seed)
        if seq_len < self.num_image_tokens + 64:
            raise ValueError(f"--seq-len must leave room for the {self.num_image_tokens} image tokens and text")

    def __call__(self, examples):
        rows = []
        for _ in examples:
            text = torch.randint(3, self.image_token_id, (self.seq_len,), generator=self.generator)
            prefix = [1] + ([self.align_token_id] if self.kind == "aligngpt" else [])
            start = len(prefix) + 34
            ids = torch.cat([torch.tensor(prefix), text[: start - len(prefix)],
                             torch.full((self.num_image_tokens,), self.image_token_id),
                             text[start + self.num_image_tokens:]])[: self.seq_len]
            labels = torch.full_like(ids, -100)
            after = start + self.num_image_tokens
            answers = after + (self.seq_len - after) // 2
            labels[answers:] = ids[answers:]
            rows.append((ids, labels))
        input_ids = torch.stack([r[0] for r in rows])
        labels = torch.stack([r[1] for r in rows])
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "pixel_values": torch.randn(len(rows), 3, self.image_size, self.image_size, generator=self.generator),
        }
        if self.kind == "aligngpt":
            batch["gate_text_mask"] = labels == -100
        return batch


# -------------------------------------------------------------------------------------------------------- measuring
class StepTimer:
    """A `TrainerCallback` timing the optimizer steps after the warmup ones (with a device synchronise)."""

    def __init__(self, warmup: int, device: torch.device):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer._sync()
                if outer.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == outer.warmup:
                    outer._sync()
                    outer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                outer._sync()
                outer.end = time.perf_counter()
                outer.steps = state.global_step - outer.warmup

        self.warmup, self.device = warmup, device
        self.start = self.end = None
        self.steps = 0
        self.callback = _Callback()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def build_trainer(kind: str, recipe: str, args, device: torch.device):
    """(SFTTrainer, StepTimer, facts about the build) for one model:recipe; `trainer.train()` runs
    `args.warmup + args.steps` steps and the timer times the last `args.steps`."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from transformers_aligngpt.tiny import build_tiny_tokenizer

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, replaced = build_quantized(kind, args.quick, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    if recipe == "kbit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:  # lean: frozen modules keep their bf16 weights, the vision tower never keeps activations
        model.requires_grad_(False)
    weights_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else None

    # the package's own LoRA recipe: every linear layer of the LLM (on a Llama the seven projections of LLaVA's
    # LORA_TARGETS), gate + projector fully trained
    if kind == "aligngpt":
        from transformers_aligngpt.training import aligngpt_lora_config

        lora = aligngpt_lora_config(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    else:
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"],
                          task_type="CAUSAL_LM", bias="none")
    collator = SyntheticConversations(kind, model.config, args.seq_len, args.quick)
    from datasets import Dataset

    steps = args.warmup + args.steps
    dataset = Dataset.from_dict({"input_ids": [[0]] * steps, "labels": [[0]] * steps})
    optim = args.optim or ("paged_adamw_8bit" if device.type == "cuda" else "adamw_torch")
    config = SFTConfig(
        output_dir=os.path.join(args.output_dir, f"{kind}-{recipe}"),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=2e-4,
        optim=optim,
        bf16=True,
        use_cpu=device.type != "cuda",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        activation_offloading=recipe == "lean_offload",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    timer = StepTimer(args.warmup, device)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, data_collator=collator,
                         processing_class=build_tiny_tokenizer(), peft_config=lora, callbacks=[timer.callback])
    facts = {
        "build_s": build_s, "weights_bytes": weights_bytes, "replaced": replaced, "optim": optim,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad),
        "fp32_frozen": sum(
            p.numel() for p in trainer.model.parameters() if not p.requires_grad and p.dtype == torch.float32
        ),
    }
    return trainer, timer, facts


def timed_tokens_per_s(timer: StepTimer, seq_len: int) -> float | None:
    elapsed = (timer.end - timer.start) if timer.start is not None else float("nan")
    return seq_len * timer.steps / elapsed if timer.steps else None


def run(kind: str, recipe: str, args, device: torch.device) -> dict:
    trainer, timer, facts = build_trainer(kind, recipe, args, device)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    elapsed = (timer.end - timer.start) if timer.start is not None else float("nan")
    row = {
        "model": kind,
        "recipe": recipe,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "quick": args.quick,
        "seq_len": args.seq_len,
        "batch_size": 1,
        "lora_r": args.lora_r,
        "optim": facts["optim"],
        "measured_steps": timer.steps,
        "tokens_per_s": round(timed_tokens_per_s(timer, args.seq_len), 1) if timer.steps else None,
        "s_per_step": round(elapsed / timer.steps, 4) if timer.steps else None,
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if device.type == "cuda" else None,
        "weights_allocated_gib": gib(facts["weights_bytes"]) if facts["weights_bytes"] is not None else None,
        "trainable_params": facts["trainable"],
        "trainable_gib": gib(facts["trainable_bytes"]),
        "frozen_fp32_params": facts["fp32_frozen"],
        "linear4bit_layers": facts["replaced"],
        "build_s": round(facts["build_s"], 1),
        "losses": [round(x, 4) for x in losses],
        "versions": versions(),
    }
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


class StepProfiler:
    """A `TrainerCallback` that records one optimizer step (forward, backward, optimizer) with `torch.profiler`:
    the step after the warm-up ones."""

    def __init__(self, step: int, device: torch.device):
        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        # GPU: kernels only (a 7B QLoRA step also has ~10^5 CPU-side events, slow to aggregate)
        activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        outer, self.device, self.profile, self.seconds = self, device, None, None

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step and outer.profile is None:
                    outer._sync()
                    outer.profile = profile(activities=activities)
                    outer.profile.__enter__()
                    outer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if outer.profile is not None and outer.seconds is None:
                    outer._sync()
                    outer.seconds = time.perf_counter() - outer.start
                    outer.profile.__exit__(None, None, None)

        self.callback = _Callback()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def self_times_us(self) -> dict[str, tuple[float, int]]:
        """{kernel (GPU) or aten op (CPU) name: (self time in us, calls)} of the recorded step."""
        return self_times(self.profile, self.device.type)


def profile_difference(trainers: dict, args, device: torch.device, top: int = 15) -> dict:
    """One profiled step of each model (after `args.warmup` steps): total self time, calls, and the kernels (GPU) or
    aten ops (CPU) whose time differs most between AlignGPT and LLaVA: where a throughput gap goes."""
    times, seconds = {}, {}
    for kind, (trainer, timer) in trainers.items():
        profiler = StepProfiler(args.warmup, device)
        trainer.add_callback(profiler.callback)
        try:
            timer.start = timer.end = None
            trainer.train()
        finally:
            trainer.remove_callback(profiler.callback)
        times[kind], seconds[kind] = profiler.self_times_us(), profiler.seconds
    a, b = times["aligngpt"], times["llava"]
    rows = []
    for name in set(a) | set(b):
        (ta, ca), (tb, cb) = a.get(name, (0.0, 0)), b.get(name, (0.0, 0))
        rows.append((name, ta - tb, ca, cb))
    rows.sort(key=lambda row: -abs(row[1]))
    return {
        "profiled_step_s": {k: round(v, 4) for k, v in seconds.items()},
        "self_time_ms": {k: round(sum(t for t, _ in v.values()) / 1e3, 3) for k, v in times.items()},
        "calls": {k: sum(c for _, c in v.values()) for k, v in times.items()},
        "largest_differences_us": [[name[:120], round(diff, 1), ca, cb] for name, diff, ca, cb in rows[:top]],
    }


def paired(args, device: torch.device, rounds: int) -> dict:
    """AlignGPT lean and LLaVA lean resident in one process, trained in alternating blocks (AB, BA, AB, ...) of
    `warmup + steps` steps each: clock and memory drift hit both models alike, so the per-round ratios are paired.
    `args.paired_first` is built first and trains first in odd rounds. (Peak memory is not measured here: two
    resident models share the allocator; see the isolated runs.)"""
    first = args.paired_first
    order = (first, "llava" if first == "aligngpt" else "aligngpt")
    built = {kind: build_trainer(kind, "lean", args, device)[:2] for kind in order}
    trainers = {kind: built[kind] for kind in ("aligngpt", "llava")}
    rates = {kind: [] for kind in trainers}
    for r in range(rounds):
        for kind in (order if r % 2 == 0 else order[::-1]):
            trainer, timer = trainers[kind]
            timer.start = timer.end = None
            trainer.train()  # weights and optimizer carry over between blocks; each block times its last `steps`
            rates[kind].append(timed_tokens_per_s(timer, args.seq_len))
    ratios = [a / b for a, b in zip(rates["aligngpt"], rates["llava"])]
    return {
        "paired": True, "recipe": "lean", "rounds": rounds, "steps_per_block": args.steps, "warmup": args.warmup,
        "built_first": first,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "seq_len": args.seq_len, "lora_r": args.lora_r,
        "aligngpt_tokens_per_s": [round(x, 1) for x in rates["aligngpt"]],
        "llava_tokens_per_s": [round(x, 1) for x in rates["llava"]],
        "ratios": [round(x, 4) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_of_means": round(sum(rates["aligngpt"]) / sum(rates["llava"]), 4),
        **({"profile": profile_difference(trainers, args, device)} if args.profile_step else {}),
        "versions": versions(),
    }


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


# --------------------------------------------------------------------------------------------------------- the plan
def plan(args) -> list[dict]:
    """Sizes of the 7B shapes under each recipe, from the configs on the `meta` device (no memory used)."""
    rows = []
    for kind in ("llava", "aligngpt"):
        config = build_config(kind, quick=False)
        with torch.device("meta"):
            model = model_class(kind)._from_config(config, dtype=torch.bfloat16)
        skip = LLAVA_SKIP if kind == "llava" else ALIGNGPT_SKIP
        quantized = other = lora = saved = 0
        import re

        for name, module in model.named_modules():
            if type(module) is nn.Linear and not _skipped(name, skip):
                n = module.weight.numel()
                quantized += n
                if re.fullmatch(LORA_TARGETS, name):
                    lora += args.lora_r * (module.in_features + module.out_features)
        quantized_names = {
            f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)
        }
        for name, p in model.named_parameters():
            if name not in quantized_names:
                other += p.numel()
            if name.startswith(("model.multi_modal_projector", "model.alignment_gate")):
                saved += p.numel()
        vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_tower"))
        nf4 = quantized / 2 + quantized / 64 + quantized / 64 / 256 * 4  # 4-bit codes + uint8 absmax + fp32 2nd level
        for recipe in ("kbit", "lean"):
            other_bytes = other * (4 if recipe == "kbit" else 2)
            trainable = lora + saved
            rows.append({
                "plan": True, "model": kind, "recipe": recipe,
                "nf4_params": quantized, "nf4_gib": gib(nf4),
                "unquantized_params": other, "unquantized_gib": gib(other_bytes),
                "vision_tower_params": vision,
                "lora_params": lora, "modules_to_save_params": saved,
                # TRL casts the trainable parameters of a quantised model to bf16; grads have the same dtype
                "trainable_plus_grads_gib": gib(trainable * 2 * 2),
                "paged_adamw_8bit_states_gib": gib(trainable * 2),
                "weights_and_adapter_gib": gib(nf4 + other_bytes + saved * 2 + trainable * 4),
            })
    return rows


def without_option(argv, name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=None,
                        help="comma-separated model:recipe pairs (models: llava, aligngpt; recipes: kbit, lean, "
                             "lean_offload); default llava:kbit,aligngpt:lean,aligngpt:lean_offload,llava:lean "
                             "(--quick: without lean_offload)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--optim", default=None, help="default: paged_adamw_8bit on GPU, adamw_torch on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test, < 1 minute)")
    parser.add_argument("--plan", action="store_true", help="print the 7B size plan (meta device) and exit")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="throughput only: AlignGPT lean and LLaVA lean in one process, ROUNDS alternating "
                             "blocks of warmup + steps each (AB, BA, ...); prints the per-round ratios")
    parser.add_argument("--paired-first", choices=["aligngpt", "llava"], default="aligngpt",
                        help="with --paired: the model built first, and trained first in odd rounds")
    parser.add_argument("--profile-step", action="store_true",
                        help="with --paired: after the rounds, profile one step of each model and print the kernels "
                             "(GPU) or aten ops (CPU) whose time differs most")
    parser.add_argument("--output-dir", default="/tmp/bench_qlora")
    args = parser.parse_args(argv)

    if args.plan:
        rows = plan(args)
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows
    if args.quick:
        args.seq_len = min(args.seq_len, 96)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.lora_r = min(args.lora_r, 8)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            parser.error("the 7B benchmark needs a CUDA GPU; use --quick for a CPU smoke run or --plan for the sizes")
        device = torch.device("cuda")
    if args.profile_step and not args.paired:
        parser.error("--profile-step profiles the --paired trainers: add --paired ROUNDS")
    if args.paired:
        row = paired(args, device, args.paired)
        print(json.dumps(row), flush=True)
        return [row]
    if args.runs is None:
        args.runs = "llava:kbit,aligngpt:lean,llava:lean" if args.quick else (
            "llava:kbit,aligngpt:lean,aligngpt:lean_offload,llava:lean")
    runs = [item.strip().partition(":")[::2] for item in args.runs.split(",")]
    for kind, recipe in runs:
        if kind not in ("llava", "aligngpt") or recipe not in RECIPES:
            parser.error(f"bad --runs item {kind}:{recipe}")
        if recipe == "lean_offload" and device.type != "cuda":
            parser.error("lean_offload (activation offloading) needs a CUDA GPU")
    if len(runs) > 1 and device.type == "cuda":
        # Each run in a fresh process: memory a finished run leaves behind (allocator caches, paged optimizer
        # buffers) was seen to add ~0.3 GiB to the next run's peak and to slow it, which made the order of the runs
        # decide the comparison (H200, 2026-11-26).
        rows = []
        for kind, recipe in runs:
            command = [sys.executable, __file__, *without_option(argv, "--runs"), "--runs", f"{kind}:{recipe}"]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith('{"model"')]
            if result.returncode != 0 or not lines:
                print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
                continue
            print(lines[-1], flush=True)
            rows.append(json.loads(lines[-1]))
        return rows
    rows = []
    for kind, recipe in runs:
        row = run(kind, recipe, args, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
