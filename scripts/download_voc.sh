#!/usr/bin/env bash
# Download Pascal VOC 2012 and the SBD-augmented labels, verify them, and lay them out as ciss expects:
#
#   DEST/VOC2012/JPEGImages/*.jpg
#   DEST/VOC2012/SegmentationClassAug/*.png                  (12,031 labels: train_aug + val)
#   DEST/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt  (10,582 / 1,449 ids)
#
# Usage: bash scripts/download_voc.sh [DEST]        (default DEST: data)
# Then train with --data_root DEST/VOC2012.
#
# The VOC archive is checked against its published MD5. The augmented labels (DrSleep's
# SegmentationClassAug.zip, used by SSUL/BARM/MiB) have no published checksum: the script checks their
# count instead, and pins an archive you trust if you set AUG_SHA256=<sha256>.
set -euo pipefail

DEST=${1:-data}
PYTHON=${PYTHON:-python3}
VOC_URL=http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
VOC_MD5=6cd6e144f989b92b3379bac3b3de84fd
AUG_URL='https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1'
AUG_SHA256=${AUG_SHA256:-}
AUG_COUNT=12031
TRAIN_AUG_COUNT=10582
VAL_COUNT=1449

fetch() {  # url file: resumable download
    if command -v curl >/dev/null; then curl -L --fail -C - -o "$2" "$1"; else wget -c -O "$2" "$1"; fi
}

mkdir -p "$DEST"
cd "$DEST"

# each archive is fetched, verified and unpacked only if its folder is not there yet (re-runs resume)
if [ ! -d VOC2012/JPEGImages ]; then
    [ -f VOCtrainval_11-May-2012.tar ] || fetch "$VOC_URL" VOCtrainval_11-May-2012.tar
    echo "$VOC_MD5  VOCtrainval_11-May-2012.tar" | md5sum -c -
    tar -xf VOCtrainval_11-May-2012.tar && mv VOCdevkit/VOC2012 VOC2012 && rmdir VOCdevkit
fi
if [ ! -d VOC2012/SegmentationClassAug ]; then
    [ -f SegmentationClassAug.zip ] || fetch "$AUG_URL" SegmentationClassAug.zip
    if [ -n "$AUG_SHA256" ]; then echo "$AUG_SHA256  SegmentationClassAug.zip" | sha256sum -c -; fi
    unzip -q SegmentationClassAug.zip -d VOC2012 && rm -rf VOC2012/__MACOSX
fi
found=$(find VOC2012/SegmentationClassAug -name '*.png' | wc -l)
if [ "$found" -ne "$AUG_COUNT" ]; then
    echo "error: VOC2012/SegmentationClassAug holds $found labels: expected $AUG_COUNT" >&2; exit 2
fi

# train_aug = every augmented label that is not a validation image (the standard 10,582), sorted
lists=VOC2012/ImageSets/Segmentation
find VOC2012/SegmentationClassAug -name '*.png' -printf '%f\n' | sed 's/\.png$//' | sort > "$lists/all_aug.txt"
sort "$lists/val.txt" | comm -23 "$lists/all_aug.txt" - > "$lists/train_aug.txt"
rm "$lists/all_aug.txt"
for pair in "train_aug.txt:$TRAIN_AUG_COUNT" "val.txt:$VAL_COUNT"; do
    n=$(wc -l < "$lists/${pair%%:*}")
    if [ "$n" -ne "${pair##*:}" ]; then echo "error: $lists/${pair%%:*} lists $n ids: expected ${pair##*:}" >&2; exit 2; fi
done

cd - >/dev/null
"$PYTHON" -m datasets.check --dataset voc --data_root "$DEST/VOC2012" --task 15-1
echo "VOC ready: --data_root $DEST/VOC2012"
