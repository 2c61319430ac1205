"""Host time of the eager forward's placeholder bookkeeping (`AlignGPTModel.placeholders_on_host`), or of the whole
alignment path, this checkout against the same code at another git revision, interleaved in one process.

At batch 1 on a GPU the bookkeeping and the rest of the alignment path run on the host while the GPU waits (the
forward is host-bound until the LLM), so their CPU time is forward time. Both versions run on the same tiny model
and inputs (`bench_model.build_tiny_models`, 576 image tokens, 641-token prompt; 4 rows with left padding for batch
4), one thread; what they return is checked equal first. One JSON line per batch size.

- `--scope bookkeeping` (default): `placeholders_on_host` and its helpers taken from `--rev`;
- `--scope path`: `bench_model.alignment_path` (embedding, placeholder bookkeeping, text mean, gate, mix, merge) with
  every `AlignGPTModel` method taken from `--rev`. On the CPU the path's arithmetic at these widths is part of both
  sides alike; the difference is host work (Python, NumPy, op dispatch), as it would be on a GPU;
- `--scope forward`: the whole `AlignGPTModel` forward (tiny tower and LLM included), every method from `--rev`.

`--after-tower`: each timed call follows a run of the tiny vision tower instead of the previous timed call. In a
forward the bookkeeping follows other work too (the previous forward's LLM, the embedding), which leaves NumPy's and
torch's code and data out of the caches: each call then costs several times what it costs warm.

With `--device cuda` the tiny models run on a GPU, where each op's cost is the host's (Python, dispatch, launch) and
the times are CUDA-event times. A machine without the repository's git history takes the old file instead of a
revision: `git show REV:src/transformers_aligngpt/modeling_aligngpt.py > .rev/modeling.py` beforehand, then
`--rev-file .rev/modeling.py --rev REV` (the revision then only names it in the output).

    python benchmarks/bench_host_bookkeeping.py --rev ee5fc72 [--scope path] [--after-tower] [--repeats 2000]
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


def load_modeling_at(rev: str, rev_file: str | None = None):
    """`modeling_aligngpt` as it was at `rev` (git show), or as `rev_file` holds it, imported under another name."""
    if rev_file is None:
        root = Path(__file__).resolve().parents[1]
        shown = subprocess.run(["git", "show", f"{rev}:{MODELING}"], cwd=root, capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"--rev {rev}: git cannot show {MODELING} there ({shown.stderr.strip()}); pass a commit "
                             "of this repository that has the file, e.g. the one before the change you are measuring "
                             "(or --rev-file, where there is no git history).")
        path = Path(tempfile.mkdtemp()) / "modeling_at_rev.py"
        path.write_text(shown.stdout)
    else:
        path = Path(rev_file)
        if not path.is_file():
            raise SystemExit(f"--rev-file {rev_file}: no such file; write it with `git show {rev}:{MODELING} > "
                             f"{rev_file}` on a machine with the repository's history.")
    spec = importlib.util.spec_from_file_location("transformers_aligngpt.modeling_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gate_tokens(layout, input_ids) -> torch.Tensor:
    """The gate's text tokens of a layout as a (batch, seq) 0/1 tensor, whether it holds them as `gate_text` or, for
    one row since b621872, as `gate_text_runs`."""
    runs = getattr(layout, "gate_text_runs", None)
    if runs is None:
        return layout.gate_text.float().cpu()
    tokens = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start, end in runs:
        tokens[0, start:end] = 1
    return tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="git revision to compare with (e.g. the commit before a change)")
    p.add_argument("--rev-file", help="modeling_aligngpt.py as it was at --rev (where there is no git history)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--scope", default="bookkeeping", choices=["bookkeeping", "path", "forward"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="float32 makes the CPU's share of the path's arithmetic smaller (bf16 matmuls are slow on CPUs "
                        "without bf16 units); the ops and the host work are the same")
    p.add_argument("--after-tower", action="store_true", help="time each call right after a run of the tiny tower")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    old = load_modeling_at(args.rev, args.rev_file)
    build_args, _, aligngpt = bm.build_tiny_models(dtype, args.device)
    inner = aligngpt.model
    # the same module, its bookkeeping methods taken from `rev` (a shallow copy shares every parameter)
    if "placeholders_on_host" not in old.AlignGPTModel.__dict__:
        raise SystemExit(f"--rev {args.rev} has no AlignGPTModel.placeholders_on_host (added in 5de0a74): pick a later "
                         "commit.")
    if args.scope != "bookkeeping":  # every method (module-level helpers come along through their globals)
        methods = {name: value for name, value in old.AlignGPTModel.__dict__.items()
                   if isinstance(value, (staticmethod, classmethod)) or callable(value) and not name.startswith("__")}
    else:
        methods = {name: old.AlignGPTModel.__dict__[name]
                   for name in ("placeholders_on_host", "_one_row_spans", "_one_row_text_runs", "_text_after_align")
                   if name in old.AlignGPTModel.__dict__}
    inner_old = copy.copy(inner)
    inner_old.__class__ = type("AlignGPTModelAtRev", (current.AlignGPTModel,), methods)
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = (bm.generation_rows(1, 576, seed=11, question_max=29) if batch == 1
                else bm.train_rows(batch, 576, seed=3))
        inputs = bm.batch_for(build_args, rows, 336, dtype, "left", False, 12, ["aligngpt"])["aligngpt"]
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if args.scope == "path":
            with torch.no_grad():
                features = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            features = features.pooler_output.to(dtype)
            sides = {"rev": lambda: bm.alignment_path(inner_old, ids, mask, features),
                     "current": lambda: bm.alignment_path(inner, ids, mask, features)}
            with torch.no_grad():
                assert torch.equal(sides["rev"](), sides["current"]())
        elif args.scope == "forward":
            pixel_values = inputs["pixel_values"]
            sides = {name: (lambda model=model: model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask)
                            .last_hidden_state)
                     for name, model in (("rev", inner_old), ("current", inner))}
            with torch.no_grad():
                assert torch.equal(sides["rev"](), sides["current"]())
        else:
            call_args = (ids, mask, None, None, inputs["pixel_values"].shape[0], 576, True, dtype)
            sides = {"rev": lambda: inner_old.placeholders_on_host(*call_args),
                     "current": lambda: inner.placeholders_on_host(*call_args)}
            a, b = sides["rev"](), sides["current"]()
            assert a.spans == b.spans and a.gate_text_counts == b.gate_text_counts
            assert torch.equal(gate_tokens(a, ids), gate_tokens(b, ids))
        with torch.no_grad():
            if args.after_tower:
                pixel_values = inputs["pixel_values"]
                res = compare(sides, args.device, warmup=0, repeats=args.repeats,
                              before=lambda: inner.vision_tower(pixel_values))
            else:
                res = compare(sides, args.device, warmup=10, repeats=args.repeats)
        med = {name: res[name]["median"] * 1e6 for name in sides}
        print(json.dumps({
            "batch": batch, "scope": args.scope, "rev": args.rev, "rev_us": round(med["rev"], 1),
            "current_us": round(med["current"], 1),
            "saved_us": round(med["rev"] - med["current"], 1), "dtype": args.dtype, "after_tower": args.after_tower,
            "rev_min_us": round(res["rev"]["min"] * 1e6, 1), "current_min_us": round(res["current"]["min"] * 1e6, 1),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
