#!/usr/bin/env bash
# The command line: convert a trained model, report the savings, deploy it and export ONNX.
#
#   bash examples/command_line.sh [WORK_DIR]
#
# The trained model is examples/digits_cnn.py's CNN; `digits_cnn:make_cnn` is its SPEC (a
# module:factory that builds the architecture) and digits-cnn.pt its trained weights.
set -euo pipefail
examples=$(cd "$(dirname "$0")" && pwd)
work=${1:-ghostify-cli}
mkdir -p "$work"
cd "$work"
export PYTHONPATH="$examples${PYTHONPATH:+:$PYTHONPATH}"  # where the SPEC's module lives

# A trained model: its weights (digits-cnn.pt) and unlabeled images (digits-images.npy).
python "$examples/digits_cnn.py"

# Convert: load the weights, convert, print the savings, save the checkpoint and the report
# (`ghostify report digits-ghost.pt` gives the same report again from the checkpoint alone).
ghostify convert digits_cnn:make_cnn --weights digits-cnn.pt --input-shape 1,1,8,8 \
    --out digits-ghost.pt --report savings.json --markdown savings.md

# Deploy: BatchNorms folded, then ONNX, checked in onnxruntime.
ghostify deploy digits-ghost.pt --onnx digits-ghost.onnx
