"""Shared helpers of the benchmark scripts: machine description, timing, JSON-lines output.

Timing rules used by every script:
- CUDA: `torch.cuda.Event` pairs around the call (plus a synchronize), so the figure is device time of the call;
- CPU: `time.perf_counter` around the call, `torch.set_num_threads` fixed by the script;
- always warm-up calls first, then the median of N timed calls. When two models are compared, their timed calls
  are interleaved (A B B A A B ...) so that clock drift, thermal state and other processes hit both alike;
- the garbage collector is disabled during each timed call (as `timeit` does): a collection pause of a process
  holding a 7B model would land on whichever call happens to allocate at that moment.
"""

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def cpu_model_name() -> str:
    """The CPU's marketing name, e.g. `AMD EPYC 7B13` (lscpu, then /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_identity() -> str:
    """`family F model M stepping S, N MHz` from /proc/cpuinfo (virtual machines often hide the model name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping", "cpu MHz") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return ""
    if not fields:
        return ""
    mhz = fields.get("cpu MHz", "?").split(".")[0]
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}, {mhz} MHz"


def machine_info(device: str) -> dict:
    """What the figures were measured on: CPU model and threads, GPU kind, library versions."""
    import transformers

    info = {
        "cpu": cpu_model_name(),
        "cpu_id": cpu_identity(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


class OpLog(TorchDispatchMode):
    """Names of the aten ops dispatched inside the `with` block, in order (on a GPU each non-view op on a GPU tensor
    is a kernel launch or a copy; `collections.Counter(log.ops)` counts them by name), and the device types each op
    touched (its tensor inputs and outputs): `log.on("cuda")` leaves out the ops the model runs on the CPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.devices: list[set[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.devices.append({leaf.device.type for leaf in leaves if isinstance(leaf, torch.Tensor)})
        return out

    def on(self, device_type: str) -> list[str]:
        return [op for op, devices in zip(self.ops, self.devices) if device_type in devices]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by one call of `fn` (CUDA events on a GPU, wall clock on CPU)."""
    return time_call_both(fn, device)[0]


def time_call_both(fn: Callable[[], object], device: str) -> tuple[float, float | None]:
    """(seconds, process CPU seconds or None on a GPU) of one call of `fn`.

    On a CPU shared with other processes the wall clock of a call grows with their load; the process CPU time
    (all threads) much less so, which makes it the steadier of the two for ratios on a busy machine.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0, None
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def compare(
    fns: dict[str, Callable[[], object]],
    device: str,
    warmup: int = 1,
    repeats: int = 5,
    same_before: bool = False,
    before: Callable[[], object] | None = None,
) -> dict[str, dict]:
    """Times every callable of `fns`, interleaved (A B, B A, A B ...), after `warmup` calls of each.

    Returns `{name: {"median", "min", "times", "first", "cpu_median", "cpu_times"}}`; `first` is the time of the
    first warm-up call (compilation, cache allocation, cuBLAS heuristics ...), `cpu_*` the process CPU time (CPU
    runs only). Use `paired_ratio` for ratios between two of them.

    `same_before`: every timed call follows a call of the same callable (an untimed one is made after a switch).
    For compiled generation with CUDA graphs, where going from one model's graphs to the other's in one process
    may cost work (CUDA-graph tree bookkeeping) that a process serving one model never does.

    `before`: called, untimed, right before every timed call (on a GPU the timing waits for its kernels first): the
    work a timed call should follow, e.g. other work that leaves the caches cold, as in a real forward.
    """
    names = list(fns)
    first = {}
    for name in names:
        for i in range(warmup):
            t, _ = time_call_both(fns[name], device)
            if i == 0:
                first[name] = t
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    previous = names[-1] if warmup else None
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if same_before and previous != name:
                fns[name]()
            previous = name
            if before is not None:
                before()
            gc.disable()
            try:
                t, c = time_call_both(fns[name], device)
            finally:
                gc.enable()
            times[name].append(t)
            if c is not None:
                cpu_times[name].append(c)
    result = {}
    for name in names:
        result[name] = {
            "median": statistics.median(times[name]),
            "min": min(times[name]),
            "times": [round(t, 6) for t in times[name]],
            "first": first.get(name),
        }
        if cpu_times[name]:
            result[name]["cpu_median"] = statistics.median(cpu_times[name])
            result[name]["cpu_times"] = [round(t, 6) for t in cpu_times[name]]
    return result


def self_times(profile, device: str) -> dict[str, tuple[float, int]]:
    """{kernel (GPU) or aten op (CPU) name: (self time in us, calls)} of a finished `torch.profiler.profile`: on a
    GPU the device time of each kernel, on the CPU the self time of each aten op (other CPU events nest them)."""
    cuda = device.startswith("cuda")
    out = {}
    for event in profile.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and (cuda or event.key.startswith("aten::")):
            out[event.key] = (us, event.count)
    return out


def paired_ratio(result: dict, a: str, b: str, key: str = "times") -> float:
    """Median over repeats of time(a) / time(b), each pair measured back to back (robust to slow load changes)."""
    pairs = [x / y for x, y in zip(result[a][key], result[b][key], strict=True) if y > 0]
    return statistics.median(pairs) if pairs else float("nan")


def ratios(result: dict, a: str, b: str) -> dict:
    """Every AlignGPT/LLaVA time ratio worth printing: of the medians, of the minima, paired, and of CPU time."""
    out = {
        "ratio": result[a]["median"] / result[b]["median"],
        "ratio_min": result[a]["min"] / result[b]["min"],
        "ratio_paired": paired_ratio(result, a, b),
    }
    if "cpu_times" in result[a] and "cpu_times" in result[b]:
        out["ratio_cpu_time"] = paired_ratio(result, a, b, "cpu_times")
    return out


class Recorder:
    """Prints one JSON object per line and appends it to `out` (flushed at once, so a killed run keeps its lines)."""

    def __init__(self, out: str | None = None, **common):
        self.out = out
        self.common = common
        self.records: list[dict] = []
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def emit(self, **record) -> dict:
        record = {**record, **self.common}
        record = {k: _round(v) for k, v in record.items()}
        self.records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")
        return record


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def log(*args) -> None:
    """Progress messages go to stderr, so stdout holds only the JSON lines."""
    print(*args, file=sys.stderr, flush=True)


__all__ = [
    "Recorder",
    "compare",
    "cpu_model_name",
    "log",
    "machine_info",
    "paired_ratio",
    "ratios",
    "self_times",
    "synchronize",
    "time_call",
    "time_call_both",
]
