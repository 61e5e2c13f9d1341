#!/usr/bin/env bash
# BARM with the published hyper-parameters (BARM README), all steps of one task:
#   bash scripts/recipes/barm.sh voc 15-1      (VOC: 15-1, 10-1, 15-5, 19-1, 5-3)
#   bash scripts/recipes/barm.sh ade 100-10    (ADE: 100-50, 100-10, 100-5, 50-50)
# DATA_ROOT, GPUS_INIT (default 0), GPUS (default 0,1), SETTING and EXTRA pass through to run_init.sh / run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=${1:?usage: barm.sh voc|ade TASK}
TASK=${2:?usage: barm.sh voc|ade TASK}

case "$DATASET:$TASK" in
    voc:15-1|voc:10-1|voc:15-5|voc:19-1|voc:5-3)
        # step 0: 1 GPU, 50 epochs, batch 16; steps: 2 GPUs, 20 epochs, batch 8 per GPU, lr 0.001
        INIT=(EPOCH=50 BATCH=16 LR=0.001) STEPS=(EPOCH=20 BATCH=8 LR=0.001)
        DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade:100-50|ade:100-10|ade:100-5|ade:50-50)
        # step 0: 60 epochs, batch 8; steps: 2 GPUs, 100 epochs, batch 4 per GPU, lr 0.01
        INIT=(EPOCH=60 BATCH=8 LR=0.001) STEPS=(EPOCH=100 BATCH=4 LR=0.01)
        DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    *)
        echo "error: no BARM recipe for $DATASET $TASK: expected voc 15-1|10-1|15-5|19-1|5-3 or ade 100-50|100-10|100-5|50-50" >&2
        exit 2 ;;
esac

export DATA_ROOT DATASET TASK
env "${INIT[@]}" GPUS="${GPUS_INIT-0}" bash scripts/run_init.sh
env "${STEPS[@]}" GPUS="${GPUS-0,1}" CURR=1 bash scripts/run.sh
