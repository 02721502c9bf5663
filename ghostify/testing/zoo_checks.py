"""Converting one zoo model and checking the result; ``run_job`` never raises.

Each model is converted twice (default settings, then with ``example_inputs``), and each
conversion must

* account for every Conv2d of the original: converted, or skipped with a reason;
* give an output with the original's structure and shapes, with no NaN or Inf where the
  original's output is finite;
* pass a backward pass (train mode where the model runs in it) that reaches every GhostModule that
  ran, with finite gradients wherever the original model's gradients are finite;
* have fewer MACs than the original by ``ghostify.report``, unless nothing was converted, counted
  on the same work: torchvision's two-stage detectors keep a fixed number of boxes while counted
  (``fixed_boxes``), and a report whose converted layers ran on other shapes than
  their originals is a failure, not a MAC figure.
"""

from __future__ import annotations

import collections
import copy
import json
import re
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ghostify
from ghostify.utils import describe_error

from .zoo_cases import BuildError, Case, build_case
from .zoo_jobs import Job, timm_param_count
from .zoo_outputs import count_nonfinite, diff, signature, tensors

PASSING = ("ok", "nothing-converted", "no-conv2d")

# Settings that fix how many boxes torchvision's two-stage detectors run their heads on: NMS at
# IoU 1.0 suppresses nothing and no score threshold drops anything, so the RPN keeps
# post_nms_top_n proposals and the RoI heads DETECTIONS boxes per image. Left as they are, the
# count depends on the random weights: keypointrcnn_resnet50_fpn's original kept 13 detections
# at 128 px and its converted copy 200, so its report counted 65.2G -> 371.6G MACs. 10 per image
# rather than the default 100 keeps the per-box heads (3.5G MACs a box there) affordable on a CPU.
DETECTIONS = 10
FIXED_BOXES: dict[str, dict[str, float]] = {
    "RegionProposalNetwork": {"nms_thresh": 1.0, "min_size": 0.0},
    "RoIHeads": {"nms_thresh": 1.0, "score_thresh": -1.0, "detections_per_img": DETECTIONS},
}


def conv_names(model: nn.Module) -> dict[int, list[str]]:
    """Every Conv1d/2d/3d (subclasses included) by identity, with all the names it has."""
    names: dict[int, list[str]] = collections.defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names[id(module)].append(name)
    return dict(names)


def ghost_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every GhostModule of ``model``, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ghostify.GhostModule)]


def unaccounted_convs(original: dict[int, list[str]], plan: dict, converted: nn.Module) -> list:
    """Conv2d of the original neither converted nor skipped, and leftovers in the converted model.

    A conv shared by several parents counts as accounted if any of its names is in the plan.
    Convs left in the converted model (outside GhostModules) must all be in ``skipped``."""
    layer_names = {layer["name"] for layer in plan.get("layers", [])}
    skipped_names = {entry["name"] for entry in plan.get("skipped", [])}
    known = layer_names | skipped_names
    problems = [names[0] for names in original.values() if not known.intersection(names)]
    inside_ghosts = {n for n, _ in ghost_modules(converted)}
    for names in conv_names(converted).values():
        outside = [n for n in names if not any(n.startswith(g + ".") for g in inside_ghosts)]
        if outside and not skipped_names.intersection(outside):
            problems.append(f"{outside[0]} (still a Conv2d, not in skipped)")
    return sorted(set(problems))


@dataclass
class Backward:
    """What one backward pass showed."""

    mode: str  # "train", or "eval" for a model that only runs in eval mode
    no_grad: list[str] = field(default_factory=list)  # GhostModules that ran, got no gradient
    nonfinite: list[str] = field(default_factory=list)  # parameters with NaN/Inf gradients


def run_backward(model: nn.Module, case: Case, originals: bool = False) -> Backward:
    """Backward through ``model`` from a loss on its outputs; which GhostModules (with
    ``originals``: which convs) got no gradient and which parameters got a NaN/Inf one. Train mode
    unless the model only runs in eval mode (then train-only branches, e.g. auxiliary heads, do
    not run and need no gradient)."""
    ghosts = ghost_modules(model)
    if originals:  # the convs of the unconverted model, under the names their ghosts take
        convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        ghosts = [(n, m) for n, m in model.named_modules() if isinstance(m, convs)]
    ran: set[int] = set()
    hooks = [g.register_forward_hook(lambda m, *_: ran.add(id(m))) for _, g in ghosts]
    model.zero_grad(set_to_none=True)
    result = Backward("eval" if case.eval_only else "train")
    try:
        model.train(result.mode == "train")
        if case.train_args is not None:
            losses = model(*case.train_args)
            loss = sum(v for v in losses.values() if isinstance(v, torch.Tensor))
        else:
            out = model(*case.args)
            floats = [t for t in tensors(out) if t.is_floating_point() and t.requires_grad]
            loss = sum(t.float().square().mean() for t in floats)
        if not isinstance(loss, torch.Tensor):
            result.no_grad.append("<no differentiable output>")
            return result
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    for name, ghost in ghosts:
        params = [p for p in ghost.parameters() if p.requires_grad]
        if id(ghost) in ran and params and all(p.grad is None for p in params):
            result.no_grad.append(name)
    if result.mode == "train" and not ran and ghosts:
        result.no_grad.append("<no GhostModule ran>")
    result.nonfinite = [
        name
        for name, param in model.named_parameters()
        if param.grad is not None and not torch.isfinite(param.grad).all()
    ]
    model.zero_grad(set_to_none=True)
    return result


def param_count(model: nn.Module) -> int:
    """Parameters of ``model`` (a shared one once)."""
    return sum(p.numel() for p in model.parameters())


def short_reason(entry: Mapping[str, Any]) -> str:
    """A skip reason without its per-layer details, to count reasons across layers."""
    return re.split(r"[:;(]", str(entry.get("reason", "?")))[0].strip()[:60]


def listing(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more there are."""
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_conversion(
    case: Case,
    pristine: nn.Module,
    reference: Any,
    mode: str,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert a copy of ``pristine`` in ``mode`` ("default" / "example") and check it.

    When ``previous`` (the other mode's result) converted exactly the same layers the same way,
    its MAC counts are reused: same modules, same MACs, and the report is the slowest step."""
    res: dict[str, Any] = {"mode": mode, "failures": []}
    failures: list[str] = res["failures"]
    model = copy.deepcopy(pristine)
    kwargs = {"example_inputs": case.args} if mode == "example" else {}
    start = time.perf_counter()
    stage = "convert"
    try:
        ghostify.convert(model, **kwargs)
        res["convert_s"] = round(time.perf_counter() - start, 3)
        stage = "plan_of"
        plan = ghostify.plan_of(model)
        layers, skipped = plan["layers"], plan["skipped"]
        res["converted"], res["skipped"] = len(layers), len(skipped)
        res["skip_reasons"] = dict(collections.Counter(short_reason(s) for s in skipped))
        found_by = (entry.get("found_by") or "?" for entry in layers + skipped)
        res["found_by"] = dict(collections.Counter(found_by))
        res["params_after"] = param_count(model)
        res["_layers"] = sorted(json.dumps(layer, sort_keys=True, default=str) for layer in layers)

        stage = "accounting"
        missing = unaccounted_convs(conv_names(pristine), plan, model)
        if missing:
            failures.append(f"Conv2d not accounted for: {', '.join(missing[:8])}")

        stage = "forward"
        model.eval()
        with torch.no_grad():
            out = model(*case.args)
        got, want = signature(out, case.ragged), signature(reference, case.ragged)
        if got != want:
            failures.append(f"output structure differs: {diff(want, got)}")
        bad = count_nonfinite(out)
        if bad and not count_nonfinite(reference):
            failures.append(f"NaN/Inf in the output: {bad} value(s), the original's are finite")

        check_macs(model, case, res, previous)
        stage = "backward"
        backward = run_backward(model, case)
        res["backward_mode"] = backward.mode
        if backward.no_grad:  # a layer whose output the model drops gets none originally either
            dropped = run_backward(copy.deepcopy(pristine), case, originals=True).no_grad
            backward.no_grad = [n for n in backward.no_grad if n not in dropped]
        if backward.no_grad:
            failures.append(
                f"no gradient reaches {len(backward.no_grad)} GhostModule(s): "
                + listing(backward.no_grad)
            )
        if backward.nonfinite and not run_backward(copy.deepcopy(pristine), case).nonfinite:
            failures.append(
                f"NaN/Inf gradient in {len(backward.nonfinite)} parameter(s): "
                f"{listing(backward.nonfinite)} (the original's gradients are finite)"
            )
    except Exception as exc:
        failures.append(f"{stage} raised {describe_error(exc)[:300]}")
        res["traceback"] = traceback.format_exc(limit=-6)
    res["seconds"] = round(time.perf_counter() - start, 3)
    del model
    return res


@contextmanager
def fixed_boxes(model: nn.Module) -> Iterator[list[str]]:
    """While inside, ``model``'s torchvision detection stages (``FIXED_BOXES``) keep a fixed
    number of boxes, so the boxes counted do not depend on the weights; yields their names."""
    saved: list[tuple[nn.Module, str, Any]] = []
    names = []
    for name, module in model.named_modules():
        settings = FIXED_BOXES.get(type(module).__name__, {})
        if settings and all(hasattr(module, key) for key in settings):
            names.append(name)
            for key, value in settings.items():
                saved.append((module, key, getattr(module, key)))
                setattr(module, key, value)
    try:
        yield names
    finally:
        for module, key, value in reversed(saved):
            setattr(module, key, value)


def check_macs(
    model: nn.Module, case: Case, res: dict[str, Any], previous: dict[str, Any] | None
) -> None:
    """MACs before/after (``ghostify.report``) into ``res``; a failure here is recorded, and the
    backward check still runs. Runs before the backward pass: a train-mode forward may leave
    graph tensors in the model."""
    try:
        if previous and previous.get("_layers") == res["_layers"] and "macs_after" in previous:
            before, after = previous["macs_before"], previous["macs_after"]
            res["macs_source"] = f"same layers as {previous['mode']}"
        else:
            with fixed_boxes(model) as pinned:
                measured = ghostify.report(model, case.args)
            before, after = measured.totals["macs_before"], measured.totals["macs_after"]
            res["macs_source"] = f"report/{measured.conventions.get('counter', '?')}"
            if pinned:
                res["macs_source"] += f" ({', '.join(pinned)} with fixed boxes)"
            if measured.cross_check.get("same_workload") is False:
                differs = measured.cross_check["workload_differs"]
                res["failures"].append(
                    f"MACs compare different work: {len(differs)} converted layer(s) ran on other "
                    f"shapes than their originals ({listing(differs)}); make the model's "
                    "data-dependent part (e.g. its number of detections) fixed to count it"
                )
    except Exception as exc:
        res["failures"].append(f"macs raised {describe_error(exc)[:300]}")
        res["traceback"] = traceback.format_exc(limit=-6)
        return
    res["macs_before"], res["macs_after"] = before, after
    if res["converted"] and not after < before:
        res["failures"].append(f"MACs did not go down: {before} -> {after}")


def run_job(job: Job, max_params: int | None = None) -> dict[str, Any]:
    """Build, convert (both modes) and check one model; never raises.

    The result is a JSON-able dict: the job, ``status`` (one of ``PASSING``, or "fail",
    "build-error", "too-large"), ``error``, ``seconds`` and, per mode, the counts and failures.
    """
    res: dict[str, Any] = {"zoo": job.zoo, "model": job.model, "family": job.family}
    start = time.perf_counter()
    try:
        if max_params and job.zoo == "timm":
            size = timm_param_count(job.model)
            if size is not None and size > max_params:
                return finish(res, start, "too-large", f"{size / 1e6:.0f}M parameters")
        case = build_case(job)
        res["input"] = case.input_desc
        pristine = case.model
        res["params_before"] = param_count(pristine)
        if max_params and res["params_before"] > max_params:
            return finish(res, start, "too-large", f"{res['params_before'] / 1e6:.0f}M parameters")
        res["convs"] = len(conv_names(pristine))
        with torch.no_grad():
            reference = pristine(*case.args)
        if count_nonfinite(reference):  # nothing to hold the conversion to: noted, not failed
            res["original_nonfinite"] = count_nonfinite(reference)
        default = check_conversion(case, pristine, reference, "default")
        example = check_conversion(case, pristine, reference, "example", default)
        res["modes"] = [default, example]
        for mode in res["modes"]:
            mode.pop("_layers", None)
    except BuildError as exc:
        return finish(res, start, "build-error", str(exc))
    except Exception as exc:
        res["traceback"] = traceback.format_exc(limit=-6)
        return finish(res, start, "fail", describe_error(exc)[:300])
    default, example = (m["failures"] for m in res["modes"])
    failures = [f"[both] {f}" for f in default if f in example]
    failures += [f"[{m['mode']}] {f}" for m in res["modes"] for f in m["failures"]
                 if not (f in default and f in example)]  # fmt: skip
    if failures:
        return finish(res, start, "fail", "; ".join(failures))
    converted = max(m.get("converted", 0) for m in res["modes"])
    status = "ok" if converted else ("no-conv2d" if not res["convs"] else "nothing-converted")
    return finish(res, start, status, None)


def finish(res: dict, start: float, status: str, error: str | None) -> dict:
    """``res`` with its status, error and time."""
    res.update(status=status, error=error, seconds=round(time.perf_counter() - start, 2))
    return res
