"""DistillationLoss against a hand computation, and finetune raising agreement with the teacher."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import ghostify
from ghostify import ConfigError, DistillationLoss
from ghostify.testing import digits
from ghostify.tune import distributed
from ghostify.tune.finetune import starting_distance


def test_soft_and_hard_terms_match_a_hand_computation() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, 2])
    t = 2.0
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for s_v, t_v in zip(s_row, t_row, strict=True):
            p, q = math.exp(t_v / t) / zt, math.exp(s_v / t) / zs
            kl += p * math.log(p / q)
    soft = t * t * kl / 2  # averaged over the two samples
    ce = 0.0
    for row, label in zip(student.tolist(), labels.tolist(), strict=True):
        ce -= math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
    hard = ce / 2
    loss = DistillationLoss(t, hard_label_weight=0.3)
    assert float(loss(student, teacher)) == pytest.approx(soft, rel=1e-5)  # no labels: no CE
    assert float(loss(student, teacher, labels)) == pytest.approx(soft + 0.3 * hard, rel=1e-5)
    assert float(loss(teacher, teacher, None)) == pytest.approx(0.0, abs=1e-6)


def test_dense_outputs_average_over_positions() -> None:
    student, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    loss = DistillationLoss(3.0)
    torch.testing.assert_close(loss(student, teacher), loss(flat(student), flat(teacher)))


def test_feature_term_compares_each_converted_layer_with_its_original() -> None:
    torch.manual_seed(0)
    model = digits.make_cnn().eval()
    original = copy.deepcopy(model)
    ghostify.convert(model)  # channel orders folded where the graph allows
    teacher = ghostify.original_model(model).eval()
    loss = DistillationLoss(feature_weight=1.0, soft_weight=0.0).watch(model, teacher)
    x = torch.rand(4, 1, 8, 8)
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, n=n: outputs.update({n: out}))
        for n, m in original.named_modules()
        if n in {row.name for row in ghostify.record_of(model).layers}
    ]
    with torch.no_grad():
        original(x)
        value = loss(model(x), teacher(x))
    for hook in hooks:
        hook.remove()
    by_hand = []
    for row in ghostify.record_of(model).layers:
        ghost = model.get_submodule(row.name)
        with torch.no_grad():
            own = ghost(_input_of(model, row.name, x))  # in the student, in its own order
        target = outputs[row.name]
        if row.output_order is not None:
            target = target[:, list(row.output_order)]
        by_hand.append(float((own - target).square().sum() / target.square().sum()))
    assert float(value) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    assert float(loss.feature_loss()) == 0.0  # the captured outputs were used up
    loss.unwatch()


def test_watch_layers_by_name_before_a_model_has_a_record() -> None:
    # A calibration distils inside convert, before the record exists: the layers are named.
    torch.manual_seed(0)
    teacher = digits.make_cnn().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.get_submodule("3").weight.mul_(1.5)  # only layer "3" differs
    loss = DistillationLoss(feature_weight=1.0, soft_weight=0.0)
    loss.watch_layers(student, teacher, ["0", "3"])
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        value = loss(student(x), teacher(x))
    # Layer "0" matches exactly; layer "3" outputs 1.5x its input's original response plus the
    # unchanged bias: its relative squared error, over the two layers' mean.
    conv = teacher.get_submodule("3")
    inputs = _input_of(teacher, "3", x)
    with torch.no_grad():
        wanted = conv(inputs)
        scaled = wanted + 0.5 * (wanted - conv.bias[:, None, None])
    expected = float((scaled - wanted).square().sum() / wanted.square().sum()) / 2
    assert float(value) == pytest.approx(expected, rel=1e-4)
    loss.unwatch()
    with torch.no_grad():
        assert float(loss(student(x), teacher(x))) == 0.0  # nothing watched any more


def _input_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.update(x=args[0])
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"hard_label_weight": -1}, "hard_label_weight must be a number >= 0"),
    ],
)
def test_bad_loss_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillationLoss(**kwargs)


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.no_grad():
        return float((a(x).argmax(dim=1) == b(x).argmax(dim=1)).float().mean())


def test_finetune_on_unlabeled_data_raises_agreement_with_a_small_teacher(digits_teacher) -> None:
    teacher, (train_x, _, test_x, _) = digits_teacher
    student = ghostify.convert(copy.deepcopy(teacher), ratio=4)
    before = agreement(teacher, student, test_x)
    losses = ghostify.finetune(student, train_x[:512], epochs=2, lr=3e-3, progress=False)
    after = agreement(teacher, student, test_x)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert after > before + 0.2, (before, after)
    assert not student.training  # the model's own train/eval flags are restored


def test_starting_distance_is_the_relative_output_error_clipped_to_a_tenth_and_one() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4, bias=False)
    inputs = torch.randn(32, 6)
    scaled = copy.deepcopy(teacher)
    with torch.no_grad():
        scaled.weight.mul_(1.5)  # outputs 1.5x the teacher's: relative error exactly 0.5
    assert starting_distance(scaled, teacher, inputs) == pytest.approx(0.5, rel=1e-5)
    assert starting_distance(copy.deepcopy(teacher), teacher, inputs) == 0.1  # already there
    assert starting_distance(nn.Linear(6, 4, bias=False), teacher, inputs) == 1.0  # far off


def test_scale_lr_moves_a_model_close_to_its_teacher_less() -> None:
    """A student 5% off its teacher takes steps a tenth the size (Adam's steps scale with lr)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    close = copy.deepcopy(teacher)  # any student works when the teacher is given
    with torch.no_grad():
        close[3].weight.mul_(1.05)
    data = torch.rand(64, 1, 8, 8)
    moved = {}
    for scale_lr in (False, True):
        student = copy.deepcopy(close)
        ghostify.finetune(
            student, data, teacher=teacher, max_steps=3, scale_lr=scale_lr, progress=False
        )
        moved[scale_lr] = float((student[3].weight - close[3].weight).detach().norm())
    assert 0 < moved[True] < 0.2 * moved[False], moved


def test_a_finetune_that_ends_further_from_the_teacher_warns() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    close = copy.deepcopy(teacher)
    with torch.no_grad():
        close[3].weight.mul_(1.05)
    data = torch.rand(64, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="further from the teacher than it started"):
        ghostify.finetune(  # a full-size lr of 0.5 throws a near-perfect student off
            close, data, teacher=teacher, lr=0.5, scale_lr=False, max_steps=3, progress=False
        )
    far = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ghostify.finetune(far, data, teacher=teacher, max_steps=20, progress=False)


def test_finetune_refuses_bad_settings_and_unconverted_models() -> None:
    model = digits.make_cnn()
    with pytest.raises(ConfigError, match="epochs must be an int >= 0; got -1"):
        ghostify.finetune(model, torch.rand(8, 1, 8, 8), epochs=-1)
    with pytest.raises(ghostify.GhostifyError, match="no conversion record"):
        ghostify.finetune(model, torch.rand(8, 1, 8, 8))


def test_progress_is_off_under_pytest_unless_asked_for() -> None:
    assert not distributed.progress_enabled(None)
    assert distributed.progress_enabled(True)
    assert not distributed.progress_enabled(False)


def test_frozen_batchnorm_trains_the_weights_under_the_running_statistics() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)
    ).eval()
    data = torch.randn(64, 3, 10, 10) * 3 + 1  # far from the statistics BatchNorms start with
    student = ghostify.convert(copy.deepcopy(teacher), ratio=2, progress=False)
    runs = {}
    for batchnorm in ("frozen", "train"):
        model = copy.deepcopy(student)
        ghostify.finetune(
            model,
            data,
            teacher=teacher,
            max_steps=4,
            batchnorm=batchnorm,
            reestimate_batchnorm=False,
            progress=False,
        )
        runs[batchnorm] = model
    frozen, trained = runs["frozen"][1], runs["train"][1]
    assert torch.equal(frozen.running_mean, student[1].running_mean)  # never updated
    assert not torch.equal(frozen.weight, student[1].weight)  # but its affine weights trained
    assert not torch.allclose(trained.running_mean, student[1].running_mean)  # batch statistics
    with pytest.raises(ConfigError, match="batchnorm must be 'frozen' or 'train'; got 'eval'"):
        ghostify.finetune(copy.deepcopy(student), data, teacher=teacher, batchnorm="eval")


def test_frozen_batchnorm_first_sets_the_statistics_of_the_data() -> None:
    """Set before the steps (on the weights as they came), not after: the trained weights are
    fitted to those statistics."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    data = torch.randn(32, 3, 6, 6) * 2 + 1
    student = ghostify.convert(copy.deepcopy(teacher), ratio=2, progress=False)
    with torch.no_grad():
        before = student[0](data)
    ghostify.finetune(
        student, data, teacher=teacher, lr=0.05, max_steps=3, batchnorm="frozen", progress=False
    )
    with torch.no_grad():
        after = student[0](data)
    assert not torch.allclose(before, after, atol=1e-3)  # the convolution did train
    assert torch.allclose(student[1].running_mean, before.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(student[1].running_var, before.var(dim=(0, 2, 3)), rtol=1e-4)
