#!/usr/bin/env bash
# Every CUDA-only branch of the code, run on purpose on one GPU, each check with its own time limit (570 s in
# all). GNNGPT_NO_FALLBACK=1 makes an optimisation that raises fail its check instead of stepping aside to its
# portable path, as it would in a user's run. docs/testing.md says which check runs which branch:
#   tests                 the fast-backend, decoding and batch tests on CUDA (CUDA-graph capture and replay of
#                         decoding steps and of the window recomputed past block_size, the rolling buffers, SDPA
#                         on masked 4-D tensors, pinned-memory batches);
#   bench_fp32            bench.py at the paper shape in fp32, generation with and without the cache;
#   train_compile_bf16    a short compiled bf16 training of GATv2Conv at the published size (the fused GATv2
#                         kernel built for CUDA, pinned batches) and its sample through CUDA graphs;
#   train_rel_full_bf16   the transformer with relative positions on the full graph in bf16: SDPA with a float
#                         mask on 4-D tensors, and its sample with the masked window recompute captured;
#   train_rel_window_bf16 the same on window:16: banded masked SDPA, and its sample decoded by the rolling
#                         buffers, one captured one-token step per character;
#   bench_bf16            bench.py at the paper shape in bf16 autocast.
# Usage: bash scripts/cuda_checks.sh [LOG_DIR]   (default: cuda_logs; one log per check, plus summary.txt)
#   CUDA_CHECKS (default: all six, in the order above) picks the checks by name, separated by spaces.
#   The trainings read DATA (default: input.txt in the repository root) and write their runs and samples in a
#   scratch directory (WORK_DIR, default: $TMPDIR/cuda_checks), not in the repository.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
logs=${1:-cuda_logs}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
work=${WORK_DIR:-${TMPDIR:-/tmp}/cuda_checks}
mkdir -p "$work"
data=${DATA:-$root/input.txt}
checks=" ${CUDA_CHECKS:-tests bench_fp32 train_compile_bf16 train_rel_full_bf16 train_rel_window_bf16 bench_bf16} "
export PYTHONUNBUFFERED=1 GNNGPT_NO_FALLBACK=1

check() {  # check NAME SECONDS COMMAND...: run COMMAND in the scratch directory under a time limit, log it
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    case $checks in *" $name "*) ;; *) return 0 ;; esac
    (cd "$work" && timeout "$limit" "$@") >"$logs/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - start)) s: $*" | tee -a "$logs/summary.txt"
}

train() {  # train NAME SECONDS SCRIPT FLAG...: a short training at the published size on CUDA, with its sample
    local name=$1 limit=$2 script=$3
    shift 3
    check "$name" "$limit" python3 "$root/$script" --preset paper --device cuda --data "$data" --max_iters 50 \
        --eval_interval 25 --eval_iters 10 --out_dir "$work/$name" --overwrite "$@"
}

{ nvidia-smi -L; python3 -c "import torch, torch_geometric as g; print('torch', torch.__version__, 'pyg', g.__version__)"; } \
    >"$logs/summary.txt" 2>&1
check tests 120 python3 -m pytest -q -p no:cacheprovider --rootdir "$root" --device cuda "$root/tests/test_fast_backend.py" \
    "$root/tests/test_data.py"
check bench_fp32 90 python3 "$root/bench.py" --preset paper --device cuda --iters 20 --json
train train_compile_bf16 180 pyg-gpt.py --gat_version GATv2Conv --dtype bfloat16 --compile
train train_rel_full_bf16 45 gpt.py --pos rel --dtype bfloat16
train train_rel_window_bf16 45 gpt.py --pos rel --graph window:16 --dtype bfloat16
check bench_bf16 90 python3 "$root/bench.py" --preset paper --device cuda --dtype bfloat16 --iters 10 --gen_repeats 1 \
    --json
