"""``ghostify.convert``: the user's entry point, composing the stages below it.

The conversion pass itself (discover, select, build, swap, fold, record) is
``ghostify.surgery.convert``; it knows nothing of the stages above it. This module checks the
user's arguments and data, then runs that pass with what they asked for: calibration on real
data (``ghostify.tune``) as a refinement inside the pass's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .budget import Budget, plan_budget
from .budget.verify import record_budget
from .errors import ConfigError
from .surgery.convert import Refine, Swapped
from .surgery.convert import convert as convert_pass
from .surgery.record import record_of
from .surgery.selection import ALL_DIMS, Selection
from .trained import warn_if_trained
from .tune.calibrate import Calibration, calibrate_conversion, prepare
from .tune.shared_layouts import share_on_activations


def convert(
    model: nn.Module,
    *,
    ratio: int = 2,
    dw_size: int | str = 3,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overrides: dict[str, dict[str, int]] | None = None,
    init: str | None = None,
    example_inputs: Any = None,
    plan: dict[str, Any] | None = None,
    skip_stem: bool = True,
    allow_subclasses: bool | Sequence[type] = False,
    fold_channel_order: bool = True,
    keep_originals: bool = True,
    only_faster: bool = False,
    progress: bool | None = None,
    dims: Sequence[int] = ALL_DIMS,
    calibration_data: Any = None,
    select: Selection | None = None,
    share_layouts: bool = True,
    budget: Budget | None = None,
) -> nn.Module:
    """Rewrite ``model``'s convolutions as GhostModules, in place, and return ``model``.

    Every convolution is either converted or recorded as skipped with a reason (see
    ``plan_of``). The pass is atomic: if anything fails, ``model`` is left exactly as it was.

    Which layers: ``include``, ``exclude``, ``overrides``, ``skip_stem``, ``allow_subclasses``
    and ``dims``, or the same choices grouped as ``select=ghostify.Selection(...)`` (not both).
    ``ratio`` / ``dw_size``: the global settings. ``init``: ``"weights"`` (default: fit the new
    layers to the trained ones, data-free) or ``"scratch"``. ``example_inputs``: a tensor or a
    tuple of the model's arguments; with them every new layer's shape is checked and the
    converted model must run. ``plan``: rebuild the layers ``plan_of`` recorded, without fitting
    (the weights come from the saved state_dict). ``only_faster=True`` (needs
    ``example_inputs``): keep the convolutions whose ghost form is not faster on this machine.
    ``calibration_data`` (a few hundred unlabeled inputs: a tensor, a list of batches, a
    DataLoader, or a ``ghostify.Calibration`` with settings): fit the new layers on real data,
    atomically too; without it, a model that looks trained (``ghostify.trained_evidence``) gets
    a ``TrainedWeightsWarning``, since a data-free fit loses much of what it learnt.
    ``progress``: tqdm bars on stderr (None: only in a terminal outside pytest).
    ``fold_channel_order``: permute consumers instead of gathering; ``share_layouts``: the layers
    writing into one residual stream share one layout where that costs little fit, so the stream
    runs in one channel order, gather-free; ``keep_originals``: keep the replaced layers on the
    record (the teacher of ``original_model``).
    """
    select = _selection(
        select,
        include=include,
        exclude=exclude,
        overrides=overrides,
        skip_stem=skip_stem,
        allow_subclasses=allow_subclasses,
        dims=dims,
    )
    refine = calibration = None
    if calibration_data is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        calibration = prepare(model, calibration_data, init, plan)
        refine = _calibration_stage(calibration)
    elif isinstance(model, nn.Module) and (init == "weights" or (init is None and plan is None)):
        warn_if_trained(model)  # a data-free fit of trained weights loses what they learnt
    choose = budget_plan = None
    if budget is not None:
        _check_budget_arguments(
            budget, ratio=ratio, dw_size=dw_size, plan=plan, only_faster=only_faster, select=select
        )
        budget_plan = plan_budget(
            model, budget, example_inputs, calibration_data=calibration, select=select
        )
        choose = budget_plan.choose
    convert_pass(
        model,
        ratio=ratio,
        dw_size=dw_size,
        select=select,
        init=init,
        example_inputs=example_inputs,
        plan=plan,
        fold_channel_order=fold_channel_order,
        keep_originals=keep_originals,
        only_faster=only_faster,
        progress=progress,
        refine=refine,
        share_layouts=share_layouts,
        choose=choose,
    )
    if calibration is not None:
        _record_fits(model, calibration)
    if budget_plan is not None:
        record_budget(model, budget_plan)
    return model


def _record_fits(model: nn.Module, calibration: Calibration) -> None:
    """Each converted layer's record says how calibration fitted it, and how well."""
    summary = getattr(calibration, "summary", None)
    record = record_of(model)
    if summary is None or record is None:
        return
    for row in record.layers:
        fitted = summary.layers.get(row.name)
        row.fit_method = "not calibrated: never ran" if fitted is None else fitted.method
        row.fit_error = None if fitted is None else fitted.error


def _check_budget_arguments(
    budget: object,
    *,
    ratio: int,
    dw_size: int | str,
    plan: object,
    only_faster: bool,
    select: Selection,
) -> None:
    """A budget chooses every layer's settings: arguments that also choose them conflict."""
    if not isinstance(budget, Budget):
        raise ConfigError(
            f"budget must be a ghostify.Budget (e.g. Budget(speedup=1.5)); got {budget!r}"
        )
    conflicts = [
        text
        for text, given in (
            (f"ratio={ratio!r}", ratio != 2),
            (f"dw_size={dw_size!r}", dw_size != 3),
            ("plan=", plan is not None),
            ("only_faster=True", only_faster),
            ("overrides=", select.overrides is not None),
        )
        if given
    ]
    if conflicts:
        raise ConfigError(
            f"budget= chooses every layer's ratio and dw_size, so {', '.join(conflicts)} cannot "
            "be combined with it; set the forms the budget may choose from with "
            "Budget(ratios=..., dw_sizes=...), and which layers with include/exclude"
        )


def _selection(select: Selection | None, **given: Any) -> Selection:
    """``select``, or the same choices from ``convert``'s keywords; both at once is an error."""
    if select is None:
        return Selection(**given)
    if not isinstance(select, Selection):
        raise ConfigError(f"select must be a ghostify.Selection; got {type(select).__name__}")
    default = Selection()
    also = [
        f"{key}={value!r}"
        for key, value in given.items()
        if _plain(value) != _plain(getattr(default, key))
    ]
    if also:
        raise ConfigError(
            f"select= already says which layers to convert; pass {', '.join(also)} inside "
            "the Selection instead (ghostify.Selection(...)), not beside it"
        )
    return select


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _calibration_stage(calibration: Calibration) -> Refine:
    """The refinement that fits the swapped-in layers on ``calibration``'s data."""

    def calibrate(swapped: Swapped) -> dict:
        share_on_activations(swapped, calibration)  # each stream's shared layout, on the data
        return calibrate_conversion(
            calibration,
            swapped.model,
            swapped.layers,
            swapped.originals,
            swapped.graphs,
            swapped.changes,
            fixed_layouts=swapped.fixed_layouts,  # shared by a residual stream's writers
        )

    return calibrate
