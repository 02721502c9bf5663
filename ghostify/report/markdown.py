"""The savings report as a Markdown document an auditor reads from top to bottom.

What was measured and how; the totals; where the MACs and parameters are (converted layers,
skipped ones, the rest of the model), adding up to the totals; every convolution in the model's
order; every operator the counter could not count, with what it is; the cross-check; provenance.
The conversion plan travels as a JSON file beside the document, not inside it.
"""

from __future__ import annotations

from .model import LayerSaving, ReportData
from .operators import not_counted_rows
from .render import (
    EVERYTHING_ELSE,
    EVERYTHING_ELSE_NOTE,
    budget_line,
    fit_text,
    human,
    inputs_text,
    model_title,
    times,
)


def _count(value: int) -> str:
    return f"{value:,} ({human(value)})"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _header(report: ReportData, chart_file: str | None) -> list[str]:
    t, conventions, provenance = report.totals, report.conventions, report.provenance
    model = provenance["model_class"]
    if provenance.get("spec"):
        model = f"`{provenance['spec']}` ({model})"
    lines = [
        f"# ghostify savings report: {model_title(report)}",
        "",
        f"- **Model:** {model}",
        f"- **Input:** {inputs_text(report)}",
        f"- **Counted with:** `{conventions['counter']}`, in eval mode",
        f"- **Unit:** {conventions['unit_note']}",
        f"- **BatchNorm:** {conventions['batchnorm_note']}",
        f"- **Parameters:** {conventions['parameters']}",
        "- **Order:** every table and the chart list the convolutions in the order the model "
        "defines them",
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
        f"| MACs | {_count(t['macs_before'])} | {_count(t['macs_after'])} | "
        f"{t['macs_reduction_percent']}% | {times(t['macs_ratio'])} |",
        f"| parameters | {_count(t['params_before'])} | {_count(t['params_after'])} | "
        f"{t['params_reduction_percent']}% | {times(t['params_ratio'])} |",
    ]
    if chart_file:
        lines += ["", f"![MACs and parameters per convolution, before and after]({chart_file})"]
    return lines


def _parts(report: ReportData) -> list[str]:
    """Converted + skipped + everything else = the totals, in one small table."""

    def part(rows: list) -> dict[str, int]:
        keys = ("macs_before", "macs_after", "params_before", "params_after")
        return {key: sum(getattr(row, key) for row in rows) for key in keys}

    lines = [
        "",
        "## Where the MACs and parameters are",
        "",
        "| part | MACs before | MACs after | params before | params after |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, figures in (
        (f"{len(report.layers)} converted convolution(s)", part(report.layers)),
        (f"{len(report.skipped)} skipped convolution(s), unchanged", part(report.skipped)),
        (f"{EVERYTHING_ELSE} ({EVERYTHING_ELSE_NOTE})", report.everything_else()),
        ("**total**", report.totals),
    ):
        lines.append(
            f"| {label} | {figures['macs_before']:,} | {figures['macs_after']:,} | "
            f"{figures['params_before']:,} | {figures['params_after']:,} |"
        )
    return lines


def _layers(report: ReportData) -> list[str]:
    timed = any(row.ghost_ms is not None for row in report.layers)
    fitted = any(row.fit_method is not None for row in report.layers)
    lines = [
        "",
        f"## Convolutions ({len(report.layers)} converted, {len(report.skipped)} skipped), "
        "in model order",
        "",
        "| # | layer | in | out | kernel | stride | groups | ratio | dw | output | MACs before "
        "| MACs after | params before | params after |"
        + (" ms before | ms after |" if timed else "")
        + (" calibration fit |" if fitted else ""),
        "|---:|---|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
        + ("---:|---:|" if timed else "")
        + ("---|" if fitted else ""),
    ]
    for number, row in enumerate(report.in_model_order(), 1):
        kernel = "x".join(map(str, row.kernel_size or [])) or "-"
        stride = "x".join(map(str, row.stride or [])) or "-"
        common = f"| {number} | `{row.name}` | {_cell(row.in_channels)} | "
        common += f"{_cell(row.out_channels)} | {kernel} | {stride} | {_cell(row.groups)} |"
        if isinstance(row, LayerSaving):
            shape = "x".join(map(str, row.output_shape)) if row.output_shape else "not called"
            times_ms = f" {row.original_ms} | {row.ghost_ms} |" if timed else ""
            times_ms += f" {fit_text(row)} |" if fitted else ""
            lines.append(
                f"{common} {row.ratio} | {row.dw_size} | {shape} | {row.macs_before:,} | "
                f"{row.macs_after:,} | {row.params_before:,} | {row.params_after:,} |{times_ms}"
            )
        else:
            lines.append(
                f"{common} skipped | - | - | {row.macs:,} | {row.macs:,} | {row.params:,} | "
                f"{row.params:,} |" + (" - | - |" if timed else "") + (" - |" if fitted else "")
            )
    if report.skipped:
        lines += ["", "Skipped, and why:", ""]
        lines += [f"- `{row.name}`: {row.reason}" for row in report.skipped]
    return lines


def _not_counted(report: ReportData) -> list[str]:
    conventions = report.conventions
    unsupported = conventions["unsupported_ops"]
    rows = not_counted_rows(unsupported["before"], unsupported["after"])
    lines = ["", "## Not counted", "", conventions["unsupported_ops_note"] + "."]
    if not rows:
        return [*lines, "", "None."]
    lines += [
        "",
        "| operator | runs before | runs after | what it is, and its cost |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        added = f" **The conversion added {row['added']} run(s).**" if row["added"] else ""
        lines.append(
            f"| `{row['op']}` | {row['before']} | {row['after']} | {row['what']}.{added} |"
        )
    return lines


def _cross_check(report: ReportData) -> list[str]:
    check = report.cross_check
    lines = ["", "## Cross-check", ""]
    if check.get("agree") is None:
        lines.append(check.get("note", "not run"))
    else:
        lines += [f"Against `{check['tool']}` ({check['rule']}):", ""]
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
    return lines


def _provenance(report: ReportData, plan_file: str | None) -> list[str]:
    provenance = report.provenance
    versions = ", ".join(
        f"{key} {provenance[key]}" for key in ("ghostify", "torch", "fvcore", "python")
    )
    options = (provenance.get("plan") or {}).get("options") or {}
    settings = ", ".join(f"{key} {value!r}" for key, value in options.items()) or "not recorded"
    where = (
        f"[`{plan_file}`]({plan_file}), beside this document"
        if plan_file
        else "the JSON report's `provenance.plan` (`SavingsReport.to_json`)"
    )
    lines = [
        "",
        "## Provenance",
        "",
        f"- versions: {versions}",
        f"- report schema: `{report.schema}`",
        f"- conversion settings: {settings}",
        f"- conversion plan (every layer's settings, channel order and skip reason): {where}; "
        "`ghostify.convert(model, plan=...)` rebuilds the converted model from it",
    ]
    if provenance.get("created"):
        lines.append(f"- created: {provenance['created']}")
    return [*lines, ""]


def markdown(
    report: ReportData, chart_file: str | None = None, plan_file: str | None = None
) -> str:
    """The report as Markdown; ``chart_file`` and ``plan_file`` (paths relative to the
    document) are shown and linked when given."""
    return "\n".join(
        _header(report, chart_file)
        + _parts(report)
        + _layers(report)
        + _not_counted(report)
        + _cross_check(report)
        + _provenance(report, plan_file)
    )
