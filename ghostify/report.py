"""The savings report: what a conversion saved, measured with fvcore on both models.

``report(model, example_inputs)`` needs only the converted model: the original is rebuilt by
replacing each GhostModule with ``nn.Conv2d(**module.conv_config())``, so a later audit that has
only the converted checkpoint gets the same figures. Both models are counted on deep copies in
eval mode; the model passed in is never changed.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import counting
from .discovery import list_sites
from .errors import ConfigError, GhostifyError
from .ghost_module import GhostModule, conv_config
from .inputs import as_args, describe_args
from .plan import plan_of

SCHEMA = "ghostify.report/1"
UNIT_NOTE = (
    "MACs: fvcore counts one fused multiply-add as one 'flop', so every figure is a count of "
    "multiply-accumulates (1 MAC = 2 FLOPs in PyTorch's FlopCounterMode convention)"
)
PARAMS_NOTE = (
    "fvcore.nn.parameter_count: every nn.Parameter once (a shared one once), BatchNorm affine "
    "weights and biases included, buffers excluded"
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LayerSaving:
    """One converted layer: its original configuration, ghost settings and both counts."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int] | str
    dilation: list[int]
    groups: int
    bias: bool
    ratio: int
    dw_size: int
    intrinsic_channels: int
    output_shape: list[int] | None  # of the first call; None when the forward never called it
    calls: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    aliases: list[str] = field(default_factory=list)  # other names of a shared module

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after


@dataclass(frozen=True)
class SkippedLayer:
    """A convolution left as it was, why, and what it costs (the same before and after)."""

    name: str
    reason: str
    in_channels: int | None
    out_channels: int | None
    kernel_size: list[int] | None
    stride: list[int] | None
    groups: int | None
    macs: int
    params: int


@dataclass
class SavingsReport:
    """MACs and parameters before and after a conversion: totals, per layer, skipped, caveats.

    ``to_dict()`` is the complete record; ``to_json``/``to_markdown``/``to_csv``/``to_chart``
    render it, ``from_json``/``from_dict`` read it back, ``str()`` is an aligned table.
    """

    totals: dict[str, Any]
    layers: list[LayerSaving]
    skipped: list[SkippedLayer]
    conventions: dict[str, Any]
    cross_check: dict[str, Any]
    provenance: dict[str, Any]
    schema: str = SCHEMA

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain JSON-able data."""
        return {
            "schema": self.schema,
            "totals": copy.deepcopy(self.totals),
            "layers": [asdict(row) for row in self.layers],
            "skipped": [asdict(row) for row in self.skipped],
            "conventions": copy.deepcopy(self.conventions),
            "cross_check": copy.deepcopy(self.cross_check),
            "provenance": copy.deepcopy(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SavingsReport:
        """Rebuild a report from ``to_dict()`` output (for example a loaded JSON file)."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"not a ghostify report: expected schema {SCHEMA!r}, got {got!r}")
        try:
            return cls(
                totals=data["totals"],
                layers=[_row(LayerSaving, row) for row in data["layers"]],
                skipped=[_row(SkippedLayer, row) for row in data["skipped"]],
                conventions=data["conventions"],
                cross_check=data["cross_check"],
                provenance=data["provenance"],
            )
        except (KeyError, TypeError) as error:
            raise ConfigError(f"malformed ghostify report: {error}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as indented JSON; also written to ``path`` when given."""
        return _emit(_dumps(self.to_dict()) + "\n", path)

    @classmethod
    def from_json(cls, source: str | Path) -> SavingsReport:
        """Read a report from a JSON string or from the path of a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The report as a Markdown document; also written to ``path`` when given."""
        return _emit(_markdown(self), path)

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV row per layer (converted, then skipped) and a total row."""
        return _emit(_csv(self), path)

    def to_chart(self, path: str | Path, *, top: int | None = None) -> Path:
        """Save a per-layer before/after MACs bar chart (PNG, SVG or PDF, from the suffix)."""
        return _chart(self, Path(path), top)

    def table(self, max_rows: int | None = None) -> str:
        """Aligned text table: largest savings first, totals at the bottom."""
        return _table(self, max_rows)

    def __str__(self) -> str:
        return self.table()


def _row(cls: type, row: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in row.items() if key in names})


def _dumps(value: Any, indent: str = "") -> str:
    """Indented JSON, with lists of plain values (shapes, kernel sizes) kept on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def _emit(text: str, path: str | Path | None) -> str:
    if path is not None:
        Path(path).write_text(text, encoding="utf-8", newline="")
    return text


# -- measuring ---------------------------------------------------------------------------------


def counting_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter requiring grad, safe to count.

    Some models keep autograd tensors from their last forward in plain attributes (torchvision's
    RAFT caches its correlation pyramid), which ``copy.deepcopy`` refuses; the copy gets detached
    versions instead. Parameters stop requiring grad because FlopCounterMode's module tracker
    hooks every grad-requiring input, and fails on a parameter view passed to a submodule under
    no_grad (timm's CaiT hands its class token to its blocks).
    """
    memo: dict[int, Any] = {}

    def detach_cached(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = value.detach()
        elif isinstance(value, (list, tuple)):
            for item in value:
                detach_cached(item)
        elif isinstance(value, dict):
            for item in value.values():
                detach_cached(item)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                detach_cached(value)
    copied = copy.deepcopy(model, memo)
    for param in copied.parameters():
        if param.is_leaf:  # a scripted or compiled submodule can expose derived tensors
            param.requires_grad_(False)
    return copied.eval()


def rebuild_original(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every GhostModule replaced by the Conv2d it stands for.

    Each GhostModule becomes ``nn.Conv2d(**module.conv_config())`` under every name it is
    registered as (a shared module stays shared). Weights are zeros: they do not affect counts,
    and not drawing random ones leaves the caller's random number generator untouched.
    """
    original = counting_copy(model)
    convs: dict[int, nn.Conv2d] = {}
    places: list[tuple[str, GhostModule]] = [
        (name, module)
        for name, module in original.named_modules(remove_duplicate=False)
        if isinstance(module, GhostModule)
    ]
    for name, module in places:
        if id(module) not in convs:
            weight = module.primary_conv.weight
            conv = nn.utils.skip_init(
                nn.Conv2d, **module.conv_config(), device=weight.device, dtype=weight.dtype
            )
            with torch.no_grad():
                for param in conv.parameters():
                    param.zero_()
            conv.train(module.training)
            convs[id(module)] = conv
        if not name:
            return convs[id(module)]  # the model itself was a GhostModule
        parent, _, attr = name.rpartition(".")
        setattr(original.get_submodule(parent), attr, convs[id(module)])
    return original


def report(
    model: nn.Module,
    example_inputs: Any,
    *,
    plan: dict[str, Any] | None = None,
    include_batchnorm: bool = True,
    spec: str | None = None,
    timestamp: bool = False,
    progress: Progress | None = None,
) -> SavingsReport:
    """Measure what converting ``model`` saved, with fvcore, on ``model(*example_inputs)``.

    ``model`` is a converted model (GhostModules in place of convolutions); the original is
    rebuilt from each GhostModule's recorded configuration. ``plan`` (from ``plan_of``, or one
    saved in a checkpoint) supplies the skip reasons; by default ``plan_of(model)`` is used.
    ``include_batchnorm=False`` leaves BatchNorm out of the MAC totals (fvcore counts it by
    default). ``spec`` is recorded in the provenance; ``timestamp=True`` adds the creation time
    (the only field that differs between two runs on the same model and inputs).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    args = as_args(example_inputs)
    say = progress or (lambda _message: None)
    plan = plan_of(model) if plan is None else plan

    after = counting_copy(model)
    before = rebuild_original(after).eval()
    sites = list_sites(after)
    ghosts = {name: site.module for name, site in sites.items() if site.kind == "ghost"}

    say("running the converted model once (FlopCounterMode cross-check)")
    with _CallRecorder(ghosts) as seen:
        torch_after = _eager_count(after, args)
    say("running the original model once (FlopCounterMode cross-check)")
    torch_before = _eager_count(before, args)
    fallback = None
    try:
        say("tracing and counting the original model with fvcore")
        count_before = counting.fvcore_count(before, args, include_batchnorm=include_batchnorm)
        say("tracing and counting the converted model with fvcore")
        count_after = counting.fvcore_count(after, args, include_batchnorm=include_batchnorm)
    except Exception as error:  # fvcore relies on TorchScript tracing; any failure -> fallback
        fallback = (
            f"fvcore could not trace the model ({counting.describe_failure(error)}); every "
            f"figure comes from {counting.FLOP_COUNTER} instead, which does not count BatchNorm, "
            "pooling or element-wise operations"
        )
        say("fvcore could not trace the model; counting with FlopCounterMode instead")
        count_before, count_after = torch_before, torch_after

    params_before = counting.count_params(before)
    params_after = counting.count_params(after)
    layers = _layer_rows(
        after, ghosts, seen, count_before, count_after, params_before, params_after
    )
    skipped = _skipped_rows(sites, plan, count_after, params_after)
    totals = _totals(count_before, count_after, params_before[""], params_after[""])
    saved_by_rows = sum(row.macs_saved for row in layers)
    cross_check = _cross_check(count_before, count_after, torch_before, torch_after, fallback)
    cross_check["layer_rows_add_up"] = saved_by_rows == totals["macs_saved"]
    conventions = _conventions(count_before, count_after, args, include_batchnorm, fallback, layers)
    provenance = _provenance(model, plan, spec, timestamp)
    return SavingsReport(totals, layers, skipped, conventions, cross_check, provenance)


def _conventions(
    count_before: counting.MacCount,
    count_after: counting.MacCount,
    args: tuple[Any, ...],
    include_batchnorm: bool,
    fallback: str | None,
    layers: list[LayerSaving],
) -> dict[str, Any]:
    """How the figures were obtained and what they leave out."""
    return {
        "unit": "MACs",
        "unit_note": UNIT_NOTE,
        "counter": count_after.counter,
        "fallback_reason": fallback,
        "batchnorm_included": count_before.batchnorm_included or count_after.batchnorm_included,
        "batchnorm_note": _batchnorm_note(include_batchnorm, fallback),
        "mode": "eval(), on deep copies: the model passed in is not changed",
        "inputs": [_describe_input(arg) for arg in args],
        "parameters": PARAMS_NOTE,
        "original_rebuilt_from": "each GhostModule's conv_config(): the replaced Conv2d's settings",
        "unsupported_ops": {
            "before": count_before.unsupported_ops,
            "after": count_after.unsupported_ops,
        },
        "unsupported_ops_note": (
            "operators the counter has no formula for, with how often each ran: their cost is "
            "not in the totals"
            if fallback is None
            else "FlopCounterMode does not list the operators it has no formula for; only "
            "convolutions, matrix products and attention are in the totals"
        ),
        "unsupported_ops_without_macs": sorted(
            op
            for op in {**count_before.unsupported_ops, **count_after.unsupported_ops}
            if op in counting.DATA_MOVEMENT_OPS
        ),
        "uncalled_layers": [row.name for row in layers if row.calls == 0],
    }


def _eager_count(model: nn.Module, args: tuple[Any, ...]) -> counting.MacCount:
    try:
        return counting.flop_counter_count(model, args)
    except counting.InputsRejected as error:
        raise ConfigError(
            f"the model rejected example_inputs ({describe_args(args)}): {error}; pass inputs of "
            "the shape, dtype and device the model expects"
        ) from error.__cause__


class _CallRecorder:
    """Context manager counting each layer's calls and keeping its first output shape."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.seen: dict[int, dict[str, Any]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> dict[int, dict[str, Any]]:
        for module in self.modules.values():
            self.seen[id(module)] = {"calls": 0, "shape": None}
            self.handles.append(module.register_forward_hook(self._hook))
        return self.seen

    def _hook(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        record = self.seen[id(module)]
        record["calls"] += 1
        if record["shape"] is None and isinstance(output, torch.Tensor):
            record["shape"] = list(output.shape)

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _layer_rows(
    after: nn.Module,
    ghosts: dict[str, nn.Module],
    seen: dict[int, dict[str, Any]],
    count_before: counting.MacCount,
    count_after: counting.MacCount,
    params_before: dict[str, int],
    params_after: dict[str, int],
) -> list[LayerSaving]:
    aliases: dict[int, list[str]] = {}
    for name, module in after.named_modules(remove_duplicate=False):
        if isinstance(module, GhostModule) and name not in ghosts:
            aliases.setdefault(id(module), []).append(name)
    rows = []
    for name, module in ghosts.items():
        config = module.conv_config()
        rows.append(
            LayerSaving(
                name=name,
                in_channels=config["in_channels"],
                out_channels=config["out_channels"],
                kernel_size=config["kernel_size"],
                stride=config["stride"],
                padding=config["padding"],
                dilation=config["dilation"],
                groups=config["groups"],
                bias=config["bias"],
                ratio=module.ratio,
                dw_size=module.dw_size,
                intrinsic_channels=module.intrinsic_channels,
                output_shape=seen[id(module)]["shape"],
                calls=seen[id(module)]["calls"],
                macs_before=count_before.by_module.get(name, 0),
                macs_after=count_after.by_module.get(name, 0),
                params_before=params_before.get(name, 0),
                params_after=params_after.get(name, 0),
                aliases=sorted(aliases.get(id(module), [])),
            )
        )
    return rows


def _skipped_rows(
    sites: dict[str, Any],
    plan: dict[str, Any],
    count_after: counting.MacCount,
    params_after: dict[str, int],
) -> list[SkippedLayer]:
    reasons = {row["name"]: row["reason"] for row in plan.get("skipped", [])}
    rows = []
    for name, site in sites.items():
        if site.kind == "ghost":
            continue
        reason = reasons.get(name, "not in the conversion plan (no reason recorded)")
        config = conv_config(site.module) if isinstance(site.module, nn.Conv2d) else {}
        rows.append(
            SkippedLayer(
                name=name,
                reason=reason,
                in_channels=config.get("in_channels"),
                out_channels=config.get("out_channels"),
                kernel_size=config.get("kernel_size"),
                stride=config.get("stride"),
                groups=config.get("groups"),
                macs=count_after.by_module.get(name, 0),
                params=params_after.get(name, 0),
            )
        )
    return rows


def _ratio(before: int, after: int) -> float | None:
    return round(before / after, 4) if after else None


def _percent(before: int, after: int) -> float | None:
    return round(100 * (before - after) / before, 2) if before else None


def _totals(
    before: counting.MacCount, after: counting.MacCount, params_before: int, params_after: int
) -> dict[str, Any]:
    return {
        "macs_before": before.total,
        "macs_after": after.total,
        "macs_saved": before.total - after.total,
        "macs_ratio": _ratio(before.total, after.total),
        "macs_reduction_percent": _percent(before.total, after.total),
        "params_before": params_before,
        "params_after": params_after,
        "params_saved": params_before - params_after,
        "params_ratio": _ratio(params_before, params_after),
        "params_reduction_percent": _percent(params_before, params_after),
        "macs_by_operator": {"before": before.by_operator, "after": after.by_operator},
    }


def _cross_check(
    before: counting.MacCount,
    after: counting.MacCount,
    torch_before: counting.MacCount,
    torch_after: counting.MacCount,
    fallback: str | None,
) -> dict[str, Any]:
    """Conv and linear MACs by the report's counter against FlopCounterMode's (halved)."""
    result: dict[str, Any] = {
        "tool": counting.FLOP_COUNTER,
        "rule": "FlopCounterMode counts 2 FLOPs per MAC; its figures are halved to compare",
    }
    if fallback is not None:
        result["agree"] = None
        result["note"] = "no independent count: FlopCounterMode is the report's own counter here"
        return result
    agree = True
    for label, count, torch_count in (
        ("before", before, torch_before),
        ("after", after, torch_after),
    ):
        result[label] = {
            "conv": {"fvcore": count.conv, "flop_counter": torch_count.conv},
            "linear": {"fvcore": count.linear, "flop_counter": torch_count.linear},
        }
        agree = agree and count.conv == torch_count.conv and count.linear == torch_count.linear
    result["agree"] = agree
    return result


def _batchnorm_note(include_batchnorm: bool, fallback: str | None) -> str:
    if fallback is not None:
        return "not included: FlopCounterMode has no formula for BatchNorm"
    if include_batchnorm:
        return (
            "included, as fvcore counts it by default (eval mode: 2 MACs per element with an "
            "affine transform); pass include_batchnorm=False (CLI: --no-batchnorm) to leave it out"
        )
    return "not included (include_batchnorm=False): BatchNorm is usually folded into the conv"


def _describe_input(arg: Any) -> dict[str, Any]:
    if isinstance(arg, torch.Tensor):
        return {"shape": list(arg.shape), "dtype": str(arg.dtype).removeprefix("torch.")}
    return {"type": type(arg).__name__}


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _provenance(
    model: nn.Module, plan: dict[str, Any], spec: str | None, timestamp: bool
) -> dict[str, Any]:
    cls = type(model)
    result: dict[str, Any] = {
        "ghostify": package_version("ghostify"),
        "torch": torch.__version__,
        "fvcore": package_version("fvcore"),
        "python": platform.python_version(),
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "spec": spec,
        "plan": _jsonable(plan),
    }
    if timestamp:
        result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result


def _jsonable(value: Any) -> Any:
    """``value`` through a JSON round trip, so the report holds plain data only."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise GhostifyError(f"the conversion plan is not JSON-serialisable: {error}") from None


# -- rendering ---------------------------------------------------------------------------------

_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def human(count: float) -> str:
    """``4111514624`` -> ``"4.11 G"``, ``25557032`` -> ``"25.6 M"``: three significant digits."""
    sign = "-" if count < 0 else ""
    count = abs(count)
    for index, (scale, suffix) in enumerate(_UNITS):
        if count >= scale * 0.9995:
            value = float(f"{count / scale:.3g}")
            if value >= 1000 and index > 0:  # 999.7 K rounds to 1.00 M, not "1000 K"
                scale, suffix = _UNITS[index - 1]
                value = float(f"{count / scale:.3g}")
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{sign}{value:.{digits}f} {suffix}"
    return f"{sign}{int(count)}"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _kernel(row: LayerSaving) -> str:
    text = f"{row.in_channels}->{row.out_channels} {row.kernel_size[0]}x{row.kernel_size[1]}"
    if row.stride != [1, 1]:
        text += f" s{row.stride[0]}" if row.stride[0] == row.stride[1] else f" s{row.stride}"
    if row.groups > 1:
        text += f" g{row.groups}"
    return text


def _by_savings(report: SavingsReport) -> list[LayerSaving]:
    return sorted(report.layers, key=lambda row: (-row.macs_saved, row.name))


def _inputs_text(report: SavingsReport) -> str:
    return ", ".join(
        "x".join(map(str, item["shape"])) if "shape" in item else item["type"]
        for item in report.conventions["inputs"]
    )


def _table(report: SavingsReport, max_rows: int | None) -> str:
    totals = report.totals
    header = ["layer", "conv", "ratio", "MACs before", "MACs after", "saved", "params before"]
    header.append("params after")
    rows = [
        [
            row.name,
            _kernel(row),
            str(row.ratio),
            human(row.macs_before),
            human(row.macs_after),
            _pct(row.macs_saved, row.macs_before),
            human(row.params_before),
            human(row.params_after),
        ]
        for row in _by_savings(report)
    ]
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        hidden, rows = len(rows) - max_rows, rows[:max_rows]
    total_row = [
        "total (whole model)",
        "",
        "",
        human(totals["macs_before"]),
        human(totals["macs_after"]),
        _pct(totals["macs_saved"], totals["macs_before"]),
        human(totals["params_before"]),
        human(totals["params_after"]),
    ]
    widths = [max(len(r[i]) for r in [header, *rows, total_row]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        parts += [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(header))
    conventions = report.conventions
    counter = "fvcore" if conventions["counter"] == counting.FVCORE else "FlopCounterMode"
    bn = "BatchNorm included" if conventions["batchnorm_included"] else "BatchNorm not included"
    title = (
        f"ghostify savings: {report.provenance['model_class']}, input {_inputs_text(report)}, "
        f"{counter} MACs ({bn})"
    )
    out = [title, line(header), rule, *map(line, rows)]
    if hidden:
        out.append(f"... {hidden} more layers")
    out += [rule, line(total_row)]
    out.append(
        f"{len(report.layers)} layers converted; MACs {_times(totals['macs_ratio'])} fewer, "
        f"params {_times(totals['params_ratio'])} fewer"
    )
    out += _notes(report)
    return "\n".join(out)


def _notes(report: SavingsReport) -> list[str]:
    notes = []
    if report.skipped:
        reasons: dict[str, int] = {}
        for row in report.skipped:
            reasons[row.reason] = reasons.get(row.reason, 0) + 1
        listed = "; ".join(f"{n} x {reason}" if n > 1 else reason for reason, n in reasons.items())
        notes.append(f"skipped {len(report.skipped)} conv(s): {listed}")
    conventions = report.conventions
    if conventions["fallback_reason"]:
        notes.append(f"note: {conventions['fallback_reason']}")
    unsupported = conventions["unsupported_ops"]["after"]
    if unsupported:
        free = set(conventions["unsupported_ops_without_macs"])
        listed = ", ".join(
            f"{op} x{n}" + (" (no MACs)" if op in free else "") for op, n in unsupported.items()
        )
        notes.append(f"not counted (no fvcore formula): {listed}")
    agree = report.cross_check.get("agree")
    if agree is True:
        notes.append("cross-check: conv and linear MACs agree with torch FlopCounterMode")
    elif agree is False:
        notes.append("cross-check: conv/linear MACs DIFFER from torch FlopCounterMode (see JSON)")
    return notes


def _markdown(report: SavingsReport) -> str:
    t = report.totals
    conventions = report.conventions
    provenance = report.provenance
    model = provenance["model_class"]
    if provenance.get("spec"):
        model += f" (`{provenance['spec']}`)"
    lines = [
        "# ghostify savings report",
        "",
        f"- **Model:** {model}",
        f"- **Input:** {_inputs_text(report)}",
        f"- **Counted with:** `{conventions['counter']}`, in eval mode",
        f"- **Unit:** {conventions['unit_note']}",
        f"- **BatchNorm:** {conventions['batchnorm_note']}",
        f"- **Parameters:** {conventions['parameters']}",
    ]
    if conventions["fallback_reason"]:
        lines.append(f"- **Fallback:** {conventions['fallback_reason']}")
    lines += [
        "",
        "| | before | after | saved | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| MACs | {t['macs_before']:,} ({human(t['macs_before'])}) | {t['macs_after']:,} "
        f"({human(t['macs_after'])}) | {t['macs_reduction_percent']}% | "
        f"{_times(t['macs_ratio'])} |",
        f"| parameters | {t['params_before']:,} ({human(t['params_before'])}) | "
        f"{t['params_after']:,} ({human(t['params_after'])}) | "
        f"{t['params_reduction_percent']}% | {_times(t['params_ratio'])} |",
        "",
        f"## Converted layers ({len(report.layers)}), largest savings first",
        "",
        "| layer | in | out | kernel | stride | groups | ratio | dw | output | MACs before "
        "| MACs after | params before | params after |",
        "|---|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in _by_savings(report):
        shape = "x".join(map(str, row.output_shape)) if row.output_shape else "not called"
        lines.append(
            f"| `{row.name}` | {row.in_channels} | {row.out_channels} | "
            f"{'x'.join(map(str, row.kernel_size))} | {'x'.join(map(str, row.stride))} | "
            f"{row.groups} | {row.ratio} | {row.dw_size} | {shape} | {row.macs_before:,} | "
            f"{row.macs_after:,} | {row.params_before:,} | {row.params_after:,} |"
        )
    lines += ["", f"## Skipped convolutions ({len(report.skipped)})", ""]
    if report.skipped:
        lines += ["| layer | reason | MACs | params |", "|---|---|---:|---:|"]
        lines += [
            f"| `{row.name}` | {row.reason} | {row.macs:,} | {row.params:,} |"
            for row in report.skipped
        ]
    else:
        lines.append("None.")
    lines += ["", "## Not counted", "", conventions["unsupported_ops_note"] + ":", ""]
    for label in ("before", "after"):
        ops = conventions["unsupported_ops"][label]
        listed = ", ".join(f"`{op}` x{n}" for op, n in ops.items()) or "none"
        lines.append(f"- {label}: {listed}")
    if conventions["unsupported_ops_without_macs"]:
        free = ", ".join(f"`{op}`" for op in conventions["unsupported_ops_without_macs"])
        lines.append(f"- of these, {free} do no multiply-adds (data movement or comparisons)")
    check = report.cross_check
    lines += ["", "## Cross-check", ""]
    if check.get("agree") is None:
        lines.append(check.get("note", "not run"))
    else:
        lines.append(f"Against `{check['tool']}` ({check['rule']}):")
        lines.append("")
        for label in ("before", "after"):
            for family in ("conv", "linear"):
                pair = check[label][family]
                lines.append(
                    f"- {label}, {family}: fvcore {pair['fvcore']:,}, "
                    f"FlopCounterMode {pair['flop_counter']:,}"
                )
        lines.append(f"- agree: **{'yes' if check['agree'] else 'NO'}**")
    lines.append(f"- per-layer rows add up to the total saving: {check['layer_rows_add_up']}")
    versions = ", ".join(
        f"{key} {provenance[key]}" for key in ("ghostify", "torch", "fvcore", "python")
    )
    lines += [
        "",
        "## Provenance",
        "",
        f"- versions: {versions}",
        f"- report schema: `{report.schema}`",
    ]
    if provenance.get("created"):
        lines.append(f"- created: {provenance['created']}")
    lines += [
        "",
        "<details><summary>Conversion plan (JSON)</summary>",
        "",
        "```json",
        json.dumps(provenance["plan"], indent=2),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


_CSV_COLUMNS = (
    "name",
    "status",
    "reason",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "groups",
    "ratio",
    "dw_size",
    "output_shape",
    "macs_before",
    "macs_after",
    "params_before",
    "params_after",
)


def _csv(report: SavingsReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()

    def dims(value: list[int] | None) -> str:
        return "x".join(map(str, value)) if value else ""

    for row in report.layers:
        writer.writerow(
            {
                "name": row.name,
                "status": "converted",
                "reason": "",
                "in_channels": row.in_channels,
                "out_channels": row.out_channels,
                "kernel_size": dims(row.kernel_size),
                "stride": dims(row.stride),
                "groups": row.groups,
                "ratio": row.ratio,
                "dw_size": row.dw_size,
                "output_shape": dims(row.output_shape),
                "macs_before": row.macs_before,
                "macs_after": row.macs_after,
                "params_before": row.params_before,
                "params_after": row.params_after,
            }
        )
    for row in report.skipped:
        writer.writerow(
            {
                "name": row.name,
                "status": "skipped",
                "reason": row.reason,
                "in_channels": row.in_channels,
                "out_channels": row.out_channels,
                "kernel_size": dims(row.kernel_size),
                "stride": dims(row.stride),
                "groups": row.groups,
                "macs_before": row.macs,
                "macs_after": row.macs,
                "params_before": row.params,
                "params_after": row.params,
            }
        )
    t = report.totals
    writer.writerow(
        {
            "name": "(whole model)",
            "status": "total",
            "macs_before": t["macs_before"],
            "macs_after": t["macs_after"],
            "params_before": t["params_before"],
            "params_after": t["params_after"],
        }
    )
    return buffer.getvalue()


def _chart(report: SavingsReport, path: Path, top: int | None) -> Path:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "the chart needs matplotlib: pip install 'ghostify[plot]' (or pip install matplotlib)"
        ) from None
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"chart path must end in .png, .svg or .pdf; got {str(path)!r}")
    rows = report.layers if top is None else _by_savings(report)[:top]
    height = max(2.5, 0.22 * len(rows) + 1.2)
    figure = Figure(figsize=(8, height), layout="constrained")
    axes = figure.add_subplot()
    positions = list(range(len(rows)))
    before = [row.macs_before / 1e6 for row in rows]
    after = [row.macs_after / 1e6 for row in rows]
    axes.barh([p - 0.2 for p in positions], before, height=0.4, label="before", color="#9aa5b1")
    axes.barh([p + 0.2 for p in positions], after, height=0.4, label="after", color="#2b7bba")
    axes.set_yticks(positions, [row.name for row in rows], fontsize=7)
    axes.invert_yaxis()  # first layer on top
    axes.set_xlabel("MACs (millions)")
    totals = report.totals
    axes.set_title(
        f"{report.provenance['model_class'].rsplit('.', 1)[-1]}: {human(totals['macs_before'])} "
        f"-> {human(totals['macs_after'])} MACs ({totals['macs_reduction_percent']}% fewer)",
        fontsize=9,
    )
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    metadata = {"Date": None} if suffix in (".svg", ".pdf") else {}  # no timestamp in the file
    figure.savefig(path, metadata=metadata, dpi=120)
    return path
