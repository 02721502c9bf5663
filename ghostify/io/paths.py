"""What a calibration data path holds, known without reading it (and without importing torch).

The command line checks ``--calibration-data`` with these before any heavy import, so a wrong
path is a usage error at once; ``ghostify.io.data`` reads the files.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".pt", ".pth")
ARRAY_SUFFIXES = (".npy",)
KNOWN = "a folder of images (" + ", ".join(IMAGE_SUFFIXES) + "), a .pt tensor or a .npy array"
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> the PIL mode images are converted to


def image_files(folder: Path) -> list[Path]:
    """The images in ``folder`` and its sub-folders (class folders), sorted; hidden ones aside."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def data_kind(path: Path) -> str | None:
    """``"images"``, ``"tensor"`` or ``"array"`` by what ``path`` is, or None when unknown."""
    if path.is_dir():
        return "images"
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return "tensor"
    return "array" if suffix in ARRAY_SUFFIXES else None
