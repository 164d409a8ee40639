#!/usr/bin/env bash
# Fetch every dataset of the paper into DATA_DIR (first argument, default data):
# nerf_synthetic/, nerf_llff_data/ and nerf_multiscale/. Safe to run again.
set -euo pipefail
# DATA_DIR: a relative path given is taken from where the script is run; the default is the repo's data/.
DATA_DIR=$(if [ -n "${1:-}" ]; then realpath -m -- "$1"; fi)
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
bash scripts/download_blender.sh "$DATA_DIR"
bash scripts/download_llff.sh "$DATA_DIR"
bash scripts/download_multicam.sh "$DATA_DIR"
echo "all datasets are in $DATA_DIR"
