"""InfLoRAStrategy inside a user's own Avalanche loop: plugins that compose (or are refused), the user's own
optimiser and schedule, any class-incremental stream, task labels, sliced streams, and save/restore mid-stream."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins import (EarlyStoppingPlugin, EvaluationPlugin, LRSchedulerPlugin, LwFPlugin,
                                        ReplayPlugin)

from conftest import SyntheticImages, tiny_vit
from inflora_avalanche import InfLoRAStrategy, InfLoRAViT, load_strategy, save_strategy

CLASSES = list(range(6))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread."""


def _benchmark(labels=CLASSES, task_labels=False):
    train, test = SyntheticImages(labels, 16, 0), SyntheticImages(labels, 8, 1)
    return nc_benchmark(train, test, n_experiences=3, task_labels=task_labels, seed=0, fixed_class_order=list(labels))


def _evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True), loggers=[])


def _strategy(plugins=(), seed=0, target_modules=None, **kwargs):
    torch.manual_seed(seed)
    model = InfLoRAViT(tiny_vit(seed=seed), rank=2, target_modules=target_modules)
    kwargs = {"lr": 1e-2, "train_epochs": 2, "train_mb_size": 16, "evaluator": _evaluator(), **kwargs}
    return InfLoRAStrategy(model=model, plugins=list(plugins), **kwargs)


def _stream_accuracy(metrics: dict) -> float:
    return next(v for k, v in metrics.items() if k.startswith("Top1_Acc_Stream"))


class LossRecorder(SupervisedPlugin):
    """Per training iteration: the labels, and how many of them belong to an earlier experience."""

    def __init__(self):
        super().__init__()
        self.old_targets = 0
        self.batches = 0

    def after_backward(self, strategy, **kwargs):
        current = set(strategy.experience.classes_in_this_experience)
        self.old_targets += sum(int(y) not in current for y in strategy.mb_y)
        self.batches += 1


# --------------------------------------------------------------------------------------------------- plugins
def test_lr_scheduler_plugin_is_refused_with_the_alternative():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plugin = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))
    with pytest.raises(ValueError, match="LRSchedulerPlugin.*scheduler_factory") as info:
        _strategy([plugin])
    assert "\n" not in str(info.value)


def test_users_own_optimizer_and_scheduler_factories():
    seen = []

    class Recorder(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            seen.append((type(strategy.optimizer).__name__, [g["lr"] for g in strategy.optimizer.param_groups]))

    strategy = _strategy(
        [Recorder()], lr=0.1, head_lr=0.2, train_epochs=3,
        optimizer_factory=lambda groups: torch.optim.RMSprop(groups),
        scheduler_factory=lambda optimizer, epochs: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )
    strategy.train(_benchmark().train_stream[0])
    assert [name for name, _ in seen] == ["RMSprop"] * 3
    assert [lrs for _, lrs in seen] == [pytest.approx([0.1, 0.2]), pytest.approx([0.05, 0.1]),
                                        pytest.approx([0.025, 0.05])]


def test_replayed_samples_train_on_the_heads_of_their_classes():
    """With Avalanche's ReplayPlugin, old-class samples reach the loss: each through its own task's head."""
    bench = _benchmark()
    recorder = LossRecorder()
    strategy = _strategy([ReplayPlugin(mem_size=48), recorder])
    losses = []

    class Check(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            # the loss equals the cross-entropy of every sample over its own task's columns
            model, out, y = strategy.model, strategy.mb_output, strategy.mb_y
            total = 0.0
            for classes in model.task_classes:
                mask = torch.isin(y, torch.tensor(classes))
                local = torch.tensor([classes.index(int(c)) for c in y[mask]], dtype=torch.long)
                total = total + torch.nn.functional.cross_entropy(out[mask][:, classes], local, reduction="sum")
            losses.append((float(strategy.loss), float(total) / len(y)))
            # the replayed samples' own loss reaches the current branches
            old = ~torch.isin(y, torch.tensor(model.task_classes[-1]))
            if model.num_tasks > 1 and old.any():
                columns = model.task_classes[0]
                local = torch.tensor([columns.index(int(c)) for c in y[old]], dtype=torch.long)
                loss = torch.nn.functional.cross_entropy(out[old][:, columns], local)
                ups = [adapter.up for _, adapter in model.adapters()]
                grads = torch.autograd.grad(loss, ups, retain_graph=True)
                old_grads.append(sum(float(g.abs().sum()) for g in grads))

    old_grads: list = []
    strategy.plugins.append(Check())
    for experience in list(bench.train_stream)[:2]:
        strategy.train(experience)
    assert recorder.old_targets > 0  # replayed samples were in the batches of experience 2
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in losses)
    assert old_grads and all(g > 0 for g in old_grads)


def test_early_stopping_stops_an_experience_and_the_stream_goes_on():
    bench = _benchmark()
    epochs = []

    class Epochs(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            epochs.append(strategy.clock.train_exp_counter)

    stopper = EarlyStoppingPlugin(patience=1, val_stream_name="test_stream", metric_name="Top1_Acc_Stream")
    strategy = _strategy([stopper, Epochs()], train_epochs=6, eval_every=1)
    for t, experience in enumerate(bench.train_stream):
        strategy.train(experience, eval_streams=[bench.test_stream[: t + 1]])
    counts = [epochs.count(t) for t in range(3)]
    assert min(counts) < 6 and all(c >= 1 for c in counts)  # stopped early at least once, every task trained
    assert strategy.model.num_tasks == 3 and not strategy.model.task_open


def test_lwf_plugin_adds_its_distillation_and_is_refused_with_an_input_transform():
    bench = _benchmark()
    losses = {}
    for name, plugins in (("plain", []), ("lwf", [LwFPlugin(alpha=10.0, temperature=2.0)])):
        recorder = []

        class Loss(SupervisedPlugin):
            def before_backward(self, strategy, **kwargs):
                recorder.append((strategy.experience.current_experience, float(strategy.loss)))

        strategy = _strategy([*plugins, Loss()])
        for experience in list(bench.train_stream)[:2]:
            strategy.train(experience)
        losses[name] = recorder
    first = [loss for t, loss in losses["plain"] if t == 0]
    assert first == [loss for t, loss in losses["lwf"] if t == 0]  # nothing to distil from on the first task
    assert [loss for t, loss in losses["lwf"] if t == 1] != [loss for t, loss in losses["plain"] if t == 1]
    with pytest.raises(ValueError, match="LwFPlugin.*input_transform"):
        _strategy([LwFPlugin()], input_transform=lambda x, training: x)


def test_plugin_passes_use_the_strategys_forward():
    """``forward_context`` runs a forward as the strategy does (its input transform and autocast)."""
    strategy = _strategy(input_transform=lambda x, training: x * 0.5)
    strategy.train(_benchmark().train_stream[0])
    model = strategy.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = strategy.forward_context(training=False).features(model, x)
        expected = model.forward_pooled(x * 0.5)
    assert torch.equal(features, expected)


# --------------------------------------------------------------------------------------------------- streams
def test_benchmark_from_datasets_and_arbitrary_labels_work():
    labels = [40, 3, 17, 8, 25, 11]
    train, test = as_classification_dataset(SyntheticImages(labels, 16, 0)), as_classification_dataset(
        SyntheticImages(labels, 8, 1))
    # benchmark_from_datasets: no class timeline on the experiences; the classes come from the data
    one = benchmark_from_datasets(train=[train], test=[test])
    strategy = _strategy(num_tasks=1)
    strategy.train(one.train_stream[0])
    assert strategy.model.task_classes == [sorted(labels)]
    assert _stream_accuracy(strategy.eval(one.test_stream)) > 0.5
    # class_incremental_benchmark, any class order. Labels that are not 0..C-1: Avalanche splits the range 0..max,
    # so some of its experiences are empty; the error says how to build the stream instead, and that stream works.
    shuffled = class_incremental_benchmark(
        {"train": as_classification_dataset(SyntheticImages(CLASSES, 16, 0)),
         "test": as_classification_dataset(SyntheticImages(CLASSES, 8, 1))},
        class_order=[4, 0, 5, 2, 1, 3], num_experiences=3)
    strategy = _strategy()
    for experience in shuffled.train_stream:
        strategy.train(experience)
    assert strategy.model.task_classes == [[0, 4], [2, 5], [1, 3]]
    assert _stream_accuracy(strategy.eval(shuffled.test_stream)) > 1 / 6
    broken = class_incremental_benchmark({"train": train, "test": test}, class_order=labels, num_experiences=3)
    strategy = _strategy()
    strategy.train(broken.train_stream[0])
    with pytest.raises(ValueError, match="experience 1 has no training samples.*class_incremental_stream"):
        strategy.train(broken.train_stream[1])
    from inflora_avalanche.streams import class_incremental_stream

    bench = class_incremental_stream(SyntheticImages(labels, 16, 0), SyntheticImages(labels, 8, 1), 3, labels)
    strategy = _strategy()
    for experience in bench.train_stream:
        strategy.train(experience)
    assert strategy.model.task_classes == [[3, 40], [8, 17], [11, 25]]
    assert _stream_accuracy(strategy.eval(bench.test_stream)) > 1 / 6


def test_task_labels_give_task_aware_prediction():
    bench = _benchmark(task_labels=True)
    strategy = _strategy()
    for experience in bench.train_stream:
        strategy.train(experience)
    class_incremental = _stream_accuracy(strategy.eval(bench.test_stream))
    assert strategy.task_label_classes == {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    strategy.eval_task_labels = True
    task_aware = _stream_accuracy(strategy.eval(bench.test_stream))
    assert task_aware > class_incremental and task_aware > 0.8


def test_a_sliced_stream_needs_num_tasks():
    bench = _benchmark()
    with pytest.raises(ValueError, match="slice of 2 of the stream's 3 experiences; pass num_tasks="):
        _strategy().train(bench.train_stream[:2][0])
    strategy = _strategy(num_tasks=3)
    strategy.train(bench.train_stream[:2][0])
    assert strategy.subspace_plugin.num_tasks == 3


# --------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("targets", [None, ["mlp.fc1", "mlp.fc2"], "all-linear"])
def test_continuing_after_restore_equals_not_stopping(tmp_path, targets):
    """Train experience 1, save; a fresh strategy (new model, new plugins) restores it and trains experience 2:
    bit for bit what the uninterrupted strategy gives, model, memory and RNG included, whatever layers are
    adapted."""
    bench = _benchmark()
    uninterrupted = _strategy(target_modules=targets)
    uninterrupted.train(bench.train_stream[0])
    save_strategy(uninterrupted, tmp_path / "after_exp1.safetensors")
    uninterrupted.train(bench.train_stream[1])
    expected = uninterrupted.eval(bench.test_stream)

    torch.manual_seed(123)  # anything in between: the restore brings the RNG back
    restored = _strategy(seed=0, target_modules=targets)
    load_strategy(restored, tmp_path / "after_exp1.safetensors")
    assert restored.model.task_classes == [[0, 1]] and not restored.model.task_open
    restored.train(bench.train_stream[1])
    got = restored.eval(bench.test_stream)
    assert got == expected
    a, b = uninterrupted.model.state_dict(), restored.model.state_dict()
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    memory_a = uninterrupted.subspace_plugin.state_dict()["layers"]
    memory_b = restored.subspace_plugin.state_dict()["layers"]
    assert set(memory_a) == set(memory_b) == {name for name, _ in restored.model.adapters()}
    if targets is not None:  # the branches live where they were asked for, and were trained and saved there
        assert {name.split(".", 2)[2] for name in memory_a} >= {"mlp.fc1", "mlp.fc2"}
        assert all(a.num_finished == 4 for _, a in restored.model.adapters())
    for layer in memory_a:
        assert torch.equal(memory_a[layer]["basis"], memory_b[layer]["basis"]), layer
