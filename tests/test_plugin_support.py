"""Every Avalanche plugin is supported or refused at construction; the user's criterion is honoured on every path or
refused; evaluation works before any training with any metric, without inflated losses; online streams and lone
classes are refused before anything runs."""

from __future__ import annotations

import math

import avalanche.training.plugins as avalanche_plugins
import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics, topk_acc_metrics
from avalanche.training.losses import MaskedCrossEntropy
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from torch import nn

from conftest import SyntheticImages, tiny_vit
from inflora_avalanche import InfLoRAStrategy, InfLoRAViT, SDLoRAStrategy
from inflora_avalanche.alignment import ClassifierAlignmentPlugin
from inflora_avalanche.plugin_support import REFUSED_PLUGINS, SUPPORTED_PLUGINS
from inflora_avalanche.sdlora import SDLoRAViT

AVALANCHE_PLUGINS = sorted(name for name in dir(avalanche_plugins)
                           if isinstance(getattr(avalanche_plugins, name), type)
                           and issubclass(getattr(avalanche_plugins, name), SupervisedPlugin))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread."""


def _benchmark(labels=tuple(range(6)), experiences=3):
    labels = list(labels)
    return nc_benchmark(SyntheticImages(labels, 16, 0), SyntheticImages(labels, 8, 1), n_experiences=experiences,
                        task_labels=False, seed=0, fixed_class_order=labels)


def _strategy(plugins=(), criterion=None, evaluator=None, sd_lora=False, **kwargs):
    torch.manual_seed(0)
    extra = {} if criterion is None else {"criterion": criterion}
    evaluator = evaluator or EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    common = dict(train_epochs=1, train_mb_size=16, evaluator=evaluator, plugins=list(plugins), **extra, **kwargs)
    if sd_lora:
        return SDLoRAStrategy(model=SDLoRAViT(tiny_vit(), rank=2), **common)
    return InfLoRAStrategy(model=InfLoRAViT(tiny_vit(), rank=2), lr=1e-2, **common)


# ------------------------------------------------------------------------------------------------- plugins
def test_every_avalanche_plugin_is_either_supported_or_refused():
    assert AVALANCHE_PLUGINS, "no plugin classes found in avalanche.training.plugins"
    undecided = [n for n in AVALANCHE_PLUGINS if n not in REFUSED_PLUGINS and n not in SUPPORTED_PLUGINS]
    assert not undecided, f"Avalanche plugins with no decision: {undecided}"
    assert not set(REFUSED_PLUGINS) & set(SUPPORTED_PLUGINS)


@pytest.mark.parametrize("name", sorted(REFUSED_PLUGINS))
@pytest.mark.parametrize("sd_lora", [False, True], ids=["inflora", "sd_lora"])
def test_refused_plugins_are_refused_at_construction_in_one_line(name, sd_lora):
    cls = getattr(avalanche_plugins, name)
    plugin = cls.__new__(cls)  # the type decides; no constructor arguments needed
    with pytest.raises(ValueError) as info:
        _strategy([plugin], sd_lora=sd_lora)
    message = str(info.value)
    assert message.startswith(f"{name} cannot be used with a low-rank strategy: ") and "\n" not in message


def test_a_subclass_of_a_refused_plugin_is_refused_and_a_users_own_plugin_is_accepted():
    from inflora_avalanche.methods.finetune import SaveableEWCPlugin

    with pytest.raises(ValueError, match="SaveableEWCPlugin cannot be used with a low-rank strategy: it protects"):
        _strategy([SaveableEWCPlugin(ewc_lambda=1.0)])

    class Mine(SupervisedPlugin):
        pass

    assert any(isinstance(p, Mine) for p in _strategy([Mine()]).plugins)


@pytest.mark.parametrize("name", ["EWCPlugin", "ReplayPlugin"])
def test_a_plugin_class_not_an_instance_is_refused_at_construction_in_one_line(name):
    """plugins=[EWCPlugin] (not called) used to pass the refusal and fail at the first train() with Avalanche's
    'before_training() missing 1 required positional argument'."""
    expected = rf"^plugins holds the class {name}, not a plugin: pass {name}\(\.\.\.\)"
    with pytest.raises(ValueError, match=expected) as info:
        _strategy([getattr(avalanche_plugins, name)])
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- criterion
@pytest.mark.parametrize("criterion, match", [
    (MaskedCrossEntropy(), "MaskedCrossEntropy indexes the whole output by dataset label"),
    (nn.CrossEntropyLoss(weight=torch.ones(6)), "class weights"),
    (nn.CrossEntropyLoss(ignore_index=0), "ignore_index=0"),
    (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
    ("cross_entropy", "must be callable"),
    (nn.CrossEntropyLoss, r"criterion is the class CrossEntropyLoss, not a criterion: pass CrossEntropyLoss\(\)"),
], ids=["masked", "weights", "ignore_index", "reduction none", "not callable", "a class, not called"])
def test_criteria_that_cannot_be_honoured_are_refused(criterion, match):
    with pytest.raises(ValueError, match=match):
        _strategy(criterion=criterion)


class MixedBatchRecorder(SupervisedPlugin):
    """The loss, outputs and labels of every training batch that mixes the current task with replayed samples."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def before_backward(self, strategy, **kwargs):
        model = strategy.model
        if strategy.experience.current_experience and len(set(strategy.mb_y.tolist()) - set(model.task_classes[-1])):
            self.batches.append((float(strategy.loss.detach()), strategy.mb_output.detach().clone(), strategy.mb_y.clone(),
                                 [list(c) for c in model.task_classes]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_users_criterion_scores_replayed_batches_task_by_task(reduction):
    """With ReplayPlugin, a batch mixes tasks; each task's samples are scored by the user's criterion (label smoothing
    here) on their own head, combined as its reduction says."""
    criterion = nn.CrossEntropyLoss(label_smoothing=0.5, reduction=reduction)
    recorder = MixedBatchRecorder()
    strategy = _strategy([ReplayPlugin(mem_size=24), recorder], criterion=criterion)
    for experience in list(_benchmark().train_stream)[:2]:
        strategy.train(experience)
    assert recorder.batches
    for loss, out, y, task_classes in recorder.batches:
        expected = {s: 0.0 for s in (0.5, 0.0)}
        for classes in task_classes:
            mask = torch.isin(y, torch.tensor(classes))
            if mask.any():
                local = torch.tensor([classes.index(int(c)) for c in y[mask]])
                for smoothing in expected:
                    part = F.cross_entropy(out[mask][:, classes], local, label_smoothing=smoothing, reduction="sum")
                    expected[smoothing] += float(part)
        scale = len(y) if reduction == "mean" else 1
        assert loss == pytest.approx(expected[0.5] / scale, rel=1e-5)
        assert abs(loss - expected[0.0] / scale) > 1e-3  # the smoothing made a difference: it was not dropped


# ------------------------------------------------------------------------------------------------- evaluation
def _losses(results: dict) -> dict:
    return {k.split("/")[-1]: v for k, v in results.items() if k.startswith("Loss_Exp")}


def test_evaluation_before_training_works_with_top_k_and_losses_are_not_inflated():
    benchmark = _benchmark()
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), topk_acc_metrics(top_k=3, stream=True),
                                 loss_metrics(experience=True), loggers=[])
    strategy = _strategy(evaluator=evaluator)
    before = strategy.eval(benchmark.test_stream)
    assert all(v == pytest.approx(math.log(6)) for v in _losses(before).values())  # nothing known: uniform
    strategy.train(benchmark.train_stream[0])
    after = strategy.eval(benchmark.test_stream)
    losses = _losses(after)
    assert losses["Exp000"] < math.log(2)  # the learned classes: their loss over the two known ones
    assert all(math.log(2) < losses[e] < 20 for e in ("Exp001", "Exp002"))  # unseen: finite, not ~1e4
    # Accuracy still comes from the model's own output (unseen classes never predicted).
    model = strategy.model
    x = torch.stack([benchmark.test_stream[0].dataset[i][0] for i in range(8)])
    assert set(model.eval()(x).argmax(1).tolist()) <= set(model.seen_classes)


def test_evaluation_loss_on_known_classes_is_the_criterion_over_known_columns():
    benchmark = _benchmark()
    evaluator = EvaluationPlugin(loss_metrics(experience=True), loggers=[])
    strategy = _strategy(evaluator=evaluator, criterion=nn.CrossEntropyLoss(label_smoothing=0.2))
    strategy.train(benchmark.train_stream[0])
    loss = _losses(strategy.eval(benchmark.test_stream[:1]))["Exp000"]
    data = benchmark.test_stream[0].dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = strategy.model.eval()(x)[:, [0, 1]]
    assert loss == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.2)), rel=1e-5)


# ------------------------------------------------------------------------------------------------- streams
def test_online_sub_experiences_are_refused_before_anything_runs():
    strategy = _strategy()
    online = split_online_stream(_benchmark().train_stream, experience_size=8)
    with pytest.raises(ValueError, match="one task per experience.*split_online_stream"):
        strategy.train(next(iter(online)))
    assert strategy.model.num_tasks == 0


@pytest.mark.parametrize("sd_lora", [False, True], ids=["inflora", "sd_lora"])
def test_a_lone_class_is_refused_unless_alignment_can_learn_it(sd_lora):
    benchmark = _benchmark(experiences=6)
    with pytest.raises(ValueError, match="single class.*ClassifierAlignmentPlugin\\(logit_normalization=False\\)"):
        _strategy(sd_lora=sd_lora).train(benchmark.train_stream[0])
    normalised = ClassifierAlignmentPlugin(epochs=1, samples_per_class=8)
    with pytest.raises(ValueError, match="single class"):
        _strategy([normalised], sd_lora=sd_lora).train(benchmark.train_stream[0])
    strategy = _strategy([ClassifierAlignmentPlugin(logit_normalization=False, epochs=1, samples_per_class=8)],
                         sd_lora=sd_lora)
    for experience in list(benchmark.train_stream)[:2]:
        strategy.train(experience)
    assert strategy.model.task_classes == [[0], [1]]
