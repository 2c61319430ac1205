#!/usr/bin/env bash
# All GPU benchmarks in one device call (the lent GPU has ~15 minutes per session, start-up included).
# Run from the repository root. The GPU machine lacked transformers 5.24, trl, bitsandbytes and datasets (+ dill,
# multiprocess): their wheels travel in .whl/ (git-ignored), fetched beforehand on a machine with PyPI access:
#   pip download -d .whl --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_28_x86_64 transformers==5.24.0 trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 \
#     dill==0.4.0 multiprocess==0.70.18
# Each benchmark has its own time limit; JSON lines go to $OUT.
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # (each library on its own: a set that does not need bitsandbytes leaves its 43 MB wheel out of .whl/)
  python3 -c "import importlib
for name in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'datasets'):
    try:
        print(name, importlib.import_module(name).__version__, end='; ')
    except Exception as error:
        print(name, 'missing:', type(error).__name__, end='; ')
print('cuda', __import__('torch').version.cuda)"
  nproc; df -h /dev/shm | tail -1
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$? after $((SECONDS - start))s"
  grep '^{' "$OUT/$name.log" | tail -n 30 | cut -c1-400
  grep -iE "error|Traceback" "$OUT/$name.log" | tail -n 5
}

# issue 7's full 7B step: forward / train / generate ratios, the gate's in-forward share, alignment-path ops (no
# --explain: the compiled case records its graph breaks and their reasons itself; the time goes to batch-32 compiled)
model_step() {  # model_step SECONDS
  step model "$1" python3 benchmarks/bench_model.py --device cuda --shapes 7b --profile --profile-batch 1 \
    --budget-s $(( $1 - 20 )) --out "$OUT/bench_7b.jsonl"
}
# the batch-1 forward and default-path generation with more repeats (the full run's 4 repeats of the default path
# were too few to tell noise from cost)
followup_b1() {  # followup_b1 SECONDS
  step model_b1 "$1" python3 benchmarks/bench_model.py --device cuda --shapes 7b --cases forward,generate \
    --paths default --gen-batches 1 --gen-repeats 10 --repeats 41 --budget-s $(( $1 - 10 )) \
    --out "$OUT/bench_7b_b1.jsonl"
}

# SET=followup: a second, shorter call (~100 s): `followup_b1`.
# SET=scoring: issue 4's CLIP scoring benchmark alone (its goal is met: 1,043 pairs/s on an H100, BENCHMARKS.md).
if [ "${SET:-all}" = followup ]; then
  followup_b1 ${MODEL_S:-85}
  exit 0
fi
# SET=model: issue 7 alone (~420 s): the full 7B model step with a budget that reaches compiled batch 32, then the
# batch-1 follow-up above (issue 5's QLoRA figures are in BENCHMARKS.md and need no rerun for it).
if [ "${SET:-all}" = model ]; then
  model_step ${MODEL_S:-320}
  followup_b1 ${MODEL_B1_S:-85}
  exit 0
fi
# SET=path (~60 s a run): the batch-1 forward case (alignment path, extra token, gate) in RUNS (default 2) separate
# processes, with the device-op profile and REPEATS (default 201) paired repeats (at 61 the in-forward measurements,
# gate over global mode and the extra token, still spread over +-1.5% on a noisy host); then, with B32=1 (~90 s),
# default-path generation at batch 32 with 8 repeats (its 4 repeats in the full run spread 2.3-3.2 s a call on a
# noisy host), its prefill also timed for LLaVA at AlignGPT's length (the extra token's own cost at batch 32).
# (Compiled batch-1 generation needs more than 100 s in a fresh process, its compilation included: the full run has
# it.)
if [ "${SET:-all}" = path ]; then
  # the path's pieces at tiny widths, where the host's cost per op is the whole cost, and the ids' trip to the host:
  # two plain copies of ids and attention mask, a stack of both and one copy, one copy queued without a wait (~20 s)
  step alignment_path_tiny 60 python3 benchmarks/bench_alignment_path.py --device cuda --repeats 300
  # the host work cut since an earlier revision, A/B in one process on the GPU (tiny widths; ~60 s): needs the old
  # modeling file, which a machine without git history cannot show; beforehand, where the history is:
  #   mkdir -p .rev && echo REV > .rev/rev && git show REV:src/transformers_aligngpt/modeling_aligngpt.py > .rev/modeling.py
  # and carry .rev with .whl
  if [ -f .rev/modeling.py ]; then
    rev=$(cat .rev/rev 2>/dev/null || echo unnamed)
    for scope in path forward; do
      step host_ab_$scope 40 python3 benchmarks/bench_host_bookkeeping.py --rev "$rev" --rev-file .rev/modeling.py \
        --device cuda --scope $scope --batches 1 --repeats 400
    done
    step host_ab_path_after_tower 40 python3 benchmarks/bench_host_bookkeeping.py --rev "$rev" \
      --rev-file .rev/modeling.py --device cuda --scope path --batches 1 --repeats 400 --after-tower
  fi
  for run in $(seq "${RUNS:-2}"); do
    step forward_b1_$run 90 python3 benchmarks/bench_model.py --device cuda --shapes 7b --cases forward --profile \
      --profile-batch 1 --repeats ${REPEATS:-201} --out "$OUT/bench_7b_forward_b1.jsonl"
  done
  if [ "${B32:-0}" = 1 ]; then
    step default_b32 110 python3 benchmarks/bench_model.py --device cuda --shapes 7b --cases generate --paths default \
      --gen-batches 32 --gen-repeats 8 --budget-s 100 --out "$OUT/bench_7b_default_b32.jsonl"
  fi
  exit 0
fi
# SET=prefill (~100 s): the default-path batch-32 prefill at LLaVA lengths 639, 640 and 641 (AlignGPT's one more),
# each also against LLaVA at AlignGPT's length, with device time by kernel group (attention, matmul, other): whether
# the extra token's cost at batch 32 (1.01-1.03 at 640 -> 641) is a tile boundary, 640 = 10 x 64, or the gate's path
if [ "${SET:-all}" = prefill ]; then
  step prefill_length 170 python3 benchmarks/bench_prefill_length.py --device cuda --out "$OUT/prefill_length.jsonl"
  exit 0
fi
if [ "${SET:-all}" = scoring ]; then
  # end to end with the torchvision image processor and the compiled tower; decoding per backend
  # (24,576 pairs: at 8,192 the 3-4 s pipeline fill dominated; steady_pairs_per_s leaves it out)
  step score_pairs ${SCORE_S:-150} python3 benchmarks/bench_score_pairs.py --device cuda --model-config large \
    --num-pairs 24576 --decode-pairs 4096 --batch-size 256 --num-workers 15 --image-backend torchvision --compile \
    --measure-decode --decode-backends pil,torchvision
  exit 0
fi

# (budget: one device call of at most 600 s; the limits sum to 560 s, the wheel install takes ~15 s; the second H100
# run needed 364 s with the memory step for AlignGPT alone and the model step cut short of compiled batch 32 by its
# 230 s budget: qlora ~150 s, memory ~25 s per model, model ~250 s in full)
# 1. issue 5: tokens/s of AlignGPT vs LLaVA QLoRA, both resident, alternating blocks (paired ratios), then one
# profiled step per model: the kernels whose GPU time differs most (where a gap goes)
step qlora ${QLORA_S:-170} python3 benchmarks/bench_qlora.py --paired 6 --steps 10 --warmup 2 --profile-step
# 2. issue 5: peak memory on this GPU of each model alone in its own process (AlignGPT's goal: at most 6.0 GiB)
step qlora_memory ${QLORA_MEMORY_S:-100} python3 benchmarks/bench_qlora.py --runs aligngpt:lean,llava:lean --steps 3 --warmup 2
# 3. issue 7: `model_step`
model_step ${MODEL_S:-290}
