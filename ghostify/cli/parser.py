"""The ``ghostify`` argument parser: commands, flags and their value checks (no torch here)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..errors import GhostifyError
from ..io.specs import FORMS
from ..options import AUTO_DW_SIZE, INIT_MODES, check_dw_size, check_ratio
from ..utils import package_version

DEFAULT_SHAPE = (1, 3, 224, 224)
DEFAULT_SAMPLES = 512

_EXAMPLES = """\
examples:
  ghostify convert torchvision:resnet50 --input-shape 1,3,224,224
  ghostify convert torchvision:resnet50 --weights resnet50.pt --calibration-data images/ \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --finetune-epochs 1 --out ghost.pt
  ghostify deploy ghost.pt --out deployed.pt --onnx deployed.onnx
  ghostify convert torchvision:resnet50 --ratio 2 --out resnet50-ghost.pt \\
      --report savings.json --markdown savings.md --csv savings.csv --chart savings.png
  ghostify convert timm:resnet18 --exclude 'layer4.*' --no-skip-stem
  ghostify convert torchvision:resnet50 --speedup 1.4 --input-shape 8,3,224,224
  ghostify convert torchvision:resnet50 --macs 0.5 --weights resnet50.pt --calibration-data images/
  ghostify convert mypackage.models:build_net --input-shape 1,3,128,128
  ghostify report resnet50-ghost.pt --report savings.json

SPEC is torchvision:NAME, timm:NAME or package.module:factory (a callable taking no arguments
and returning an nn.Module; the module is looked up in the current folder first, as python -m
does). Zoo models are built without pretrained weights: pass yours with --weights, and with
them --calibration-data, or the conversion loses much of what the weights learnt.
Figures are MACs counted by fvcore (one fused multiply-add = one "flop" in fvcore's terms).
Exit status: 0 done, 1 the work failed, 2 a usage error (found before any work), 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def input_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` (or ``1x3x224x224``; any rank) into a shape tuple."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(
            f"--input-shape must be comma-separated positive integers such as 1,3,224,224 "
            f"(N,C,H,W) or 1,12,1000 (N,C,L); got {text!r}"
        )
    return shape


def _numbers(option: str) -> Callable[[str], tuple[float, ...]]:
    """An argparse type for ``0.485,0.456,0.406``: one number or one per channel."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option} must be comma-separated numbers such as 0.485,0.456,0.406; got {text!r}"
            ) from None
        if option == "--std" and any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"--std values must be > 0; got {text!r}")
        return values

    return parse


def _count(option: str, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be an int >= {minimum}; got {text!r}")
        return value

    return parse


def _checked(check: Any, option: str) -> Callable[[str], Any]:
    """An argparse type running one of ghostify's checks, so a bad value is a usage error."""

    def parse(text: str) -> int | str:
        if text == AUTO_DW_SIZE and check is check_dw_size:
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be an int; got {text!r}") from None
        try:
            if check is check_dw_size:
                return check(value, option, allow_auto=True)
            return check(value, option)
        except GhostifyError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _traceback_option(parser: argparse.ArgumentParser, default: Any) -> None:
    # On the main parser and on each subcommand, so it works before or after the subcommand;
    # the subcommands' SUPPRESS default keeps a --traceback given before them.
    parser.add_argument(
        "--traceback",
        action="store_true",
        default=default,
        help="show the full traceback when something fails",
    )


def _shape_option(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument(
        "--input-shape",
        type=input_shape,
        default=None,
        metavar="SHAPE",
        help="shape of the example input, any rank: N,C,H,W for Conv2d models, N,C,L for "
        f"Conv1d, N,C,D,H,W for Conv3d (default: {default_text}); checked against the model's "
        "first convolution",
    )


def _quiet_option(parser: argparse.ArgumentParser, group: Any = None) -> None:
    (group or parser).add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print nothing but errors and warnings (no progress, no table)",
    )
    _traceback_option(parser, argparse.SUPPRESS)


def _outputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report outputs")
    group.add_argument("--report", metavar="JSON", type=Path, help="write the report as JSON")
    group.add_argument(
        "--markdown",
        metavar="MD",
        type=Path,
        help="write the report as Markdown, with its conversion plan beside it "
        "(savings.md -> savings.plan.json) and, with matplotlib, its chart (savings.png)",
    )
    group.add_argument("--csv", metavar="CSV", type=Path, help="write per-layer rows as CSV")
    group.add_argument(
        "--chart",
        metavar="FILE",
        type=Path,
        help="save a per-layer before/after chart of MACs and parameters as .png, .svg or .pdf "
        "(by the suffix; needs matplotlib: ghostify[plot])",
    )
    group.add_argument(
        "--no-batchnorm",
        dest="include_batchnorm",
        action="store_false",
        help="leave BatchNorm out of the MAC counts (fvcore counts it by default)",
    )
    group.add_argument(
        "--timestamp", action="store_true", help="record the creation time in the report"
    )
    _quiet_option(parser, group)


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "calibration (keep what trained weights learnt)",
        "Unlabeled inputs the new layers are fitted on; a few hundred are enough. Without them a "
        "converted trained model loses much of its accuracy.",
    )
    group.add_argument(
        "--calibration-data",
        metavar="PATH",
        type=Path,
        help="a folder of images (flat or one sub-folder per class; resized and centre-cropped "
        "to --input-shape's H,W), a .pt file holding one tensor of inputs, or a .npy array",
    )
    group.add_argument(
        "--samples",
        type=_count("--samples", 1),
        metavar="N",
        help=f"use at most N inputs, chosen at random with --seed (default {DEFAULT_SAMPLES})",
    )
    group.add_argument(
        "--finetune-epochs",
        type=_count("--finetune-epochs", 0),
        metavar="E",
        help="then fine-tune E epochs by distillation from the original model on the same "
        "unlabeled inputs (default 0)",
    )
    group.add_argument(
        "--mean",
        type=_numbers("--mean"),
        metavar="M",
        help="per-channel mean subtracted from images scaled to [0, 1], e.g. 0.485,0.456,0.406 "
        "for torchvision's ImageNet weights (images only)",
    )
    group.add_argument(
        "--std",
        type=_numbers("--std"),
        metavar="S",
        help="per-channel std images are divided by, e.g. 0.229,0.224,0.225 (images only)",
    )
    group.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random choice of inputs (default 0)"
    )


def _budget_value(option: str) -> Callable[[str], float]:
    """An argparse type for a budget: > 1 for --speedup, a fraction in (0, 1] otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value > 1 if option == "--speedup" else 0 < value <= 1
        if not ok:
            wanted = (
                "a number > 1 (the original's time over the result's, e.g. 1.5)"
                if option == "--speedup"
                else "a fraction in (0, 1] of the original's count (e.g. 0.5)"
            )
            raise argparse.ArgumentTypeError(f"{option} must be {wanted}; got {text!r}")
        return value

    return parse


def _budget_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "budget (instead of --ratio / --dw-size)",
        "ask for the outcome: every layer's form (the convolution, or a GhostModule at ratio "
        "2-8, dw_size 1 or 3) is chosen to meet it with the least loss",
    )
    one = group.add_mutually_exclusive_group()
    one.add_argument(
        "--speedup",
        type=_budget_value("--speedup"),
        metavar="X",
        help="run X times as fast as the original, measured here after deploy (at the "
        "--input-shape batch)",
    )
    one.add_argument(
        "--macs",
        type=_budget_value("--macs"),
        metavar="F",
        help="keep at most the fraction F of the original's MACs (fvcore's count)",
    )
    one.add_argument(
        "--params",
        type=_budget_value("--params"),
        metavar="F",
        help="keep at most the fraction F of the original's parameters",
    )
    group.add_argument(
        "--runtime",
        choices=("eager", "onnxruntime"),
        default=None,
        help="where --speedup is measured: eager PyTorch after deploy (default) or ONNX Runtime",
    )


def _convert_parser(commands: Any) -> None:
    conv = commands.add_parser(
        "convert",
        help="convert a model (calibrated on your data), report the savings, save it",
        description="Build the model SPEC names (with --weights), convert it (calibrated on "
        "--calibration-data, optionally fine-tuned), print the savings table and optionally "
        "save the converted checkpoint and the report.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("spec", metavar="SPEC", help=f"the model: {FORMS}")
    conv.add_argument(
        "--weights",
        metavar="FILE",
        type=Path,
        help="a state_dict (torch.save) to load into SPEC's model before converting; read "
        "with weights_only=True",
    )
    conv.add_argument(
        "--ratio",
        type=_checked(check_ratio, "--ratio"),
        default=None,
        help="ghost ratio s, an int >= 2 (default 2)",
    )
    conv.add_argument(
        "--dw-size",
        type=_checked(check_dw_size, "--dw-size"),
        default=None,
        help="cheap depthwise kernel size d, odd, or 'auto' (1 for 1x1 convs, else 3; default 3)",
    )
    conv.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="convert only layers matching this glob (repeatable)",
    )
    conv.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave layers matching this glob as they are (repeatable)",
    )
    conv.add_argument(
        "--init",
        choices=INIT_MODES,
        default="weights",
        help="'weights' fits the ghosts to the conv's filters (default); 'scratch' is random",
    )
    conv.add_argument(
        "--skip-stem",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the first convolution as it is (default: skip it)",
    )
    _shape_option(conv, "the calibration inputs' shape with N=1, else 1,3,224,224")
    conv.add_argument(
        "--out", metavar="CKPT", type=Path, help="save the converted checkpoint to this file"
    )
    _budget_options(conv)
    _calibration_options(conv)
    _outputs(conv)


def _checkpoint_parsers(commands: Any) -> None:
    rep = commands.add_parser(
        "report",
        help="report the savings of a saved checkpoint",
        description="Rebuild the converted model from a checkpoint written by `ghostify convert "
        "--out` (it names its model SPEC) and report the savings.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    _shape_option(rep, "the one saved in the checkpoint")
    _outputs(rep)

    dep = commands.add_parser(
        "deploy",
        help="fold a checkpoint's BatchNorms; save it and/or export it to ONNX",
        description="Rebuild the converted model from a checkpoint, turn it into its fastest "
        "exact inference form (ghostify.deploy: BatchNorms folded, memory layout measured), "
        "save it as a deployed checkpoint (--out) and/or export it to ONNX (--onnx), checked in "
        "onnxruntime, with a dynamic batch dimension. The ONNX model is one self-contained file "
        "unless its weights pass protobuf's 2 GB limit; then they go to FILE.data beside it.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dep.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    dep.add_argument(
        "--out",
        metavar="CKPT",
        type=Path,
        help="save the deployed model as a checkpoint (load it with ghostify.io.checkpoint."
        "load_model)",
    )
    dep.add_argument("--onnx", metavar="FILE", type=Path, help="write the ONNX model here")
    dep.add_argument(
        "--opset", type=_count("--opset", 7), default=18, help="ONNX opset version (default 18)"
    )
    _shape_option(dep, "the one saved in the checkpoint")
    _quiet_option(dep)


def build_parser() -> argparse.ArgumentParser:
    """The ``ghostify`` argument parser; each command's function is chosen by ``command``."""
    parser = _Parser(
        prog="ghostify",
        description="Rewrite a PyTorch model's convolutions as GhostModules, keep what its "
        "weights learnt (calibration, fine-tuning), report the MAC and parameter savings, and "
        "deploy it.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version_line())
    _traceback_option(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _convert_parser(commands)
    _checkpoint_parsers(commands)
    return parser


def _version_line() -> str:
    # Read from the installed metadata: importing torch for its version costs seconds.
    return (
        f"ghostify {__version__} (torch {package_version('torch')}, "
        f"fvcore {package_version('fvcore')})"
    )
