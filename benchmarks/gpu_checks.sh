#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run sized for a short GPU loan, most important first:
#   1. tests/test_cuda.py: the adapter in float32 and bfloat16, merging, a training step with and without bf16;
#   2. bench_train_step.py: ViT-g at 518 px, ours against the original and the floor (TF32, the original's
#      setting), with CUDA peak memory and a profile of our step;
#   3. the same with bf16 autocast;
#   4. bench_scaling.py: ViT-g, our step at 224/518/896 px and batch 1/2/4, bf16 autocast;
#   5. bench_families.py: every family's step against its plain forward and backward pass;
#   6. bench_evaluate.py --parts probes: kNN and the linear segmentation probe, 1,000 + 1,000 images, 150 classes.
# Each step has its own time limit (STEP_LIMIT_S, default 240 s; SHORT_LIMIT_S, default 120 s, for steps 5-6) so
# that one slow step cannot use up the loan; a failed or timed-out step is reported and the next one runs. Results
# go to $OUT (default: gpu-results/), 7 files: environment.txt, checks.log (every step's output and errors, one
# section each) and the benchmarks' JSON. Run from the repository root, with the Python that has torch (sinder-peft
# itself is used from the source tree):
#
#     bash benchmarks/gpu_checks.sh
#
# It needs transformers 5, peft 0.18-0.21 and accelerate on that machine; where they are missing or older, carry
# wheels (`pip download peft==0.21.2 --no-deps -d wheels/`) and `pip install --no-deps wheels/*.whl` first.
#
# Without a GPU, `DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh` runs the same steps on a tiny model (a dry run
# of this script; the CUDA tests then skip).
set -uo pipefail

OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
STEP_LIMIT_S=${STEP_LIMIT_S:-240}
SHORT_LIMIT_S=${SHORT_LIMIT_S:-120}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${QUICK:-}" ]; then
    step_model=(--quick)
    scaling_model=(--quick)
    families_model=(--quick)
    probes_model=(--quick)
else
    step_model=(--model-size g --resolution 518 --warmup 2 --repeats 5)
    scaling_model=(--model-size g)
    families_model=(--repeats 9)
    probes_model=(--model-size b)
fi

"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt"
import accelerate, peft, torch, transformers

import sinder_peft  # refuses a PEFT version it cannot register with, saying which

print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA device")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!!! the environment cannot run sinder-peft (see above)"; exit 1; }

failures=0
LOG="$OUT/checks.log"
: >"$LOG"
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    local first_line
    first_line=$(($(wc -l <"$LOG") + 1))
    # straight into the log, so that a run cut short keeps what every step printed
    if timeout "$limit" "$@" >>"$LOG" 2>&1; then
        tail -n +"$first_line" "$LOG" | grep -E '^(\||## |[0-9]+ px|[0-9]+ (passed|skipped|failed)|FAILED|ERROR)' |
            head -n 40
    else
        echo "!!! $name failed or ran past ${limit} s; see $LOG"
        tail -n +"$first_line" "$LOG" | tail -n 20
        failures=$((failures + 1))
    fi
}

run_step cuda_tests "$STEP_LIMIT_S" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
run_step train_step_vitg "$STEP_LIMIT_S" "$PYTHON" benchmarks/bench_train_step.py --device "$DEVICE" \
    "${step_model[@]}" --profile --output "$OUT/train_step_vitg.json"
run_step train_step_vitg_bf16 "$STEP_LIMIT_S" "$PYTHON" benchmarks/bench_train_step.py --device "$DEVICE" \
    "${step_model[@]}" --bf16 --output "$OUT/train_step_vitg_bf16.json"
run_step scaling_vitg_bf16 "$STEP_LIMIT_S" "$PYTHON" benchmarks/bench_scaling.py --device "$DEVICE" \
    "${scaling_model[@]}" --bf16 --output "$OUT/scaling_vitg_bf16.json"
run_step families "$SHORT_LIMIT_S" "$PYTHON" benchmarks/bench_families.py --device "$DEVICE" \
    "${families_model[@]}" --output "$OUT/families.json"
run_step probes "$SHORT_LIMIT_S" "$PYTHON" benchmarks/bench_evaluate.py --device "$DEVICE" --parts probes \
    "${probes_model[@]}" --output "$OUT/probes.json"

echo "=== done ($(date -u +%H:%M:%S)): $failures step(s) failed; results in $OUT"
exit "$failures"
