#!/usr/bin/env bash
# Download the LLFF forward-facing scenes to DATA_DIR/nerf_llff_data (DATA_DIR: first argument, default data).
# Safe to run again: it does nothing when the scenes are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/download_lib.sh
DATA_DIR=${1:-data}
URL=${LLFF_URL:-"https://drive.usercontent.google.com/download?id=16VnMcF1KJYxN9QId6TClMsZRahHNMW5g&export=download&confirm=t"}
mkdir -p "$DATA_DIR"
if check_llff "$DATA_DIR/nerf_llff_data" >/dev/null; then
  echo "LLFF scenes already in $DATA_DIR/nerf_llff_data"; exit 0
fi
[ -f "$DATA_DIR/nerf_llff_data.zip" ] || fetch_zip "$URL" "$DATA_DIR/nerf_llff_data.zip"
unpack_zip "$DATA_DIR/nerf_llff_data.zip" "$DATA_DIR" nerf_llff_data
problem=$(check_llff "$DATA_DIR/nerf_llff_data") || die "unpacked, but the layout is incomplete: $problem"
rm -f "$DATA_DIR/nerf_llff_data.zip"
echo "LLFF scenes are in $DATA_DIR/nerf_llff_data ($LLFF_SCENES)"
