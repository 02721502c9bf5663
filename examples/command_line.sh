#!/usr/bin/env bash
# The command line: a trained model converted (calibrated, fine-tuned), reported and deployed.
#
#   bash examples/command_line.sh [WORK_DIR]
#
# The trained model is examples/digits_cnn.py's CNN: `digits_cnn:make_cnn` is its SPEC (a
# module:factory that builds the architecture, found in the current folder as `python -m`
# finds modules), digits-cnn.pt its trained weights, digits-images.npy unlabeled images.
set -euo pipefail
examples=$(cd "$(dirname "$0")" && pwd)
work=${1:-ghostify-cli}
mkdir -p "$work"
cd "$work"
cp "$examples/digits_cnn.py" .

# A trained model: its weights and 512 unlabeled images (N x 1 x 8 x 8, a NumPy array).
python digits_cnn.py

# Convert: load the weights, calibrate on the images, fine-tune one epoch by distillation from
# the original, print the savings and save the checkpoint and the report
# (`ghostify report digits-ghost.pt` gives the same report again from the checkpoint alone).
ghostify convert digits_cnn:make_cnn --weights digits-cnn.pt --input-shape 1,1,8,8 \
    --calibration-data digits-images.npy --finetune-epochs 1 \
    --out digits-ghost.pt --report savings.json --markdown savings.md

# Deploy: BatchNorms folded; a deployed PyTorch checkpoint and an ONNX file checked in onnxruntime.
ghostify deploy digits-ghost.pt --out digits-deployed.pt --onnx digits-ghost.onnx
