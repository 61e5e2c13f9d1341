#!/usr/bin/env bash
# Every method on the same synthetic VOC 15-1 overlap task, on the CPU, then one report (scripts/report.py):
#   PYTHON=.venv/bin/python bash scripts/compare_methods.sh          (about 35 minutes on 2 cores)
# OUT (default compare/) holds the data, the runs and the report (report.md, report.csv, PNG figures).
# METHODS picks a subset; SEEDS="1 2 3" trains every method once per seed (--random_seed S, subpath METHOD-seedS)
# and the report gives each method's mean ± standard deviation over the seeds (groups.md). The setting is small (ResNet-18 from scratch, 97-pixel crops, 200 images), the
# protocol each method's own: its network, labels, losses, and its published learning rates of the
# incremental steps (step 0 trains every backbone at 0.01, since none starts from ImageNet weights here), with
# --clean (synchronised gradients, the last weights: see docs/differences.md).
# FT, LwF, ILT and MiB share one step 0 (the same CE training on the same network and labels); every other
# method trains its own. bf16 autocast (--amp) is used when the CPU computes bf16 natively.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-compare}
METHODS=${METHODS:-"ft lwf lwf-mc ilt ewc pi rw mib plop rcil dkd ssul barm kproba"}
INIT_EPOCHS=${INIT_EPOCHS:-12}
STEP_EPOCHS=${STEP_EPOCHS:-20}
for seed in ${SEEDS:-}; do
    [[ "$seed" =~ ^[0-9]+$ ]] || { echo "error: SEEDS: '$seed' is not a seed: expected non-negative integers, e.g." \
        "SEEDS=\"1 2\"" >&2; exit 2; }
done
AMP=$("$PYTHON" -m utils.hardware --amp_flag)

[ -d "$OUT/VOC2012" ] || "$PYTHON" -m datasets.synthetic --dataset voc --root "$OUT/VOC2012" --n_train 200 \
    --n_val 50 --size 128 --seed 0
CKPT="$OUT/checkpoints"
COMMON=(--data_root "$OUT/VOC2012" --dataset voc --task 15-1 --overlap --backbone resnet18 --no_pretrained
        --crop_size 97 --crop_val --batch_size 8 --val_batch_size 8 --num_workers 1 --lr_policy poly
        --val_interval 0 --ckpt_dir "$CKPT" --device cpu --clean $AMP)

# per method: flags of step 0 and of steps 1-5 (from scratch, so the backbones learn at 0.01 at step 0)
init_flags() {
    case "$1" in
        barm|kproba) echo "--backbone_lr0 0.01" ;;
        ssul) echo "--backbone_lr0 0.01" ;;
        dkd) echo "--lr 0.01 --head_lr_factor 1" ;;
        *) echo "--lr 0.01" ;;
    esac
}
step_flags() {  # the published rates of the incremental steps
    case "$1" in
        barm|kproba) echo "--lr 0.001" ;;
        ssul) echo "--lr 0.01" ;;
        dkd) echo "--lr 0.0001" ;;
        *) echo "--lr 0.001" ;;
    esac
}
shared_step0() {  # methods whose step 0 is FT's (plain CE over all pixels, MiB's network and labels)
    case "$1" in ft|lwf|ilt|mib) return 0 ;; *) return 1 ;; esac
}

NO_SEED=-  # without SEEDS: one run per method, its default seed, subpath METHOD

start=$(date +%s)
folders=()
for method in $METHODS; do
    for seed in ${SEEDS:-$NO_SEED}; do
        if [ "$seed" = "$NO_SEED" ]; then
            run=$method ft=ft seed_flags=()
        else
            run=$method-seed$seed ft=ft-seed$seed seed_flags=(--random_seed "$seed" --subpath "$run")
        fi
        folder="$CKPT/$run/15-1/overlap"
        if shared_step0 "$method" && [ "$method" != ft ] && [ -f "$CKPT/$ft/15-1/overlap/step0/final.pth" ] \
                && [ ! -f "$folder/step0/final.pth" ]; then
            mkdir -p "$folder" && cp -r "$CKPT/$ft/15-1/overlap/step0" "$folder/"
        fi
        # shellcheck disable=SC2046
        "$PYTHON" train.py --method "$method" "${COMMON[@]}" ${seed_flags[@]+"${seed_flags[@]}"} --initial \
            --train_epoch "$INIT_EPOCHS" --resume $(init_flags "$method") > "$OUT/$run.log" 2>&1
        # shellcheck disable=SC2046
        "$PYTHON" train.py --method "$method" "${COMMON[@]}" ${seed_flags[@]+"${seed_flags[@]}"} --curr_step 1 \
            --train_epoch "$STEP_EPOCHS" --resume $(step_flags "$method") >> "$OUT/$run.log" 2>&1
        folders+=("$folder")
        echo "$run done after $(( $(date +%s) - start )) s"
    done
done

"$PYTHON" scripts/report.py "${folders[@]}" --out "$OUT/report" --allow_mixed_conventions
echo "report: $OUT/report/report.md${SEEDS:+ and groups.md (mean ± std over the seeds)}" \
     "($(( $(date +%s) - start )) s in all)"
