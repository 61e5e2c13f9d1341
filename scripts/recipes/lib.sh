# Sourced by the recipes in this folder. `recipe_lookup METHOD DATASET TASK SETTING [PROTOCOL]` finds the published
# setting in published.tsv (refusing, with one line and exit status 2, a setting that was never published) and
# sets RECIPE (its name), PROTOCOL, NUMBER, SOURCE and DEVIATION; `recipe_announce` prints them; `recipe_step`
# launches train.py (scripts/launch.sh) with the recipe's flags, then `--recipe NAME`, then $EXTRA, so that the
# run records which values came from the recipe and which from the user.
# SEEDS="1 2 3" runs the recipe once per seed (`--random_seed S --subpath $SUBPATH-seedS` after `--recipe NAME`: the
# user's choice), ORDERS="a b c" once per class order of the task (a: the task's own, b, c, ...: its published
# shuffled orders, `--task NAME` after `--recipe NAME`; ORDERED_TASKS), every seed of every order; `recipe_report`
# then runs scripts/report.py on the runs (mean ± standard deviation of the experiment). Without SEEDS and ORDERS a
# recipe runs once, with the published seed, as before.
RECIPE_TABLE="scripts/recipes/published.tsv"
# Tasks with published class orders besides their own (utils/tasks.py): VOC 15-1's 22 shuffled orders of SSUL, BARM
# and DKD (15-1_b ... 15-1_w); ADE's b and c orders of MiB tasks.py (100-50b, 100-10b, 50b; 100-50c, ...).
# Entries: DATASET:TASK=NAME-PATTERN:LETTERS, the pattern's % replaced by the order's letter.
VOC_SHUFFLED_LETTERS="b c d e f g h i j k l m n o p q r s t u v w"
ADE_ORDER_LETTERS="b c"
ORDERED_TASKS=("voc:15-1=15-1_%:$VOC_SHUFFLED_LETTERS" "ade:100-50=100-50%:$ADE_ORDER_LETTERS"
               "ade:100-10=100-10%:$ADE_ORDER_LETTERS" "ade:50-50=50%:$ADE_ORDER_LETTERS")
OWN_ORDER=a
RUN_TASKS=()
RUN_SEEDS=()
RECIPE_FOLDERS=()

recipe_error() {
    echo "error: $*" >&2
    exit 2
}

# recipe_runs DATASET TASK: RUN_TASKS (one per order of ORDERS, default the task) and RUN_SEEDS (SEEDS, default one
# run with the recipe's seed), checked
recipe_runs() {
    local dataset=$1 task=$2 order entry pattern letters seed
    RUN_TASKS=() RUN_SEEDS=()
    for order in ${ORDERS:-$OWN_ORDER}; do
        if [ "$order" = "$OWN_ORDER" ]; then
            RUN_TASKS+=("$task")
            continue
        fi
        pattern="" letters=""
        for entry in "${ORDERED_TASKS[@]}"; do
            if [ "${entry%%=*}" = "$dataset:$task" ]; then
                pattern=${entry#*=} && pattern=${pattern%%:*} && letters=${entry##*:}
            fi
        done
        [ -n "$pattern" ] || recipe_error "ORDERS: $dataset $task has no published class orders but its own" \
            "($OWN_ORDER): tasks with orders are ${ORDERED_TASKS[*]%%=*} (docs/recipes.md)"
        [[ " $letters " == *" $order "* ]] || recipe_error "ORDERS: $dataset $task has no order '$order': expected" \
            "$OWN_ORDER (its own) or one of $letters"
        RUN_TASKS+=("${pattern//%/$order}")
    done
    for seed in ${SEEDS:-}; do
        [[ "$seed" =~ ^[0-9]+$ ]] || recipe_error "SEEDS: '$seed' is not a seed: expected non-negative integers," \
            "e.g. SEEDS=\"1 2 3\""
        [[ " ${RUN_SEEDS[*]:-} " == *" $seed "* ]] && recipe_error "SEEDS: seed $seed is given twice: its runs would" \
            "share a folder"
        RUN_SEEDS+=("$seed")
    done
    [ ${#RUN_SEEDS[@]} -gt 0 ] || RUN_SEEDS=("")
    if [ ${#RUN_TASKS[@]} -ne "$(printf '%s\n' "${RUN_TASKS[@]}" | sort -u | grep -c .)" ]; then
        recipe_error "ORDERS: an order is given twice: its runs would share a folder"
    fi
}

recipe_lookup() {
    local method=$1 dataset=$2 task=$3 setting=$4 wanted=${5:-} default_protocol=${6:--}
    local row
    row=$(awk -F'\t' -v m="$method" -v d="$dataset" -v t="$task" -v s="$setting" -v p="$wanted" \
              -v own="$default_protocol" '
        /^#/ || $1 == "method" { next }
        $1 == m && $2 == d && $3 == t && $4 == s && (p == "" || $5 == p) {
            if ($5 == own || $5 == "-") { print; found = 1; exit }
            if (first == "") first = $0
        }
        END { if (!found && first != "") print first }' "$RECIPE_TABLE")
    if [ -z "$row" ]; then
        local known
        known=$(awk -F'\t' -v m="$method" -v d="$dataset" -v p="$wanted" '
            /^#/ || $1 == "method" { next }
            $1 == m && $2 == d && (p == "" || $5 == p) { printf "%s%s %s", sep, $3, $4; sep = ", " }' "$RECIPE_TABLE")
        echo "error: no published $method setting $dataset $task $setting${wanted:+ under protocol $wanted}:" \
             "published ones are ${known:-none on $dataset} (train.py --method $method --task $task runs the" \
             "method's published protocol on any task)" >&2
        exit 2
    fi
    IFS=$'\t' read -r _ _ _ _ PROTOCOL NUMBER SOURCE DEVIATION <<< "$row"
    RECIPE="$method/$dataset/$task/$setting"
    [ "$PROTOCOL" = - ] || RECIPE="$RECIPE/$PROTOCOL-protocol"
    RECIPE_SETTING=$setting
    recipe_runs "$dataset" "$task"
}

recipe_announce() {
    local number="published $NUMBER"
    [ "$NUMBER" = - ] && number="no published number"
    echo "recipe $RECIPE: $number ($SOURCE); known deviation: $DEVIATION" >&2
}

# recipe_step FLAGS...: one train.py launch per order and seed (one without ORDERS and SEEDS) with the recipe's FLAGS
# and --step0_from auto (a step 0 another run already trained the same way is reused: 15-1 after 15-5), then
# --recipe, then the order's task and the seed with its subpath, then the user's $EXTRA
recipe_step() {
    local task seed subpath chosen folder
    for task in "${RUN_TASKS[@]}"; do
        for seed in "${RUN_SEEDS[@]}"; do
            chosen=() subpath=$SUBPATH
            [ "$task" = "$TASK" ] || chosen+=(--task "$task")
            if [ -n "$seed" ]; then
                subpath="$SUBPATH-seed$seed"
                chosen+=(--random_seed "$seed" --subpath "$subpath")
            fi
            folder="$CKPT_DIR/$subpath/$task/$RECIPE_SETTING"
            [[ " ${RECIPE_FOLDERS[*]:-} " == *" $folder "* ]] || RECIPE_FOLDERS+=("$folder")
            # shellcheck disable=SC2086
            TASK=$task SUBPATH=$subpath launch "$@" --step0_from auto --recipe "$RECIPE" ${chosen[@]+"${chosen[@]}"} \
                ${EXTRA:-}
        done
    done
}

# recipe_report: with SEEDS or ORDERS, the report of the runs (scripts/report.py: mean ± standard deviation of the
# experiment per step) into $REPORT_DIR (default $CKPT_DIR/reports/$SUBPATH-$TASK-$SETTING)
recipe_report() {
    [ -n "${SEEDS:-}${ORDERS:-}" ] || return 0
    local out=${REPORT_DIR:-$CKPT_DIR/reports/$SUBPATH-$TASK-$RECIPE_SETTING}
    echo "report of ${#RECIPE_FOLDERS[@]} runs: $out/groups.md" >&2
    "$PYTHON" scripts/report.py "${RECIPE_FOLDERS[@]}" --out "$out"
}

# gpu_ids N: "0,1,...,N-1", the default GPUS of a recipe whose published run used N GPUs
gpu_ids() {
    seq -s, 0 $(( $1 - 1 ))
}
