"""Batch-32 prefill at prompt lengths around a multiple of 64: what one more position costs, and in which kernels.

AlignGPT's prompt is LLaVA's plus one `<align>` token. At batch 32 (left-padded) a 7B prefill is GPU-bound, so the
gate's few small kernels cannot show there, but the extra position can cost more than 1/L: attention and matmul
kernels work in whole tiles of queries and keys (64 or 128 wide), and a length that crosses a multiple of the tile
adds a row and a column of tiles. bench_model.py's default prompts are 640 = 10 x 64 tokens for LLaVA and 641 for
AlignGPT, right on such a boundary.

For each `--question-max` Q (LLaVA's longest prompt is 611 + Q tokens, AlignGPT's 612 + Q; the batch is
bench_model.py's generation batch) three prefills, interleaved (`generate(max_new_tokens=1)`, as bench_model.py
times them):
    aligngpt         AlignGPT at its length
    llava            LLaVA, one token shorter
    llava_same_len   LLaVA at AlignGPT's length (a text token in the `<align>` slot)
aligngpt / llava_same_len is the gate and the merge at this batch size; llava_same_len / llava is one more position.
With `--profile` (on by default on CUDA) one profiled prefill of each: device time by kernel group (attention,
matmul, other), so a difference between lengths reads as where the time goes.

GPU (7B shapes, bf16, SDPA; ~2 minutes on an H200):
    python benchmarks/bench_prefill_length.py --device cuda --out outputs/prefill_length.jsonl
CPU smoke run (tiny widths, batch 4, the real 576-token image grid; ~30 s):
    python benchmarks/bench_prefill_length.py --quick
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build_models, generate_kwargs, generation_inputs
from common import Recorder, compare, machine_info, ratios, self_times, synchronize

NAMES = ("aligngpt", "llava", "llava_same_len")
# substrings of kernel names (CUDA) or aten op names (CPU), checked in this order
GROUPS = {
    # (cuDNN's SDPA kernels on an H100: cudnn_generated_fort_native_sdpa_sm90_flash_fprop_..., PyTorch's own:
    # fmha_cutlassF_... (memory-efficient) or flash_fwd_...)
    "attention": ("sdpa", "fmha", "flash", "attention", "scaled_dot_product"),
    "matmul": ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm"),
}


def kernel_group(name: str) -> str:
    lower = name.lower()
    for group, needles in GROUPS.items():
        if any(needle in lower for needle in needles):
            return group
    return "other"


def profile_groups(fn, device: str, calls: int) -> dict:
    """Self time (ms per call) and count of `calls` calls' device kernels (CUDA) or aten ops (CPU), by `GROUPS`;
    the heaviest eight, and the attention ones."""
    from torch.profiler import ProfilerActivity, profile

    # (GPU: kernels only, as bench_qlora.py; the CPU-side events of a 7B forward are many and slow to aggregate)
    activities = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    totals = dict.fromkeys((*GROUPS, "other"), 0.0)
    counts = dict.fromkeys(totals, 0)
    times = self_times(prof, device)
    for name, (us, count) in times.items():
        group = kernel_group(name)
        totals[group] += us / 1000 / calls
        counts[group] += count // calls
    top = sorted(((us / 1000 / calls, name[:120], count // calls) for name, (us, count) in times.items()), reverse=True)
    # the attention kernels by name: which SDPA backend ran (cuDNN, memory-efficient or flash) and its tile shape
    attention = [[round(ms, 3), name, n] for ms, name, n in top if kernel_group(name) == "attention"]
    return {"ms": totals, "count": counts, "top": [[round(ms, 3), name, n] for ms, name, n in top[:8]],
            "attention": attention[:4]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", choices=["7b", "small", "tiny"], default=None,
                   help="7b on CUDA, small on CPU, tiny with --quick")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="bfloat16 on CUDA, else float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch", type=int, default=None, help="32 (--quick: 4)")
    p.add_argument("--question-max", default="28,29,30",
                   help="comma list; LLaVA's longest prompt is 611 + Q tokens (639, 640, 641), AlignGPT's one more")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed prefills of each (8; --quick: 3)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="one profiled prefill of each model and length (default: on CUDA)")
    p.add_argument("--profile-calls", type=int, default=3, help="prefills per profile (times are per call)")
    p.add_argument("--quick", action="store_true", help="tiny widths, batch 4, two lengths, 3 repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shapes = args.shapes or ("tiny" if args.quick else "7b" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (4 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 8)
    args.profile = cuda if args.profile is None else args.profile
    spec = "28,29" if args.quick and args.question_max == "28,29,30" else args.question_max
    try:
        questions = [int(q) for q in spec.split(",") if q.strip()]
    except ValueError:
        questions = []
    if not questions or min(questions) < 1:
        p.error(f"--question-max takes positive question lengths separated by commas, e.g. 28,29,30; got {spec!r}")
    # what bench_model's builders and batch makers read
    args.layers = args.vision_layers = args.image_size = None
    args.new_tokens = 1
    if not cuda:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    info = machine_info(args.device)
    rec = Recorder(args.out, shapes=args.shapes, device=info.get("gpu", info["cpu"]), dtype=args.dtype,
                   attn=args.attn, batch=args.batch)
    rec.emit(case="machine", command=" ".join(["python", "benchmarks/bench_prefill_length.py", *(argv or sys.argv[1:])]),
             **info)
    start = time.monotonic()
    llava, aligngpt = build_models(args, dtype)
    models = {"aligngpt": aligngpt, "llava": llava, "llava_same_len": llava}
    image_size = aligngpt.config.vision_config.image_size
    num_image_tokens = aligngpt.config.num_image_tokens
    records = []
    for question_max in questions:
        args.question_max = question_max
        batches, _ = generation_inputs(args, dtype, image_size, num_image_tokens, args.batch, same_len=True)
        kwargs = generate_kwargs(args, "default", 1, 0)

        def prefill(name, batches=batches, kwargs=kwargs):
            return lambda: models[name].generate(**batches[name], **kwargs)

        with torch.no_grad():
            timed = compare({name: prefill(name) for name in NAMES}, args.device, warmup=1, repeats=args.repeats)
            groups = {name: profile_groups(prefill(name), args.device, args.profile_calls) for name in NAMES} if args.profile else {}
        lengths = {name: batches[name]["input_ids"].shape[1] for name in NAMES}
        for name in NAMES:
            record = dict(case="prefill_length", model=name, question_max=question_max, prompt_len=lengths[name],
                          prompt_len_mod_64=lengths[name] % 64, seconds=timed[name]["median"],
                          times=timed[name]["times"])
            if name in groups:
                record.update({f"{group}_ms": ms for group, ms in groups[name]["ms"].items()},
                              kernel_counts=groups[name]["count"], top_kernels=groups[name]["top"],
                              attention_kernels=groups[name]["attention"])
            records.append(rec.emit(**record))
        summary = dict(case="prefill_length_ratios", question_max=question_max, llava_len=lengths["llava"],
                       aligngpt_len=lengths["aligngpt"],
                       aligngpt_over_llava=ratios(timed, "aligngpt", "llava")["ratio_paired"],
                       aligngpt_over_same_len=ratios(timed, "aligngpt", "llava_same_len")["ratio_paired"],
                       same_len_over_llava=ratios(timed, "llava_same_len", "llava")["ratio_paired"],
                       linear_share=1 / lengths["llava"])
        if groups:
            # one more position, by kernel group: LLaVA at AlignGPT's length minus LLaVA (ms of device time)
            summary["extra_position_ms"] = {group: groups["llava_same_len"]["ms"][group] - groups["llava"]["ms"][group]
                                            for group in groups["llava"]["ms"]}
        records.append(rec.emit(**summary))
    rec.emit(case="done", total_seconds=time.monotonic() - start,
             peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    return records


if __name__ == "__main__":
    main()
