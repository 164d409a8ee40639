#!/usr/bin/env bash
# The README's results: train on the real lego, evaluate, render a video and a mesh.
#   bash scripts/make_results.sh [DATA_DIR=data] [RUN=log/lego_results] [MINUTES=8]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data}; RUN=${2:-log/lego_results}; MINUTES=${3:-8}
PY=${PYTHON:-python3}
$PY train.py --config configs/blender.txt --data_dir "$DATA" --scene lego --log_dir "$RUN" \
  --max_minutes "$MINUTES" --eval_every 0 --render_every 1000 --save_every 0
$PY eval.py --log_dir "$RUN"
$PY visualize.py --log_dir "$RUN" --n_frames 8 --render_factor 2 --visualize_depth --visualize_normals
$PY extract_mesh.py --log_dir "$RUN" --grid_size 256 --threshold 50 --colors
$PY scripts/render_mesh.py "$RUN/mesh.ply" --out "$RUN/mesh.png"
