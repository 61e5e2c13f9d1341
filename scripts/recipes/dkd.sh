#!/usr/bin/env bash
# DKD and DKD-M with DKD's published settings (DKD scripts/voc/overlapped/*.sh, scripts/ade/overlapped/*.sh,
# configs/config_voc.json, configs/config_ade.json), every step of one task:
#   bash scripts/recipes/dkd.sh voc 15-1                 DKD, overlap   (VOC: 19-1, 15-5, 15-1, 10-1, 5-3)
#   bash scripts/recipes/dkd.sh voc 15-1 disjoint        DKD, disjoint
#   bash scripts/recipes/dkd.sh voc 15-1 overlap 100     DKD-M: 100 memory images (DKD's VOC value)
#   bash scripts/recipes/dkd.sh ade 100-50 overlap 300   DKD-M on ADE (ADE: 100-50, 100-10, 50-50; 300 images)
# The batch is DKD's global batch (VOC 32 = 4 GPUs x 8, ADE 24 = 4 x 6), split over GPUS (default 0,1,2,3; one
# id -> one GPU with the whole batch; empty -> the CPU). `--lr` is the backbone's (ASPP and classifiers at 10x),
# 1e-3 then 1e-4 on VOC, 2.5e-3 then 2.5e-4 on ADE; pos_weight (VOC 2 at step 0 then 1, ADE 35), the loss
# weights, frozen BN and dropout at t>0 and the weight-decay policy are the method's defaults. A DKD-M run starts
# from the DKD run's step 0 when it exists (the two are the same at step 0). DATA_ROOT, GPUS, CKPT_DIR, SUBPATH and
# EXTRA (more flags, e.g. "--resume") pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: dkd.sh voc|ade TASK [overlap|disjoint] [MEM]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
SETTING=${3:-overlap}
MEM=${4:-0}

# published hIoU / mIoU of all classes at the last step (DKD README): DKD ; DKD-M
case "$DATASET:$TASK:$SETTING" in
    voc:19-1:overlap) ;;   # 56.95 / 76.13 ; 68.14 / 77.04
    voc:15-5:overlap) ;;   # 67.17 / 73.95 ; 68.96 / 74.84
    voc:15-1:overlap) ;;   # 57.46 / 70.50 ; 64.09 / 72.95
    voc:10-1:overlap) ;;   # 57.21 / 60.43 ; 64.89 / 66.20
    voc:5-3:overlap) ;;    # 61.32 / 58.98 ; 65.02 / 63.32
    voc:19-1:disjoint) ;;  # 57.98 / 75.90 ; 67.12 / 76.84
    voc:15-5:disjoint) ;;  # 64.35 / 72.21 ; 65.04 / 72.53
    voc:15-1:disjoint) ;;  # 54.21 / 68.48 ; 60.32 / 70.78
    voc:10-1:disjoint|voc:5-3:disjoint) ;;  # not published
    ade:100-50:overlap) ;;  # 29.42 / 35.55 ; 29.45 / 35.58
    ade:100-10:overlap) ;;  # 26.79 / 34.53 ; 27.44 / 34.83
    ade:50-50:overlap) ;;   # 34.77 / 34.39 ; 34.78 / 34.39
    *)
        echo "error: no DKD recipe for $DATASET $TASK $SETTING: expected voc 19-1|15-5|15-1|10-1|5-3 overlap|disjoint" \
             "or ade 100-50|100-10|50-50 overlap" >&2
        exit 2 ;;
esac
case "$MEM" in
    ''|*[!0-9]*) echo "error: MEM must be a number of memory images (0: DKD), got '$MEM'" >&2; exit 2 ;;
esac
case "$DATASET" in
    voc) EPOCH=60 GLOBAL_BATCH=32 LR0=0.001 LR=0.0001 POLICY=poly DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) EPOCH=100 GLOBAL_BATCH=24 LR0=0.0025 LR=0.00025 POLICY=warm_poly
         DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
[ "$SETTING" = overlap ] && SETTING_FLAG=--overlap || SETTING_FLAG=
DKD_SUBPATH=DKD
if [ "$MEM" -gt 0 ]; then SUBPATH=${SUBPATH:-DKD-M}; else SUBPATH=${SUBPATH:-$DKD_SUBPATH}; fi

GPUS=${GPUS-0,1,2,3}
CKPT_DIR=${CKPT_DIR:-checkpoints}
EXTRA=${EXTRA:-}
N_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c . || true)
BATCH=$(( GLOBAL_BATCH / (N_GPUS > 0 ? N_GPUS : 1) ))   # per process
COMMON=(--method dkd --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --model dkd_resnet101
        --crop_size 512 --crop_val --train_epoch "$EPOCH" --batch_size "$BATCH" --lr_policy "$POLICY" --amp
        --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH" $SETTING_FLAG)

source scripts/launch.sh
STEP0="$CKPT_DIR/$DKD_SUBPATH/$TASK/$SETTING/step0/final.pth"
if [ "$MEM" -gt 0 ] && [ "$SUBPATH" != "$DKD_SUBPATH" ] && [ -f "$STEP0" ]; then
    FROM=(--prev_ckpt "$STEP0")   # DKD-M's step 0 is DKD's
else
    FROM=()
    # shellcheck disable=SC2086
    launch "${COMMON[@]}" --lr "$LR0" --initial $EXTRA
fi
# shellcheck disable=SC2086
launch "${COMMON[@]}" --lr "$LR" --curr_step 1 --mem_size "$MEM" ${FROM[@]+"${FROM[@]}"} $EXTRA
