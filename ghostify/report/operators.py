"""What the operators a report lists as "not counted" are, and why fvcore does not count them.

fvcore counts multiply-accumulates of the operators it has a formula for (convolutions, matrix
products, BatchNorm, a few poolings and upsamplings, ...); every other operator is listed as
unsupported with how often it ran. An auditor should not have to look each of them up: this
module says what each is in these models, whether the conversion added it, and what it costs.
"""

from __future__ import annotations

import re

# Operators ghostify's GhostModule itself adds, with why they are there.
ADDED_BY_GHOSTS = {
    "aten::index_copy_": "a GhostModule writing its kept and ghost channels into the channel "
    "order its layer keeps (where that order could not be folded into what reads the output, "
    "e.g. the model's own output): a copy of the output, no arithmetic",
    "aten::cat": "a GhostModule joining its kept and ghost channels into one output: a copy, "
    "no arithmetic",
    "aten::add": "a GhostModule adding the folded biases of its channels after they are joined "
    "(deployed form), or the model's own residual additions: one addition per output element",
    "aten::add_": "an in-place addition (a bias or a residual sum): one addition per element",
}

# Families by name, the first that matches: (operator names, what it is and what it costs).
_FAMILIES = (
    (
        "relu sigmoid silu gelu tanh hardswish hardsigmoid hardtanh elu leaky_relu mish softplus "
        "clamp clip softmax log_softmax erf",
        "an activation function: a few operations per element, not multiply-accumulates, so "
        "fvcore's default formulas leave it out",
    ),
    (
        "cat stack index gather scatter select slice pad repeat expand flip roll copy clone "
        "contiguous view reshape permute transpose flatten squeeze unsqueeze chunk split "
        "pixel_shuffle channel_shuffle narrow to type_as zeros ones full empty fill arange",
        "data movement or allocation: it copies, reorders or creates values, with no arithmetic",
    ),
    (
        "max_pool adaptive_max_pool avg_pool adaptive_avg_pool mean sum amax amin max min "
        "argmax argmin topk sort where eq ne gt ge lt le",
        "a pooling, reduction or comparison: comparisons or additions, not multiply-accumulates",
    ),
    (
        "add sub mul div rsub neg pow sqrt rsqrt exp log",
        "element-wise arithmetic: about one operation per element, no multiply-accumulate "
        "structure, so fvcore's default formulas leave it out",
    ),
    (
        "dropout batch_norm instance_norm group_norm layer_norm",
        "a normalisation or dropout: a few operations per element in eval mode",
    ),
)


def describe(op: str) -> str:
    """What ``op`` (an ``aten::`` name, as fvcore lists it) is and what it costs, in words."""
    if op in ADDED_BY_GHOSTS:
        return ADDED_BY_GHOSTS[op]
    name = op.split("::")[-1].strip("_").lower()
    for words, text in _FAMILIES:
        # "max_pool" names max_pool2d and max_pool2d_with_indices; "index" names index_select.
        if any(re.fullmatch(rf"{word}(\d+d)?(_.*)?", name) for word in words.split()):
            return text
    return (
        "an operator fvcore has no formula for (see PyTorch's operator reference for "
        f"{op}); its cost, whatever it is, is not in the totals"
    )


def not_counted_rows(before: dict[str, int], after: dict[str, int]) -> list[dict[str, object]]:
    """One row per operator not counted: how often it ran before and after, what it is, and
    whether the conversion added calls of it."""
    rows = []
    for op in sorted({*before, *after}):
        runs_before, runs_after = before.get(op, 0), after.get(op, 0)
        rows.append(
            {
                "op": op,
                "before": runs_before,
                "after": runs_after,
                "added": max(0, runs_after - runs_before),
                "what": describe(op),
            }
        )
    return rows
