#!/usr/bin/env bash
# GPU check: the kernels' GPU tests and the benchmark tables in one run, sized for a short session on
# a lent H100/H200.
#
#   bash bench/gpu_check.sh            # from the repo root; results land in $OUT (or bench/results)
#
# Needs only torch, triton, einops, pytest and safetensors, which the lent machines' image holds,
# so nothing is installed: the repo is put on PYTHONPATH. Steps, each with its own time cap so one
# hang cannot eat the budget: bf16/fp16/fp32 GPU tests of both kernels, the kernel benchmark table
# (attention vs SDPA, fused CE vs torch, with CUDA peak memory per row), and the training-step ladder.
set -u -o pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu-info.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$RESULTS/gpu-info.txt" || exit 1

# every kernel test runs on CUDA when it is there (bf16 cases are marked gpu); sentence-aware attention,
# the custom ops under torch.compile and the Triton-vs-torch convergence run included
timeout 300 python3 -m pytest tests/test_attention.py tests/test_attention_segments.py tests/test_custom_ops.py \
    tests/test_kernel_convergence.py tests/test_cross_entropy.py -q -p no:cacheprovider 2>&1 \
    | tee "$RESULTS/gpu-tests.log" || status=1
timeout 240 python3 -m bench.kernels --out "$RESULTS" 2>&1 | tee "$RESULTS/bench-kernels.log" || status=1
# one log for the two ladders: at most 8 files come back from a lent machine
timeout 120 python3 -m bench.train_step --out "$RESULTS" 2>&1 | tee "$RESULTS/bench-steps.log" || status=1
timeout 60 python3 -m bench.segment_attention 2>&1 | tee -a "$RESULTS/bench-steps.log" || status=1
exit $status
