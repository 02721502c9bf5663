"""Building a zoo model untrained, with inputs its forward accepts, small enough for a CPU."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .zoo_jobs import Job

EVAL_ONLY = " (eval only)"


class BuildError(RuntimeError):
    """The unconverted model could not be built or run: not a ghostify failure."""


@dataclass
class Case:
    """A built model with the inputs it runs on."""

    model: nn.Module
    args: tuple  # positional arguments of forward
    input_desc: str
    train_args: tuple | None = None  # detection: (images, targets) for a train-mode loss
    ragged: bool = False  # per-image outputs (detection): compare trailing dims only

    @property
    def eval_only(self) -> bool:
        """The model does not run in train mode: backward is checked in eval mode."""
        return self.input_desc.endswith(EVAL_ONLY)


def image_sizes(family: str) -> list[int]:
    """Input sizes to try, smallest first: the first one the original model accepts is used."""
    return {"flow": [128], "detection": [128]}.get(family, [64, 96, 128, 160, 224, 299])


def build_torchvision(name: str, family: str, size: int) -> nn.Module:
    """A torchvision model without weights, sized for ``size`` px where the builder asks."""
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


def build_transformers(name: str) -> nn.Module:
    """A Hugging Face ``transformers`` model from its class's default config (no weights)."""
    import transformers

    model_class = getattr(transformers, name)
    return model_class(model_class.config_class())


def build_ultralytics(name: str, task: str) -> nn.Module:
    """An ultralytics model from its YAML (shipped with the package, no weights)."""
    from ultralytics.nn import tasks

    model_class = {
        "segment": tasks.SegmentationModel,
        "classify": tasks.ClassificationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
    }.get(task, tasks.DetectionModel)
    if name.startswith("rtdetr"):
        model_class = tasks.RTDETRDetectionModel
    return model_class(f"{name}.yaml", verbose=False)


def timm_input_sizes(name: str) -> list[int]:
    """Small sizes first, then the model's default input size as the last resort."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
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
    elif job.zoo == "transformers":
        sizes = image_sizes(job.family)

        def build(size: int) -> nn.Module:
            return build_transformers(job.model)
    elif job.zoo == "ultralytics":
        sizes = image_sizes(job.family)

        def build(size: int) -> nn.Module:
            return build_ultralytics(job.model, job.family)
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
        return Case(build(eval_only).eval(), args, desc + EVAL_ONLY, train_args)
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
