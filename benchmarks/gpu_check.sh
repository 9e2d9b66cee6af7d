#!/usr/bin/env bash
# One GPU check of metatrain's step cost, on one CUDA device, in under 8 minutes (sized for one NVIDIA H200):
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # OUTPUT_DIR: default $OUT if set, else outputs/gpu_check
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_check_smoke   # tiny, on CPU, to test the plumbing
#
# Parts, each `benchmarks/step_cost.py` in one process (--in_process: the CUDA allocator's peak is reset for every
# configuration, torch.cuda.synchronize around every timed step), plain training first and last of every size:
#   mwn   Meta-Weight-Net, CIFAR ResNet-32 widths 1-5, batch 100 of random 3x32x32 images: plain, EvoGrad (its
#         default, the default with meta_step_position=before, all-at-once, memory_lean), t1t2_fd, t1t2
#   lft   LFT (feature-wise transformation layers) on timm resnet10t and resnet34, 224x224, batch 16, same methods
#   bf16  MWN width 1 through MetaTrainer, EvoGrad's default (and plain), 200 steps under bf16 autocast:
#         meta_steps_skipped (must be 0), final loss, meta loss, hypergradient norm
#   fp16  the same under fp16 (Trainer's loss scaling)
#   lm    recipes/lm_data_weighting.py under bf16, seed 0, 3 epochs (tiny GPT-2, 50% corrupted answers): plain, clean
#         only, Meta-Weight-Net and mixture weights, each by EvoGrad and by t1t2_fd; held-out loss, gap recovered, time
#         per step, peak CUDA memory, skipped meta steps
# Then `benchmarks/gpu_report.py` writes summary.json (environment, every part's exit status and time, the checks)
# and report.md (Markdown tables to paste into docs/benchmarks.md).
#
# Time budget, seconds (8 min = 480 s in all). Each part spends ~10 s on imports and CUDA start-up before its first
# row; figures measured on an H200 (2026-12-04: 348 s in all without the lm part, at earlier limits):
#   wheels (.whl/, under 1 MB) ~5, the datasets check, versions and CUDA check ~15           limit: none (~20)
#   mwn   40 configurations x (3 warm-up + 15 timed + 1 metered step), ~3.5 s each: ~140 s
#         rows that would start more than 145 s after the first are skipped (recorded so)   hard stop 165
#   lft   16 configurations, same steps, ~5 s each: ~75 s; rows after 70 s skipped            hard stop 90
#   bf16  plain, EvoGrad, plain x 200 steps: ~60 s                                           hard stop 70
#   fp16  the same: ~65 s                                                                    hard stop 70
#   lm    6 runs x 96 steps of a tiny GPT-2 (not yet measured on a GPU)                      hard stop 45
#   report (imports torch for the environment) ~10                                          hard stop 20
# The hard stops and the ~20 s of set-up add up to 480 s; the expected total is about 420 s.
# Each part can fail or be stopped on its own: results.json is rewritten after every configuration, a failing
# configuration writes its error into its row, and the script always goes on to the next part and the report.
# GPU_CHECK_DEADLINE_SCALE (default 1) multiplies every deadline and hard stop, e.g. 0.5 for a shorter run.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
WORK=$(mktemp -d)
PARTS="$WORK/parts.tsv"
: >"$PARTS"
: >"$WORK/datasets.err"
echo "gpu_check: output in $OUT_DIR, smoke=$SMOKE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# The packages the GPU machine lacks travel as wheels in .whl/ (datasets 5.2.0 with dill and multiprocess, for
# Python 3.12: metatrain.trainer imports datasets; see /work/.library/device/README.md), installed with that README's
# command. Not in smoke mode, which runs with the local environment. A failed install does not stop the script.
# Fetch them first (not committed; .whl/ is in .git/info/exclude), then run with the device tool carrying ".whl":
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
if [ "$SMOKE" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site
        echo "gpu_check: installed into /tmp/site: $(cd .whl && echo *.whl)"
    else
        echo "gpu_check: WARNING: installing .whl/*.whl failed; going on with the machine's own packages"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing outside the machine is reachable
# metatrain imports datasets: the machine lacks it, so its wheel travels in .whl/ (above)
if ! "$PY" -c "import datasets" >"$WORK/datasets.err" 2>&1; then
    echo "gpu_check: ERROR: 'import datasets' fails ($(tail -n 1 "$WORK/datasets.err")): carry its wheel in .whl/" \
        "(see the top of this script); every row will record the import error"
fi

# ------------------------------------------------------------------------------------------ environment, CUDA
"$PY" - <<'EOF'
import importlib, platform
for name in ("torch", "transformers", "accelerate", "timm", "datasets", "pyarrow", "huggingface_hub", "safetensors",
             "numpy", "metatrain"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as err:
        print(f"  {name}: NOT IMPORTABLE: {type(err).__name__}: {err}")
import torch
print(f"  python {platform.python_version()}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else "")
EOF
if [ "$SMOKE" != 1 ]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: ERROR: no CUDA device visible to torch: this script measures GPU memory and time." \
            "Run it on the GPU machine, or set GPU_CHECK_SMOKE=1 for the tiny CPU run." >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
fi

# -------------------------------------------------------------------------------------------------- settings
METHODS=(plain evograd evograd_before evograd_all_at_once evograd_lean t1t2_fd t1t2)
SCALE=${GPU_CHECK_DEADLINE_SCALE:-1}
scaled() { awk -v s="$SCALE" -v x="$1" 'BEGIN { printf "%d", x * s }'; }
if [ "$SMOKE" = 1 ]; then  # plumbing only: width 1, resnet10t at 32 px, 2 timed steps, 4 steps per precision run
    MWN=(--widths 1 --batch_size 20 --warmup 1 --repeats 2 --threads 1)
    LFT=(--lft_models resnet10t --lft_image_size 32 --batch_size 4 --warmup 1 --repeats 2 --threads 1)
    PREC=(--widths 1 --batch_size 20 --warmup 1 --repeats 2 --logging_steps 1 --threads 1)
    LM=(--num_train 64 --num_meta 16 --num_test 32 --length 3 --num_train_epochs 1 --per_device_train_batch_size 16
        --meta_batch_size 16 --use_cpu true)
    MWN_DEADLINE=600 MWN_STOP=900 LFT_DEADLINE=600 LFT_STOP=900 PREC_STOP=600 LM_STOP=600
else
    MWN=(--widths 1 2 3 4 5 --batch_size 100 --warmup 3 --repeats 15 --threads 8)
    LFT=(--lft_models resnet10t resnet34 --lft_image_size 224 --batch_size 16 --warmup 3 --repeats 15 --threads 8)
    # 10 warm-up + 189 timed + 1 metered = 200 steps
    PREC=(--widths 1 --batch_size 100 --warmup 10 --repeats 189 --logging_steps 20 --threads 8)
    LM=(--num_train_epochs 3)  # 96 steps per run: the cost per step, not the recipe's result
    LM_STOP=$(scaled 45)
    MWN_DEADLINE=$(scaled 145) MWN_STOP=$(scaled 165) LFT_DEADLINE=$(scaled 70) LFT_STOP=$(scaled 90)
    PREC_STOP=$(scaled 70)
fi

# part NAME HARD_STOP_S ARGS...: one step_cost.py run into $OUT_DIR/NAME/results.json; never stops the script
part() {
    local name=$1 stop=$2
    shift 2
    local start=$SECONDS
    echo "=== part $name: step_cost.py $* (hard stop ${stop} s) ==="
    timeout -k 10 "$stop" "$PY" benchmarks/step_cost.py --output_dir "$OUT_DIR/$name" --in_process --keep_going \
        --no_plots "$@" 2>&1 | tee "$WORK/$name.log" | grep -v -E "Warning|warn\(|^\s*$"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "=== part $name: HARD STOP after ${stop} s (rows measured so far are kept) ==="
    echo "=== part $name: exit $rc after $((SECONDS - start)) s ==="
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$WORK/$name.log" >>"$PARTS"
}

part mwn "$MWN_STOP" "${MWN[@]}" --lft_models --methods "${METHODS[@]}" --deadline_s "$MWN_DEADLINE"
part lft "$LFT_STOP" "${LFT[@]}" --widths --methods "${METHODS[@]}" --deadline_s "$LFT_DEADLINE"
part bf16 "$PREC_STOP" "${PREC[@]}" --lft_models --methods plain evograd --mixed_precision bf16
if [ "$SMOKE" = 1 ]; then  # MetaTrainer refuses fp16 on CPU (Accelerate would train in fp32 without a word)
    echo "=== part fp16: SKIPPED in smoke mode: fp16 autocast needs CUDA ==="
    printf 'fp16\tskipped\t0\tsmoke run on CPU: fp16 autocast needs CUDA\n' >>"$PARTS"
else
    part fp16 "$PREC_STOP" "${PREC[@]}" --lft_models --methods plain evograd --mixed_precision fp16
fi
start=$SECONDS
echo "=== part lm: recipes/lm_data_weighting.py --bf16 true --seeds 0 (hard stop ${LM_STOP} s) ==="
timeout -k 10 "$LM_STOP" "$PY" recipes/lm_data_weighting.py --bf16 true --seeds 0 --results_dir "$OUT_DIR/lm" \
    --output_dir "$WORK/lm_runs" --disable_tqdm true "${LM[@]}" 2>&1 | tee "$WORK/lm.log" |
    grep -v -E "Warning|warn\(|^\s*$"
rc=${PIPESTATUS[0]}
echo "=== part lm: exit $rc after $((SECONDS - start)) s ==="
printf '%s\t%s\t%s\t%s\n' lm "$rc" "$((SECONDS - start))" "$WORK/lm.log" >>"$PARTS"

# ----------------------------------------------------------------------------------------------------- report
echo "=== report ==="
timeout -k 5 20 "$PY" benchmarks/gpu_report.py "$OUT_DIR" --parts "$PARTS" --smoke "$SMOKE"
echo "gpu_check: done in $SECONDS s; files:"
ls -la "$OUT_DIR" "$OUT_DIR"/*/ 2>/dev/null
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log complete before the command returns
exit 0
