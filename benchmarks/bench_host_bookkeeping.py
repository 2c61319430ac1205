"""Host time of the eager forward's placeholder bookkeeping (`AlignGPTModel.placeholders_on_host`), this checkout
against the same method at another git revision, interleaved in one process.

At batch 1 on a GPU the bookkeeping runs on the host while the GPU waits (the forward is host-bound until the LLM),
so its CPU time is forward time. Both versions run on the same tiny model and inputs
(`bench_model.build_tiny_models`, 576 image tokens, 641-token prompt; 4 rows with left padding for batch 4), one
thread; the layouts they return are checked equal first. One JSON line per batch size.

    python benchmarks/bench_host_bookkeeping.py --rev ee5fc72 [--repeats 2000]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402
from common import compare  # noqa: E402

import transformers_aligngpt.modeling_aligngpt as current  # noqa: E402

MODELING = "src/transformers_aligngpt/modeling_aligngpt.py"


def load_modeling_at(rev: str):
    """`modeling_aligngpt` as it was at `rev` (git show), imported under another name."""
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(["git", "show", f"{rev}:{MODELING}"], cwd=root, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--rev {rev}: git cannot show {MODELING} there ({shown.stderr.strip()}); pass a commit of "
                         "this repository that has the file, e.g. the one before the change you are measuring.")
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / "modeling_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("transformers_aligngpt.modeling_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="git revision to compare with (e.g. the commit before a change)")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--batches", default="1,4")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtype = torch.bfloat16
    old = load_modeling_at(args.rev)
    build_args, _, aligngpt = bm.build_tiny_models(dtype)
    inner = aligngpt.model
    # the same module, its bookkeeping methods taken from `rev` (a shallow copy shares every parameter)
    if "placeholders_on_host" not in old.AlignGPTModel.__dict__:
        raise SystemExit(f"--rev {args.rev} has no AlignGPTModel.placeholders_on_host (added in 5de0a74): pick a later "
                         "commit.")
    methods = {name: old.AlignGPTModel.__dict__[name]
               for name in ("placeholders_on_host", "_one_row_spans", "_text_after_align")
               if name in old.AlignGPTModel.__dict__}
    inner_old = copy.copy(inner)
    inner_old.__class__ = type("AlignGPTModelAtRev", (current.AlignGPTModel,), methods)
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = (bm.generation_rows(1, 576, seed=11, question_max=29) if batch == 1
                else bm.train_rows(batch, 576, seed=3))
        inputs = bm.batch_for(build_args, rows, 336, dtype, "left", False, 12, ["aligngpt"])["aligngpt"]
        call_args = (inputs["input_ids"], inputs["attention_mask"], None, None, inputs["pixel_values"].shape[0], 576,
                     True, dtype)
        sides = {"rev": lambda: inner_old.placeholders_on_host(*call_args),
                 "current": lambda: inner.placeholders_on_host(*call_args)}
        a, b = sides["rev"](), sides["current"]()
        assert a.spans == b.spans and a.gate_text_counts == b.gate_text_counts
        assert torch.equal(a.gate_text, b.gate_text)
        res = compare(sides, "cpu", warmup=10, repeats=args.repeats)
        med = {name: res[name]["median"] * 1e6 for name in sides}
        print(json.dumps({
            "batch": batch, "rev": args.rev, "rev_us": round(med["rev"], 1), "current_us": round(med["current"], 1),
            "saved_us": round(med["rev"] - med["current"], 1),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
