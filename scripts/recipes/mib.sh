#!/usr/bin/env bash
# MiB's family (FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB) and PLOP with their published settings (MiB README;
# PLOP scripts/voc/plop_*.sh, scripts/ade/plop_ade_*.sh), every step of one task:
#   bash scripts/recipes/mib.sh mib voc 15-1 overlap     (METHOD: ft lwf lwf-mc ilt ewc pi rw mib plop)
#   bash scripts/recipes/mib.sh plop ade 100-5           (VOC: 19-1 15-5 15-1 10-1, overlap|disjoint (default
#                                                         overlap); ADE: 100-50 100-10 50-50 100-5, overlap)
# Settings: crop 512, centre-crop evaluation, ResNet-101 with the InPlace-ABN ImageNet weights
# ($TORCH_HOME/hub/checkpoints/resnet101_iabn_sync.pth.tar), SGD Nesterov + poly without floor, global batch 24
# (2 GPUs x 12), lr 0.01 at step 0 and 0.001 after, 30 epochs per step on VOC (10-1: 10 after step 0, PLOP's
# schedule), 60 on ADE; fp32 for MiB's methods, mixed precision (--amp, PLOP's apex O1) for PLOP. The loss weights
# are the methods' defaults (PLOP's POD factors follow --dataset).
# PROTOCOL=plop runs one of MiB's methods under PLOP's label tables and evaluation (void ignored, ADE class 0
# scored) with --amp, as the PLOP paper's re-runs of MiB and ILT. ADE: ciss builds the per-step lists with the
# overlap filter; MiB's paper used its own partition of the images (see the README, "Differences").
# DATA_ROOT, GPUS (default 0,1; one id -> one GPU with the whole batch; empty -> the CPU), CKPT_DIR, SUBPATH,
# PROTOCOL and EXTRA (more flags, e.g. "--resume") pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: mib.sh ft|lwf|lwf-mc|ilt|ewc|pi|rw|mib|plop voc|ade TASK [overlap|disjoint]"
METHOD=${1:?$USAGE}
DATASET=${2:?$USAGE}
TASK=${3:?$USAGE}
SETTING=${4:-overlap}

case "$METHOD" in
    ft|lwf|lwf-mc|ilt|ewc|pi|rw|mib) PROTOCOL=${PROTOCOL:-mib} ;;
    plop) PROTOCOL=${PROTOCOL:-plop} ;;
    *) echo "error: unknown method '$METHOD': $USAGE" >&2; exit 2 ;;
esac
case "$PROTOCOL" in
    mib|plop) ;;
    *) echo "error: PROTOCOL must be mib or plop, got '$PROTOCOL'" >&2; exit 2 ;;
esac
case "$DATASET:$TASK:$SETTING" in
    voc:19-1:overlap|voc:19-1:disjoint|voc:15-5:overlap|voc:15-5:disjoint|voc:15-1:overlap|voc:15-1:disjoint) ;;
    voc:10-1:overlap|voc:10-1:disjoint) ;;
    ade:100-50:overlap|ade:100-10:overlap|ade:50-50:overlap|ade:100-5:overlap) ;;
    *)
        echo "error: no recipe for $DATASET $TASK $SETTING: expected voc 19-1|15-5|15-1|10-1 overlap|disjoint or" \
             "ade 100-50|100-10|50-50|100-5 overlap" >&2
        exit 2 ;;
esac

# published mIoU of all classes at the last step: MiB paper [MiB] (MiB voc-tab.png, ade-tab.png; VOC; ADE on its
# own image partition), PLOP paper [PLOP] (overlap, PLOP's protocol), RCIL README [RCIL] (PLOP's protocol)
published() {
    case "$METHOD:$DATASET:$TASK:$SETTING" in
        ft:voc:19-1:disjoint) echo "6.2 [MiB]" ;;          ft:voc:19-1:overlap) echo "7.1 [MiB]" ;;
        ft:voc:15-5:disjoint) echo "9.2 [MiB]" ;;          ft:voc:15-5:overlap) echo "9.8 [MiB]" ;;
        ft:voc:15-1:disjoint) echo "0.6 [MiB]" ;;          ft:voc:15-1:overlap) echo "0.6 [MiB]" ;;
        pi:voc:19-1:disjoint) echo "5.9 [MiB]" ;;          pi:voc:19-1:overlap) echo "7.8 [MiB]" ;;
        pi:voc:15-5:disjoint) echo "9.5 [MiB]" ;;          pi:voc:15-5:overlap) echo "9.5 [MiB]" ;;
        pi:voc:15-1:disjoint) echo "0.4 [MiB]" ;;          pi:voc:15-1:overlap) echo "0.5 [MiB]" ;;
        ewc:voc:19-1:disjoint) echo "22.9 [MiB]" ;;        ewc:voc:19-1:overlap) echo "26.3 [MiB]" ;;
        ewc:voc:15-5:disjoint) echo "29.4 [MiB]" ;;        ewc:voc:15-5:overlap) echo "27.1 [MiB]" ;;
        ewc:voc:15-1:disjoint) echo "1.3 [MiB]" ;;         ewc:voc:15-1:overlap) echo "1.3 [MiB]" ;;
        rw:voc:19-1:disjoint) echo "19.2 [MiB]" ;;         rw:voc:19-1:overlap) echo "22.9 [MiB]" ;;
        rw:voc:15-5:disjoint) echo "22.7 [MiB]" ;;         rw:voc:15-5:overlap) echo "21.2 [MiB]" ;;
        rw:voc:15-1:disjoint) echo "1.5 [MiB]" ;;          rw:voc:15-1:overlap) echo "1.3 [MiB]" ;;
        lwf:voc:19-1:disjoint) echo "50.8 [MiB]" ;;        lwf:voc:19-1:overlap) echo "49.1 [MiB]" ;;
        lwf:voc:15-5:disjoint) echo "53.1 [MiB]" ;;        lwf:voc:15-5:overlap) echo "53.3 [MiB]" ;;
        lwf:voc:15-1:disjoint) echo "1.5 [MiB]" ;;         lwf:voc:15-1:overlap) echo "1.8 [MiB]" ;;
        lwf:voc:10-1:disjoint) echo "4.3 [RCIL]" ;;        lwf:voc:10-1:overlap) echo "4.8 [RCIL]" ;;
        lwf-mc:voc:19-1:disjoint) echo "60.5 [MiB]" ;;     lwf-mc:voc:19-1:overlap) echo "61.9 [MiB]" ;;
        lwf-mc:voc:15-5:disjoint) echo "60.7 [MiB]" ;;     lwf-mc:voc:15-5:overlap) echo "52.3 [MiB]" ;;
        lwf-mc:voc:15-1:disjoint) echo "5.2 [MiB]" ;;      lwf-mc:voc:15-1:overlap) echo "6.9 [MiB]" ;;
        ilt:voc:19-1:disjoint) echo "66.4 [MiB]" ;;        ilt:voc:19-1:overlap) echo "64.4 [MiB]; 65.05 [PLOP]" ;;
        ilt:voc:15-5:disjoint) echo "57.3 [MiB]" ;;        ilt:voc:15-5:overlap) echo "59.9 [MiB]; 60.45 [PLOP]" ;;
        ilt:voc:15-1:disjoint) echo "4.2 [MiB]" ;;         ilt:voc:15-1:overlap) echo "5.7 [MiB]; 8.56 [PLOP]" ;;
        ilt:voc:10-1:disjoint) echo "5.4 [RCIL]" ;;        ilt:voc:10-1:overlap) echo "5.5 [RCIL]" ;;
        mib:voc:19-1:disjoint) echo "67.4 [MiB]" ;;        mib:voc:19-1:overlap) echo "67.8 [MiB]; 69.15 [PLOP]" ;;
        mib:voc:15-5:disjoint) echo "64.7 [MiB]" ;;        mib:voc:15-5:overlap) echo "69.0 [MiB]; 70.08 [PLOP]" ;;
        mib:voc:15-1:disjoint) echo "37.9 [MiB]" ;;        mib:voc:15-1:overlap) echo "29.7 [MiB]; 29.29 [PLOP]" ;;
        mib:voc:10-1:disjoint) echo "6.9 [RCIL]" ;;        mib:voc:10-1:overlap) echo "12.65 [PLOP]; 20.1 [RCIL]" ;;
        plop:voc:19-1:overlap) echo "73.54 [PLOP]" ;;
        plop:voc:15-5:disjoint) echo "64.3 [RCIL]" ;;      plop:voc:15-5:overlap) echo "70.09 [PLOP]" ;;
        plop:voc:15-1:disjoint) echo "46.5 [RCIL]" ;;      plop:voc:15-1:overlap) echo "54.64 [PLOP]" ;;
        plop:voc:10-1:disjoint) echo "8.4 [RCIL]" ;;       plop:voc:10-1:overlap) echo "30.45 [PLOP]" ;;
        ft:ade:100-50:*) echo "8.3 [MiB partition]" ;;     ft:ade:100-10:*) echo "1.1 [MiB partition]" ;;
        ft:ade:50-50:*) echo "7.3 [MiB partition]" ;;
        lwf:ade:100-50:*) echo "22.6 [MiB partition]" ;;   lwf:ade:100-10:*) echo "1.7 [MiB partition]" ;;
        lwf:ade:50-50:*) echo "13.9 [MiB partition]" ;;
        lwf-mc:ade:100-50:*) echo "26.3 [MiB partition]" ;; lwf-mc:ade:100-10:*) echo "14.3 [MiB partition]" ;;
        lwf-mc:ade:50-50:*) echo "15.1 [MiB partition]" ;;
        ilt:ade:100-50:*) echo "21.6 [MiB partition]; 17.00 [PLOP]" ;;
        ilt:ade:100-10:*) echo "1.4 [MiB partition]; 1.09 [PLOP]" ;;
        ilt:ade:50-50:*) echo "10.8 [MiB partition]; 9.70 [PLOP]" ;;
        ilt:ade:100-5:*) echo "0.5 [RCIL]" ;;
        mib:ade:100-50:*) echo "34.6 [MiB partition]; 32.79 [PLOP]" ;;
        mib:ade:100-10:*) echo "25.9 [MiB partition]; 29.24 [PLOP]" ;;
        mib:ade:50-50:*) echo "27.0 [MiB partition]; 29.31 [PLOP]" ;;
        mib:ade:100-5:*) echo "25.96 [PLOP]" ;;
        plop:ade:100-50:*) echo "32.94 [PLOP]" ;;          plop:ade:100-10:*) echo "31.59 [PLOP]" ;;
        plop:ade:50-50:*) echo "30.40 [PLOP]" ;;           plop:ade:100-5:*) echo "28.75 [PLOP]" ;;
        *) echo "not published" ;;
    esac
}
echo "$METHOD $DATASET $TASK $SETTING (protocol $PROTOCOL): published mIoU (all classes, last step): $(published)" >&2

case "$DATASET" in
    voc) EPOCH0=30 EPOCH=30 DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) EPOCH0=60 EPOCH=60 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
[ "$TASK" = 10-1 ] && EPOCH=10   # PLOP's 10-1 schedule (PLOP scripts/voc/plop_10-1.sh)
[ "$SETTING" = overlap ] && SETTING_FLAG=--overlap || SETTING_FLAG=
[ "$PROTOCOL" = plop ] && AMP=--amp || AMP=   # PLOP's scripts: apex O1; MiB's: fp32
GLOBAL_BATCH=24
SUBPATH=${SUBPATH:-$METHOD}
[ "$PROTOCOL" = mib ] || [ "$METHOD" = plop ] || SUBPATH=${SUBPATH}-plop-protocol

GPUS=${GPUS-0,1}
CKPT_DIR=${CKPT_DIR:-checkpoints}
EXTRA=${EXTRA:-}
N_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c . || true)
BATCH=$(( GLOBAL_BATCH / (N_GPUS > 0 ? N_GPUS : 1) ))   # per process
COMMON=(--method "$METHOD" --protocol "$PROTOCOL" --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK"
        --model mib_resnet101 --crop_size 512 --crop_val --batch_size "$BATCH" --val_batch_size "$BATCH"
        --lr_policy poly --weight_decay 1e-4 --random_seed 42 --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH"
        $SETTING_FLAG $AMP)

source scripts/launch.sh
# shellcheck disable=SC2086
launch "${COMMON[@]}" --lr 0.01 --train_epoch "$EPOCH0" --initial $EXTRA
# shellcheck disable=SC2086
launch "${COMMON[@]}" --lr 0.001 --train_epoch "$EPOCH" --curr_step 1 $EXTRA
