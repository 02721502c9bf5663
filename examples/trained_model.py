"""A trained model through the whole pipeline: calibrate -> fine-tune -> deploy -> ONNX.

    python examples/trained_model.py [--samples 512] [--finetune-epochs 1] [--out-dir ghostify-out]

The trained model is the digits CNN of ``examples/digits_cnn.py`` (trained here in seconds;
load your own model's weights instead). It is converted calibrated on unlabeled images,
fine-tuned by distillation from the original, folded for inference and exported to ONNX (``pip
install 'ghostify[deploy]'``), with the test accuracy and the agreement with the original
printed after each step.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from digits_cnn import digits, trained_cnn  # examples/digits_cnn.py, beside this file
from torch import nn

import ghostify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="unlabeled calibration images")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("ghostify-out"))
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)

    train_images, _, test_images, test_labels = digits()
    model = trained_cnn()  # your trained model
    with torch.no_grad():
        original = model.eval()(test_images).argmax(dim=1)

    def show(step: str, candidate: nn.Module) -> None:
        with torch.no_grad():
            predicted = candidate.eval()(test_images).argmax(dim=1)
        accuracy = (predicted == test_labels).float().mean().item()
        agreement = (predicted == original).float().mean().item()
        print(f"{step:<28} accuracy {accuracy:6.1%}   agreement with the original {agreement:6.1%}")

    show("trained", model)

    # 1. Calibrate: fit the GhostModules on real inputs (no labels needed).
    unlabeled = train_images[: options.samples]
    ghostify.convert(model, ratio=2, calibration_data=unlabeled)
    show("converted, calibrated", model)

    # 2. Fine-tune: distillation from the original, which the conversion record keeps.
    ghostify.finetune(model, unlabeled, epochs=options.finetune_epochs)
    show("fine-tuned by distillation", model)

    # 3. Deploy: BatchNorms folded, memory layout measured, outputs checked against the model.
    example = test_images[:8]
    deployed = ghostify.deploy(copy.deepcopy(model).eval(), example)
    show("deployed", deployed)

    # 4. ONNX: exported with a dynamic batch, checked in onnxruntime against PyTorch.
    ghostify.export_onnx(deployed, example, options.out_dir / "digits-ghost.onnx")
    print(f"wrote {options.out_dir / 'digits-ghost.onnx'} (checked in onnxruntime)")


if __name__ == "__main__":
    main()
