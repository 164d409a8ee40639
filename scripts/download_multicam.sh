#!/usr/bin/env bash
# Make the multiscale Blender scenes in DATA_DIR/nerf_multiscale (DATA_DIR: first argument, default data):
# downloads nerf_synthetic if needed, then converts it with scripts/convert_blender_data.py.
# Safe to run again: converted scenes are kept.
set -euo pipefail
# DATA_DIR: a relative path given is taken from where the script is run; the default is the repo's data/.
DATA_DIR=$(if [ -n "${1:-}" ]; then realpath -m -- "$1"; fi)
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
source scripts/download_lib.sh
if check_multicam "$DATA_DIR/nerf_multiscale" >/dev/null; then
  echo "multiscale scenes already in $DATA_DIR/nerf_multiscale"; exit 0
fi
bash scripts/download_blender.sh "$DATA_DIR"
"$(python_bin)" scripts/convert_blender_data.py --blenderdir "$DATA_DIR/nerf_synthetic" --outdir "$DATA_DIR/nerf_multiscale" \
  || die "conversion failed"
problem=$(check_multicam "$DATA_DIR/nerf_multiscale") || die "converted, but the layout is incomplete: $problem"
echo "multiscale scenes are in $DATA_DIR/nerf_multiscale"
