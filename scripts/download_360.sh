#!/usr/bin/env bash
# Download the mip-NeRF 360 scenes to DATA_DIR/360_v2 (DATA_DIR: first argument, default data):
# 360_v2.zip (bicycle bonsai counter garden kitchen room stump, each images/ images_2/ images_4/
# images_8/ poses_bounds.npy sparse/), and with --extra also 360_extra_scenes.zip (flowers treehill).
# The archives hold the scene folders at their top level (no 360_v2/ folder). Safe to run again:
# it does nothing when the scenes are already there.
#   bash scripts/download_360.sh [DATA_DIR] [--extra]
set -euo pipefail
EXTRA=0
DATA_ARG=
for arg in "$@"; do
  case $arg in
    --extra) EXTRA=1 ;;
    -*) echo "usage: $0 [DATA_DIR] [--extra]" >&2; exit 2 ;;
    *) DATA_ARG=$arg ;;
  esac
done
# DATA_DIR: a relative path given is taken from where the script is run; the default is the repo's data/.
DATA_DIR=$(if [ -n "$DATA_ARG" ]; then realpath -m -- "$DATA_ARG"; fi)
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
source scripts/download_lib.sh
# The official archives (multinerf's README, https://jonbarron.info/mipnerf360/).
URL=${M360_URL:-http://storage.googleapis.com/gresearch/refraw360/360_v2.zip}
EXTRA_URL=${M360_EXTRA_URL:-http://storage.googleapis.com/gresearch/refraw360/360_extra_scenes.zip}
M360_SCENES="bicycle bonsai counter garden kitchen room stump"
M360_EXTRA_SCENES="flowers treehill"

# check_360 ROOT SCENES: prints the first problem and returns 1, or returns 0 when the layout is complete.
check_360() {
  local root=$1 scenes=$2 s d
  for s in $scenes; do
    [ -f "$root/$s/poses_bounds.npy" ] || { echo "missing $root/$s/poses_bounds.npy"; return 1; }
    for d in images images_2 images_4 images_8; do
      [ -d "$root/$s/$d" ] || { echo "missing $root/$s/$d/"; return 1; }
    done
  done
}

# unpack_scenes ZIP DEST: unzip into a temporary folder beside DEST, then move each top-level entry
# (scene folders, notes) into DEST, replacing an earlier copy. An archive that holds one 360_v2/
# folder instead (a repacked mirror) is unpacked from inside it.
unpack_scenes() {
  local zip=$1 dest=$2 tmp src entry
  mkdir -p "$dest"
  tmp=$(mktemp -d "$(dirname "$dest")/.unpack.XXXXXX")
  unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; die "could not unpack $zip"; }
  src=$tmp
  [ -d "$tmp/360_v2" ] && src=$tmp/360_v2
  for entry in "$src"/*; do
    [ -e "$entry" ] || continue
    rm -rf "${dest:?}/$(basename "$entry")"
    mv "$entry" "$dest/"
  done
  rm -rf "$tmp"
}

# get ZIP_URL ZIP_NAME SCENES LABEL: fetch DATA_DIR/ZIP_NAME unless the scenes are there, unpack it
# into DATA_DIR/360_v2, check the layout, remove the archive.
get() {
  local url=$1 zip=$DATA_DIR/$2 scenes=$3 label=$4 problem
  if check_360 "$DATA_DIR/360_v2" "$scenes" >/dev/null; then
    echo "$label already in $DATA_DIR/360_v2"; return 0
  fi
  [ -f "$zip" ] || fetch_zip "$url" "$zip"
  unpack_scenes "$zip" "$DATA_DIR/360_v2"
  problem=$(check_360 "$DATA_DIR/360_v2" "$scenes") || die "unpacked, but the layout is incomplete: $problem"
  rm -f "$zip"
  echo "$label are in $DATA_DIR/360_v2 ($scenes)"
}

mkdir -p "$DATA_DIR"
get "$URL" 360_v2.zip "$M360_SCENES" "mip-NeRF 360 scenes"
if [ "$EXTRA" = 1 ]; then
  get "$EXTRA_URL" 360_extra_scenes.zip "$M360_EXTRA_SCENES" "mip-NeRF 360 extra scenes"
fi
