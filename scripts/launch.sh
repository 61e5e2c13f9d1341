# Sourced by run_init.sh, run.sh and the recipes: `launch ARGS...` runs train.py on the GPUs listed in
# $GPUS (comma-separated ids; one id -> python, several -> torchrun with one process per GPU on a free
# port; empty -> the CPU), and tees the output into $CKPT_DIR/$SUBPATH/$TASK/train-<date>.log.
PYTHON=${PYTHON:-python3}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

launch() {
    local log_dir="$CKPT_DIR/$SUBPATH/$TASK"
    mkdir -p "$log_dir"
    local log="$log_dir/train-$(date +%Y%m%d-%H%M%S).log"
    local n_gpus=0
    [ -n "$GPUS" ] && n_gpus=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
    set -o pipefail
    if [ "$n_gpus" -gt 1 ]; then
        CUDA_VISIBLE_DEVICES="$GPUS" "$PYTHON" -m torch.distributed.run --nproc_per_node="$n_gpus" \
            --master_port="$(free_port)" train.py "$@" 2>&1 | tee "$log"
    elif [ "$n_gpus" -eq 1 ]; then
        CUDA_VISIBLE_DEVICES="$GPUS" "$PYTHON" train.py "$@" 2>&1 | tee "$log"
    else
        "$PYTHON" train.py --device cpu "$@" 2>&1 | tee "$log"
    fi
}
