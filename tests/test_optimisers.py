"""Optimisers and schedules beyond the reference's: timm's optimisers by name, timm's and torch's schedulers from a
``scheduler_factory``, and the linear warmup of the built-in schedules (issue 20, item 4)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from timm.scheduler import CosineLRScheduler, PlateauLRScheduler, StepLRScheduler

from conftest import SyntheticImages, tiny_vit
from inflora_avalanche import InfLoRAStrategy, InfLoRAViT
from inflora_avalanche import training
from inflora_avalanche.optimizer_names import OPTIMIZER_ARGS, OWN_OPTIMIZERS, TIMM_OPTIMIZERS
from inflora_avalanche.run import cli
from inflora_avalanche.run import config as C


def two_tasks(per_class: int):
    data = {"train": SyntheticImages([0, 1, 2, 3], per_class, seed=0), "test": SyntheticImages([0, 1, 2, 3], 4, seed=1)}
    return class_incremental_benchmark(data, class_order=[0, 1, 2, 3], num_experiences=2)


class LrRecorder(SupervisedPlugin):
    """The learning rate of every group, per task, at the start of every epoch and of every iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[list[float]]] = []
        self.iterations: list[list[float]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.epochs.append([])
        self.iterations.append([])

    def before_training_epoch(self, strategy, **kwargs):
        self.epochs[-1].append([g["lr"] for g in strategy.optimizer.param_groups])

    def before_training_iteration(self, strategy, **kwargs):
        self.iterations[-1].append(strategy.optimizer.param_groups[0]["lr"])


def train(recorder: LrRecorder, experiences: int = 1, per_class: int = 8, **kwargs) -> InfLoRAStrategy:
    settings = dict(lr=1e-3, train_epochs=5, train_mb_size=16, plugins=[recorder],
                    evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    strategy = InfLoRAStrategy(model=InfLoRAViT(tiny_vit(), rank=2), **{**settings, **kwargs})
    for experience in two_tasks(per_class).train_stream[:experiences]:
        strategy.train(experience)
    return strategy


def timm_cosine(lr: float, t: int, total: int, warmup: int = 0, warmup_lr: float = 0.0, lr_min: float = 0.0):
    """timm's CosineLRScheduler written out: linear warmup from ``warmup_lr``, then cosine counted from 0."""
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / total))


# ------------------------------------------------------------------------------------------------- schedulers
def test_timm_cosine_with_warmup_sets_each_epochs_rate_in_every_task():
    recorder = LrRecorder()
    factory = lambda optimizer, epochs: CosineLRScheduler(  # noqa: E731
        optimizer, t_initial=epochs, warmup_t=2, warmup_lr_init=1e-5, lr_min=1e-6)
    train(recorder, experiences=2, head_lr=2e-3, scheduler_factory=factory)
    for task in recorder.epochs:  # rebuilt per task: the second task warms up again
        branches = [lrs[0] for lrs in task]
        heads = [lrs[1] for lrs in task]
        assert branches == pytest.approx([timm_cosine(1e-3, e, 5, 2, 1e-5, 1e-6) for e in range(5)], rel=1e-12)
        assert heads == pytest.approx([timm_cosine(2e-3, e, 5, 2, 1e-5, 1e-6) for e in range(5)], rel=1e-12)
    assert recorder.epochs[0][0][0] == pytest.approx(1e-5) and recorder.epochs[0][2][0] < 1e-3


def test_timm_per_update_schedule_is_stepped_after_every_optimiser_step():
    recorder = LrRecorder()
    updates = 3 * 2  # 48 samples at 16 a batch, 2 epochs
    factory = lambda optimizer, epochs: CosineLRScheduler(  # noqa: E731
        optimizer, t_initial=updates, t_in_epochs=False, warmup_t=2, warmup_lr_init=1e-4)
    train(recorder, per_class=24, train_epochs=2, scheduler_factory=factory)
    assert recorder.iterations[0] == pytest.approx([timm_cosine(1e-3, u, updates, 2, 1e-4) for u in range(updates)])


def test_timm_step_scheduler_and_torch_schedulers_keep_their_own_conventions():
    recorder = LrRecorder()
    train(recorder, train_epochs=4, scheduler_factory=lambda o, e: StepLRScheduler(o, decay_t=2, decay_rate=0.5))
    assert [lrs[0] for lrs in recorder.epochs[0]] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    recorder = LrRecorder()
    train(recorder, per_class=24, train_epochs=2,
          scheduler_factory=lambda o, e: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    assert [lrs[0] for lrs in recorder.epochs[0]] == pytest.approx([1e-3, 5e-4])
    assert recorder.iterations[0] == pytest.approx([1e-3] * 3 + [5e-4] * 3)  # stepped per epoch, not per iteration


@pytest.mark.parametrize("factory, match", [
    (lambda o, e: None, "scheduler_factory must return a scheduler .* got NoneType"),
    (lambda o, e: "cosine", "scheduler_factory must return a scheduler .* got str"),
    (lambda o, e: o, "scheduler_factory must return a scheduler .* got Adam"),
    (lambda o, e: CosineLRScheduler, "must return a scheduler .* got the class CosineLRScheduler itself"),
    (lambda o, e: torch.optim.lr_scheduler.StepLR, "must return a scheduler .* got the class StepLR itself"),
    (lambda o, e: torch.optim.lr_scheduler.ReduceLROnPlateau(o), "ReduceLROnPlateau steps on a validation metric"),
    (lambda o, e: PlateauLRScheduler(o), "PlateauLRScheduler steps on a validation metric"),
], ids=["None", "a name", "the optimiser", "timm class", "torch class", "torch plateau", "timm plateau"])
def test_a_factory_that_returns_no_epoch_scheduler_is_refused_before_training(factory, match):
    recorder = LrRecorder()
    with pytest.raises(ValueError, match=match) as err:
        train(recorder, scheduler_factory=factory)
    assert "\n" not in str(err.value)
    assert recorder.iterations == []  # refused before the plugins' before_training_exp: nothing trained


# ------------------------------------------------------------------------------------------------- warmup
@pytest.mark.parametrize("schedule", training.LR_SCHEDULES)
def test_warmup_rises_linearly_then_the_schedule_runs_unshifted(schedule):
    epochs, warmup, start = 8, 3, 0.2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = training.epoch_scheduler(schedule, milestones=[5], gamma=0.5, warmup_epochs=warmup,
                                         warmup_factor=start)(optimizer, epochs)
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    plain = training.lr_factor(schedule, epochs, [5], 0.5)
    assert seen == pytest.approx([0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3] + [plain(e) for e in range(warmup, epochs)])
    # no warmup: the schedule's own factors, unchanged
    assert training.with_warmup(plain, 0, start) is plain


def test_strategy_warmup_through_training_and_the_reference_default_unchanged():
    recorder = LrRecorder()
    train(recorder, train_epochs=4, warmup_epochs=2, warmup_factor=0.5)
    assert [lrs[0] for lrs in recorder.epochs[0]] == pytest.approx(
        [5e-4, 7.5e-4] + [1e-3 * training.reference_cosine_factor(e, 4) for e in (2, 3)])
    recorder = LrRecorder()
    train(recorder, train_epochs=4)
    assert [lrs[0] for lrs in recorder.epochs[0]] == [1e-3 * training.reference_cosine_factor(e, 4)
                                                       for e in range(4)]


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_epochs": -1}, "warmup_epochs must be a whole number >= 0, got -1"),
    ({"warmup_epochs": 1.5}, "warmup_epochs must be a whole number >= 0, got 1.5"),
    ({"warmup_epochs": 5}, r"warmup_epochs \(5\) must be below the epochs of a task \(5\)"),
    ({"warmup_epochs": 1, "warmup_factor": 1.5}, r"warmup_factor .* must be in \[0, 1\], got 1.5"),
    ({"warmup_epochs": 1, "scheduler_factory": lambda o, e: None}, "with scheduler_factory put the warmup in your"),
    ({"optimizer": "adamx"}, "did you mean 'adamax'"),
    ({"optimizer": "sgd", "betas": (0.9, 0.99)}, "optimizer sgd takes no betas"),
    ({"optimizer": "adan", "betas": (0.9, 0.99)}, "optimizer adan takes 3 betas, got 2"),
    ({"optimizer": "adamw", "momentum": 0.5}, "optimizer adamw takes no momentum, got momentum=0.5; drop it"),
    ({"warmup_factor": 0.5}, "warmup_factor=0.5 does nothing without warmup_epochs"),
])
def test_bad_optimiser_and_warmup_settings_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        InfLoRAStrategy(model=InfLoRAViT(tiny_vit(), rank=2), train_epochs=5, **kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- optimisers
def test_timm_optimisers_by_name_keep_each_groups_rate_and_their_settings():
    groups = lambda: [{"params": [torch.nn.Parameter(torch.ones(3, 2))], "lr": 1e-3},  # noqa: E731
                      {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-2}]
    adamw = training.optimizer_factory("adamw", weight_decay=0.05)(groups())
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    assert [g["lr"] for g in adamw.param_groups] == [1e-3, 1e-2]
    lion = training.optimizer_factory("lion", betas=(0.8, 0.95))(groups())
    assert type(lion).__name__ == "Lion" and lion.defaults["betas"] == (0.8, 0.95)
    assert training.optimizer_factory("lion")(groups()).defaults["betas"] == (0.9, 0.99)  # timm's own default
    nesterov = training.optimizer_factory("nesterov", momentum=0.8)(groups())
    assert type(nesterov) is torch.optim.SGD and nesterov.defaults["nesterov"] and nesterov.defaults["momentum"] == 0.8
    # ours stay ours: the reference's Adam, and SGD with plain momentum (timm's "sgd" would be Nesterov)
    adam = training.optimizer_factory()(groups())
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.9, 0.999)
    sgd = training.optimizer_factory("sgd")(groups())
    assert type(sgd) is torch.optim.SGD and not sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9


def test_the_torch_free_table_matches_timms_registry_and_every_name_trains():
    from timm.optim import list_optimizers
    from timm.optim._optim_factory import default_registry

    assert set(TIMM_OPTIMIZERS) <= set(list_optimizers()) and set(OWN_OPTIMIZERS) <= set(OPTIMIZER_ARGS)
    for name in TIMM_OPTIMIZERS:
        info = default_registry.get_optimizer_info(name)
        assert OPTIMIZER_ARGS[name] == (info.num_betas if info.has_betas else 0, info.has_momentum), name
        torch.manual_seed(0)
        weight, bias = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(3))
        optimizer = training.optimizer_factory(name)([{"params": [weight], "lr": 1e-3}, {"params": [bias], "lr": 1e-2}])
        before = weight.detach().clone()
        for _ in range(2):
            optimizer.zero_grad()
            (torch.randn(5, 4) @ weight.t() + bias).pow(2).mean().backward()
            optimizer.step()
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2], name  # the schedule's rates stay
        assert torch.isfinite(weight).all() and not torch.equal(weight, before), name


def test_optimiser_names_are_checked_without_torch():
    code = ("import sys; from inflora_avalanche.optimizer_names import check_optimizer_name as c; c('lamb'); "
            "import inflora_avalanche.run.config; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- command line
def test_cli_takes_timm_optimisers_and_warmup_to_the_strategy():
    from inflora_avalanche.methods.inflora import low_rank_strategy_kwargs

    config = cli.config_from_argv(["--demo", "--optimizer", "lion", "--betas", "0.9", "0.99", "--weight-decay",
                                   "0.01", "--warmup-epochs", "1", "--warmup-factor", "0.25", "--epochs", "3"])
    kwargs = low_rank_strategy_kwargs(config, evaluator=None, plugins=[], device="cpu")
    assert (kwargs["optimizer"], kwargs["betas"], kwargs["warmup_epochs"], kwargs["warmup_factor"]) == (
        "lion", (0.9, 0.99), 1, 0.25)
    # a preset's Adam betas do not reach an optimiser without betas
    sgd = {**cli.config_from_argv(["--demo", "--optimizer", "sgd"]), "betas": [0.9, 0.999]}  # as from a preset
    assert low_rank_strategy_kwargs(sgd, evaluator=None, plugins=[], device="cpu")["betas"] is None
    assert cli.config_from_argv(["--demo", "--optimizer", "nesterov", "--momentum", "0.8"])["momentum"] == 0.8
    default = cli.config_from_argv(["--demo"])
    assert (default["optimizer"], default["betas"], default["warmup_epochs"]) == ("adam", None, 0)


@pytest.mark.parametrize("argv, needle", [
    (["--optimizer", "adamx"], "optimizer must be adam, sgd or one of timm's optimisers"),
    (["--optimizer", "addamw"], "did you mean 'adamw'?"),
    (["--optimizer", "bnbadamw"], "bnbadamw is one of timm's, left out here because it needs bitsandbytes"),
    (["--optimizer", "adan", "--betas", "0.9", "0.99"], "betas must be 3 numbers in [0, 1) for --optimizer adan"),
    (["--betas", "0.9", "1.5"], "betas must be 2 numbers in [0, 1) for --optimizer adam"),
    (["--optimizer", "nesterov", "--betas", "0.9", "0.99"], "--betas apply to --optimizer adam, not nesterov"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum applies to --optimizer sgd, not adamw"),
    (["--warmup-epochs", "2", "--epochs", "2"], "--warmup-epochs 2 must be below --epochs 2"),
    (["--warmup-epochs", "-1"], "warmup_epochs (the command line) must be >= 0, got -1"),
    (["--warmup-factor", "0.5"], "--warmup-factor applies to a warmup: add --warmup-epochs N"),
    (["--warmup-epochs", "1", "--warmup-factor", "2"], "--warmup-factor must be in [0, 1]"),
    (["--method", "naive", "--warmup-epochs", "1"], "naive trains with Adam at a constant rate"),
    (["--method", "naive", "--optimizer", "adamw"], "naive trains with Adam at a constant rate"),
])
def test_bad_optimiser_flags_are_one_line_exit_2_before_any_compute(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.run_main(["--demo", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(C.ConfigError):
        cli.config_from_argv(["--demo", *argv])
