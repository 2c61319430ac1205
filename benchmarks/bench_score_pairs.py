"""Throughput of `score_pairs`: image-caption pairs per second, end to end from JPEG files on disk.

Generates its own JPEGs (random sizes, smooth colour fields plus noise, like photos in file size) and captions into
a temporary folder, builds a CLIP with random weights from a config (nothing is downloaded), then times
`score_pairs` over a `datasets.Dataset` of (path, caption) rows: JPEG decoding, resize / crop in DataLoader worker
processes, model, cache files, everything. Prints one JSON line.

    # CPU, tiny CLIP, < 1 minute
    python benchmarks/bench_score_pairs.py --quick
    # one GPU, CLIP ViT-L/14-336 (the paper's) with random weights
    python benchmarks/bench_score_pairs.py --device cuda --model-config large --num-pairs 20000 \
        --batch-size 256 --num-workers 15

Fields: `pairs_per_s` = pairs / wall time of the whole `score_pairs` call (cold: nothing cached; model already
built and warmed up on one batch, so CUDA / cuBLAS start-up is not counted); `steady_pairs_per_s` = the rate between
the first and the second-to-last scored batch, i.e. without the pipeline fill (`first_batch_s`: the first batch waits
for one worker to decode a whole batch, 3-4 s for 256 pairs) and drain, which dominate short runs: the rate that
decides a 558K-pair corpus; `cached_run_s` = a second call
over the same data (every shard loads from its cache file); `decode_pairs_per_s` (with `--measure-decode`) = the
worker processes alone, without the model: the ceiling the CPUs set (`--decode-only` measures only that,
`--decode-backends pil,torchvision` both image-processor backends alternately in one run). The JPEGs were just written, so they are read
from the page cache (`--drop-caches` tries to empty it first; needs root).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import transformers_aligngpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "painting",
    "drawing",
    "of",
    "with",
    "and",
    "on",
    "in",
    "at",
    "near",
    "under",
    "over",
    "two",
    "three",
    "several",
    "many",
    "small",
    "large",
    "old",
    "new",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "dog",
    "cat",
    "bird",
    "horse",
    "car",
    "bus",
    "train",
    "boat",
    "house",
    "street",
    "city",
    "tree",
    "flower",
    "grass",
    "sky",
    "cloud",
    "beach",
    "sea",
    "mountain",
    "river",
    "man",
    "woman",
    "child",
    "people",
    "table",
    "chair",
    "food",
    "plate",
    "cup",
    "window",
    "door",
    "sign",
    "light",
    "night",
    "day",
    "sunset",
    "snow",
    "water",
    "field",
    "road",
    "bridge",
    "building",
    "wall",
    "logo",
    "text",
]

MODEL_CONFIGS = {
    # the tests' tiny CLIP: for CPU runs
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        max_text=77,
    ),
    # openai/clip-vit-base-patch16
    "base": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=512,
        max_text=77,
    ),
    # openai/clip-vit-large-patch14-336: the CLIP of AlignGPT
    "large": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        projection_dim=768,
        max_text=77,
    ),
}


def _write_jpeg(job):
    from PIL import Image

    index, folder, min_side, max_side, quality = job
    rng = np.random.default_rng(index)
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.integers(-16, 17, size=(h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
    name = f"{index // 1000:03d}/{index:07d}.jpg"
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality)
    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 21))))
    return name, caption, os.path.getsize(path)


def make_pairs(folder, n, min_side, max_side, quality, processes):
    jobs = [(i, folder, min_side, max_side, quality) for i in range(n)]
    with mp.get_context("fork").Pool(processes) as pool:
        rows = pool.map(_write_jpeg, jobs, chunksize=64)
    names, captions, sizes = zip(*rows)
    return list(names), list(captions), float(np.mean(sizes))


def build_tokenizer(vocab_size):
    from transformers_aligngpt.tiny import build_tiny_clip_tokenizer

    return build_tiny_clip_tokenizer(WORDS, vocab_size=min(vocab_size, 600), model_max_length=77)


def build_image_processor(name, backend):
    """The CLIP image processor of `name` with transformers' PIL or torchvision backend (`auto`: torchvision if
    installed), as `score_pairs(image_backend=...)` would load it."""
    import transformers

    from transformers_aligngpt.alignment_levels import _resolve_image_backend

    backend = _resolve_image_backend(backend)
    cls = transformers.CLIPImageProcessor if backend == "torchvision" else getattr(
        transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor  # (transformers without backends)
    )
    size = MODEL_CONFIGS[name]["vision"]["image_size"]
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_clip(name, device, backend="auto"):
    import torch
    from transformers import CLIPConfig, CLIPModel

    spec = MODEL_CONFIGS[name]
    tokenizer = build_tokenizer(49408)
    config = CLIPConfig(
        text_config=dict(
            spec["text"],
            vocab_size=49408 if name != "tiny" else len(tokenizer),
            max_position_embeddings=spec["max_text"],
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=spec["vision"],
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(config).eval()
    return model, build_image_processor(name, backend), tokenizer


def measure_decode(dataset, model, image_processor, tokenizer, args, device, dtype):
    """Pairs/s of the DataLoader workers alone (decode, resize, crop, tokenise), no model."""
    import torch

    from transformers_aligngpt.alignment_levels import _ClipScorer, _identity, _PairBatches, _PairView

    scorer = _ClipScorer(
        model,
        image_processor,
        tokenizer,
        device,
        dtype,
        normalize_on_device=args.normalize_on_device,
        jpeg_draft=args.jpeg_draft,
        max_text_length=None,
    )
    view = _PairView(dataset, "image", "caption", "id", None)
    n = len(view)
    batches = [np.arange(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
    reasons = np.full(n, None, dtype=object)
    loader = torch.utils.data.DataLoader(
        _PairBatches(view, batches, reasons, scorer),
        batch_size=None,
        num_workers=args.num_workers,
        collate_fn=_identity,
        prefetch_factor=args.prefetch_factor if args.num_workers else None,
    )
    start = time.perf_counter()
    rows = sum(len(b["indices"]) for b in loader)
    return rows / (time.perf_counter() - start)


class BatchClock:
    """Records when each scored batch comes back (`_ClipScorer.finish` waits for the batch's scores on the host, so
    the time is the batch's completion) and how many pairs it held: the steady-state rate leaves out the pipeline
    fill (the first batch waits for a worker to decode a whole batch) and the drain."""

    def __init__(self):
        from transformers_aligngpt import alignment_levels

        self.events: list[tuple[float, int]] = []
        self.cls = alignment_levels._ClipScorer
        self.original = self.cls.finish
        clock = self

        def timed(scorer, batch, launched):
            out = clock.original(scorer, batch, launched)
            clock.events.append((time.perf_counter(), len(batch["indices"])))
            return out

        self.cls.finish = timed

    def close(self):
        self.cls.finish = self.original

    def steady(self, start: float) -> dict:
        if len(self.events) < 4:
            return {"first_batch_s": round(self.events[0][0] - start, 3) if self.events else None}
        times = [t for t, _ in self.events]
        inner = self.events[1:-1]  # batches 2 .. K-1: after the fill, before the drain
        return {
            "first_batch_s": round(times[0] - start, 3),
            "steady_pairs_per_s": round(sum(n for _, n in inner) / (inner[-1][0] - times[0]), 1),
        }


def decode_rates(args, dataset, model, image_processor, tokenizer, device, dtype):
    """(pairs/s of the given processor, {backend: pairs/s} for --decode-backends, alternating, best of two)."""
    rate = measure_decode(dataset, model, image_processor, tokenizer, args, device, dtype)
    if not args.decode_backends:
        return rate, None
    rates = {}
    for _ in range(2):
        for backend in args.decode_backends.split(","):
            processor = build_image_processor(args.model_config, backend)
            value = measure_decode(dataset, model, processor, tokenizer, args, device, dtype)
            rates[backend] = max(rates.get(backend, 0.0), value)
    return rate, {k: round(v, 1) for k, v in rates.items()}


def settings(args, mean_bytes: float) -> dict:
    """The run's settings and data, as recorded in every result line."""
    return {
        "model_config": args.model_config,
        "image_size": MODEL_CONFIGS[args.model_config]["vision"]["image_size"],
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "jpeg_draft": args.jpeg_draft,
        "normalize_on_device": args.normalize_on_device,
        "jpeg_sides": [args.min_side, args.max_side],
        "jpeg_mean_kb": round(mean_bytes / 1024, 1),
    }


def decode_only_result(args, dataset, model, image_processor, tokenizer, device, dtype, mean_bytes):
    import torch
    import transformers

    rate, by_backend = decode_rates(args, dataset, model, image_processor, tokenizer, device, dtype)
    result = {
        "benchmark": "score_pairs_decode_only",
        "decode_pairs_per_s": round(rate, 1),
        "decode_pairs_per_s_by_backend": by_backend,
        "image_processor": type(image_processor).__name__,
        "num_pairs": len(dataset),
        **settings(args, mean_bytes),
        "cpu": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    from transformers_aligngpt.alignment_levels import IMAGE_BACKENDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model-config", default="tiny", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--num-pairs", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on cuda, 32 on cpu")
    parser.add_argument("--num-workers", type=int, default=None, help="default: CPUs - 1")
    parser.add_argument("--prefetch-factor", type=int, default=4, help="chunks each worker prepares ahead")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument("--min-side", type=int, default=300, help="generated JPEG sides, pixels")
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--jpeg-draft", action="store_true")
    parser.add_argument("--no-normalize-on-device", dest="normalize_on_device", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    parser.add_argument("--image-backend", default="auto", choices=IMAGE_BACKENDS,
                        help="image processor backend (auto: torchvision if installed, else PIL)")
    parser.add_argument("--measure-decode", action="store_true", help="also time the decoding workers alone")
    parser.add_argument("--decode-backends", default=None,
                        help="with --measure-decode: comma list of backends timed alternately (e.g. pil,torchvision)")
    parser.add_argument("--decode-pairs", type=int, default=None,
                        help="time the decoding workers on the first N pairs only (default: all)")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decoding workers (implies --measure-decode; no CLIP forward): the CPU side alone")
    parser.add_argument("--drop-caches", action="store_true", help="try to empty the page cache before timing")
    parser.add_argument("--workdir", default=None, help="where to write the JPEGs (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny CLIP, 256 pairs: < 1 minute")
    args = parser.parse_args(argv)
    args.measure_decode = args.measure_decode or args.decode_only
    if args.quick:
        args.device, args.model_config = "cpu", "tiny"
        args.num_pairs = min(args.num_pairs, 256)

    import datasets
    import torch
    import transformers

    from transformers_aligngpt.alignment_levels import _default_num_workers, _resolve_dtype, score_pairs

    datasets.disable_progress_bars()
    device = torch.device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 32
    if args.num_workers is None:
        args.num_workers = _default_num_workers(1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_score_pairs_"))
    try:
        t0 = time.perf_counter()
        names, captions, mean_bytes = make_pairs(
            str(work / "images"), args.num_pairs, args.min_side, args.max_side, args.quality, max(1, cpus)
        )
        generate_s = time.perf_counter() - t0
        dataset = datasets.Dataset.from_dict(
            {
                "id": [f"{i:07d}" for i in range(len(names))],
                "image": [str(work / "images" / n) for n in names],
                "caption": captions,
            }
        )
        t0 = time.perf_counter()
        if args.decode_only:  # the workers need the processor and tokenizer; a tiny model stands in for the scorer
            model, _, tokenizer = build_clip("tiny", device)
            image_processor = build_image_processor(args.model_config, args.image_backend)
            return decode_only_result(args, dataset, model, image_processor, tokenizer, device, dtype, mean_bytes)
        model, image_processor, tokenizer = build_clip(args.model_config, device, args.image_backend)
        build_s = time.perf_counter() - t0
        common = dict(
            model=model,
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_column="image",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            prefetch_factor=args.prefetch_factor,
            device=device,
            dtype=dtype,
            shard_size=args.shard_size,
            jpeg_draft=args.jpeg_draft,
            normalize_on_device=args.normalize_on_device,
            compile=args.compile,
            progress=False,
        )
        # warm-up on one batch (CUDA context, cuBLAS / SDPA kernels, compilation), its own cache
        t0 = time.perf_counter()
        score_pairs(dataset.select(range(min(len(dataset), args.batch_size))), cache_dir=work / "warmup", **common)
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0

        dropped = None
        if args.drop_caches:
            try:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                dropped = True
            except OSError:
                dropped = False

        cache = work / "cache"
        clock = BatchClock()
        t0 = time.perf_counter()
        try:
            scored = score_pairs(dataset, cache_dir=cache, **common)
            if device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            clock.close()
        cold_s = time.perf_counter() - t0
        steady = clock.steady(t0)
        t0 = time.perf_counter()
        again = score_pairs(dataset, cache_dir=cache, **common)
        cached_s = time.perf_counter() - t0
        scores = scored.with_format("arrow")["clip_score"].to_numpy()
        assert len(scored) == len(dataset) and np.isfinite(scores).all()
        assert np.array_equal(scores, again.with_format("arrow")["clip_score"].to_numpy())

        decode_rate, decode_by_backend = None, None
        if args.measure_decode:
            decode_set = dataset.select(range(min(len(dataset), args.decode_pairs or len(dataset))))
            decode_rate, decode_by_backend = decode_rates(
                args, decode_set, model, image_processor, tokenizer, device, dtype
            )

        result = {
            "benchmark": "score_pairs",
            "pairs_per_s": round(len(dataset) / cold_s, 1),
            **steady,
            "num_pairs": len(dataset),
            "seconds": round(cold_s, 3),
            "cached_run_s": round(cached_s, 3),
            "decode_pairs_per_s": round(decode_rate, 1) if decode_rate else None,
            "decode_pairs_per_s_by_backend": decode_by_backend,
            "image_processor": type(image_processor).__name__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""),
            **settings(args, mean_bytes),
            "prefetch_factor": args.prefetch_factor,
            "shard_size": args.shard_size,
            "compile": args.compile,
            "page_cache_dropped": dropped,
            "cpus": cpus,
            "dev_shm_gb": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None,
            "score_mean": round(float(scores.mean()), 6),
            "setup_s": {
                "generate_jpegs": round(generate_s, 2),
                "build_model": round(build_s, 2),
                "warmup": round(warmup_s, 2),
            },
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "python": platform.python_version(),
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
