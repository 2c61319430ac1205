#!/usr/bin/env bash
# All GPU benchmarks in one device call (the lent GPU has ~15 minutes per session, start-up included).
# Run from the repository root with the wheels of transformers 5.24, trl, bitsandbytes, datasets (+ dill,
# multiprocess) in .whl/ (see benchmarks/README.md). Each benchmark has its own time limit; JSON lines go to $OUT.
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, trl, peft, bitsandbytes, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', \
bitsandbytes.__version__, 'datasets', datasets.__version__)"
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

step qlora ${QLORA_S:-170} python3 benchmarks/bench_qlora.py --steps 4 --warmup 2 \
  --runs llava:kbit,aligngpt:lean,aligngpt:lean_offload
step model ${MODEL_S:-230} python3 benchmarks/bench_model.py --device cuda --shapes 7b --explain --budget-s $(( ${MODEL_S:-230} - 20 )) \
  --out "$OUT/bench_7b.jsonl"
step score_pairs ${SCORE_S:-110} python3 benchmarks/bench_score_pairs.py --device cuda --model-config large \
  --num-pairs 8192 --batch-size 256 --num-workers 15 --measure-decode
