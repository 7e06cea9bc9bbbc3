#!/usr/bin/env bash
# Fills .claim/ (git-ignored) with what bench/gpu_claim.sh needs on a lent GPU machine, which has torch
# and triton but not vector-quantize-pytorch, cannot download, and has no Fashion-MNIST:
#   .claim/wheels/          vector-quantize-pytorch and its pure-Python needs, for Python 3.12
#   .claim/fashion-mnist/   the four IDX files (Debian's dataset-fashion-mnist)
#   .claim/tok_domain/, .claim/tok_ood/   the two CPU-trained tokenizers (their weights and config)
#
#   bash bench/gpu_claim_prep.sh runs/pretrain-levers/amx_default13/tokenizer runs/pretrain-levers/ood_amx_default13/tokenizer
#   bash bench/gpu_claim_prep.sh          # no tokenizers at hand: trains both here first (the AMX default's recipe,
#                                         # 14x14 tokens, 1,000 steps; a few minutes each on 2 cores)
# Run it from the repo root inside the project's virtual environment (`lvm` and pip on PATH).
set -eu -o pipefail
DOMAIN_TOK=${1:-} OOD_TOK=${2:-}
if [ -z "$DOMAIN_TOK" ]; then
    for pair in domain:fashion-mnist ood:skimage-crops; do
        name=${pair%%:*}
        lvm tokenizer-train --data "${pair#*:}" --out-dir "runs/claim-tokenizers/$name" --image-size 28 --channels 1 \
            --steps 1000 --batch-size 128 --eval-holdout 500 --grid 14 --no-progress
    done
    DOMAIN_TOK=runs/claim-tokenizers/domain OOD_TOK=runs/claim-tokenizers/ood
fi
FMNIST=${LVM_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
grep -qx "/.claim/" .git/info/exclude 2>/dev/null || echo "/.claim/" >> .git/info/exclude
rm -rf .claim && mkdir -p .claim/wheels .claim/fashion-mnist
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .claim/wheels \
    vector-quantize-pytorch==1.32.0 einx==0.4.3 loguru==0.7.3 torch-einops-utils==0.2.0 frozendict==2.5.1
cp "$FMNIST"/*-ubyte.gz .claim/fashion-mnist/
for pair in "domain:$DOMAIN_TOK" "ood:$OOD_TOK"; do  # a tokenizer folder's weights and config, links followed
    name=${pair%%:*} src=${pair#*:}
    mkdir -p ".claim/tok_$name"
    cp -L "$src"/tokenizer.json "$src"/tokenizer.safetensors "$src"/train_config.json ".claim/tok_$name/"
done
du -sh .claim
