"""Host cost of AlignGPT's alignment path next to LLaVA's image merge: aten ops and time at tiny widths.

At batch 1 on a GPU, the alignment path (placeholder masks and checks, text mean, affinities, gate, mix, merge) is
a chain of small kernels whose arithmetic is negligible: its cost is one launch per op. This script counts the
non-view aten ops each side dispatches (a `TorchDispatchMode` log) and times both on the CPU with tiny widths (LLM hidden 64, tower hidden 32, 576 image tokens), where the per-op host overhead dominates
as launch overhead does on a GPU. Both sides run on the same tensors of models that share their weights
(`bench_model.build_models`), interleaved; one JSON line per batch size. On the CPU every op is a host op. AlignGPT's
placeholder bookkeeping runs on the CPU even for a GPU model (`AlignGPTModel.placeholders_on_host`: one copy of the
ids over, the masks, checks and gate tokens in NumPy, at most two copies back): its NumPy work is no aten op, so it
shows in the times (`bookkeeping_host_us`) and not in the op counts; `bench_model.py --profile` on a GPU counts the
ops that reach the device.

With `--device cuda` the same tiny models run on a GPU, where tiny widths leave the host's cost per op (Python,
dispatch, launch) as the whole cost: the op counts are then the ops that reach the device, and two more sides time
the ids' trip to the host: two plain copies of ids and attention mask (as the forward makes it), a `stack` of both
and one copy (as it did up to beca395), and the mask's copy without a wait followed by the ids' blocking copy (one
host sync).

    python benchmarks/bench_alignment_path.py [--batches 1,4] [--repeats 300] [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402
from common import OpLog, compare  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device_type = torch.device(args.device).type
    build_args, llava, aligngpt = bm.build_tiny_models(dtype, args.device)
    num_image_tokens = 576
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = (bm.generation_rows(1, num_image_tokens, seed=11, question_max=29) if batch == 1
                else bm.train_rows(batch, num_image_tokens, seed=3))
        inputs = bm.batch_for(build_args, rows, 336, dtype, "left", False, 12, ["aligngpt", "llava"])
        with torch.no_grad():
            features = torch.stack(list(aligngpt.model.get_image_features(
                pixel_values=inputs["aligngpt"]["pixel_values"], return_dict=True).pooler_output)).to(dtype)
            a_ids, a_mask = inputs["aligngpt"]["input_ids"], inputs["aligngpt"]["attention_mask"]
            l_ids = inputs["llava"]["input_ids"]
            inner, embeds = aligngpt.model, aligngpt.model.get_input_embeddings()(a_ids)
            num_images, num_patches = features.shape[:2]
            sides = {
                "aligngpt": lambda: bm.alignment_path(inner, a_ids, a_mask, features),
                "llava": lambda: bm.llava_merge(llava.model, l_ids, features),
                # the placeholder bookkeeping alone, as the eager forward does it (on the host) and as the device
                # path does it (masks, gate tokens, one host copy of the counts and the checks, the cast)
                "bookkeeping_host": lambda: inner.placeholders_on_host(
                    a_ids, a_mask, None, None, num_images, num_patches, True, dtype),
                "bookkeeping_device": lambda: bm.device_bookkeeping(inner, a_ids, embeds, a_mask, num_images,
                                                                    num_patches),
            }
            if device_type != "cpu":  # (on the CPU both are no-ops)
                sides["ids_to_host_stacked"] = lambda: torch.stack([a_ids, a_mask]).cpu()
                sides["ids_to_host_separate"] = lambda: (a_ids.cpu(), a_mask.cpu())
                # the mask's copy queued without a wait (into pinned memory), the ids' blocking copy then waiting for
                # both: one host sync instead of two
                sides["ids_to_host_one_sync"] = lambda: (a_mask.to("cpu", non_blocking=True), a_ids.cpu())
            ops = {}
            for name, fn in sides.items():
                with OpLog() as log:
                    fn()
                names = log.ops if device_type == "cpu" else log.on(device_type)
                ops[name] = [op for op in names if op not in bm.VIEW_OPS]
            res = compare(sides, args.device, warmup=10, repeats=args.repeats)
        med = {name: res[name]["median"] * 1e6 for name in sides}
        print(json.dumps({
            "batch": batch, "dtype": args.dtype, "image_rows": batch - (batch // 4 if batch > 1 else 0),
            "aligngpt_ops": len(ops["aligngpt"]), "llava_ops": len(ops["llava"]),
            "aligngpt_us": round(med["aligngpt"], 1), "llava_us": round(med["llava"], 1),
            "extra_us": round(med["aligngpt"] - med["llava"], 1),
            "bookkeeping_host_us": round(med["bookkeeping_host"], 1),
            "bookkeeping_device_path_us": round(med["bookkeeping_device"], 1),
            "bookkeeping_host_ops": len(ops["bookkeeping_host"]),
            "bookkeeping_device_path_ops": len(ops["bookkeeping_device"]),
            "aligngpt_op_names": " ".join(ops["aligngpt"]),
            **{f"{name}_us": round(med[name], 1) for name in sides if name.startswith("ids_to_host")},
            "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
