"""Host time generate() spends per decoding step in `prepare_inputs_for_generation`, AlignGPT next to LLaVA.

With the static cache and the compiled decoding step, a batch-1 token costs a few milliseconds on a GPU, and the
Python around the compiled call counts. transformers' `prepare_inputs_for_generation` runs
`inspect.signature(self.forward)` at every step for classes registered with `register_for_auto_class` (AlignGPT's
are, so that `save_pretrained` exports the code; LLaVA's are not); the package computes that signature once
(`modeling_aligngpt`). This script times the method on a real decoding step's arguments (captured from `generate`),
for LLaVA, AlignGPT, and AlignGPT with the cached signature removed (the code before the fix), interleaved; tiny
shapes (`bench_model.SHAPES["tiny"]`), CPU, one thread. A first JSON line compares a step of the default-cache path
(transformers' plain `generate`): aten ops per step (on a GPU, kernel launches) and host time per token.

    python benchmarks/bench_decode_step.py [--repeats 3000]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402
from common import OpLog  # noqa: E402


def capture_decode_step(model, batch) -> tuple:
    """(input_ids, args, kwargs) of `prepare_inputs_for_generation` in the second step of a static-cache generate."""
    calls = []
    original = model.prepare_inputs_for_generation

    def spy(input_ids, *args, **kwargs):
        calls.append((input_ids, args, dict(kwargs)))
        return original(input_ids, *args, **kwargs)

    model.prepare_inputs_for_generation = spy
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           cache_implementation="static", disable_compile=True)
    finally:
        del model.prepare_inputs_for_generation
    return calls[1]


def default_path_steps(models: dict, batches: dict, repeats: int) -> dict:
    """Default-cache greedy decoding (transformers' plain `generate`): aten ops per decoding step (from a 10- and a
    2-token generate: 8 steps apart) and host time per token (34 vs 2 tokens, interleaved, median), per model."""
    def gen(name, n):
        with torch.no_grad():
            return models[name].generate(**batches[name], max_new_tokens=n, min_new_tokens=n, do_sample=False)

    ops, per_token = {}, {name: [] for name in models}
    for name in models:
        gen(name, 2)
        counts = []
        for n in (2, 10):
            with OpLog() as log:
                gen(name, n)
            counts.append(collections.Counter(log.ops))
        steps = counts[1].copy()
        steps.subtract(counts[0])
        ops[name] = {k: v / 8 for k, v in steps.items() if v}
    for r in range(repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            gen(name, 2)
            short = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen(name, 34)
            per_token[name].append((time.perf_counter() - short - t0) / 32)
    a, b = ops["aligngpt"], ops["llava"]
    extra = {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}
    return {
        "case": "default-cache decoding step (batch 1): aten ops and host time per token",
        **{f"{name}_ops_per_step": sum(v.values()) for name, v in ops.items()},
        "aligngpt_extra_ops_per_step": dict(sorted(extra.items())),
        **{f"{name}_ms_per_token": round(statistics.median(v) * 1e3, 3) for name, v in per_token.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3000)
    p.add_argument("--default-path-repeats", type=int, default=6,
                   help="interleaved generate pairs for the default-cache host time per token")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    build_args, llava, aligngpt = bm.build_tiny_models(torch.float32)
    rows = bm.generation_rows(1, 576, seed=11, question_max=29)
    batches = bm.batch_for(build_args, rows, 336, torch.float32, "left", False, 12, ["aligngpt", "llava"])
    print(json.dumps({**default_path_steps({"aligngpt": aligngpt, "llava": llava}, batches,
                                           args.default_path_repeats),
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}), flush=True)
    steps = {name: capture_decode_step(model, batches[name])
             for name, model in (("aligngpt", aligngpt), ("llava", llava))}
    forward = type(aligngpt).forward
    cached = forward.__dict__.get("__signature__")

    def call(model, name, uncached=False):
        def run():
            if uncached:
                forward.__dict__.pop("__signature__", None)
            try:
                ids, a, kw = steps[name]
                return model.prepare_inputs_for_generation(ids, *a, **kw)
            finally:
                if uncached and cached is not None:
                    forward.__signature__ = cached
        return run

    variants = {"llava": call(llava, "llava"), "aligngpt": call(aligngpt, "aligngpt"),
                "aligngpt_signature_uncached": call(aligngpt, "aligngpt", uncached=True)}
    times = {k: [] for k in variants}
    order = random.Random(0)
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(20):
                fn()
        for _ in range(args.repeats):
            names = list(variants)
            order.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(json.dumps({
        "case": "prepare_inputs_for_generation, one decoding step (batch 1, static cache)",
        **{f"{k}_us": round(v, 1) for k, v in med.items()},
        "ratio": round(med["aligngpt"] / med["llava"], 3),
        "ratio_signature_uncached": round(med["aligngpt_signature_uncached"] / med["llava"], 3),
        "signature_cached": cached is not None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
