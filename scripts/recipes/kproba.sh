#!/usr/bin/env bash
# KProBA as its scripts (KProBA run_init.sh, run.sh, runade.sh and README), all steps of one task:
#   bash scripts/recipes/kproba.sh voc 10-1      (run_init.sh + run.sh: one GPU, 5 epochs, batch 16, lr 0.001)
#   bash scripts/recipes/kproba.sh ade 100-10    (runade.sh / README: BARM's ADE settings)
# KProBA's repository publishes no numbers. DATA_ROOT, GPUS_INIT, GPUS, CKPT_DIR, SETTING and EXTRA pass through;
# BARM's flags otherwise (--pseudo --bn_freeze --amp --crop_val, poly); there is no --pseudo_thresh (dead in KProBA).
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: kproba.sh voc|ade TASK"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}

case "$DATASET:$TASK" in
    voc:10-1)
        # step 0 and steps 1-10: one GPU, 5 epochs, batch 16, lr 0.001 (the repository's VOC scripts)
        INIT=(5 16 0.001) STEPS=(5 16 0.001) GPUS_INIT=${GPUS_INIT-0} GPUS=${GPUS-0}
        DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade:100-10)
        # step 0: 60 epochs, batch 8 (README; it names 100-5 there, a mismatch with its 100-10 steps); steps:
        # 2 GPUs, batch 4 per GPU, 100 epochs, lr 0.01 (runade.sh)
        INIT=(60 8 0.001) STEPS=(100 4 0.01) GPUS_INIT=${GPUS_INIT-0} GPUS=${GPUS-0,1}
        DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    *)
        echo "error: no KProBA recipe for $DATASET $TASK: expected voc 10-1 or ade 100-10" >&2
        exit 2 ;;
esac

SUBPATH=${SUBPATH:-KProBA}
CKPT_DIR=${CKPT_DIR:-checkpoints}
SETTING=${SETTING:---overlap}           # --overlap, or empty for disjoint
EXTRA=${EXTRA:-}                        # more flags, e.g. "--resume"
source scripts/launch.sh

common() {
    # shellcheck disable=SC2086
    launch --method kproba --data_root "$DATA_ROOT" --model deeplabv3bga_resnet101 --dataset "$DATASET" \
        --task "$TASK" --loss_type bce_loss --crop_val --lr_policy poly --pseudo --bn_freeze --amp \
        --subpath "$SUBPATH" --ckpt_dir "$CKPT_DIR" $SETTING "$@" $EXTRA
}
GPUS=$GPUS_INIT common --train_epoch "${INIT[0]}" --batch_size "${INIT[1]}" --lr "${INIT[2]}" --curr_step 0 --initial
GPUS=$GPUS common --train_epoch "${STEPS[0]}" --batch_size "${STEPS[1]}" --lr "${STEPS[2]}" --curr_step 1
