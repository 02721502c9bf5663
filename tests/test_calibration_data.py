"""``ghostify.load_calibration_data``: image folders (flat, class sub-folders), .pt, .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import ghostify
from ghostify import ConfigError, load_calibration_data

# Solid colours, one per image, so that each loaded image says which file it came from.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> None:
    """A solid-colour RGB image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def colours_of(images: torch.Tensor) -> set[tuple[int, ...]]:
    """The solid colour of each loaded RGB image, back in 0..255."""
    return {tuple(round(255 * float(v)) for v in image[:, 0, 0]) for image in images}


def broken_image(folder: Path) -> None:
    """A folder holding a file named like an image that is not one."""
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a PNG")


@pytest.fixture
def class_folders(tmp_path) -> Path:
    """Two class folders of solid images (one nested deeper), plus files that are not images."""
    root = tmp_path / "data"
    for index, colour in enumerate(COLOURS):
        folder = root / ("cats" if index % 2 else "dogs/young")
        solid(folder / f"{index}.png" if index % 3 else folder / f"{index}.BMP", colour)
    (root / "cats" / "labels.txt").write_text("not an image")
    solid(root / ".cache" / "thumb.png", (1, 2, 3))  # hidden: not a sample
    return root


def test_a_flat_folder_is_resized_cropped_and_scaled(tmp_path) -> None:
    for index, colour in enumerate(COLOURS[:3]):
        solid(tmp_path / f"{index}.png", colour, size=(10 + index, 7))  # different sizes
    images = load_calibration_data(tmp_path, input_size=5)
    assert images.shape == (3, 3, 5, 5) and images.dtype == torch.float32
    assert colours_of(images) == set(COLOURS[:3])
    for image in images:  # a solid image stays solid through resizing
        assert torch.allclose(image, image[:, :1, :1].expand_as(image), atol=1e-6)


def test_class_sub_folders_are_read_and_their_labels_ignored(class_folders) -> None:
    images = load_calibration_data(class_folders, input_size=(4, 6))
    assert images.shape == (len(COLOURS), 3, 4, 6)
    assert colours_of(images) == set(COLOURS)  # both folders, .BMP too; no hidden, no .txt


def test_samples_and_seed_choose_reproducibly(class_folders) -> None:
    first = load_calibration_data(class_folders, input_size=4, samples=3, seed=1)
    again = load_calibration_data(class_folders, input_size=4, samples=3, seed=1)
    assert torch.equal(first, again) and len(colours_of(first)) == 3
    chosen = {
        frozenset(colours_of(load_calibration_data(class_folders, samples=3, seed=seed)))
        for seed in range(6)
    }
    assert len(chosen) > 1  # the seed changes the choice
    every = load_calibration_data(class_folders, input_size=4, samples=100)
    assert len(every) == len(COLOURS)  # at most: all of them when there are fewer


def test_the_centre_is_kept_and_the_aspect_ratio_too(tmp_path) -> None:
    """A 40x20 image, black left half and white right half, to 10x10: the shorter side goes to
    10 (so 20x10) and the centre 10x10 is cropped: black then white, split in the middle."""
    picture = np.zeros((20, 40), dtype=np.uint8)
    picture[:, 20:] = 255
    Image.fromarray(picture, mode="L").save(tmp_path / "split.png")
    (image,) = load_calibration_data(tmp_path, input_size=10, channels=1)
    assert image.shape == (1, 10, 10)
    row = image[0, 5]
    assert (row[:4] < 0.05).all() and (row[6:] > 0.95).all()


def test_normalisation_and_greyscale(tmp_path) -> None:
    solid(tmp_path / "a.png", (255, 0, 51))
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.5, 0.2)
    (image,) = load_calibration_data(tmp_path, mean=mean, std=std)
    want = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.5, (0.2 - 0.1) / 0.2]
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(want))
    (grey,) = load_calibration_data(tmp_path, channels=1)
    # PIL's luminance: L = R * 299/1000 + G * 587/1000 + B * 114/1000.
    assert grey.shape == (1, 9, 12)
    assert round(255 * float(grey[0, 0, 0])) == round(255 * 299 / 1000 + 51 * 114 / 1000)


def test_a_saved_tensor_is_taken_as_it_is(tmp_path) -> None:
    data = torch.randn(10, 3, 4, 4)
    torch.save(data, tmp_path / "inputs.pt")
    assert torch.equal(load_calibration_data(tmp_path / "inputs.pt"), data)
    checked = load_calibration_data(tmp_path / "inputs.pt", channels=3, input_size=4)
    assert torch.equal(checked, data)


@settings(max_examples=25, deadline=None)
@given(samples=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_samples_of_a_tensor_are_distinct_rows_of_it(tmp_path_factory, samples, seed) -> None:
    path = tmp_path_factory.mktemp("pt") / "x.pt"
    data = torch.arange(8.0).view(8, 1, 1).expand(8, 2, 3).clone()  # row i holds i
    torch.save(data, path)
    chosen = load_calibration_data(path, samples=samples, seed=seed)
    rows = chosen[:, 0, 0].long().tolist()
    assert len(rows) == min(samples, 8) == len(set(rows))
    for index, row in enumerate(rows):
        assert torch.equal(chosen[index], data[row])


def test_a_numpy_array(tmp_path) -> None:
    array = np.random.default_rng(0).random((6, 1, 5))  # float64, as NumPy makes it
    np.save(tmp_path / "x.npy", array)
    data = load_calibration_data(tmp_path / "x.npy")
    assert data.dtype == torch.float32 and data.shape == (6, 1, 5)
    torch.testing.assert_close(data, torch.from_numpy(array).float())


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p: (p / "empty").mkdir(), {}, "empty' holds no image"),
        (lambda p: None, {}, "does not exist"),
        (lambda p: (p / "notes.txt").write_text("x"), {}, "unknown kind of file '.txt'"),
        (lambda p: (p / "broken.png").write_bytes(b"no"), {}, "unknown kind of file '.png'"),
        (lambda p: broken_image(p / "d"), {}, "cannot read image"),
        (lambda p: torch.save([torch.ones(2, 3)], p / "l.pt"), {}, "holds a list"),
        (lambda p: (p / "t.pt").write_text("text"), {}, "cannot read calibration data"),
        (lambda p: torch.save(torch.ones(4, 3).long(), p / "i.pt"), {}, "holds int64 values"),
        (lambda p: torch.save(torch.ones(5), p / "r.pt"), {}, "expected a batch of inputs"),
        (lambda p: torch.save(torch.ones(2, 3, 4, 4), p / "c.pt"), {"channels": 1}, "1 channel"),
        (
            lambda p: torch.save(torch.ones(2, 3, 4, 4), p / "s.pt"),
            {"input_size": 8},
            "expected (N, C, 8, 8)",
        ),
        (lambda p: torch.save(torch.ones(2, 3), p / "m.pt"), {"mean": [0.5]}, "mean/std normalise"),
        (lambda p: np.save(p / "o.npy", np.array([{}], dtype=object)), {}, "as a NumPy array"),
        (lambda p: np.save(p / "u.npy", np.zeros((2, 3), np.uint8)), {}, "holds uint8 values"),
        (lambda p: (p / "d").mkdir(), {"samples": 0}, "samples must be a positive int"),
        (lambda p: (p / "d").mkdir(), {"input_size": (2, 2, 2)}, "input_size must be"),
        (lambda p: (p / "d").mkdir(), {"channels": 2}, "channels must be 1, 3 or 4"),
    ],
)
def test_what_cannot_be_read_is_refused_with_the_reason(tmp_path, make, kwargs, message) -> None:
    before = set(tmp_path.iterdir())
    make(tmp_path)
    made = set(tmp_path.iterdir()) - before
    path = next(iter(made)) if made else tmp_path / "missing"
    with pytest.raises(ConfigError) as error:
        load_calibration_data(path, **kwargs)
    assert message in str(error.value)


def test_images_of_different_sizes_need_an_input_size(tmp_path) -> None:
    solid(tmp_path / "a.png", (0, 0, 0), size=(4, 4))
    solid(tmp_path / "b.png", (0, 0, 0), size=(5, 4))
    with pytest.raises(ConfigError, match="different sizes .* pass input_size"):
        load_calibration_data(tmp_path)


def test_the_loaded_images_calibrate_a_conversion(tmp_path) -> None:
    """What the loader returns is what convert(calibration_data=...) takes."""
    for index in range(8):
        pixels = np.random.default_rng(index).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    data = ghostify.load_calibration_data(tmp_path)
    ghostify.convert(model, calibration_data=data)
    assert ghostify.record_of(model).calibrated_from is not None
