# Sourced by the recipes in this folder. `recipe_lookup METHOD DATASET TASK SETTING [PROTOCOL]` finds the published
# setting in published.tsv (refusing, with one line and exit status 2, a setting that was never published) and
# sets RECIPE (its name), PROTOCOL, NUMBER, SOURCE and DEVIATION; `recipe_announce` prints them; `recipe_step`
# launches train.py (scripts/launch.sh) with the recipe's flags, then `--recipe NAME`, then $EXTRA, so that the
# run records which values came from the recipe and which from the user.
RECIPE_TABLE="scripts/recipes/published.tsv"

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
}

recipe_announce() {
    local number="published $NUMBER"
    [ "$NUMBER" = - ] && number="no published number"
    echo "recipe $RECIPE: $number ($SOURCE); known deviation: $DEVIATION" >&2
}

# recipe_step FLAGS...: one train.py launch with the recipe's FLAGS, then --recipe, then the user's $EXTRA
recipe_step() {
    # shellcheck disable=SC2086
    launch "$@" --recipe "$RECIPE" ${EXTRA:-}
}

# gpu_ids N: "0,1,...,N-1", the default GPUS of a recipe whose published run used N GPUs
gpu_ids() {
    seq -s, 0 $(( $1 - 1 ))
}
