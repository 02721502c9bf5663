"""Coverage sweep: convert every torchvision model and the timm zoo, check each, write a table.

For every model: build it untrained (no weights are downloaded), run it on a small input, convert a
copy with default settings and another with ``example_inputs``, and check that

* the converted model's output has the original's structure and shapes,
* a backward pass (train mode where possible) reaches every GhostModule's parameters,
* the MACs went down (``ghostify.report``) unless nothing was converted,
* every Conv2d of the original was either converted or skipped with a reason.

Each model runs in a worker subprocess with a timeout, so a hang, an OOM kill or a segfault costs
one model, not the sweep; results are appended to a JSON-lines file, so a sweep can be resumed and
split into shards. Usage::

    python benchmarks/zoo.py                          # torchvision + timm, then docs/coverage.md
    python benchmarks/zoo.py --zoo torchvision        # one zoo
    python benchmarks/zoo.py --zoo timm --set reps    # one timm model per architecture family
    python benchmarks/zoo.py --families resnet,dla    # these timm families, every model
    python benchmarks/zoo.py --only resnet18,timm:dla34 --limit 5 --resume
    python benchmarks/zoo.py --report-only            # regenerate docs/coverage.md from results
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import select
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"
RESULTS = OUT_DIR / "zoo-results.jsonl"
COVERAGE_MD = ROOT / "docs" / "coverage.md"
RESULT_MARK = "@@ZOO@@"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_PARAMS = 350_000_000  # original + working copy + grads must fit a shared CPU box

# timm modules (architecture families) built mostly from convolutions: every model is swept.
CONV_FAMILIES = (
    "resnet", "regnet", "efficientnet", "mobilenetv3", "mobilenetv5", "convnext", "densenet",
    "dla", "dpn", "hrnet", "inception_v3", "inception_v4", "inception_resnet_v2",
    "inception_next", "nfnet", "rexnet", "ghostnet", "repghost", "byobnet", "cspnet", "cspnext",
    "vgg", "xception", "xception_aligned", "res2net", "resnest", "resnetv2", "senet", "sknet",
    "selecsls", "vovnet", "tresnet", "hardcorenas", "hgnet", "lcnetv2", "repvit", "fasternet",
    "starnet", "rdnet", "convmixer",
)  # fmt: skip

TV_FAMILIES = ("classification", "quantization", "segmentation", "detection", "video", "flow")


# --------------------------------------------------------------------------------------------
# Jobs: which models, in which order
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    zoo: str  # "torchvision" or "timm"
    model: str
    family: str

    @property
    def key(self) -> str:
        return f"{self.zoo}:{self.model}"


def torchvision_family(name: str) -> str:
    """Task family of a torchvision builder, from the module that defines it."""
    from torchvision import models

    for family, module in (
        ("quantization", models.quantization),
        ("segmentation", models.segmentation),
        ("detection", models.detection),
        ("video", models.video),
        ("flow", models.optical_flow),
    ):
        if name in models.list_models(module=module):
            return family
    return "classification"


def torchvision_jobs() -> list[Job]:
    from torchvision import models

    return [Job("torchvision", n, torchvision_family(n)) for n in sorted(models.list_models())]


def timm_family(name: str) -> str:
    """The timm module that registers ``name``: timm's own notion of an architecture family."""
    from timm.models import _registry

    return _registry._model_to_module.get(name, "unknown")


def timm_sizes() -> dict[str, int | None]:
    """Parameter count of every timm model, built on the meta device (cached: ~1 min to build)."""
    import timm

    cache = OUT_DIR / f"timm-sizes-{timm.__version__}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    sizes: dict[str, int | None] = {}
    for name in timm.list_models():
        sizes[name] = meta_param_count(lambda n=name: timm.create_model(n, pretrained=False))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(sizes))
    return sizes


def meta_param_count(build: Callable[[], nn.Module]) -> int | None:
    """Parameters of the model ``build`` makes, without allocating them (None if that fails)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in build().parameters())
    except Exception:
        return None


def timm_jobs(which: str, families: Iterable[str] | None = None) -> list[Job]:
    """timm jobs: "reps" = the smallest model of each family, "conv" = every model of the
    conv-heavy families, "all" = both (representatives first); ``families`` narrows either."""
    import timm

    sizes = timm_sizes()
    by_family: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        by_family[timm_family(name)].append(name)
    wanted = set(families) if families else None

    def size_key(name: str) -> tuple[bool, float, str]:
        size = sizes.get(name)  # timm's test_* models are tiny, but not what users run
        return (name.startswith("test_"), math.inf if size is None else size, name)

    jobs: list[Job] = []
    if which in ("reps", "all"):
        for family in sorted(by_family):
            if wanted is None or family in wanted:
                jobs.append(Job("timm", min(by_family[family], key=size_key), family))
    if which in ("conv", "all"):
        conv = [f for f in CONV_FAMILIES if f in by_family and (wanted is None or f in wanted)]
        if wanted is not None and which == "conv":
            conv += sorted(f for f in wanted if f in by_family and f not in conv)
        names = sorted((n for f in conv for n in by_family[f]), key=size_key)
        jobs.extend(Job("timm", n, timm_family(n)) for n in names)
    seen: set[str] = set()
    return [j for j in jobs if not (j.key in seen or seen.add(j.key))]


# --------------------------------------------------------------------------------------------
# Building models and their inputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A built model with the inputs it runs on."""

    model: nn.Module
    args: tuple  # positional arguments of forward
    input_desc: str
    train_args: tuple | None = None  # detection: (images, targets) for a train-mode loss
    ragged: bool = False  # per-image outputs (detection): compare trailing dims only


def image_sizes(family: str) -> list[int]:
    """Input sizes to try, smallest first: the first one the original model accepts is used."""
    return {"flow": [128], "detection": [128]}.get(family, [64, 96, 128, 160, 224, 299])


def build_torchvision(name: str, family: str, size: int) -> nn.Module:
    from torchvision import models

    kwargs: dict[str, Any] = {"weights": None}
    if family in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if family == "quantization":
        kwargs["quantize"] = False  # the float model with quant stubs: what a user would convert
    if family == "detection" and not name.startswith("ssd"):
        kwargs.update(min_size=size, max_size=size)  # default 800 px is far too slow on a CPU
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    return models.get_model(name, **kwargs)


def build_timm(name: str, size: int) -> nn.Module:
    """A timm model, asked for ``size`` input where it has a fixed image size (ViT-likes)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:  # the architecture takes no img_size: it accepts any size
        return timm.create_model(name, pretrained=False)


def timm_input_sizes(name: str) -> list[int]:
    """Small sizes first, then the model's default input size as the last resort."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    default = cfg.input_size[-1] if cfg is not None and cfg.input_size else 224
    return sorted({*[s for s in (64, 96, 128, 160) if s < default], default})


def make_inputs(family: str, size: int, batch: int = 2) -> tuple[tuple, str, tuple | None]:
    """(forward args, description, train-mode args) for a model of ``family``."""
    gen = torch.Generator().manual_seed(0)
    if family == "detection":
        images = [torch.rand(3, size, size, generator=gen) for _ in range(batch)]
        targets = [synthetic_target(size) for _ in range(batch)]
        return (images,), f"{batch}x[3,{size},{size}] images", (images, targets)
    if family == "flow":
        pair = tuple(torch.rand(batch, 3, size, size, generator=gen) for _ in range(2))
        return pair, f"2x[{batch},3,{size},{size}]", None
    if family == "video":
        frames = 4 if size < 224 else 16
        x = torch.rand(batch, 3, frames, size, size, generator=gen)
        return (x,), f"[{batch},3,{frames},{size},{size}]", None
    x = torch.rand(batch, 3, size, size, generator=gen)
    return (x,), f"[{batch},3,{size},{size}]", None


def synthetic_target(size: int) -> dict[str, torch.Tensor]:
    """One box with a mask and keypoints, enough for every torchvision detection loss."""
    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.7, size * 0.8]])
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[:, size // 5 : size * 4 // 5, size // 5 : size * 7 // 10] = 1
    keypoints = torch.tensor([[[size * 0.3 + i, size * 0.4 + i, 1.0] for i in range(17)]])
    return {"boxes": box, "labels": torch.tensor([1]), "masks": mask, "keypoints": keypoints}


def build_case(job: Job) -> Case:
    """Build the model at the smallest input size its forward accepts (eval mode, seeded)."""
    if job.zoo == "selftest":
        return selftest_case(job.model)
    if job.zoo == "torchvision":
        sizes = image_sizes(job.family)
        if job.model.startswith("vit_"):  # patch size in the name; a 4x4 grid of patches
            sizes = [4 * int(job.model.rsplit("_", 1)[1])]
        if job.family == "video" and job.model.startswith("mvit"):
            sizes = [224]  # fixed positional embeddings for 16x224x224 clips

        def build(size: int) -> nn.Module:
            return build_torchvision(job.model, job.family, size)
    else:
        sizes = timm_input_sizes(job.model)

        def build(size: int) -> nn.Module:
            return build_timm(job.model, size)

    errors, eval_only = [], None
    for size in sizes:
        torch.manual_seed(0)
        try:
            model = build(size).eval()
            args, desc, train_args = make_inputs(job.family, size)
            with torch.no_grad():
                model(*args)
        except Exception as exc:  # try the next size; report all if none works
            errors.append(f"{size}px: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        # Branches that run only in training (inception's aux head) need a size train mode takes.
        if train_args is not None or runs_in_train_mode(model, args):
            return Case(model, args, desc, train_args, ragged=job.family == "detection")
        eval_only = eval_only or size
    if eval_only is not None:  # never runs in train mode: backward is checked in eval mode
        torch.manual_seed(0)
        args, desc, train_args = make_inputs(job.family, eval_only)
        return Case(build(eval_only).eval(), args, desc + " (eval only)", train_args)
    raise BuildError("the original model does not run: " + " | ".join(errors))


def runs_in_train_mode(model: nn.Module, args: tuple) -> bool:
    """Whether a train-mode forward works (BatchNorm statistics change; nothing else matters)."""
    try:
        with torch.no_grad():
            model.train()(*args)
        return True
    except Exception:
        return False
    finally:
        model.eval()


def selftest_case(name: str) -> Case:
    """Tiny jobs that prove the isolation works: a crash and a hang cost only themselves."""
    if name == "crash":
        os.abort()
    if name == "hang":
        time.sleep(3600)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU())
    return Case(model.eval(), (torch.rand(2, 3, 16, 16),), "[2,3,16,16]")


class BuildError(RuntimeError):
    """The unconverted model could not be built or run: not a ghostify failure."""


# --------------------------------------------------------------------------------------------
# The library under test (with stand-ins while parts of it are not written yet)
# --------------------------------------------------------------------------------------------


def library() -> dict[str, Any]:
    """convert / plan_of / report from ghostify, or stand-ins where a module does not exist yet."""
    import ghostify

    lib: dict[str, Any] = {"version": getattr(ghostify, "__version__", "?")}
    convert, plan_of = getattr(ghostify, "convert", None), getattr(ghostify, "plan_of", None)
    if callable(convert) and callable(plan_of):
        lib.update(convert=convert, plan_of=plan_of, stand_in_convert=False)
    else:
        lib.update(convert=naive_convert, plan_of=naive_plan_of, stand_in_convert=True)
    try:
        from ghostify.report import report

        lib.update(report=report, stand_in_report=False)
    except ImportError:
        lib.update(report=None, stand_in_report=True)
    return lib


def naive_convert(model: nn.Module, *, example_inputs: Any = None, **_: Any) -> nn.Module:
    """Stand-in for ghostify.convert: swap every Conv2d attribute found by a module walk."""
    from ghostify.errors import ConfigError
    from ghostify.layers.ghost_module import GhostModule

    layers, skipped = [], []
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for index, (name, conv) in enumerate(convs):
        if index == 0:
            skipped.append({"name": name, "reason": "stem", "found_by": "module-walk"})
            continue
        try:
            ghost = GhostModule.from_conv(conv)
        except ConfigError as exc:
            skipped.append({"name": name, "reason": str(exc), "found_by": "module-walk"})
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, ghost)
        layers.append({"name": name, "conv": ghost.conv_config(), "found_by": "module-walk"})
    model._zoo_plan = {"layers": layers, "skipped": skipped, "options": {}}  # type: ignore
    return model


def naive_plan_of(model: nn.Module) -> dict:
    return model._zoo_plan  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def signature(out: Any, ragged: bool = False) -> Any:
    """JSON-able structure of an output: containers, keys, tensor shapes and dtypes.

    ``ragged`` drops the leading dim of tensors (detection: the number of boxes depends on the
    weights, not on the architecture)."""
    if isinstance(out, torch.Tensor):
        shape = list(out.shape[1:] if ragged and out.dim() > 0 else out.shape)
        return ["tensor", shape, str(out.dtype).removeprefix("torch.")]
    if isinstance(out, Mapping):
        return ["dict", [[str(k), signature(v, ragged)] for k, v in out.items()]]
    if isinstance(out, (list, tuple)):
        return [type(out).__name__, [signature(v, ragged) for v in out]]
    return type(out).__name__


def tensors(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested output."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):
        for value in out.values():
            yield from tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from tensors(value)


def conv_names(model: nn.Module) -> dict[int, list[str]]:
    """Every Conv1d/2d/3d (subclasses included) by identity, with all the names it has."""
    names: dict[int, list[str]] = collections.defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names[id(module)].append(name)
    return dict(names)


def ghost_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ghostify.layers.ghost_module import GhostModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GhostModule)]


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


def backward_check(model: nn.Module, case: Case) -> tuple[str, list[str]]:
    """Backward through the converted model; GhostModules that ran but whose trainable params got
    no gradient. Train mode unless the model only runs in eval mode (then train-only branches,
    e.g. auxiliary heads, do not run and are not expected to get gradients)."""
    ghosts = ghost_modules(model)
    ran: set[int] = set()
    hooks = [g.register_forward_hook(lambda m, *_: ran.add(id(m))) for _, g in ghosts]
    model.zero_grad(set_to_none=True)
    mode = "eval" if case.input_desc.endswith("(eval only)") else "train"
    try:
        model.train(mode == "train")
        if case.train_args is not None:
            losses = model(*case.train_args)
            loss = sum(v for v in losses.values() if isinstance(v, torch.Tensor))
        else:
            out = model(*case.args)
            floats = [t for t in tensors(out) if t.is_floating_point() and t.requires_grad]
            loss = sum(t.float().square().mean() for t in floats)
        if not isinstance(loss, torch.Tensor):
            return mode, ["<no differentiable output>"]
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    missing = []
    for name, ghost in ghosts:
        params = [p for p in ghost.parameters() if p.requires_grad]
        if id(ghost) in ran and params and all(p.grad is None for p in params):
            missing.append(name)
    if mode == "train" and not ran and ghosts:
        missing.append("<no GhostModule ran>")
    model.zero_grad(set_to_none=True)
    return mode, missing


def macs_of(lib: dict[str, Any], converted: nn.Module, pristine: nn.Module | None, case: Case):
    """(macs_before, macs_after, source) from ghostify.report, or fvcore while report is missing."""
    if lib["report"] is not None:
        data = lib["report"](converted, case.args).to_dict()
        totals, conventions = data["totals"], data.get("conventions", {})
        counter = conventions.get("counter", "ghostify.report")
        return totals["macs_before"], totals["macs_after"], f"report/{counter}"
    from fvcore.nn import FlopCountAnalysis

    def count(model: nn.Module) -> int:
        analysis = FlopCountAnalysis(model, case.args)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())

    with torch.no_grad():
        before = count(pristine) if pristine is not None else None
        return before, count(converted), "fvcore"


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_conversion(
    lib: dict[str, Any],
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
    model = copy.deepcopy(pristine)
    kwargs = {"example_inputs": case.args} if mode == "example" else {}
    start = time.perf_counter()
    stage = "convert"
    try:
        lib["convert"](model, **kwargs)
        res["convert_s"] = round(time.perf_counter() - start, 3)
        stage = "plan_of"
        plan = lib["plan_of"](model)
        layers, skipped = plan.get("layers", []), plan.get("skipped", [])
        res["converted"], res["skipped"] = len(layers), len(skipped)
        res["skip_reasons"] = dict(collections.Counter(short_reason(s) for s in skipped))
        found = collections.Counter(e.get("found_by", "?") for e in layers + skipped)
        res["found_by"] = dict(found)
        res["params_after"] = param_count(model)
        res["_layers"] = sorted(json.dumps(layer, sort_keys=True, default=str) for layer in layers)

        stage = "accounting"
        missing = unaccounted_convs(conv_names(pristine), plan, model)
        if missing:
            res["failures"].append(f"Conv2d not accounted for: {', '.join(missing[:8])}")

        stage = "forward"
        model.eval()
        with torch.no_grad():
            out = model(*case.args)
        got, want = signature(out, case.ragged), signature(reference, case.ragged)
        if got != want:
            res["failures"].append(f"output structure differs: {diff(want, got)}")

        check_macs(lib, model, pristine, case, res, previous)
        stage = "backward"
        res["backward_mode"], no_grad = backward_check(model, case)
        if no_grad:
            res["failures"].append(
                f"no gradient reaches {len(no_grad)} GhostModule(s): {', '.join(no_grad[:5])}"
            )

    except Exception as exc:
        res["failures"].append(f"{stage} raised {type(exc).__name__}: {first_line(exc)}")
        res["traceback"] = traceback.format_exc(limit=-6)
    res["seconds"] = round(time.perf_counter() - start, 3)
    del model
    return res


def check_macs(
    lib: dict[str, Any],
    model: nn.Module,
    pristine: nn.Module,
    case: Case,
    res: dict[str, Any],
    previous: dict[str, Any] | None,
) -> None:
    """MACs before/after into ``res``; a failure here is recorded, and the backward check runs.

    Runs before the backward pass: a train-mode forward may leave graph tensors in the model."""
    try:
        if previous and previous.get("_layers") == res["_layers"] and "macs_after" in previous:
            before, after = previous["macs_before"], previous["macs_after"]
            res["macs_source"] = f"same layers as {previous['mode']}"
        else:
            before, after, res["macs_source"] = macs_of(lib, model, pristine, case)
    except Exception as exc:
        res["failures"].append(f"macs raised {type(exc).__name__}: {first_line(exc)}")
        res["traceback"] = traceback.format_exc(limit=-6)
        return
    res["macs_before"], res["macs_after"] = before, after
    if res["converted"] and before is not None and not after < before:
        res["failures"].append(f"MACs did not go down: {before} -> {after}")


def short_reason(entry: Mapping[str, Any]) -> str:
    """A skip reason without its per-layer details, to count reasons across layers."""
    return re.split(r"[:;(]", str(entry.get("reason", "?")))[0].strip()[:60]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def diff(want: Any, got: Any, path: str = "out") -> str:
    """Where two signatures first differ, as an indexing path into the output."""
    kind = want[0] if isinstance(want, list) else None
    if not isinstance(got, list) or got[0] != kind or kind == "tensor":
        return f"{path}: expected {describe(want)}, got {describe(got)}"
    if kind == "dict":
        keys_w, keys_g = [k for k, _ in want[1]], [k for k, _ in got[1]]
        if keys_w != keys_g:
            return f"{path}: expected keys {keys_w}, got {keys_g}"
        pairs = [(f"{path}[{k!r}]", w, g) for (k, w), (_, g) in zip(want[1], got[1], strict=True)]
    else:
        if len(want[1]) != len(got[1]):
            return f"{path}: expected {kind} of {len(want[1])}, got {len(got[1])}"
        pairs = [
            (f"{path}[{i}]", w, g) for i, (w, g) in enumerate(zip(want[1], got[1], strict=True))
        ]
    return next((diff(w, g, p) for p, w, g in pairs if w != g), f"{path}: equal")


def describe(sig: Any) -> str:
    if isinstance(sig, list) and sig[0] == "tensor":
        return f"tensor{sig[1]} {sig[2]}"
    return sig[0] if isinstance(sig, list) else str(sig)


def run_job(job: Job, lib: dict[str, Any] | None = None, max_params: int | None = None) -> dict:
    """Build, convert (both modes) and check one model; never raises."""
    lib = lib or library()
    res: dict[str, Any] = {"zoo": job.zoo, "model": job.model, "family": job.family}
    start = time.perf_counter()
    try:
        if max_params and job.zoo == "timm":
            import timm

            size = meta_param_count(lambda: timm.create_model(job.model, pretrained=False))
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
        default = check_conversion(lib, case, pristine, reference, "default")
        example = check_conversion(lib, case, pristine, reference, "example", default)
        res["modes"] = [default, example]
        for mode in res["modes"]:
            mode.pop("_layers", None)
    except BuildError as exc:
        return finish(res, start, "build-error", str(exc))
    except Exception as exc:
        res["traceback"] = traceback.format_exc(limit=-6)
        return finish(res, start, "fail", f"{type(exc).__name__}: {first_line(exc)}")
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
    res.update(status=status, error=error, seconds=round(time.perf_counter() - start, 2))
    return res


# --------------------------------------------------------------------------------------------
# Isolation: a persistent worker subprocess, restarted after a timeout or a crash
# --------------------------------------------------------------------------------------------


class Runner:
    """Runs jobs in a worker subprocess; one job that hangs or crashes costs only itself."""

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_params: int | None = DEFAULT_MAX_PARAMS,
        threads: int = 1,
        recycle: int = 20,
        log: Path | None = None,
    ) -> None:
        self.timeout, self.max_params = timeout, max_params
        self.threads, self.recycle = threads, recycle
        self.log_path = log or OUT_DIR / "zoo-worker.log"
        self.proc: subprocess.Popen | None = None
        self.done = 0

    def _start(self) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - owned by the child for its lifetime
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        cmd += ["--threads", str(self.threads), "--max-params", str(self.max_params or 0)]
        self.done = 0
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, bufsize=1, cwd=ROOT)  # fmt: skip

    def run(self, job: Job) -> dict:
        if self.proc is None or self.proc.poll() is not None or self.done >= self.recycle:
            self.close()  # a fresh worker now and then: memory fragmentation, leaked state
            self.proc = self._start()
        assert self.proc.stdin and self.proc.stdout
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps(dataclasses.asdict(job)) + "\n")
        self.proc.stdin.flush()
        deadline = start + self.timeout
        while True:
            left = deadline - time.perf_counter()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.close()
                return self._failed(job, start, "timeout", f"no result after {self.timeout:.0f}s")
            line = self.proc.stdout.readline()
            if not line:  # EOF: the worker died (OOM kill, segfault, abort)
                code = self.proc.wait()
                self.proc = None
                return self._failed(job, start, "crash", f"worker died with exit code {code}")
            if line.startswith(RESULT_MARK):
                self.done += 1
                return json.loads(line[len(RESULT_MARK) :])

    def _failed(self, job: Job, start: float, status: str, error: str) -> dict:
        res = {"zoo": job.zoo, "model": job.model, "family": job.family}
        return finish(res, start, status, error)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def worker_main(threads: int, max_params: int | None) -> None:
    """Read jobs (JSON lines) on stdin, answer RESULT_MARK lines on the original stdout."""
    result_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever models print goes to the log, not into the result stream
    sys.stdout = sys.stderr
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    lib = library()
    for line in sys.stdin:
        job = Job(**json.loads(line))
        print(f"--- {job.key}", file=sys.stderr, flush=True)
        res = run_job(job, lib, max_params)
        result_out.write(RESULT_MARK + json.dumps(res, default=str) + "\n")
        gc.collect()


# --------------------------------------------------------------------------------------------
# Results and docs/coverage.md
# --------------------------------------------------------------------------------------------


def load_results(path: Path = RESULTS) -> dict[str, dict]:
    """The latest result per model key (later lines win)."""
    results: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                res = json.loads(line)
                results[f"{res['zoo']}:{res['model']}"] = res
    return results


PASSING = ("ok", "nothing-converted", "no-conv2d")

HINTS = {
    "timeout": "Too slow for the sweep's CPU budget: rerun it alone with a larger --timeout.",
    "crash": "The worker process died (usually out of memory): rerun alone on a larger machine.",
    "too-large": "Skipped to fit a shared CPU box: rerun with --max-params 0 on a bigger machine.",
    "build-error": "The untrained model itself does not build or run here (not a ghostify issue).",
}


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


def render_markdown(results: Mapping[str, dict], command: str = "") -> str:
    import timm
    import torchvision

    header = ["model", "family", "Conv2d", "converted", "skipped", "MACs before", "MACs after",
              "params before", "params after", "found by", "status", "s", "error"]  # fmt: skip
    lines = [
        "# Model-zoo coverage",
        "",
        "Generated by `python benchmarks/zoo.py` "
        f"({datetime.date.today().isoformat()}; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, timm {timm.__version__}, {platform.machine()} CPU).",
        "",
        "Each model is built untrained, converted twice (default settings, then with "
        "`example_inputs`), and checked: same output structure and shapes, a backward pass "
        "reaching every GhostModule, fewer MACs, and every Conv2d converted or skipped with a "
        "reason. Numbers below are for the default conversion; `a / b` means default / "
        "example_inputs differ. Statuses: `ok`; `nothing-converted` (every Conv2d skipped with a "
        "reason, e.g. a ViT whose only conv is the patch-embedding stem); `no-conv2d` (nothing "
        "to convert); `fail`, `timeout`, `crash`; `build-error` and `too-large` are models the "
        "sweep could not run at all.",
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    by_zoo: dict[str, list[dict]] = collections.defaultdict(list)
    for res in results.values():
        by_zoo[res["zoo"]].append(res)
    lines += ["## Summary", ""]
    lines += [f"- {summary_line(zoo, rows)}" for zoo, rows in sorted(by_zoo.items(), reverse=True)]
    lines += [f"- {timing_line(zoo, rows)}" for zoo, rows in sorted(by_zoo.items(), reverse=True)]
    if "timm" in by_zoo:
        lines += [f"- {line}" for line in timm_coverage_lines(by_zoo["timm"])]
    lines += ["", "## How layers were found and why some were skipped", ""]
    lines += ["Counted over every model's default conversion (`found by`: how the discovery saw "
              "each Conv2d; `fx-submodule`/`hooks`/`module-walk` are the fallbacks when a "
              "whole-model fx trace is not possible).", ""]  # fmt: skip
    for zoo, rows in sorted(by_zoo.items(), reverse=True):
        found, reasons = tallies(rows)
        lines.append(f"- **{zoo}** found by: " + ", ".join(f"{k} {v}" for k, v in found))
        lines.append(f"- **{zoo}** skipped: " + ", ".join(f"{k} ({v})" for k, v in reasons))
    lines += [
        "",
        "What a user can do about skipped layers: `nothing-converted` models are almost all "
        "ViT-style (the patch embedding is the only Conv2d and, as the first conv run, the stem): "
        "`convert(model, skip_stem=False)` converts it, usually for little gain. Depthwise convs "
        "and layers where a GhostModule would not save MACs are skipped on purpose. Conv2d "
        "subclasses (timm's `Conv2dSame`, `StdConv2d`, `ScaledStdConv2d`) are skipped because "
        "their forward is not a plain convolution; see docs/zoo_findings.md.",
    ]
    failures = [r for r in results.values() if r["status"] not in PASSING]
    if failures:
        lines += ["", "## Models that do not pass, why, and what to do", ""]
        for res in sorted(failures, key=lambda r: (r["zoo"], r["model"])):
            lines.append(
                f"- `{res['zoo']}:{res['model']}` ({res['status']}): {res.get('error')}. "
                f"**What to do:** {hint_for(res)}"
            )
    for zoo, rows in sorted(by_zoo.items(), reverse=True):
        lines += ["", f"## {zoo}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for res in sorted(rows, key=lambda r: (r["family"], r["model"])):
            lines.append("| " + " | ".join(row_of(res)) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def select_jobs(args: argparse.Namespace) -> list[Job]:
    families = [f for f in (args.families or "").split(",") if f]
    jobs: list[Job] = []
    if args.zoo in ("all", "torchvision") and not families:
        jobs += torchvision_jobs()
    if args.zoo in ("all", "timm"):
        jobs += timm_jobs("conv" if families and args.set == "all" else args.set, families or None)
    if args.only:
        wanted = set(args.only.split(","))
        jobs = [j for j in jobs if j.model in wanted or j.key in wanted]
        known = {j.model for j in jobs} | {j.key for j in jobs}
        jobs += [job_for(name) for name in sorted(wanted - known)]
    return jobs[: args.limit] if args.limit else jobs


def job_for(spec: str) -> Job:
    """A job from "zoo:model" or a bare model name (torchvision first, then timm)."""
    zoo, _, name = spec.rpartition(":")
    from torchvision import models

    if zoo == "torchvision" or (not zoo and name in models.list_models()):
        return Job("torchvision", name, torchvision_family(name))
    return Job("timm", name, timm_family(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--zoo", choices=("all", "torchvision", "timm"), default="all")
    parser.add_argument(
        "--set",
        choices=("all", "reps", "conv"),
        default="all",
        help="timm: reps = one model per family, conv = conv-heavy families",
    )
    parser.add_argument("--families", help="comma-separated timm families (modules), all models")
    parser.add_argument("--only", help="comma-separated models (name or zoo:name)")
    parser.add_argument("--limit", type=int, help="at most this many models")
    parser.add_argument("--resume", action="store_true", help="skip models already in results")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: redo fails")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="s per model")
    parser.add_argument("--max-params", type=int, default=DEFAULT_MAX_PARAMS, help="0: no cap")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=COVERAGE_MD)
    parser.add_argument("--report-only", action="store_true", help="only regenerate the markdown")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.threads, args.max_params or None)
        return 0
    if not args.report_only:
        sweep(select_jobs(args), args)
    results = load_results(args.results)
    args.markdown.write_text(render_markdown(results, "python benchmarks/zoo.py"))
    print(f"wrote {args.markdown} ({len(results)} models)")
    return 0


def sweep(jobs: list[Job], args: argparse.Namespace) -> None:
    done = load_results(args.results) if args.resume else {}
    if args.retry_failed:
        done = {k: r for k, r in done.items() if r["status"] in PASSING}
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(todo)} models to run ({len(jobs) - len(todo)} already done)", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.timeout, args.max_params or None, args.threads)
    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    try:
        with open(args.results, "a") as out:
            for index, job in enumerate(todo, 1):
                res = runner.run(job)
                out.write(json.dumps(res, default=str) + "\n")
                out.flush()
                counts[res["status"]] += 1
                elapsed = time.perf_counter() - start
                eta = elapsed / index * (len(todo) - index)
                error = f"  {res['error'][:120]}" if res.get("error") else ""
                print(f"[{index}/{len(todo)} {elapsed / 60:.1f}m eta {eta / 60:.0f}m] "
                      f"{job.key:55s} {res['status']:17s} {res['seconds']:6.1f}s{error}",
                      flush=True)  # fmt: skip
    finally:
        runner.close()
    print("done:", dict(counts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
