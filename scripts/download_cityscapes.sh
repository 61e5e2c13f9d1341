#!/usr/bin/env bash
# Check a Cityscapes folder for --dataset cityscapes_domain, and say what to fetch where when it is incomplete.
# Cityscapes needs a login (https://www.cityscapes-dataset.com/register/), so nothing is downloaded here: fetch
#
#   leftImg8bit_trainvaltest.zip  (11 GB)   -> DEST/cityscapes/leftImg8bit/{train,val,test}/CITY/*_leftImg8bit.png
#   gtFine_trainvaltest.zip       (241 MB)  -> DEST/cityscapes/gtFine/{train,val,test}/CITY/*_gtFine_labelIds.png
#
# from https://www.cityscapes-dataset.com/downloads/ (packages 3 and 1) and unzip both in DEST/cityscapes. Only
# train/ (2,975 images, 18 cities) and val/ (500, 3 cities) are read, with the raw gtFine_labelIds.png labels (no
# cityscapesScripts conversion is needed: the trainIds files are not used).
#
# Usage: bash scripts/download_cityscapes.sh [DEST]        (default DEST: data)
# Then train with --dataset cityscapes_domain --data_root DEST/cityscapes.
set -euo pipefail

DEST=${1:-data}
PYTHON=${PYTHON:-python3}
ROOT="$DEST/cityscapes"
PAGE=https://www.cityscapes-dataset.com/downloads/

missing() {
    echo "error: $1: log in at $PAGE, download $2 and unzip it in $ROOT (it holds $3)" >&2
    exit 2
}

mkdir -p "$ROOT"
for zip in leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip; do  # archives placed in DEST/cityscapes: unpacked once
    folder=${zip%%_*}
    if [ -f "$ROOT/$zip" ] && [ ! -d "$ROOT/$folder/train" ]; then
        (cd "$ROOT" && unzip -q -o "$zip")
    fi
done
for split in train:2975 val:500; do
    name=${split%%:*}
    [ -d "$ROOT/leftImg8bit/$name" ] || missing "$ROOT/leftImg8bit/$name is missing" leftImg8bit_trainvaltest.zip \
        "leftImg8bit/{train,val,test}/"
    [ -d "$ROOT/gtFine/$name" ] || missing "$ROOT/gtFine/$name is missing" gtFine_trainvaltest.zip "gtFine/{train,val,test}/"
    n=$(find "$ROOT/leftImg8bit/$name" -name '*_leftImg8bit.png' | wc -l)
    labels=$(find "$ROOT/gtFine/$name" -name '*_gtFine_labelIds.png' | wc -l)
    if [ "$n" -ne "${split##*:}" ] || [ "$labels" -ne "${split##*:}" ]; then
        echo "warning: $ROOT holds $n $name images and $labels labelIds files: the public release has ${split##*:}" >&2
    fi
done
"$PYTHON" -m datasets.check --dataset cityscapes_domain --data_root "$ROOT" --task 11-5
echo "Cityscapes ready: --dataset cityscapes_domain --data_root $ROOT"
