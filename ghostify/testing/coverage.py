"""Zoo sweep results: the JSON-lines file, and the coverage table rendered as Markdown."""

from __future__ import annotations

import collections
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .zoo_checks import PASSING
from .zoo_jobs import (
    CONV_FAMILIES,
    TRANSFORMERS_MODELS,
    ULTRALYTICS_MODELS,
    timm_family,
    torchvision_jobs,
)

HINTS = {
    "timeout": "Too slow for the sweep's CPU budget: rerun it alone with a larger --timeout.",
    "crash": "The worker process died (usually out of memory): rerun alone on a larger machine.",
    "too-large": "Skipped to fit a shared CPU box: rerun with --max-params 0 on a bigger machine.",
    "build-error": "The untrained model itself does not build or run here (not a ghostify issue).",
}


def load_results(path: Path) -> dict[str, dict]:
    """The latest result per model key (later lines win)."""
    results: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                res = json.loads(line)
                results[f"{res['zoo']}:{res['model']}"] = res
    return results


def hint_for(res: dict) -> str:
    """What a user can do about a failed model."""
    if res["status"] in HINTS:
        return HINTS[res["status"]]
    error = res.get("error") or ""
    if "Expected gradient function" in error:  # docs/zoo_findings.md, finding 1
        return (
            "Only `ghostify.report` fails (PyTorch's FlopCounterMode under no_grad); the "
            "conversion passed its other checks. Workaround: `model.requires_grad_(False)` "
            "before `report(...)`."
        )
    if "not accounted" in error:
        return "Pass exclude=[...] for the named convs, or example_inputs so hooks can find them."
    if "output structure" in error:
        return "Exclude the layers named in the error (exclude=[...]) and report the model."
    if "NaN/Inf" in error:
        return "Exclude the GhostModules named in the error and report the model with this line."
    if "convert raised" in error:
        return "Retry with example_inputs=..., or exclude=[...] the layer named in the error."
    if "gradient" in error:
        return "Inference works; for training, exclude the named layers."
    return "Exclude the layer named in the error, or report the model with this line."


def fmt_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def summary_line(zoo: str, rows: list[dict]) -> str:
    counts = collections.Counter(r["status"] for r in rows)
    passing = sum(counts[s] for s in PASSING)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    line = f"**{zoo}**: {passing}/{len(rows)} models pass ({parts})"
    if zoo == "timm":
        families = {r["family"] for r in rows}
        passed = {r["family"] for r in rows if r["status"] in PASSING}
        line += f"; {len(passed)}/{len(families)} architecture families have a passing model"
    return line


def timing_line(zoo: str, rows: list[dict]) -> str:
    seconds = sorted(r.get("seconds", 0.0) for r in rows)
    median = seconds[len(seconds) // 2] if seconds else 0.0
    return (
        f"**{zoo}** time: {sum(seconds) / 60:.1f} min in all, median {median:.1f} s per model "
        "(both conversions and every check, on a 2-core CPU shared with other jobs)"
    )


def timm_coverage_lines(rows: list[dict]) -> list[str]:
    """Conv-heavy families: how many of their models pass; families with no result yet."""
    import timm

    conv_rows = [r for r in rows if r["family"] in CONV_FAMILIES]
    passing = sum(r["status"] in PASSING for r in conv_rows)
    expected = sum(timm_family(n) in CONV_FAMILIES for n in timm.list_models())
    lines = [
        f"**timm conv-heavy families** ({len(set(CONV_FAMILIES))} modules): {passing}/"
        f"{len(conv_rows)} swept models pass; {expected - len(conv_rows)} of their {expected} "
        "models not swept yet"
    ]
    missing = sorted({timm_family(n) for n in timm.list_models()} - {r["family"] for r in rows})
    if missing:
        lines.append(f"timm families without a result yet: {', '.join(missing)}")
    return lines


def listed_models(zoo: str) -> list[str]:
    """Every model the sweep lists for a zoo other than timm (empty if its library is missing)."""
    if zoo == "transformers":
        return list(TRANSFORMERS_MODELS)
    if zoo == "ultralytics":
        return list(ULTRALYTICS_MODELS)
    if zoo == "torchvision" and importlib.util.find_spec("torchvision") is not None:
        return [job.model for job in torchvision_jobs()]
    return []


def missing_line(zoo: str, rows: list[dict]) -> str | None:
    """The models of a (non-timm) zoo without a result, so a partial sweep says what it left."""
    missing = sorted(set(listed_models(zoo)) - {r["model"] for r in rows})
    if not missing:
        return None
    return f"**{zoo}**: {len(missing)} listed models not swept yet: {', '.join(missing)}"


def tallies(rows: list[dict]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(found_by counts, skip-reason counts) over the default conversions of ``rows``."""
    found: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for res in rows:
        for mode in res.get("modes", [])[:1]:
            found.update(mode.get("found_by", {}))
            for reason, count in mode.get("skip_reasons", {}).items():
                reasons[re.split(r"[:;(]", reason)[0].strip()] += count
    return found.most_common(), reasons.most_common()


def row_of(res: dict) -> list[str]:
    modes = {m["mode"]: m for m in res.get("modes", [])}
    d, e = modes.get("default", {}), modes.get("example", {})

    def both(key: str) -> str:
        a, b = d.get(key), e.get(key)
        return "–" if a is None and b is None else (str(a) if a == b else f"{a} / {b}")

    found = "+".join(sorted({*d.get("found_by", {}), *e.get("found_by", {})})) or "–"
    error = (res.get("error") or "").replace("|", "\\|").replace("\n", " ")[:400]
    return [
        res["model"], res["family"], str(res.get("convs", "–")), both("converted"),
        both("skipped"), fmt_count(d.get("macs_before")), fmt_count(d.get("macs_after")),
        fmt_count(res.get("params_before")), fmt_count(d.get("params_after")), found,
        res["status"], f"{res.get('seconds', 0):.1f}", error,
    ]  # fmt: skip


HEADER = ["model", "family", "convs", "converted", "skipped", "MACs before", "MACs after",
          "params before", "params after", "found by", "status", "s", "error"]  # fmt: skip

INTRO = (
    "Each model is built untrained, converted twice (default settings, then with "
    "`example_inputs`), and checked: same output structure and shapes, no NaN/Inf in the "
    "outputs or gradients where the original's are finite, a backward pass reaching every "
    "GhostModule, fewer MACs, and every Conv1d/2d/3d (`convs`, subclasses included) converted "
    "or skipped with a reason. Numbers below "
    "are for the default conversion; `a / b` means default / example_inputs differ. Statuses: "
    "`ok`; `nothing-converted` (every conv skipped with a reason, e.g. a ViT whose only conv is "
    "the patch-embedding stem); `no-conv2d` (no convolution at all); `fail`, `timeout`, `crash`; "
    "`build-error` and `too-large` are models the sweep could not run at all."
)

SKIP_ADVICE = (
    "What a user can do about skipped layers: `nothing-converted` models are almost all "
    "ViT-style (the patch embedding is the only conv and, as the first conv run, the stem): "
    "`convert(model, skip_stem=False)` converts it, usually for little gain. Depthwise convs "
    "and layers where a GhostModule would not save MACs are skipped on purpose. timm's conv "
    "subclasses (`Conv2dSame`, `StdConv2d`, `StdConv2dSame`, `ScaledStdConv2d`) are converted "
    "exactly; any other subclass of `nn.Conv2d` is skipped with its name in the reason, and "
    "`ghostify.register_conv_type` declares it ([any convolution](guides/any-convolution.md))."
)

# Zoos in the order the tables appear; a zoo not listed comes last.
ZOO_ORDER = ("torchvision", "timm", "transformers", "ultralytics")


def versions() -> str:
    """Versions of torch and of each zoo library installed."""
    found = [f"torch {torch.__version__}"]
    for package in ZOO_ORDER:
        if importlib.util.find_spec(package) is not None:
            found.append(f"{package} {importlib.metadata.version(package)}")
    return ", ".join(found)


def render_markdown(results: Mapping[str, dict], command: str = "") -> str:
    """docs/coverage.md: summary, how layers were found and skipped, failures, one table a zoo."""
    lines = [
        "# Model-zoo coverage",
        "",
        "Generated by `python benchmarks/zoo.py` "
        f"({datetime.date.today().isoformat()}; {versions()}, {platform.machine()} CPU).",
        "",
        INTRO,
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    by_zoo: dict[str, list[dict]] = collections.defaultdict(list)
    for res in results.values():
        by_zoo[res["zoo"]].append(res)
    order = {zoo: index for index, zoo in enumerate(ZOO_ORDER)}
    zoos = sorted(by_zoo.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    lines += ["## Summary", ""]
    lines += [f"- {summary_line(zoo, rows)}" for zoo, rows in zoos]
    lines += [f"- {timing_line(zoo, rows)}" for zoo, rows in zoos]
    if "timm" in by_zoo:
        lines += [f"- {line}" for line in timm_coverage_lines(by_zoo["timm"])]
    lines += [
        f"- {line}" for zoo, rows in zoos if zoo != "timm" and (line := missing_line(zoo, rows))
    ]
    lines += ["", "## How layers were found and why some were skipped", ""]
    lines += ["Counted over every model's default conversion (`found by`: how the discovery saw "
              "each conv; `fx-submodule`/`hooks`/`module-walk` are the fallbacks when a "
              "whole-model fx trace is not possible).", ""]  # fmt: skip
    for zoo, rows in zoos:
        found, reasons = tallies(rows)
        lines.append(f"- **{zoo}** found by: " + ", ".join(f"{k} {v}" for k, v in found))
        lines.append(f"- **{zoo}** skipped: " + ", ".join(f"{k} ({v})" for k, v in reasons))
    lines += ["", SKIP_ADVICE]
    failures = [r for r in results.values() if r["status"] not in PASSING]
    if failures:
        lines += ["", "## Models that do not pass, why, and what to do", ""]
        for res in sorted(failures, key=lambda r: (r["zoo"], r["model"])):
            lines.append(
                f"- `{res['zoo']}:{res['model']}` ({res['status']}): {res.get('error')}. "
                f"**What to do:** {hint_for(res)}"
            )
    for zoo, rows in zoos:
        lines += ["", f"## {zoo}", "", "| " + " | ".join(HEADER) + " |"]
        lines.append("|" + "---|" * len(HEADER))
        for res in sorted(rows, key=lambda r: (r["family"], r["model"])):
            lines.append("| " + " | ".join(row_of(res)) + " |")
    return "\n".join(lines) + "\n"
