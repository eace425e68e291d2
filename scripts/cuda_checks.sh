#!/usr/bin/env bash
# The checks that need a CUDA GPU, in order of importance, each with its own time limit:
#   1. the fast backend and the cached decoder against PyG and full recomputation, on CUDA (fp32);
#   2. bench.py at the paper shape in fp32;
#   3. a short compiled bf16 training run of GATv2Conv at the published size on tinyshakespeare;
#   4. bench.py at the paper shape in bf16 autocast.
# Usage: bash scripts/cuda_checks.sh [LOG_DIR]   (default: cuda_logs; one log per check, plus summary.txt)
set -u
logs=${1:-cuda_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, record its exit status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - start)) s: $*" | tee -a "$logs/summary.txt"
}

{ nvidia-smi -L; python3 -c "import torch, torch_geometric as g; print('torch', torch.__version__, 'pyg', g.__version__)"; } \
    >"$logs/summary.txt" 2>&1
check tests 120 python3 -m pytest -q --device cuda tests/test_fast_backend.py
check bench_fp32 150 python3 bench.py --preset paper --device cuda --iters 20 --json
check train_bf16_compile 100 python3 pyg-gpt.py --gat_version GATv2Conv --device cuda --dtype bfloat16 --compile \
    --max_iters 100 --eval_interval 50 --eval_iters 10 --out_dir "${TMPDIR:-/tmp}/cuda_checks_run" --overwrite
check bench_bf16 90 python3 bench.py --preset paper --device cuda --dtype bfloat16 --iters 10 --gen_repeats 1 --json
