#!/usr/bin/env bash
# Download the NeRF synthetic (Blender) scenes to DATA_DIR/nerf_synthetic (DATA_DIR: first argument, default data).
# Safe to run again: it does nothing when the scenes are already there.
set -euo pipefail
# DATA_DIR: a relative path given is taken from where the script is run; the default is the repo's data/.
DATA_DIR=$(if [ -n "${1:-}" ]; then realpath -m -- "$1"; fi)
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
source scripts/download_lib.sh
URL=${BLENDER_URL:-"https://drive.usercontent.google.com/download?id=18JxhpWD-4ZmuFKLzKlAw-w5PpzZxXOcG&export=download&confirm=t"}
download_dataset "$DATA_DIR" nerf_synthetic "$URL" check_blender "Blender scenes" "$BLENDER_SCENES"
