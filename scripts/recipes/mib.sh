#!/usr/bin/env bash
# The MiB family (FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB) and PLOP as published, every step of one task:
#   bash scripts/recipes/mib.sh mib voc 15-1 overlap     (METHOD: ft lwf lwf-mc ilt ewc pi rw mib plop)
#   bash scripts/recipes/mib.sh plop ade 100-5           (SETTING: overlap (default) or disjoint)
#   PROTOCOL=plop bash scripts/recipes/mib.sh ilt voc 15-1 overlap
# Each published number was produced by one code base: MiB's (--protocol mib: MiB's labels and evaluation, fp32;
# MiB README) or PLOP's (--protocol plop: PLOP's labels and evaluation, apex O1; PLOP scripts/voc/*.sh,
# scripts/ade/*.sh, which RCIL's README and SSUL's README re-ran). The recipe runs the protocol of the number it
# prints: the method's own where both published it, else the other (e.g. MiB on VOC 10-1 was published from PLOP's
# code); PROTOCOL=mib|plop picks one. Values of both: crop 512, centre-crop evaluation, global batch 24 (2 GPUs x
# 12), SGD + poly, lr 0.01 at step 0 then 0.001, 30 epochs per step on VOC (PLOP's 10-1: 10 after step 0), 60 on
# ADE, seed 42; ResNet-101 with the InPlace-ABN ImageNet weights (docs/data.md). GPUS (default 0,1; one id: one GPU
# with the whole batch; empty: the CPU), DATA_ROOT, CKPT_DIR, SUBPATH and EXTRA pass through.
# Cityscapes domains (ft lwf lwf-mc ilt mib plop; SETTING: domains):
#   bash scripts/recipes/mib.sh plop cityscapes_domain 11-5
# PLOP's code produced every Cityscapes number (PLOP scripts/cityscapesDomain/*.sh; RCIL's README re-ran them): apex
# O1, 50 epochs at every step, the other values as above; PLOP 1-1 distils the logits with 0.001
# (plop_cityscapesDomain_1-1.sh), 11-1 and 11-5 with 0.0001 (plop_cityscapesDomain_11-1.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: mib.sh ft|lwf|lwf-mc|ilt|ewc|pi|rw|mib|plop voc|ade|cityscapes_domain TASK [overlap|disjoint|domains]"
METHOD=${1:?$USAGE}
DATASET=${2:?$USAGE}
TASK=${3:?$USAGE}
DEFAULT_SETTING=overlap
[ "$DATASET" = cityscapes_domain ] && DEFAULT_SETTING=domains
SETTING=${4:-$DEFAULT_SETTING}
case "$METHOD" in
    ft|lwf|lwf-mc|ilt|ewc|pi|rw|mib) OWN=mib ;;
    plop) OWN=plop ;;
    *) echo "error: unknown method '$METHOD': $USAGE" >&2; exit 2 ;;
esac
case "${PROTOCOL:-}" in
    ''|mib|plop) ;;
    *) echo "error: PROTOCOL must be mib or plop, got '$PROTOCOL'" >&2; exit 2 ;;
esac
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup "$METHOD" "$DATASET" "$TASK" "$SETTING" "${PROTOCOL:-}" "$OWN"
recipe_announce

case "$DATASET" in
    voc) EPOCH0=30 EPOCH=30 DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) EPOCH0=60 EPOCH=60 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    cityscapes_domain) EPOCH0=50 EPOCH=50 DATA_ROOT=${DATA_ROOT:-data/cityscapes} ;;
esac
[ "$PROTOCOL:$DATASET:$TASK" = plop:voc:10-1 ] && EPOCH=10   # PLOP scripts/voc/plop_10-1.sh
[ "$PROTOCOL" = plop ] && AMP=--amp || AMP=--no_amp          # PLOP's scripts: apex O1; MiB's: fp32
METHOD_FLAGS=()
[ "$METHOD:$DATASET:$TASK" = plop:cityscapes_domain:1-1 ] && METHOD_FLAGS=(--pod_logits_factor 0.001)
[ "$SETTING" = overlap ] && SETTING_FLAG=(--overlap) || SETTING_FLAG=()
SUBPATH=${SUBPATH:-$METHOD}
[ "$PROTOCOL" = "$OWN" ] || SUBPATH=$SUBPATH-$PROTOCOL-protocol
CKPT_DIR=${CKPT_DIR:-checkpoints}
COMMON=(--method "$METHOD" --protocol "$PROTOCOL" --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK"
        ${SETTING_FLAG[@]+"${SETTING_FLAG[@]}"} --model mib_resnet101 --crop_size 512 --crop_val --global_batch 24
        --lr_policy poly --weight_decay 1e-4 --random_seed 42 --output_stride 16 "$AMP" --ckpt_dir "$CKPT_DIR"
        --subpath "$SUBPATH" ${METHOD_FLAGS[@]+"${METHOD_FLAGS[@]}"})
export GPUS=${GPUS-0,1}
recipe_step "${COMMON[@]}" --lr 0.01 --train_epoch "$EPOCH0" --curr_step 0 --initial
recipe_step "${COMMON[@]}" --lr 0.001 --train_epoch "$EPOCH" --curr_step 1
recipe_report
