"""Command-line checks that run before any work and before torch is imported.

A command line that cannot work should say so at once, with exit status 2, not after seconds
of importing torch or a minute of conversion: every flag combination, path and SPEC that can be
judged without building the model is judged here. Checks that need the model (the input shape
against its first convolution) are in ``model_checks``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from ..io.paths import KNOWN, PIL_MODES, data_kind, image_files
from ..io.specs import check_spec

CHART_SUFFIXES = (".png", ".svg", ".pdf")
_OUTPUTS = ("out", "report", "markdown", "csv", "chart", "onnx")
_CALIBRATION_FLAGS = ("samples", "finetune_epochs", "mean", "std", "seed")


class UsageError(ConfigError):
    """A command line that cannot work, found before any work starts: exit status 2."""


def check_command_line(args: argparse.Namespace) -> None:
    """Every check that needs neither torch nor the model; a UsageError at the first problem."""
    check_paths(args)
    _resolve_from_current_folder()  # convert builds SPEC; report and deploy rebuild a checkpoint's
    if args.command == "convert":
        try:
            check_spec(args.spec)
        except ConfigError as error:
            raise UsageError(str(error)) from None
        check_calibration(args)
        check_budget(args)
    elif args.command == "deploy" and args.out is None and args.onnx is None:
        raise UsageError(
            "deploy needs --out CKPT and/or --onnx FILE: without them nothing would be saved"
        )


def _resolve_from_current_folder() -> None:
    """Put the current folder first on the module path, as ``python -m`` does, so that a
    ``mymodule:factory`` SPEC finds ``mymodule.py`` where the command runs."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def _named(path: Path) -> str:
    return repr(str(path))


def check_paths(args: argparse.Namespace) -> None:
    """Input files must exist; every output path must be writable (its folder exists), must
    not overwrite an input, and the chart's suffix must be known."""
    inputs = {}
    for option in ("weights", "checkpoint"):
        path = getattr(args, option, None)
        if path is None:
            continue
        flag = f"--{option}" if option == "weights" else "checkpoint"
        if not Path(path).is_file():
            raise UsageError(f"{flag} {_named(path)} does not exist or is not a file")
        inputs[Path(path).resolve()] = flag
    for option in _OUTPUTS:
        path = getattr(args, option, None)
        if path is None:
            continue
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise UsageError(f"--{option} {_named(path)} is a folder; give a file name")
        where = f"--{option} {_named(path)}: the folder {_named(folder)}"
        if not folder.is_dir():
            raise UsageError(f"{where} does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{where} is not writable")
        if path.resolve() in inputs:
            raise UsageError(
                f"--{option} {_named(path)} would overwrite the {inputs[path.resolve()]} it reads"
            )
    chart = getattr(args, "chart", None)
    if chart is not None and Path(chart).suffix.lower() not in CHART_SUFFIXES:
        raise UsageError(
            f"--chart {_named(chart)} must end in {', '.join(CHART_SUFFIXES)} (the suffix picks "
            "the format)"
        )


def check_budget(args: argparse.Namespace) -> None:
    """``--speedup`` / ``--macs`` / ``--params`` choose every layer's form themselves."""
    budget = next(
        (f"--{flag}" for flag in ("speedup", "macs", "params") if getattr(args, flag) is not None),
        None,
    )
    if budget is None:
        if args.runtime is not None:
            raise UsageError("--runtime says where --speedup is measured; it needs --speedup X")
        return
    given = [
        flag for flag, value in (("--ratio", args.ratio), ("--dw-size", args.dw_size)) if value
    ]
    if given:
        raise UsageError(
            f"{budget} chooses every layer's ratio and dw_size, so {' and '.join(given)} cannot "
            "be given with it"
        )
    if args.runtime is not None and budget != "--speedup":
        raise UsageError(f"--runtime says where --speedup is measured; {budget} counts, not times")


def check_calibration(args: argparse.Namespace) -> None:
    """``--calibration-data`` and the flags that go with it, judged from the path alone."""
    path = args.calibration_data
    if path is None:
        given = [
            f"--{flag.replace('_', '-')}"
            for flag in _CALIBRATION_FLAGS
            if getattr(args, flag) is not None
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)} only apply with --calibration-data PATH (the inputs they "
                "choose, normalise or fine-tune on)"
            )
        return
    if args.init == "scratch":
        raise UsageError(
            "--calibration-data fits the new layers to the trained ones, so it needs --init "
            "weights (the default); --init scratch starts from random layers"
        )
    if not path.exists():
        raise UsageError(f"--calibration-data {_named(path)} does not exist; give {KNOWN}")
    kind = data_kind(path)
    if kind is None:
        raise UsageError(
            f"--calibration-data {_named(path)}: unknown kind of file "
            f"{path.suffix or '(no suffix)'!r}; give {KNOWN}"
        )
    if kind != "images":
        if args.mean is not None or args.std is not None:
            raise UsageError(
                f"--mean/--std normalise images; --calibration-data {_named(path)} holds model "
                "inputs as they are (normalise them before saving)"
            )
        return
    if not image_files(path):
        raise UsageError(
            f"--calibration-data {_named(path)} holds no image (looked for {KNOWN.split('(')[1]} "
            "in it and its sub-folders"
        )
    shape = args.input_shape
    if shape is not None and (len(shape) != 4 or shape[1] not in PIL_MODES):
        raise UsageError(
            f"--input-shape {','.join(map(str, shape))}: images are read as N,C,H,W with C = 1 "
            "(greyscale), 3 (RGB) or 4 (RGBA); give such a shape for an image folder"
        )
    for option in ("mean", "std"):
        values = getattr(args, option)
        if values is not None and shape is not None and len(values) not in (1, shape[1]):
            raise UsageError(
                f"--{option} has {len(values)} values; the images have {shape[1]} channel(s) "
                "(give one value, or one per channel)"
            )
