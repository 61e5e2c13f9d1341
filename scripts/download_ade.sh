#!/usr/bin/env bash
# Download ADE20K (SceneParsing-150, ADEChallengeData2016), verify it, and check its layout:
#
#   DEST/ADEChallengeData2016/images/{training,validation}/*.jpg        (20,210 / 2,000)
#   DEST/ADEChallengeData2016/annotations/{training,validation}/*.png   (labels 0..150)
#
# Usage: bash scripts/download_ade.sh [DEST]        (default DEST: data)
# Then train with --dataset ade --data_root DEST/ADEChallengeData2016.
set -euo pipefail

DEST=${1:-data}
PYTHON=${PYTHON:-python3}
ADE_URL=http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
ADE_MD5=7328b3957e407ddae1d3cbf487f149ef

fetch() {
    if command -v curl >/dev/null; then curl -L --fail -C - -o "$2" "$1"; else wget -c -O "$2" "$1"; fi
}

mkdir -p "$DEST"
cd "$DEST"
if [ ! -d ADEChallengeData2016/images ]; then  # fetched, verified and unpacked once (re-runs resume)
    [ -f ADEChallengeData2016.zip ] || fetch "$ADE_URL" ADEChallengeData2016.zip
    echo "$ADE_MD5  ADEChallengeData2016.zip" | md5sum -c -
    unzip -q ADEChallengeData2016.zip
fi
for split in training:20210 validation:2000; do
    n=$(find "ADEChallengeData2016/images/${split%%:*}" -name '*.jpg' | wc -l)
    if [ "$n" -ne "${split##*:}" ]; then
        echo "error: ADEChallengeData2016/images/${split%%:*} holds $n images: expected ${split##*:}" >&2; exit 2
    fi
done
cd - >/dev/null
"$PYTHON" -m datasets.check --dataset ade --data_root "$DEST/ADEChallengeData2016" --task 100-50
echo "ADE20K ready: --data_root $DEST/ADEChallengeData2016"
