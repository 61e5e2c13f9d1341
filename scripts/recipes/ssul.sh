#!/usr/bin/env bash
# SSUL and SSUL-M with SSUL's published settings (SSUL README, run.sh), every step of one
# task in one run, as SSUL's main.py:
#   bash scripts/recipes/ssul.sh voc 15-1          SSUL     (VOC: 15-1, 10-1, 15-5, 19-1)
#   bash scripts/recipes/ssul.sh voc 15-1 ssulm    SSUL-M   (memory: 100 images on VOC, 300 on ADE)
#   bash scripts/recipes/ssul.sh ade 100-5         SSUL     (ADE: 100-5, 100-10, 100-50, 50-50)
# VOC needs SSUL's saliency maps in $DATA_ROOT/saliency_map/ (see the README). The batch is SSUL's global batch
# (VOC 32, ADE 24: its DataParallel runs on GPUs 0,1), split over GPUS (default 0,1; one id -> one GPU with
# the whole batch; empty -> the CPU). DATA_ROOT, GPUS, CKPT_DIR, SETTING and EXTRA pass through; SSUL's
# unknown label, freezing, weight transfer, pseudo-labels (0.7) and BN freezing are the method's defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: ssul.sh voc|ade TASK [ssul|ssulm]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
VARIANT=${3:-ssul}

# published mIoU (all classes, last step; SSUL README): SSUL / SSUL-M
case "$DATASET:$TASK" in
    voc:15-1) ;;    # 67.61 / 71.37
    voc:10-1) ;;    # 59.25 / 64.12
    voc:15-5) ;;    # 71.22 / 73.02
    voc:19-1) ;;    # 75.44 / 76.49
    ade:100-5) ;;   # 32.48 / 34.56
    ade:100-10) ;;  # 33.10 / 34.46
    ade:100-50) ;;  # 33.58 / 34.37
    ade:50-50) ;;   # 29.56 / 29.77
    *)
        echo "error: no SSUL recipe for $DATASET $TASK: expected voc 15-1|10-1|15-5|19-1 or ade 100-5|100-10|100-50|50-50" >&2
        exit 2 ;;
esac
case "$DATASET" in
    voc) EPOCH=50 GLOBAL_BATCH=32 LR=0.01 POLICY=poly MEMORY=100 DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) EPOCH=100 GLOBAL_BATCH=24 LR=0.05 POLICY=warm_poly MEMORY=300
         DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
case "$VARIANT" in
    ssul) MEM=0 SUBPATH=${SUBPATH:-SSUL} ;;
    ssulm) MEM=$MEMORY SUBPATH=${SUBPATH:-SSUL-M} ;;
    *) echo "error: unknown variant '$VARIANT': expected ssul or ssulm" >&2; exit 2 ;;
esac

GPUS=${GPUS-0,1}
CKPT_DIR=${CKPT_DIR:-checkpoints}
SETTING=${SETTING:---overlap}           # --overlap, or empty for disjoint
EXTRA=${EXTRA:-}                        # more flags, e.g. "--resume"
N_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c . || true)
BATCH=$(( GLOBAL_BATCH / (N_GPUS > 0 ? N_GPUS : 1) ))   # per process

source scripts/launch.sh
# shellcheck disable=SC2086
launch --method ssul --data_root "$DATA_ROOT" --model deeplabv3_resnet101 --dataset "$DATASET" --task "$TASK" \
    --train_epoch "$EPOCH" --batch_size "$BATCH" --lr "$LR" --lr_policy "$POLICY" --loss_type bce_loss \
    --pseudo_thresh 0.7 --mem_size "$MEM" --crop_val --amp --curr_step 0 --subpath "$SUBPATH" \
    --ckpt_dir "$CKPT_DIR" $SETTING $EXTRA
