"""The calibration sums: equal to a reference built with torch's own unfold, at all or at sampled
positions, and independent of how the data is split into batches (what makes one process and
several ranks end with the same weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ghostify import GhostModule
from ghostify.fit.statistics import KernelStatistics, LayerStatistics, Sampling


def _layer(size: tuple[int, int] = (11, 9)) -> tuple[nn.Conv2d, torch.Tensor]:
    """In float64, so that the convolution's own rounding (which depends on how it is computed:
    whole, at a few positions, or in batches of another size) is below what is compared."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, stride=2).double()
    x = torch.randn(10, 6, *size, dtype=torch.float64).cumsum(2).cumsum(3) / 5  # smooth maps
    return conv, x


def _unfolded_taps(maps: torch.Tensor, dw_size: int) -> torch.Tensor:
    """(N, C, dw_size**2 + 1, L) tap features by F.unfold: an independent reference."""
    n, c, h, w = maps.shape
    cols = F.unfold(maps.double(), dw_size, padding=dw_size // 2).view(n, c, dw_size**2, h * w)
    return torch.cat([cols, cols.new_ones(n, c, 1, h * w)], dim=2)


# A few positions of a large map: the sources are computed only where the sampled taps read.
SAMPLED = [(None, (11, 9)), (7, (11, 9)), (5, (31, 29))]


@pytest.mark.parametrize(("per_sample", "size"), SAMPLED)
def test_layer_sums_are_those_of_an_unfold_reference(per_sample: int | None, size) -> None:
    conv, x = _layer(size)
    stats = LayerStatistics(conv, dw_size=3, refit_intrinsic=True, sampling=Sampling(per_sample, 5))
    with torch.no_grad():
        sources = conv(x)
        targets = sources + 0.1 * torch.randn_like(sources)
        stats.update(x, targets)
    length = sources[0, 0].numel()
    layout = stats.positions(length)
    keep = torch.arange(length) if layout is None else layout
    assert len(keep) == (length if per_sample is None else per_sample)
    features = _unfolded_taps(sources, 3)[..., keep]
    wanted = targets.double().flatten(2)[..., keep]
    torch.testing.assert_close(stats.gram, torch.einsum("nctl,ncul->ctu", features, features))
    torch.testing.assert_close(stats.cross, torch.einsum("nctl,ndl->ctd", features, wanted))
    torch.testing.assert_close(stats.target_sq, wanted.square().sum(dim=(0, 2)))
    assert stats.count.item() == 10 * len(keep)
    symmetric = LayerStatistics(conv, dw_size=3, sampling=Sampling(per_sample, 5))
    symmetric.update(x)  # targets = the layer's own outputs, computed whole
    torch.testing.assert_close(symmetric.gram, stats.gram)

    inputs = stats.inputs
    picked = inputs.positions(length)
    keep = torch.arange(length) if picked is None else picked
    patches = F.unfold(x.double(), 3, padding=1, stride=2)[..., keep]  # (N, 54, s)
    patches = torch.cat([patches, patches.new_ones(10, 1, len(keep))], dim=1)
    wanted = targets.double().flatten(2)[..., keep]
    torch.testing.assert_close(inputs.gram[0], torch.einsum("nkl,njl->kj", patches, patches))
    torch.testing.assert_close(inputs.cross[0], torch.einsum("nkl,ndl->kd", patches, wanted))
    torch.testing.assert_close(inputs.target_sq, wanted.square().sum(dim=(0, 2)))


@pytest.mark.parametrize(("per_sample", "size"), SAMPLED)
def test_kernel_sums_are_those_of_an_unfold_reference(per_sample: int | None, size) -> None:
    conv, x = _layer(size)
    ghost = GhostModule.like(conv, ratio=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    ghost.set_channel_order(order)
    stats = KernelStatistics(conv, ghost, Sampling(per_sample, seed=2))
    with torch.no_grad():
        targets = conv(x)
        stats.update(x, targets)
        features = _unfolded_taps(ghost.primary_conv(x), ghost.dw_size)
    length = targets[0, 0].numel()
    picked = stats.positions(length)
    keep = torch.arange(length) if picked is None else picked
    features = features[..., keep]
    m = ghost.intrinsic_channels
    channel_at = torch.empty_like(ghost.output_position)
    channel_at[ghost.output_position] = torch.arange(12)
    slot_targets = targets.double().flatten(2)[:, channel_at[m:]][..., keep]
    source = ghost.slot_source
    torch.testing.assert_close(stats.gram, torch.einsum("nctl,ncul->ctu", features, features))
    want = torch.einsum("nstl,nsl->st", features[:, source], slot_targets)
    torch.testing.assert_close(stats.cross, want)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), st.booleans())
def test_sums_do_not_depend_on_how_the_data_is_batched(sizes: list[int], sampled: bool) -> None:
    """The data split into batches of ``sizes`` (then the rest) gives the sums of one batch, to
    float64 rounding: float32 block sums differ by ~1e-7, which the ill-conditioned cheap-kernel
    and ridge systems turned into 3e-5 differences in the weights between one process and 2
    ranks."""
    conv, x = _layer()
    sampling = Sampling(9, 11, seed=3) if sampled else None
    whole = LayerStatistics(conv, dw_size=3, refit_intrinsic=True, sampling=sampling)
    parts = LayerStatistics(conv, dw_size=3, refit_intrinsic=True, sampling=sampling)
    with torch.no_grad():
        whole.update(x)
        start = 0
        for size in [*sizes, len(x)]:
            if start < len(x):
                parts.update(x[start : start + size])
            start += size
    for a, b in zip(whole.tensors(), parts.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
