#!/usr/bin/env bash
# Target (4) of issue #14 at GPU scale: the domain LVM and its out-of-domain twin pretrained with the
# same recipe and many more tokens than the 2-core CPU affords, each probed (linear, mirrored) at 30 % and
# 100 % of the Fashion-MNIST labels. Sized for one call on a lent H100/H200: the two run side by side.
#
#   bash bench/gpu_claim_prep.sh DOMAIN_TOKENIZER OOD_TOKENIZER    # here, once: fills .claim/ (git-ignored)
#   bash bench/gpu_claim.sh                                          # on the GPU (carry .claim): both models at once
#   CLAIM_PHASE=train bash bench/gpu_claim.sh; CLAIM_PHASE=probe bash bench/gpu_claim.sh   # the same, as two calls
#   CLAIM_DRY=1 bash bench/gpu_claim.sh                              # here, on CPU: tiny sizes, checks the wiring
#
# Both models use the tokenizers trained on the CPU (so only the LVM's compute changes) and the same
# steps, batch and learning rate; the probe chooses each model's layer on training images, as `lvm probe`
# does. Results: $OUT/<name>/probe.{json,md} and $OUT/<name>.log (or runs/claim-gpu without $OUT).
set -u -o pipefail
NAMES=("$@")
[ "$#" -gt 0 ] || NAMES=(domain ood)
ROOT="$PWD"
CLAIM="$ROOT/.claim"
RESULTS="${OUT:-runs/claim-gpu}"
PHASE=${CLAIM_PHASE:-all}  # all | train (tokenize + pretrain) | probe: two calls of ~5 min on a machine kept warm
case "$PHASE" in all|train|probe) ;; *) echo "CLAIM_PHASE is all, train or probe, not $PHASE"; exit 2 ;; esac
export PYTHONUNBUFFERED=1 LVM_FASHION_MNIST_DIR="$CLAIM/fashion-mnist"
if [ -n "${CLAIM_DRY:-}" ]; then  # CPU: a few steps on a few thousand images, every stage still runs
    STEPS=20 BATCH=4 DEVICE=cpu COMPILE=--no-compile LIMIT=(--limit 3000) PROBE_LIMIT=(--limit-train 2000 --limit-test 500)
    BUDGET=()
    FRACTIONS=(1.0) SEEDS=1 SWEEP=500 PY="${PY:-python3}"
else  # ~49 M tokens per model, 6x the 30-minute CPU default's 7.8 M (1,923 steps of 8 rows of 510)
    STEPS=${CLAIM_STEPS:-3000} BATCH=${CLAIM_BATCH:-32} DEVICE=cuda COMPILE=--compile LIMIT=() PROBE_LIMIT=()
    BUDGET=(--time-budget "${CLAIM_TRAIN_MIN:-3}")  # minutes: fewer steps (logged) if the GPU is slower than planned
    FRACTIONS=(0.3 1.0) SEEDS=3 SWEEP=5000 PY=python3
    # the lent machines lack vector-quantize-pytorch and its pure-Python needs: install the carried wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CLAIM"/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/site"
    nvidia-smi --query-gpu=name --format=csv,noheader
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# the models run side by side (a small LVM leaves most of the GPU idle), sharing the CPU cores
THREADS=$(( $(nproc) / ${#NAMES[@]} )); [ "$THREADS" -ge 1 ] || THREADS=1
export OMP_NUM_THREADS=$THREADS

pipeline() {  # pipeline NAME: tokenize, pretrain and probe one model; its log is $RESULTS/NAME.log
    local name=$1 source
    [ "$name" = domain ] && source=fashion-mnist || source=skimage-crops
    local tok="$CLAIM/tok_$name" work="${CLAIM_WORK:-/tmp/claim}/$name" log="$RESULTS/$name.log"
    [ -d "$tok" ] || { echo "no $tok: run bench/gpu_claim_prep.sh first (and carry .claim)" | tee "$log"; return 2; }
    mkdir -p "$RESULTS/$name" "$work"
    step() {  # step TITLE CMD...: one stage, timed, into the log; the pipeline stops at the first failure
        echo "=== $name: $1 $(date -u +%H:%M:%S)" >> "$log"; shift
        echo "+ $*" >> "$log"
        local t0=$SECONDS
        "$@" 2>&1 | grep -v -E "it/s\]|batch/s\]|fit/s\]|img/s\]|step/s\]" >> "$log"
        local rc=${PIPESTATUS[0]}
        echo "=== $name: rc=$rc, $((SECONDS - t0)) s" >> "$log"
        return "$rc"
    }
    if [ "$PHASE" != probe ]; then
        step "tokenize train" "$PY" -m lvm.cli tokenize --source "$source" --tokenizer "$tok" --split train \
            --out "$work/tokens/train" "${LIMIT[@]}" || return 1
        step "tokenize test" "$PY" -m lvm.cli tokenize --source "$source" --tokenizer "$tok" --split test \
            --out "$work/tokens/test" "${LIMIT[@]}" || return 1
        step "pretrain" "$PY" -m lvm.cli train --data "$work/tokens/train" --eval-data "$work/tokens/test" \
            --out "$work/lvm" --preset small --context-len 512 --steps "$STEPS" --batch-size "$BATCH" --lr 2e-3 \
            --warmup-steps 50 --eval-every 1000 --ckpt-every 1000 --eval-rows 64 --device "$DEVICE" $COMPILE \
            --threads "$THREADS" --no-progress "${BUDGET[@]}" || return 1
    fi
    [ "$PHASE" != train ] || return 0
    [ -d "$work/lvm" ] || { echo "no $work/lvm: run CLAIM_PHASE=train first, on the same machine" >> "$log"; return 2; }
    step "probe" "$PY" -m lvm.cli probe --checkpoint "$work/lvm" --tokenizer "$tok" --source fashion-mnist \
        --fractions "${FRACTIONS[@]}" --seeds "$SEEDS" --no-baselines --no-random-init --sweep-images "$SWEEP" \
        --mirror --methods linear --device "$DEVICE" --out "$RESULTS/$name" "${PROBE_LIMIT[@]}" || return 1
    rm -f "$RESULTS/$name/label_efficiency.png"  # at most 8 files come back from a lent machine
}

for name in "${NAMES[@]}"; do
    case "$name" in domain|ood) ;; *) echo "models are domain and ood, not $name"; exit 2 ;; esac
done
mkdir -p "$RESULTS"
pids=()
for name in "${NAMES[@]}"; do pipeline "$name" & pids+=($!); done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { status=1; echo "${NAMES[$i]} failed:"; tail -20 "$RESULTS/${NAMES[$i]}.log"; }
done
for name in "${NAMES[@]}"; do grep -h "^===" "$RESULTS/$name.log"; cat "$RESULTS/$name/probe.md" 2>/dev/null; done
exit $status
