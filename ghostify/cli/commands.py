"""The work of each command: convert (calibrate, fine-tune), report, deploy. Imports torch.

Reached only once ``checks`` has passed the command line, so every error here is about the
model, the files' contents or the work itself.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..budget import Budget
from ..errors import ConfigError, TrainedWeightsWarning
from ..io import checkpoint, specs
from ..io.data import load_calibration_data
from ..io.paths import data_kind
from ..io.weights import apply_weights, load_weights
from ..pipeline import convert
from ..report import SavingsReport, report
from ..surgery import original_model, plan_of, record_of
from ..trained import CONSEQUENCE, trained_evidence
from ..tune import finetune
from .checks import UsageError
from .model_checks import check_input_shape, first_conv
from .parser import DEFAULT_SAMPLES, DEFAULT_SHAPE


class Progress:
    """Step messages with elapsed time on stderr, so stdout carries only the table; warnings
    on stderr always (``--quiet`` too).

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

    @staticmethod
    def warn(message: str) -> None:
        print(f"ghostify: warning: {message}", file=sys.stderr, flush=True)


def _example(shape: Sequence[int]) -> torch.Tensor:
    # Counts depend on shapes only; a seeded input keeps any data-dependent path reproducible.
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))


def _text(shape: Sequence[int]) -> str:
    return ",".join(map(str, shape))


def _build(spec: str) -> nn.Module:
    try:
        return specs.build_model(spec)
    except ConfigError as error:  # the SPEC names nothing that builds: the command line's fault
        raise UsageError(str(error)) from None


def _calibration_data(args: argparse.Namespace, model: nn.Module, say: Progress) -> torch.Tensor:
    """The inputs ``--calibration-data`` names, read for this model."""
    path, shape = args.calibration_data, args.input_shape
    images = data_kind(path) == "images"
    channels = size = None
    if images:
        found = first_conv(model)
        channels = shape[1] if shape else found[1].in_channels if found else 3
        if channels not in (1, 3, 4):
            raise UsageError(
                f"--calibration-data {str(path)!r} is a folder of images, read as 1, 3 or 4 "
                f"channels; {args.spec}'s first convolution takes {channels}: save the inputs "
                "as a .pt tensor instead"
            )
        size = tuple(shape[2:]) if shape else DEFAULT_SHAPE[2:]
    samples = args.samples or DEFAULT_SAMPLES
    say(f"reading calibration data {path} (at most {samples} inputs)")
    data = load_calibration_data(
        path,
        input_size=size,
        channels=channels,
        mean=args.mean,
        std=args.std,
        samples=samples,
        seed=args.seed or 0,
    )
    say(f"calibration data: {len(data)} inputs of shape {_text(data.shape[1:])}")
    return data


def run_convert(args: argparse.Namespace, say: Progress) -> SavingsReport:
    weights = None
    if args.weights is not None:
        say(f"reading {args.weights}")
        weights = load_weights(args.weights)
    say(f"building {args.spec}" + (" (random weights)" if weights is None else ""))
    model = _build(args.spec).eval()
    if weights is not None:
        apply_weights(model, weights, args.weights, args.spec)
        say(f"loaded {len(weights)} tensors from {args.weights}")
    data = None
    if args.calibration_data is not None:
        data = _calibration_data(args, model, say)
        check_input_shape(
            model, (1, *data.shape[1:]), args.spec, f"--calibration-data {args.calibration_data}:"
        )
    shape = args.input_shape or ((1, *data.shape[1:]) if data is not None else DEFAULT_SHAPE)
    given = "--input-shape" if args.input_shape else "the default input shape"
    check_input_shape(model, shape, args.spec, given)
    if data is None and args.init == "weights":
        _warn_if_trained(model, args, say)
    budget = _budget(args)
    ratio = 2 if args.ratio is None else args.ratio
    dw_size = 3 if args.dw_size is None else args.dw_size
    if budget is None:
        say(f"converting with ratio {ratio}, dw_size {dw_size}, init {args.init!r}")
    else:
        say(f"converting to a budget: {budget.describe()}, init {args.init!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainedWeightsWarning)  # said above, in the CLI's terms
        convert(
            model,
            ratio=ratio,
            dw_size=dw_size,
            budget=budget,
            include=args.include,
            exclude=args.exclude,
            init=args.init,
            example_inputs=_example(shape),
            skip_stem=args.skip_stem,
            progress=say.bars,
            calibration_data=data,
        )
    converted = _nothing_converted(model, say)
    if data is not None and converted:
        if args.finetune_epochs:
            say(f"fine-tuning {args.finetune_epochs} epoch(s) by distillation from the original")
            losses = finetune(model, data, args.finetune_epochs, progress=say.bars, seed=0)
            say(f"distillation loss per epoch: {', '.join(f'{x:.4g}' for x in losses)}")
        say(_agreement(model, data))
    plan = plan_of(model)
    if args.out is not None:
        checkpoint.save_checkpoint(args.out, model, spec=args.spec, plan=plan, input_shape=shape)
        say(f"wrote checkpoint {args.out}")
    return _measure(model, _example(shape), plan, args.spec, args, say)


def _budget(args: argparse.Namespace) -> Budget | None:
    """The ``ghostify.Budget`` that ``--speedup`` / ``--macs`` / ``--params`` ask for."""
    for kind in ("speedup", "macs", "params"):
        value = getattr(args, kind, None)
        if value is not None:
            return Budget(**{kind: value}, runtime=args.runtime or "eager")
    return None


def _warn_if_trained(model: nn.Module, args: argparse.Namespace, say: Progress) -> None:
    evidence = "you passed --weights" if args.weights else trained_evidence(model)
    if evidence is not None:
        say.warn(
            f"converting trained weights ({evidence}) without --calibration-data: {CONSEQUENCE}. "
            "To keep it, add --calibration-data PATH: a few hundred unlabeled inputs (a folder "
            "of images, a .pt or .npy file)"
        )


def _nothing_converted(model: nn.Module, say: Progress) -> bool:
    """Warn, naming why, when no convolution was converted; True when some were."""
    record = record_of(model)
    if record is None or record.layers:
        return True
    if not record.skipped:
        say.warn(
            "nothing was converted: the model has no convolution ghostify converts (Conv1d, "
            "Conv2d, Conv3d or a registered subclass)"
        )
        return False
    reasons = Counter(skip.reason for skip in record.skipped)
    first: dict[str, str] = {}
    for skip in record.skipped:
        first.setdefault(skip.reason, skip.name)
    listed = "; ".join(
        f"{count} x {reason}" if count > 1 else f"{first[reason]}: {reason}"
        for reason, count in reasons.items()
    )
    say.warn(
        f"nothing was converted: all {len(record.skipped)} convolution(s) were skipped ({listed})"
    )
    return False


@torch.no_grad()
def _agreement(model: nn.Module, data: torch.Tensor, batch: int = 64) -> str:
    """How close the converted model is to the original on the calibration inputs."""
    original = original_model(model).eval()
    model.eval()
    squared = total = agree = 0.0
    for start in range(0, len(data), batch):
        inputs = data[start : start + batch]
        want, got = original(inputs), model(inputs)
        if not isinstance(want, torch.Tensor):
            return "converted (its outputs are not one tensor: no agreement figure)"
        squared += float((got - want).float().pow(2).sum())
        total += float(want.float().pow(2).sum())
        if want.dim() == 2 and want.shape[1] > 1:
            agree += float((got.argmax(1) == want.argmax(1)).sum())
    text = f"relative output error {(squared / max(total, 1e-30)) ** 0.5:.4f}"
    if agree or (want.dim() == 2 and want.shape[1] > 1):
        text += f", top-1 agreement {100 * agree / len(data):.1f}%"
    return f"against the original on the calibration inputs: {text}"


def _rebuilt(
    args: argparse.Namespace, say: Progress
) -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    """The converted model a checkpoint describes, an example input, and the checkpoint."""
    say(f"reading {args.checkpoint}")
    payload = checkpoint.load_checkpoint(args.checkpoint)
    say(f"rebuilding {payload['spec']} with the saved plan and weights")
    model = checkpoint.load_model(payload)
    shape = args.input_shape or payload.get("input_shape") or DEFAULT_SHAPE
    if args.input_shape is not None:
        check_input_shape(model, shape, payload["spec"])
    return model, _example(shape), payload


def run_report(args: argparse.Namespace, say: Progress) -> SavingsReport:
    model, example, payload = _rebuilt(args, say)
    return _measure(model, example, payload["plan"], payload["spec"], args, say)


def run_deploy(args: argparse.Namespace, say: Progress) -> object:
    from ..deploy import deploy, deploy_record, export_onnx
    from ..deploy.export import external_data_path

    model, example, payload = _rebuilt(args, say)
    say("folding BatchNorms and measuring the memory layout")
    deploy(model, example)
    record = deploy_record(model)
    if args.out is not None:
        checkpoint.save_checkpoint(
            args.out,
            model,
            spec=payload["spec"],
            plan=payload["plan"],
            input_shape=list(example.shape),
            deployed=record,
        )
        say(f"wrote deployed checkpoint {args.out}")
    if args.onnx is not None:
        say(f"exporting to {args.onnx} (opset {args.opset}) and checking it in onnxruntime")
        export_onnx(model, example, args.onnx, opset=args.opset)
        data = external_data_path(args.onnx)
        if data.exists():
            say(f"wrote {args.onnx} and its weights {data} (past protobuf's 2 GB limit: keep both)")
        else:
            say(f"wrote {args.onnx} (one self-contained file)")
    return record


def _measure(
    model: nn.Module,
    example: torch.Tensor,
    plan: dict[str, Any],
    spec: str,
    args: argparse.Namespace,
    say: Progress,
) -> SavingsReport:
    say(f"measuring on input {_text(example.shape)}")
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


COMMANDS = {"convert": run_convert, "report": run_report, "deploy": run_deploy}
