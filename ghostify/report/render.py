"""Rendering a savings report: aligned table, Markdown, CSV and a before/after chart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import ConfigError
from . import counting
from .model import LayerSaving, ReportData

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
    text = f"{row.in_channels}->{row.out_channels} {'x'.join(map(str, row.kernel_size))}"
    if any(step != 1 for step in row.stride):
        text += f" s{row.stride[0]}" if len(set(row.stride)) == 1 else f" s{row.stride}"
    if row.groups > 1:
        text += f" g{row.groups}"
    return text


def _speedup(row: LayerSaving) -> str:
    """The measured per-layer speed-up, ``1.42x`` (original time / GhostModule time)."""
    if row.original_ms is None or not row.ghost_ms:
        return "-"
    return f"{row.original_ms / row.ghost_ms:.2f}x"


def _by_savings(report: ReportData) -> list[LayerSaving]:
    return sorted(report.layers, key=lambda row: (-row.macs_saved, row.name))


def _inputs_text(report: ReportData) -> str:
    return ", ".join(
        "x".join(map(str, item["shape"])) if "shape" in item else item["type"]
        for item in report.conventions["inputs"]
    )


def table(report: ReportData, max_rows: int | None) -> str:
    totals = report.totals
    header = ["layer", "conv", "ratio", "MACs before", "MACs after", "saved", "params before"]
    header.append("params after")
    timed = any(row.ghost_ms is not None for row in report.layers)
    if timed:
        header.append("time")
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
        + ([_speedup(row)] if timed else [])
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
    ] + ([""] if timed else [])
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
    if report.cross_check.get("same_workload") is False:  # absent in reports made before it
        notes.append(f"warning: {report.cross_check['workload_note']}")
    return notes


def markdown(report: ReportData, chart_file: str | None = None) -> str:
    """The report as Markdown; ``chart_file`` (a path relative to the document) is shown under
    the totals."""
    t = report.totals
    timed = any(row.ghost_ms is not None for row in report.layers)
    conventions = report.conventions
    provenance = report.provenance
    image = (
        ["", f"![MACs per converted layer, before and after]({chart_file})"] if chart_file else []
    )
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
    planned = budget_line(report)
    if planned:
        lines.append(f"- **Budget:** {planned.removeprefix('budget: ')}")
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
        *image,
        "",
        f"## Converted layers ({len(report.layers)}), largest savings first",
        "",
        "| layer | in | out | kernel | stride | groups | ratio | dw | output | MACs before "
        "| MACs after | params before | params after |"
        + (" ms before | ms after |" if timed else ""),
        "|---|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
        + ("---:|---:|" if timed else ""),
    ]
    for row in _by_savings(report):
        shape = "x".join(map(str, row.output_shape)) if row.output_shape else "not called"
        times = f" {row.original_ms} | {row.ghost_ms} |" if timed else ""
        lines.append(
            f"| `{row.name}` | {row.in_channels} | {row.out_channels} | "
            f"{'x'.join(map(str, row.kernel_size))} | {'x'.join(map(str, row.stride))} | "
            f"{row.groups} | {row.ratio} | {row.dw_size} | {shape} | {row.macs_before:,} | "
            f"{row.macs_after:,} | {row.params_before:,} | {row.params_after:,} |{times}"
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
    if "same_workload" in check:
        lines.append(f"- every converted layer ran as its original did: {check['same_workload']}")
    if check.get("workload_differs"):
        names = ", ".join(f"`{name}`" for name in check["workload_differs"][:8])
        lines.append(f"- **{check['workload_note']}**: {names}")
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
    "original_ms",
    "ghost_ms",
)


def csv_rows(report: ReportData) -> str:
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
                "original_ms": row.original_ms,
                "ghost_ms": row.ghost_ms,
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


def chart(report: ReportData, path: Path, top: int | None) -> Path:
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
