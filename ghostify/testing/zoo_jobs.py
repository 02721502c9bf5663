"""Which models a zoo sweep runs: every torchvision builder, timm's registry by family, and
lists of Hugging Face ``transformers`` vision models and ultralytics YOLO models.

A timm "family" is the module that registers the model (``timm.list_modules()``), timm's own
notion of an architecture. Only timm's public API is used. For ``transformers`` the family is the
task, for ultralytics the YOLO task (detect, segment, classify, pose, obb).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# timm modules (architecture families) built mostly from convolutions: every model is swept.
CONV_FAMILIES = (
    "resnet", "regnet", "efficientnet", "mobilenetv3", "mobilenetv5", "convnext", "densenet",
    "dla", "dpn", "hrnet", "inception_v3", "inception_v4", "inception_resnet_v2",
    "inception_next", "nfnet", "rexnet", "ghostnet", "repghost", "byobnet", "cspnet", "cspnext",
    "vgg", "xception", "xception_aligned", "res2net", "resnest", "resnetv2", "senet", "sknet",
    "selecsls", "vovnet", "tresnet", "hardcorenas", "hgnet", "lcnetv2", "repvit", "fasternet",
    "starnet", "rdnet", "convmixer",
)  # fmt: skip

# Hugging Face transformers vision models (class names), each built from its default config (the
# architecture's reference size), with the task as family. Conv backbones of DETR-style
# detectors included: their default configs build an untrained HF ResNet backbone, no timm.
TRANSFORMERS_MODELS = {
    "ResNetForImageClassification": "image-classification",
    "ConvNextForImageClassification": "image-classification",
    "ConvNextV2ForImageClassification": "image-classification",
    "MobileNetV1ForImageClassification": "image-classification",
    "MobileNetV2ForImageClassification": "image-classification",
    "MobileViTForImageClassification": "image-classification",
    "MobileViTV2ForImageClassification": "image-classification",
    "RegNetForImageClassification": "image-classification",
    "EfficientNetForImageClassification": "image-classification",
    "BitForImageClassification": "image-classification",
    "PoolFormerForImageClassification": "image-classification",
    "HGNetV2ForImageClassification": "image-classification",
    "TextNetForImageClassification": "image-classification",
    "CvtForImageClassification": "image-classification",
    "LevitForImageClassification": "image-classification",
    "SegformerForSemanticSegmentation": "semantic-segmentation",
    "MobileNetV2ForSemanticSegmentation": "semantic-segmentation",
    "UperNetForSemanticSegmentation": "semantic-segmentation",
    "GLPNForDepthEstimation": "depth-estimation",
    "DetrForObjectDetection": "object-detection",
    "ConditionalDetrForObjectDetection": "object-detection",
    "DeformableDetrForObjectDetection": "object-detection",
    "TableTransformerForObjectDetection": "object-detection",
    "RTDetrForObjectDetection": "object-detection",
    "DFineForObjectDetection": "object-detection",
}

# ultralytics models built from their YAML (smallest scale of each generation), with their task.
ULTRALYTICS_MODELS = {
    "yolov3-tinyu": "detect",
    "yolov5nu": "detect",
    "yolov6n": "detect",
    "yolov8n": "detect",
    "yolov8n-seg": "segment",
    "yolov8n-cls": "classify",
    "yolov8n-pose": "pose",
    "yolov8n-obb": "obb",
    "yolov9t": "detect",
    "yolov10n": "detect",
    "yolo11n": "detect",
    "yolo11n-seg": "segment",
    "yolo11n-cls": "classify",
    "yolo11n-pose": "pose",
    "yolo11n-obb": "obb",
    "yolo12n": "detect",
    "yolo26n": "detect",
    "rtdetr-l": "detect",
}

# torchvision task families, each from the torchvision.models submodule that defines its builders
_TORCHVISION_MODULES = {
    "quantization": "quantization",
    "segmentation": "segmentation",
    "detection": "detection",
    "video": "video",
    "flow": "optical_flow",
}


@dataclass(frozen=True)
class Job:
    """One model of a sweep: its zoo ("torchvision", "timm", "transformers", "ultralytics" or
    "selftest"), name and family."""

    zoo: str
    model: str
    family: str

    @property
    def key(self) -> str:
        return f"{self.zoo}:{self.model}"


def torchvision_family(name: str) -> str:
    """Task family of a torchvision builder, from the module that defines it."""
    from torchvision import models

    for family, module in _TORCHVISION_MODULES.items():
        if name in models.list_models(module=getattr(models, module)):
            return family
    return "classification"


def torchvision_jobs() -> list[Job]:
    """Every model torchvision lists, by name."""
    from torchvision import models

    return [Job("torchvision", n, torchvision_family(n)) for n in sorted(models.list_models())]


@functools.cache
def _timm_families() -> dict[str, str]:
    import timm

    return {
        name: module for module in timm.list_modules() for name in timm.list_models(module=module)
    }


def timm_family(name: str) -> str:
    """The timm module that registers ``name`` ("unknown" for a name timm does not list)."""
    return _timm_families().get(name, "unknown")


def meta_param_count(build: Callable[[], nn.Module]) -> int | None:
    """Parameters of the model ``build`` makes, without allocating them (None if that fails)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in build().parameters())
    except Exception:
        return None


def timm_param_count(name: str) -> int | None:
    """Parameters of timm model ``name``, built on the meta device."""
    import timm

    return meta_param_count(lambda: timm.create_model(name, pretrained=False))


def timm_sizes(cache_dir: Path | None = None) -> dict[str, int | None]:
    """Parameter count of every timm model (about a minute), cached in ``cache_dir`` if given."""
    import timm

    cache = cache_dir / f"timm-sizes-{timm.__version__}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    sizes = {name: timm_param_count(name) for name in timm.list_models()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(sizes))
    return sizes


def timm_jobs(
    which: str, families: Iterable[str] | None = None, cache_dir: Path | None = None
) -> list[Job]:
    """timm jobs: "reps" = the smallest model of each family, "conv" = every model of the
    conv-heavy families, "all" = both (representatives first); ``families`` narrows either."""
    import timm

    sizes = timm_sizes(cache_dir)
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


def transformers_jobs() -> list[Job]:
    """The Hugging Face ``transformers`` vision models of the sweep."""
    return [Job("transformers", name, task) for name, task in TRANSFORMERS_MODELS.items()]


def ultralytics_jobs() -> list[Job]:
    """The ultralytics YOLO models of the sweep."""
    return [Job("ultralytics", name, task) for name, task in ULTRALYTICS_MODELS.items()]


def job_for(spec: str) -> Job:
    """A job from "zoo:model" or a bare model name (torchvision first, then timm)."""
    from torchvision import models

    zoo, _, name = spec.rpartition(":")
    if zoo == "transformers" or (not zoo and name in TRANSFORMERS_MODELS):
        return Job("transformers", name, TRANSFORMERS_MODELS.get(name, "unknown"))
    if zoo == "ultralytics" or (not zoo and name in ULTRALYTICS_MODELS):
        return Job("ultralytics", name, ULTRALYTICS_MODELS.get(name, "unknown"))
    if zoo == "torchvision" or (not zoo and name in models.list_models()):
        return Job("torchvision", name, torchvision_family(name))
    return Job("timm", name, timm_family(name))
