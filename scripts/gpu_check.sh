#!/usr/bin/env bash
# One-shot check of the CUDA paths, for a machine with a GPU (about 8 minutes with one GPU); everything goes
# to the folder given as the argument:
#   bash scripts/gpu_check.sh OUT_DIR
#   1. the CUDA-gated tests (fp16 GradScaler, channels-last under autocast, SyncBatchNorm, nccl);
#   2. scripts/benchmark.py, BARM resnet101 step 0 at 513: fp32 NCHW eager, --amp channels-last, --compile;
#      step 1 and its teacher forward; the data pipeline per worker and --device_augment's decoding on the GPU;
#   3. a 2-step run with --amp on synthetic data, then --test reproducing its numbers; one epoch with
#      --device_augment;
#   4. with two GPUs or more: the same 2 steps under torchrun (nccl).
# Without CUDA it proves it works on the CPU: the CUDA tests skip, the benchmark and the runs use a ResNet-18
# at small crops, torchrun is skipped. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
"$PYTHON" - > "$OUT/environment.txt" <<'EOF'
import platform, torch, torchvision
print("python", platform.python_version(), "| torch", torch.__version__, "| torchvision", torchvision.__version__)
print("cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| gpus", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i), f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
EOF
cat "$OUT/environment.txt"

echo "== 1. CUDA-gated tests"
"$PYTHON" -m pytest tests/test_cuda.py -q -rs 2>&1 | tee "$OUT/cuda_tests.txt"

echo "== 2. benchmark"
if [ "$GPUS" -gt 0 ]; then
    BENCH=(--backbone resnet101 --crop 513 --batch 8 --repeats 10)
    RUN=(--backbone resnet101 --crop_size 321 --batch_size 8)
    DATA=(--size 513 --images 48 --batch 8)
else
    BENCH=(--backbone resnet18 --crop 97 --batch 2 --repeats 2)
    RUN=(--backbone resnet18 --crop_size 65 --batch_size 4)
    DATA=(--size 97 --images 8 --batch 4 --repeats 1)
fi
"$PYTHON" scripts/benchmark.py train --methods barm --cases step0 "${BENCH[@]}" --precisions fp32 \
    --channels_last off --json "$OUT/bench_fp32.json" --markdown "$OUT/bench_fp32.md" 2>&1 | tee "$OUT/benchmark.txt"
"$PYTHON" scripts/benchmark.py train --methods barm --cases step0 step1 teacher "${BENCH[@]}" --precisions amp \
    --channels_last on --json "$OUT/bench_amp.json" --markdown "$OUT/bench_amp.md" 2>&1 | tee -a "$OUT/benchmark.txt"
if [ "$GPUS" -gt 0 ]; then
    "$PYTHON" scripts/benchmark.py train --methods barm --cases step0 "${BENCH[@]}" --precisions amp \
        --channels_last on --compile --json "$OUT/bench_compile.json" --markdown "$OUT/bench_compile.md" 2>&1 \
        | tee -a "$OUT/benchmark.txt"
fi
"$PYTHON" scripts/benchmark.py data "${DATA[@]}" 2>&1 | tee "$OUT/data_pipeline.txt"

echo "== 3. a 2-step run with --amp, then --test"
"$PYTHON" -m datasets.synthetic --dataset voc --root "$OUT/VOC2012" --n_train 60 --n_val 16 --size 128 --seed 0
COMMON=(--data_root "$OUT/VOC2012" --ckpt_dir "$OUT/checkpoints" --task 15-1 --overlap --no_pretrained "${RUN[@]}"
        --crop_val --val_batch_size 8 --lr_policy poly --val_interval 0 --amp --clean)
"$PYTHON" train.py "${COMMON[@]}" --train_epoch 2 --end_step 1 2>&1 | tee "$OUT/run.txt"
"$PYTHON" train.py --data_root "$OUT/VOC2012" --ckpt_dir "$OUT/checkpoints" --task 15-1 --overlap --test 2>&1 \
    | tee "$OUT/test.txt"
"$PYTHON" - "$OUT/checkpoints/barm/15-1/overlap" <<'EOF' | tee "$OUT/test_reproduces.txt"
import json, os, sys
root = sys.argv[1]
name = next(os.scandir(os.path.join(root, "eval"))).name
for step in (0, 1):
    trained = json.load(open(os.path.join(root, f"step{step}", "results.json")))
    tested = json.load(open(os.path.join(root, "eval", name, f"step{step}", "results.json")))
    same = trained["confusion_matrix"] == tested["confusion_matrix"]
    print(f"step {step}: --test reproduces the training's test: {same} (mIoU {100 * trained['Mean IoU']:.2f})")
    assert same
EOF
"$PYTHON" train.py "${COMMON[@]}" --train_epoch 1 --initial --device_augment --ckpt_dir "$OUT/checkpoints_device_augment" \
    2>&1 | tee "$OUT/device_augment.txt"

echo "== 4. torchrun (nccl)"
if [ "$GPUS" -ge 2 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${COMMON[@]}" --train_epoch 1 \
        --end_step 1 --ckpt_dir "$OUT/checkpoints_ddp" 2>&1 | tee "$OUT/torchrun.txt"
    grep -q "weights identical on all 2 ranks" "$OUT/torchrun.txt"
else
    echo "skipped: $GPUS GPU(s)" | tee "$OUT/torchrun.txt"
fi
echo "== done: $OUT"
