#!/usr/bin/env bash
# The README's demo: a synthetic VOC-format dataset, then BARM on 15-1 (overlap), all six steps, with a
# ResNet-18 on the CPU (about 3 minutes on 2 cores), printing the per-step table. BARM's losses, with --clean
# (synchronised gradients, the last weights of every step: see docs/differences.md). Output under $OUT (about
# 400 MB: one checkpoint per step). On a CPU with native bf16 it trains with --amp (bf16 autocast) and
# channels-last tensors, the fastest CPU configuration (see the README's benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-demo}
AMP=$("$PYTHON" -m utils.hardware --amp_flag)
FAST=("$AMP")
[ "$AMP" = --amp ] && FAST+=(--channels_last on)

"$PYTHON" -m datasets.synthetic --dataset voc --root "$OUT/VOC2012" --n_train 200 --n_val 50 --size 128 --seed 0
COMMON=(--data_root "$OUT/VOC2012" --dataset voc --task 15-1 --overlap --model deeplabv3bga_resnet18
        --no_pretrained --crop_size 97 --crop_val --batch_size 8 --val_batch_size 8 --num_workers 2
        --lr_policy poly --val_interval 0 --ckpt_dir "$OUT/checkpoints" --subpath BARM --clean "${FAST[@]}")
# step 0 (run_init.sh): from scratch, so the backbone learns at 0.01 instead of BARM's 0.001 for ImageNet weights
"$PYTHON" train.py "${COMMON[@]}" --initial --train_epoch 20 --backbone_lr0 0.01
# steps 1-5 (run.sh): BARM's loss with pseudo-labels, BN frozen
"$PYTHON" train.py "${COMMON[@]}" --curr_step 1 --train_epoch 10 --lr 0.01 --pseudo --bn_freeze
# evaluate every step again with the settings recorded in its checkpoint (results in $OUT/checkpoints/BARM/15-1/overlap/eval/)
"$PYTHON" train.py --data_root "$OUT/VOC2012" --task 15-1 --overlap --ckpt_dir "$OUT/checkpoints" --subpath BARM --test
