"""Where a model's time goes, by kind of work: torch.profiler's operators grouped into classes.

A speed-up short of the MAC ratio is explained by the work MACs do not count. ``time_by_kind``
profiles a call and sums each leaf operator's own CPU time into a few kinds: dense
convolutions, depthwise convolutions (a GhostModule's cheap op), copies (concatenations,
``copy_``, gathers and scatters), elementwise passes (bias, residual add, activations,
BatchNorm in the training form), and the rest; convolutions are told apart by their weight's
shape (recorded shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType

KINDS = ("dense conv", "depthwise conv", "copies", "elementwise", "other")
_CONVOLUTIONS = {
    "aten::mkldnn_convolution",
    "aten::_convolution",
    "aten::convolution",
    "aten::conv2d",
    "aten::cudnn_convolution",
    "aten::_slow_conv2d_forward",
    "aten::thnn_conv2d",
    "aten::_nnpack_spatial_convolution",
    "aten::convolution_overrideable",
}
_COPIES = {
    "aten::cat",
    "aten::copy_",
    "aten::index_copy_",
    "aten::index_select",
    "aten::clone",
    "aten::contiguous",
    "aten::to",
    "aten::_to_copy",
}
_ELEMENTWISE = {
    "aten::add",
    "aten::add_",
    "aten::mul",
    "aten::mul_",
    "aten::relu",
    "aten::relu_",
    "aten::clamp_min",
    "aten::clamp_min_",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::batch_norm",
    "aten::native_batch_norm",
    "aten::_native_batch_norm_legit_no_training",
    "aten::_batch_norm_impl_index",
}


def _kind(name: str, shapes: list) -> str:
    if name in _CONVOLUTIONS:
        weight = shapes[1] if len(shapes) > 1 else []
        depthwise = len(weight) >= 3 and weight[1] == 1 and len(shapes[0]) > 1 and shapes[0][1] > 1
        return "depthwise conv" if depthwise else "dense conv"
    if name in _COPIES:
        return "copies"
    if name in _ELEMENTWISE:
        return "elementwise"
    return "other"


def time_by_kind(call: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per call of each kind of work (operators' own CPU time, summed)."""
    call()  # warm-up
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        for _ in range(repeats):
            call()
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU or event.self_cpu_time_total <= 0:
            continue
        totals[_kind(event.name, list(event.input_shapes or []))] += event.self_cpu_time_total
    return {kind: total / 1000 / repeats for kind, total in totals.items()}
