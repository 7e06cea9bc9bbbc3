#!/usr/bin/env bash
# GPU check: the kernels' GPU tests and the benchmark tables in one run, sized for one short call on a
# lent H100/H200 (the whole script stays under ~9.5 minutes even when every step runs to its cap).
#
#   bash bench/gpu_check.sh            # from the repo root; results land in $OUT (or bench/results)
#
# Needs only torch, triton, einops, pytest and safetensors, which the lent machines' image holds, so
# nothing is installed: the repo is put on PYTHONPATH (the `tokenizer` package loads its quantizer
# library lazily, so the benchmarks never import it). Each step has its own time cap so one hang
# cannot eat the budget. Files written (at most 8 come back from a lent machine): check.log (device,
# tests and every step's output), <card>.json/.md (kernel table), train_step-cuda[-base].json/.md.
set -u -o pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${OUT:-bench/results}"
LOG="$RESULTS/check.log"
mkdir -p "$RESULTS"
status=0
step() {  # step CAP_SECONDS TITLE CMD...: run one step under its cap, appending to the log
    local cap=$1 title=$2; shift 2
    echo "=== $title (cap ${cap}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    timeout "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    echo "=== $title: rc=$rc $(date -u +%H:%M:%S)" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$LOG" || exit 1
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"  # Triton compiles dominate: spread them over workers

# every kernel test runs on CUDA when it is there (bf16 cases are marked gpu; slow ones included):
# sentence-aware attention, the custom ops under torch.compile, the Triton-vs-torch convergence run
step 170 "kernel tests" python3 -m pytest tests/test_attention.py tests/test_attention_segments.py \
    tests/test_custom_ops.py tests/test_kernel_convergence.py tests/test_cross_entropy.py -q -rs \
    -p no:cacheprovider $XDIST
step 150 "kernel benchmarks" python3 -m bench.kernels --out "$RESULTS"
step 150 "training-step ladder, small" python3 -m bench.train_step --out "$RESULTS"
step 80 "training-step ladder, base" python3 -m bench.train_step --preset base --no-compile --out "$RESULTS"
step 45 "sentence attention routes" python3 -m bench.segment_attention
exit $status
