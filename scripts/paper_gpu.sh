#!/usr/bin/env bash
# The published comparison at the published size on one GPU, with the checks that go with it. Each step runs
# under a time limit, all within one budget (PAPER_BUDGET_S, default 570 s: under 10 minutes in all), in this
# order:
#   tests    the fast backend's, decoding's and batches' tests on CUDA (python -m pytest --device cuda
#            tests/test_fast_backend.py tests/test_data.py), with GNNGPT_NO_FALLBACK=1: a fast path that raises
#            fails them instead of stepping aside (the comparison keeps the fallbacks, so that no run is lost);
#   bench    bench.py at the paper shape on CUDA;
#   compare  bigram, gpt, GATConv and GATv2Conv at --preset paper (the published hyperparameters, 5000 steps),
#            four at once on the GPU, evaluated every 1000 steps (the preset: 50) on 200 batches per split, into
#            plots/paper/runs (whose small files are kept beside the results); it writes plots/paper/val_loss.png
#            and plots/paper/results.md, and each model's sample to model_outputs/ (the shipped samples). It comes
#            last and gets what is left of the budget: stopped at its limit, every run keeps a checkpoint, and
#            PAPER_STEPS=compare with the same flags resumes them.
# A step that fails does not stop the next; the script exits with the first failed step's status (0 when none).
# docs/paper.md says how the evaluation interval was sized.
#
# Usage: bash scripts/paper_gpu.sh [LOG_DIR [COMPARE_FLAG...]]
#   Run it in the repository root with input.txt there: plots/paper and model_outputs are written in the
#   current directory (model_outputs at the published size only). LOG_DIR (default: paper_logs) gets one log per step and summary.txt. COMPARE_FLAGs
#   follow the script's own compare.py flags and so override them. Environment: PAPER_STEPS (default:
#   "tests bench compare") picks the steps, PAPER_BUDGET_S the budget, PYTHON the interpreter (default: python3).
#   Its comparison on a CPU at a tiny size, run in a scratch directory with input.txt (in the repository root,
#   compare.py refuses other flags than the shipped report's over plots/paper; tests/test_paper_gpu.py runs it
#   so):
#     PAPER_STEPS=compare bash scripts/paper_gpu.sh /tmp/paper_logs --device cpu --max_iters 20 --batch_size 4 \
#         --block_size 16 --n_embd 16 --n_head 2 --n_layer 1 --eval_iters 2
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
logs=${1:-paper_logs}
shift $(($# > 0 ? 1 : 0))
steps=" ${PAPER_STEPS:-tests bench compare} "
budget=${PAPER_BUDGET_S:-570}
python=${PYTHON:-python3}
grace=30  # seconds between a step's SIGTERM at its limit and SIGKILL: a run finishes its step (or stops its evaluation)
failed=0  # the exit status of the first step that failed
mkdir -p "$logs"
export PYTHONUNBUFFERED=1

# step NAME LIMIT COMMAND...: if PAPER_STEPS names it, run COMMAND under LIMIT seconds, logged; record how it ended
step() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    case $steps in *" $name "*) ;; *) return 0 ;; esac
    timeout -k "$grace" "$limit" "$@" >"$logs/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s): $*" | tee -a "$logs/summary.txt"
    ((status == 0 || failed != 0)) || failed=$status
    return "$status"
}

{
    date -u
    git -C "$root" log -1 --format='commit %h' 2>/dev/null
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$python" -c "from importlib.metadata import version as v; print('torch', v('torch'), 'pyg', v('torch_geometric'))"
} >"$logs/summary.txt" 2>&1

step tests 120 env GNNGPT_NO_FALLBACK=1 "$python" -m pytest -q --device cuda "$root/tests/test_fast_backend.py" \
    "$root/tests/test_data.py"
step bench 90 "$python" "$root/bench.py" --preset paper --device cuda --json
left=$((budget - SECONDS - grace))
step compare $((left > 1 ? left : 1)) "$python" "$root/compare.py" --models bigram,gpt,GATConv,GATv2Conv \
    --preset paper --device cuda --jobs 4 --eval_interval 1000 --runs plots/paper/runs --out plots/paper "$@"
status=$?
if [[ $steps == *" compare "* ]]; then
    if ((status == 0)); then
        cat plots/paper/results.md >>"$logs/summary.txt"
    else
        echo "compare exited with $status: PAPER_STEPS=compare with the same arguments resumes the stopped runs and" \
            "retries the failed ones (finished runs are reused)" | tee -a "$logs/summary.txt"
    fi
fi
exit "$failed"
