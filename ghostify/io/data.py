"""Calibration data from what users have: a folder of images, a saved tensor, a NumPy array.

``load_calibration_data(path)`` returns one float tensor of unlabeled model inputs, batch first,
which ``convert(model, calibration_data=...)`` and ``finetune(model, data)`` take as it is. Images
are read with PIL through torchvision's transforms (resized and centre-cropped to the model's
input size, scaled to [0, 1], optionally normalised); a ``.pt`` / ``.npy`` file holds inputs
exactly as the model takes them. Labels are never needed: the new layers are fitted to what the
original layers compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..utils import first_line
from .paths import ARRAY_SUFFIXES, IMAGE_SUFFIXES, KNOWN, PIL_MODES, TENSOR_SUFFIXES, image_files


def load_calibration_data(
    path: str | Path,
    *,
    input_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Unlabeled model inputs read from ``path``, as one float tensor ``(N, ...)``.

    ``path``: a folder of images (flat, or one sub-folder per class as torchvision's
    ``ImageFolder`` reads; the labels are not used), a ``.pt`` file holding one tensor saved with
    ``torch.save``, or a ``.npy`` array (float64 becomes float32, the dtype of a model's weights
    by default). ``samples``: at most this many inputs, chosen at random with ``seed`` (all of
    them when there are fewer); images come in a seeded random order, so that every batch mixes
    the classes.

    For images: ``input_size`` (``224`` or ``(H, W)``) resizes the shorter side to cover it and
    crops the centre; None keeps each image's own size, which must then be the same for all.
    ``channels``: 1 (greyscale), 3 (RGB, the default) or 4 (RGBA). ``mean`` / ``std``: one value
    per channel, applied after scaling to [0, 1] (torchvision's ImageNet weights want
    ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``). For a ``.pt`` / ``.npy`` file the
    inputs are taken as they are: ``input_size`` and ``channels`` are checked against their
    shape, and ``mean`` / ``std`` are refused (normalise the data before saving it).
    """
    path = Path(path)
    _check_count(samples, "samples", allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int; got {seed!r}")
    size = _size(input_size)
    if channels is not None and channels not in PIL_MODES:
        raise ConfigError(f"channels must be 1, 3 or 4; got {channels!r}")
    if not path.exists():
        raise ConfigError(f"calibration data {str(path)!r} does not exist; give {KNOWN}")
    if path.is_dir():
        stats = _per_channel(mean, "mean", channels or 3), _per_channel(std, "std", channels or 3)
        return _images(path, size, channels or 3, *stats, samples, seed)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES + ARRAY_SUFFIXES:
        raise ConfigError(
            f"calibration data {str(path)!r}: unknown kind of file {suffix or '(no suffix)'!r}; "
            f"give {KNOWN}"
        )
    if mean is not None or std is not None:
        raise ConfigError(
            f"mean/std normalise images; {str(path)!r} holds model inputs as they are "
            "(normalise them before saving)"
        )
    data = _tensor_file(path) if suffix in TENSOR_SUFFIXES else _array_file(path)
    _check_inputs(data, path, size, channels)
    return _subset(data, samples, seed, shuffle=False)


def _check_count(value: object, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int; got {value!r}")


def _size(input_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if input_size is None:
        return None
    sizes = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    valid = all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
    if len(sizes) != 2 or not valid:
        raise ConfigError(
            f"input_size must be a positive int or (height, width); got {input_size!r}"
        )
    return sizes  # type: ignore[return-value]


def _per_channel(values: Sequence[float] | None, name: str, channels: int) -> list[float] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, int | float) else list(values)
    if len(values) not in (1, channels) or not all(isinstance(v, int | float) for v in values):
        raise ConfigError(
            f"{name} must be one number or {channels} (one per channel); got {values!r}"
        )
    if name == "std" and any(v <= 0 for v in values):
        raise ConfigError(f"std must be > 0; got {values!r}")
    return [float(v) for v in values] * (channels if len(values) == 1 else 1)


def _subset(data: torch.Tensor, samples: int | None, seed: int, shuffle: bool) -> torch.Tensor:
    if samples is None and not shuffle:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data[order[:samples]]


def _images(
    folder: Path,
    size: tuple[int, int] | None,
    channels: int,
    mean: list[float] | None,
    std: list[float] | None,
    samples: int | None,
    seed: int,
) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms import v2
    except ImportError:
        raise ConfigError(
            "reading a folder of images needs torchvision (and Pillow): pip install "
            "'ghostify[vision]'"
        ) from None
    files = image_files(folder)
    if not files:
        raise ConfigError(
            f"calibration data folder {str(folder)!r} holds no image (looked for "
            f"{', '.join(IMAGE_SUFFIXES)} in it and its sub-folders)"
        )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    chosen = [files[i] for i in order[:samples].tolist()]
    steps: list = [v2.ToImage()]
    if size is not None:
        steps += [v2.Resize(max(size), antialias=True), v2.CenterCrop(size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None or std is not None:
        steps.append(v2.Normalize(mean or [0.0] * channels, std or [1.0] * channels))
    transform = v2.Compose(steps)
    images = []
    for file in chosen:
        try:
            with Image.open(file) as image:
                images.append(transform(image.convert(PIL_MODES[channels])))
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(f"cannot read image {str(file)!r}: {first_line(error)}") from None
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ConfigError(
            f"the images in {str(folder)!r} have different sizes ({len(shapes)} of them, e.g. "
            f"{sorted(shapes)[:2]}); pass input_size to resize them to the model's input"
        )
    return torch.stack(images)


def _tensor_file(path: Path) -> torch.Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a file it cannot read
        raise ConfigError(
            f"cannot read calibration data {str(path)!r} as a tensor saved with torch.save "
            f"(read with weights_only=True, so nothing is unpickled): {first_line(error)}"
        ) from None
    if not isinstance(data, torch.Tensor):
        raise ConfigError(
            f"calibration data {str(path)!r} holds a {type(data).__name__}; expected one tensor "
            "of model inputs, batch first (torch.save(inputs, path))"
        )
    return data


def _array_file(path: Path) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ConfigError(
            f"cannot read calibration data {str(path)!r} as a NumPy array (np.save; nothing is "
            f"unpickled): {first_line(error)}"
        ) from None
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise ConfigError(f"calibration data {str(path)!r} is not a numeric array")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_inputs(
    data: torch.Tensor, path: Path, size: tuple[int, int] | None, channels: int | None
) -> None:
    shape = tuple(data.shape)
    if not data.is_floating_point():
        raise ConfigError(
            f"calibration data {str(path)!r} holds {str(data.dtype).replace('torch.', '')} "
            f"values, shape {shape}; expected floating-point model inputs (integer images: "
            "scale them to floats as the model expects, or save them as image files)"
        )
    if data.dim() < 2 or shape[0] == 0:
        raise ConfigError(
            f"calibration data {str(path)!r} has shape {shape}; expected a batch of inputs, "
            "batch first, e.g. (N, C, H, W) images"
        )
    if channels is not None and (data.dim() < 3 or shape[1] != channels):
        raise ConfigError(
            f"calibration data {str(path)!r} has shape {shape}; the model takes {channels} "
            f"channel(s) in dimension 1"
        )
    if size is not None and (data.dim() != 4 or shape[2:] != size):
        raise ConfigError(
            f"calibration data {str(path)!r} has shape {shape}; expected (N, C, "
            f"{size[0]}, {size[1]}) for input size {size[0]}x{size[1]}"
        )
