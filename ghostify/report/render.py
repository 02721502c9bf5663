"""Rendering a savings report as text: the aligned table, CSV, and the helpers the Markdown
document (``markdown``) and the chart (``chart``) share. One order everywhere: the model's own
(``ReportData.in_model_order``), skipped convolutions in their place."""

from __future__ import annotations

import csv
import io

from . import counting
from .model import LayerSaving, ReportData, SkippedLayer

Row = LayerSaving | SkippedLayer
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
EVERYTHING_ELSE = "everything else"
EVERYTHING_ELSE_NOTE = "BatchNorm, linear layers, pooling, ...: the model outside its convolutions"


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


def times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def kernel(row: Row) -> str:
    """``64->128 3x3 s2 g2``: what the convolution is, in a few characters."""
    if row.in_channels is None or row.kernel_size is None:
        return ""
    text = f"{row.in_channels}->{row.out_channels} {'x'.join(map(str, row.kernel_size))}"
    stride = row.stride or []
    if any(step != 1 for step in stride):
        text += f" s{stride[0]}" if len(set(stride)) == 1 else f" s{stride}"
    if row.groups and row.groups > 1:
        text += f" g{row.groups}"
    return text


def speedup(row: Row) -> str:
    """The measured per-layer speed-up, ``1.42x`` (original time / GhostModule time)."""
    if not isinstance(row, LayerSaving) or row.original_ms is None or not row.ghost_ms:
        return "-"
    return f"{row.original_ms / row.ghost_ms:.2f}x"


def fit_text(row: Row) -> str:
    """A calibrated layer's fit: its relative output error, then the method."""
    if not isinstance(row, LayerSaving) or row.fit_method is None:
        return ""
    error = "" if row.fit_error is None else f"error {row.fit_error:.3f}, "
    return f"{error}{row.fit_method}"


def inputs_text(report: ReportData) -> str:
    return ", ".join(
        "x".join(map(str, item["shape"])) if "shape" in item else item["type"]
        for item in report.conventions["inputs"]
    )


def model_title(report: ReportData) -> str:
    """The model as the user named it: its SPEC (``torchvision:resnet50``), else its class."""
    provenance = report.provenance
    return provenance.get("spec") or provenance["model_class"].rsplit(".", 1)[-1]


def largest_savings(report: ReportData, count: int) -> list[Row]:
    """The ``count`` rows that save the most MACs, still in the model's order."""
    chosen = sorted(report.in_model_order(), key=lambda r: r.macs_after - r.macs_before)[:count]
    keep = {id(row) for row in chosen}
    return [row for row in report.in_model_order() if id(row) in keep]


def table(report: ReportData, max_rows: int | None) -> str:
    """Aligned text: every convolution in the model's order (skipped ones marked ``skip``), the
    rest of the model, and the totals, so that each column adds up."""
    totals = report.totals
    timed = any(isinstance(r, LayerSaving) and r.ghost_ms is not None for r in report.layers)
    header = ["layer", "conv", "ratio", "MACs before", "MACs after", "saved", "params before"]
    fitted = any(isinstance(r, LayerSaving) and r.fit_method is not None for r in report.layers)
    header += (
        ["params after"] + (["time"] if timed else []) + (["calibration fit"] if fitted else [])
    )
    shown = report.in_model_order()
    hidden = 0
    if max_rows is not None and len(shown) > max_rows:
        hidden, shown = len(shown) - max_rows, largest_savings(report, max_rows)

    def cells(
        name: str, conv: str, ratio: str, figures: dict[str, int], extra: str, fit: str = ""
    ) -> list[str]:
        before, after = figures["macs_before"], figures["macs_after"]
        return (
            [
                name,
                conv,
                ratio,
                human(before),
                human(after),
                pct(before - after, before),
                human(figures["params_before"]),
                human(figures["params_after"]),
            ]
            + ([extra] if timed else [])
            + ([fit] if fitted else [])
        )

    rows = [
        cells(
            row.name,
            kernel(row),
            str(row.ratio) if isinstance(row, LayerSaving) else "skip",
            _figures(row),
            speedup(row),
            fit_text(row),
        )
        for row in shown
    ]
    other = cells(EVERYTHING_ELSE, "", "", report.everything_else(), "")
    total_row = cells("total (whole model)", "", "", totals, "")
    widths = [max(len(r[i]) for r in [header, *rows, other, total_row]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        parts = [values[0].ljust(widths[0]), values[1].ljust(widths[1])]
        parts += [cell.rjust(width) for cell, width in zip(values[2:], widths[2:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(header))
    conventions = report.conventions
    counter = "fvcore" if conventions["counter"] == counting.FVCORE else "FlopCounterMode"
    bn = "BatchNorm included" if conventions["batchnorm_included"] else "BatchNorm not included"
    title = (
        f"ghostify savings: {model_title(report)}, input {inputs_text(report)}, "
        f"{counter} MACs ({bn}); layers in model order"
    )
    out = [title, line(header), rule, *map(line, rows)]
    if hidden:
        out.append(f"... {hidden} more layers (the {max_rows} largest savings are shown)")
    out += [line(other), rule, line(total_row)]
    out.append(
        f"{len(report.layers)} layers converted; MACs {times(totals['macs_ratio'])} fewer, "
        f"params {times(totals['params_ratio'])} fewer"
    )
    out += _notes(report)
    return "\n".join(out)


def budget_line(report: ReportData) -> str | None:
    """One line on the budget the conversion was planned for, when it was (``convert(...,
    budget=...)``): what was asked, predicted and measured."""
    options = (report.provenance.get("plan") or {}).get("options") or {}
    summary = options.get("budget")
    if not summary:
        return None
    asked = summary["budget"]
    layers = f"{summary['converted']} layers converted, {summary['kept']} kept as convolutions"
    loss = f"loss {summary['loss']:.4g} ({summary['loss_source']}, {summary['sensitivity']})"
    if "speedup" in asked:
        batch = f", batch {summary['batch_size']}" if summary.get("batch_size") else ""
        measured = summary.get("measured_speedup")
        return (
            f"budget: x{asked['speedup']:g} speed-up ({asked['runtime']}{batch}): predicted "
            f"x{summary['predicted_speedup']:.3f}, measured "
            + (f"x{measured:.3f}" if measured is not None else "not measured")
            + f"; {layers}; {loss}"
        )
    kind = "macs" if "macs" in asked else "params"
    what = "MACs" if kind == "macs" else "parameters"
    return (
        f"budget: at most {asked[kind]:g} of the original's {what}: kept "
        f"{summary[f'{kind}_fraction']:.4f}; {layers}; {loss}"
    )


def _figures(row: Row) -> dict[str, int]:
    return {
        key: getattr(row, key)
        for key in ("macs_before", "macs_after", "params_before", "params_after")
    }


def _notes(report: ReportData) -> list[str]:
    notes = []
    planned = budget_line(report)
    if planned:
        notes.append(planned)
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
        listed = ", ".join(f"{op} x{n}" for op, n in unsupported.items())
        notes.append(
            f"not counted (no fvcore formula; what each is: see the Markdown report): {listed}"
        )
    agree = report.cross_check.get("agree")
    if agree is True:
        notes.append("cross-check: conv and linear MACs agree with torch FlopCounterMode")
    elif agree is False:
        notes.append("cross-check: conv/linear MACs DIFFER from torch FlopCounterMode (see JSON)")
    if report.cross_check.get("same_workload") is False:  # absent in reports made before it
        notes.append(f"warning: {report.cross_check['workload_note']}")
    return notes


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
    "original_ms",
    "ghost_ms",
)


def csv_rows(report: ReportData) -> str:
    """One row per convolution in the model's order, the rest of the model, and the totals."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()

    def dims(value: list[int] | None) -> str:
        return "x".join(map(str, value)) if value else ""

    shared = ("in_channels", "out_channels", "groups", "macs_before", "macs_after")
    shared += ("params_before", "params_after")
    for row in report.in_model_order():
        values = {key: getattr(row, key) for key in shared}
        values.update(name=row.name, kernel_size=dims(row.kernel_size), stride=dims(row.stride))
        if isinstance(row, LayerSaving):
            values.update(
                status="converted",
                reason="",
                ratio=row.ratio,
                dw_size=row.dw_size,
                output_shape=dims(row.output_shape),
                original_ms=row.original_ms,
                ghost_ms=row.ghost_ms,
            )
        else:
            values.update(status="skipped", reason=row.reason)
        writer.writerow(values)
    other = {"name": f"({EVERYTHING_ELSE})", "status": "other", "reason": EVERYTHING_ELSE_NOTE}
    writer.writerow({**other, **report.everything_else()})
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
