#!/usr/bin/env bash
# Download the NeRF synthetic (Blender) scenes to DATA_DIR/nerf_synthetic (DATA_DIR: first argument, default data).
# Safe to run again: it does nothing when the scenes are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/download_lib.sh
DATA_DIR=${1:-data}
URL=${BLENDER_URL:-"https://drive.usercontent.google.com/download?id=18JxhpWD-4ZmuFKLzKlAw-w5PpzZxXOcG&export=download&confirm=t"}
mkdir -p "$DATA_DIR"
if check_blender "$DATA_DIR/nerf_synthetic" >/dev/null; then
  echo "Blender scenes already in $DATA_DIR/nerf_synthetic"; exit 0
fi
[ -f "$DATA_DIR/nerf_synthetic.zip" ] || fetch_zip "$URL" "$DATA_DIR/nerf_synthetic.zip"
unpack_zip "$DATA_DIR/nerf_synthetic.zip" "$DATA_DIR" nerf_synthetic
problem=$(check_blender "$DATA_DIR/nerf_synthetic") || die "unpacked, but the layout is incomplete: $problem"
rm -f "$DATA_DIR/nerf_synthetic.zip"
echo "Blender scenes are in $DATA_DIR/nerf_synthetic ($BLENDER_SCENES)"
