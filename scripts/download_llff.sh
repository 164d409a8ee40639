#!/usr/bin/env bash
# Download the LLFF forward-facing scenes to DATA_DIR/nerf_llff_data (DATA_DIR: first argument, default data).
# Safe to run again: it does nothing when the scenes are already there.
set -euo pipefail
# DATA_DIR: a relative path given is taken from where the script is run; the default is the repo's data/.
DATA_DIR=$(if [ -n "${1:-}" ]; then realpath -m -- "$1"; fi)
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
source scripts/download_lib.sh
URL=${LLFF_URL:-"https://drive.usercontent.google.com/download?id=16VnMcF1KJYxN9QId6TClMsZRahHNMW5g&export=download&confirm=t"}
download_dataset "$DATA_DIR" nerf_llff_data "$URL" check_llff "LLFF scenes" "$LLFF_SCENES"
