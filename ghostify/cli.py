"""The ``ghostify`` command line: convert a model by SPEC, or report on a saved checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .cli_checks import UsageError, check_input_shape, check_paths
from .errors import GhostifyError
from .io import checkpoint, specs
from .io.weights import apply_weights, load_weights
from .options import AUTO_DW_SIZE, INIT_MODES, check_dw_size, check_ratio
from .pipeline import convert
from .report import SavingsReport, report
from .surgery.plan import plan_of
from .utils import package_version

DEFAULT_SHAPE = (1, 3, 224, 224)

_EXAMPLES = """\
examples:
  ghostify convert torchvision:resnet50 --input-shape 1,3,224,224
  ghostify convert torchvision:resnet50 --ratio 2 --out resnet50-ghost.pt \\
      --report savings.json --markdown savings.md --csv savings.csv --chart savings.png
  ghostify convert timm:resnet18 --exclude 'layer4.*' --no-skip-stem
  ghostify convert mypackage.models:build_net --input-shape 1,3,128,128
  ghostify report resnet50-ghost.pt --report savings.json

SPEC is torchvision:NAME, timm:NAME or package.module:factory (a callable taking no
arguments and returning an nn.Module). Zoo models are built without pretrained weights.
Figures are MACs counted by fvcore (one fused multiply-add = one "flop" in fvcore's terms).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def input_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` (or ``1x3x224x224``) into a shape tuple."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(
            f"--input-shape must be comma-separated positive integers such as 1,3,224,224; "
            f"got {text!r}"
        )
    return shape


def _checked(check: Any, option: str) -> Any:
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


def _outputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report outputs")
    group.add_argument("--report", metavar="JSON", type=Path, help="write the report as JSON")
    group.add_argument("--markdown", metavar="MD", type=Path, help="write the report as Markdown")
    group.add_argument("--csv", metavar="CSV", type=Path, help="write per-layer rows as CSV")
    group.add_argument(
        "--chart",
        metavar="FILE",
        type=Path,
        help="save a per-layer before/after MACs chart as .png, .svg or .pdf (by the suffix; "
        "needs matplotlib: ghostify[plot])",
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
    group.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print nothing but errors (no progress bars or messages, no table)",
    )
    _traceback_option(parser, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The ``ghostify`` argument parser."""
    parser = _Parser(
        prog="ghostify",
        description="Rewrite a PyTorch model's Conv2d layers as GhostModules and report the "
        "MAC and parameter savings.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version_line())
    _traceback_option(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    conv = commands.add_parser(
        "convert",
        help="convert a model and report the savings",
        description="Build the model SPEC names, convert it, print the savings table and "
        "optionally save the converted checkpoint and the report.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("spec", metavar="SPEC", help=f"the model: {specs.FORMS}")
    conv.add_argument(
        "--ratio",
        type=_checked(check_ratio, "--ratio"),
        default=2,
        help="ghost ratio s, an int >= 2 (default 2)",
    )
    conv.add_argument(
        "--dw-size",
        type=_checked(check_dw_size, "--dw-size"),
        default=3,
        help="cheap depthwise kernel size d, odd, or 'auto' (1 for 1x1 convs, else 3; default 3)",
    )
    conv.add_argument(
        "--weights",
        metavar="FILE",
        type=Path,
        help="a state_dict (torch.save) to load into SPEC's model before converting; read "
        "with weights_only=True",
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
    conv.add_argument(
        "--input-shape",
        type=input_shape,
        default=DEFAULT_SHAPE,
        metavar="N,C,H,W",
        help="shape of the random example input (default 1,3,224,224)",
    )
    conv.add_argument(
        "--out", metavar="CKPT", type=Path, help="save the converted checkpoint to this file"
    )
    _outputs(conv)
    conv.set_defaults(run=_convert)

    rep = commands.add_parser(
        "report",
        help="report the savings of a saved checkpoint",
        description="Rebuild the converted model from a checkpoint written by `ghostify convert "
        "--out` (it names its model SPEC) and report the savings.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    rep.add_argument(
        "--input-shape",
        type=input_shape,
        default=None,
        metavar="N,C,H,W",
        help="shape of the example input (default: the one saved in the checkpoint)",
    )
    _outputs(rep)
    rep.set_defaults(run=_report)

    dep = commands.add_parser(
        "deploy",
        help="fold a checkpoint's BatchNorms and export it to ONNX",
        description="Rebuild the converted model from a checkpoint, turn it into its fastest exact "
        "inference form (ghostify.deploy: BatchNorms folded, memory layout measured) and "
        "optionally export it to ONNX, checked in onnxruntime, with a dynamic batch dimension.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dep.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    dep.add_argument(
        "--input-shape",
        type=input_shape,
        default=None,
        metavar="N,C,H,W",
        help="shape of the example input (default: the one saved in the checkpoint)",
    )
    dep.add_argument("--onnx", metavar="FILE", type=Path, help="write the ONNX model here")
    dep.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    dep.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    _traceback_option(dep, argparse.SUPPRESS)
    dep.set_defaults(run=_deploy)
    return parser


def _version_line() -> str:
    return (
        f"ghostify {package_version('ghostify')} (torch {torch.__version__}, "
        f"fvcore {package_version('fvcore')})"
    )


class _Progress:
    """Step messages with elapsed time on stderr, so stdout carries only the table.

    ``bars`` is what the library's ``progress=`` gets: False with ``--quiet``, else None (tqdm
    bars when stderr is a terminal).
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: bool | None = False if quiet else None
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def _example(shape: Sequence[int]) -> torch.Tensor:
    # Counts depend on shapes only; a seeded input keeps any data-dependent path reproducible.
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(map(str, shape))


def _convert(args: argparse.Namespace, say: _Progress) -> SavingsReport:
    weights = None
    if args.weights is not None:
        say(f"reading {args.weights}")
        weights = load_weights(args.weights)
    say(f"building {args.spec}" + (" (random weights)" if weights is None else ""))
    model = specs.build_model(args.spec).eval()
    if weights is not None:
        apply_weights(model, weights, args.weights, args.spec)
        say(f"loaded {len(weights)} tensors from {args.weights}")
    example = _example(args.input_shape)
    check_input_shape(model, example, args.spec)
    say(f"converting with ratio {args.ratio}, dw_size {args.dw_size}, init {args.init!r}")
    convert(
        model,
        ratio=args.ratio,
        dw_size=args.dw_size,
        include=args.include,
        exclude=args.exclude,
        init=args.init,
        example_inputs=example,
        skip_stem=args.skip_stem,
        progress=say.bars,
    )
    plan = plan_of(model)
    if args.out is not None:
        checkpoint.save_checkpoint(
            args.out, model, spec=args.spec, plan=plan, input_shape=args.input_shape
        )
        say(f"wrote checkpoint {args.out}")
    return _measure(model, example, plan, args.spec, args, say)


def _rebuilt(
    args: argparse.Namespace, say: _Progress
) -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    """The converted model a checkpoint describes, an example input, and the checkpoint."""
    say(f"reading {args.checkpoint}")
    payload = checkpoint.load_checkpoint(args.checkpoint)
    say(f"rebuilding {payload['spec']} with the saved plan and weights")
    model = checkpoint.load_model(payload)
    shape = args.input_shape or payload.get("input_shape") or DEFAULT_SHAPE
    example = _example(shape)
    if args.input_shape is not None:
        check_input_shape(model, example, payload["spec"])
    return model, example, payload


def _report(args: argparse.Namespace, say: _Progress) -> SavingsReport:
    model, example, payload = _rebuilt(args, say)
    return _measure(model, example, payload["plan"], payload["spec"], args, say)


def _deploy(args: argparse.Namespace, say: _Progress) -> object:
    from .deploy import deploy, deploy_record, export_onnx

    model, example, _ = _rebuilt(args, say)
    say("folding BatchNorms and measuring the memory layout")
    deploy(model, example)
    if args.onnx is not None:
        say(f"exporting to {args.onnx} (opset {args.opset}) and checking it in onnxruntime")
        export_onnx(model, example, args.onnx, opset=args.opset)
        say(f"wrote {args.onnx}")
    return deploy_record(model)


def _measure(
    model: nn.Module,
    example: torch.Tensor,
    plan: dict[str, Any],
    spec: str,
    args: argparse.Namespace,
    say: _Progress,
) -> SavingsReport:
    say(f"measuring on input {_shape_text(example.shape)}")
    result = report(
        model,
        example,
        plan=plan,
        include_batchnorm=args.include_batchnorm,
        spec=spec,
        timestamp=args.timestamp,
        progress=False if say.quiet else say,  # step lines, and bars in a terminal
    )
    for path, write in (
        (args.report, result.to_json),
        (args.markdown, result.to_markdown),
        (args.csv, result.to_csv),
        (args.chart, result.to_chart),
    ):
        if path is not None:
            write(path)
            say(f"wrote {path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ghostify`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    say = _Progress(args.quiet)
    try:
        check_paths(args)
        result = args.run(args, say)
    except UsageError as error:
        if args.traceback:
            raise
        command = f"{parser.prog} {args.command}"
        print(f"{command}: error: {error} (see {command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ghostify: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            raise
        print(f"ghostify: error: {_one_line(error)}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(result)
    return 0


def _one_line(error: BaseException) -> str:
    """An exception as one line; ours already say what to do, others get named and a hint."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines) if lines else "(no message)"
    if isinstance(error, GhostifyError):
        return text
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or text}: {error.filename}"
    return f"{type(error).__name__}: {text} (rerun with --traceback for details)"


if __name__ == "__main__":
    sys.exit(main())
