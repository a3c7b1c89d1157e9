"""Classifier alignment (InfLoRA+CA): statistics, sampling, loss, the plugin in a stream, state and bad settings."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from conftest import SyntheticImages, tiny_vit
from inflora_avalanche import InfLoRAStrategy, InfLoRAViT
from inflora_avalanche.alignment import ClassifierAlignmentPlugin
from inflora_avalanche.alignment_math import (
    ClassMomentAccumulator,
    covariance_factor,
    lowrank_covariance,
    mean_scale_factors,
    normalized_logit_loss,
    normalized_logits,
    sample_gaussian,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Every tensor here is tiny: one thread avoids OpenMP waits that made these tests ~30x slower on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_covariance(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- pure math
def test_class_moments_equal_direct_computation():
    gen = torch.Generator().manual_seed(0)
    features = 100.0 + torch.randn(300, 6, generator=gen) * torch.linspace(0.1, 3.0, 6)  # large offset
    labels = torch.randint(0, 4, (300,), generator=gen)
    acc = ClassMomentAccumulator(6)
    for start in range(0, 300, 37):  # uneven batches
        acc.update(features[start : start + 37], labels[start : start + 37])
    assert acc.classes == [0, 1, 2, 3]
    for c in range(4):
        x = features[labels == c].double()
        assert acc.count(c) == x.shape[0]
        torch.testing.assert_close(acc.mean(c), x.mean(0), rtol=0, atol=1e-10)
        torch.testing.assert_close(acc.covariance(c), torch.cov(x.T), rtol=1e-9, atol=1e-9)


def test_single_sample_class_has_zero_covariance():
    acc = ClassMomentAccumulator(3)
    acc.update(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([5]))
    assert torch.equal(acc.covariance(5), torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("singular", [False, True])
def test_covariance_factor_reconstructs(singular):
    cov = random_covariance(8, seed=1)
    if singular:  # rank 3: Cholesky fails, the eigen-root takes over
        v = torch.randn(8, 3, dtype=torch.float64)
        cov = v @ v.T
    factor = covariance_factor(cov)
    torch.testing.assert_close(factor @ factor.T, cov, rtol=1e-8, atol=1e-8)


def test_sampling_reproduces_mean_and_covariance():
    cov = random_covariance(5, seed=2)
    mean = torch.tensor([3.0, -1.0, 0.5, 10.0, 0.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = sample_gaussian(mean, covariance_factor(cov), 60000, generator=gen).double()
    assert x.dtype == torch.float64 and x.shape == (60000, 5)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.05 * cov.diagonal().max().item())


def test_lowrank_is_exact_for_spiked_covariance_and_keeps_the_trace():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    spiked = v @ v.T * 5 + 0.2 * torch.eye(10, dtype=torch.float64)
    factor, noise = lowrank_covariance(spiked, 3)
    assert factor.shape == (10, 3) and noise == pytest.approx(0.2)
    torch.testing.assert_close(factor @ factor.T + noise * torch.eye(10, dtype=torch.float64), spiked)
    general = random_covariance(10, seed=5)
    factor, noise = lowrank_covariance(general, 4)
    approx = factor @ factor.T + noise * torch.eye(10, dtype=torch.float64)
    assert approx.trace().item() == pytest.approx(general.trace().item())
    gen = torch.Generator().manual_seed(6)
    x = sample_gaussian(torch.zeros(10, dtype=torch.float64), factor, 60000, noise**0.5, gen)
    torch.testing.assert_close(torch.cov(x.double().T), approx, rtol=0, atol=0.06 * approx.diagonal().max().item())


def test_mean_scaling_rule():
    scales = mean_scale_factors([0, 0, 1, 2], current_task=2)
    expected = torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(scales, expected)
    with pytest.raises(ValueError, match="class tasks"):
        mean_scale_factors([3], current_task=2)


def test_normalized_logit_loss_formula_and_scale_invariance():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 5, generator=gen) * 3
    targets = torch.tensor([0, 2, 4, 1])
    sizes = [2, 3]
    norms = (logits[:, :2].norm(dim=1) + logits[:, 2:].norm(dim=1)) / 2 + 1e-7
    expected = nn.functional.cross_entropy(logits / norms[:, None] / 0.1, targets)
    torch.testing.assert_close(normalized_logit_loss(logits, targets, sizes, 0.1), expected)
    # Dividing by the logit norm makes the loss blind to a common rescaling of all logits.
    torch.testing.assert_close(
        normalized_logit_loss(7.5 * logits, targets, sizes, 0.1), normalized_logit_loss(logits, targets, sizes, 0.1)
    )
    with pytest.raises(ValueError, match="task_sizes"):
        normalized_logits(logits, [2, 2], 0.1)


# ----------------------------------------------------------------------------------------------- protocol model
class GaussianHeadsModel(nn.Module):
    """Protocol model for any strategy: identity features, one linear head per task, ``task_classes``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Linear(dim, dim)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.eye(dim))
            self.backbone.bias.zero_()
        self.backbone.requires_grad_(False)
        self.heads = nn.ModuleList()
        self.task_classes: list[list[int]] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return torch.cat([h(f) for h in self.heads], dim=1)


class ListDataset(torch.utils.data.Dataset):
    """``(x, y)`` pairs with an ``eval()`` view, as Avalanche datasets have."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor | None = None) -> None:
        self.x, self.y, self.eval_x = x, y, eval_x

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])

    def eval(self) -> "ListDataset":
        return ListDataset(self.eval_x if self.eval_x is not None else self.x, self.y)


def fake_strategy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mb: int, eval_x=None) -> SimpleNamespace:
    """The strategy attributes the plugin reads (any strategy with the protocol model has them)."""
    return SimpleNamespace(
        model=model, device="cpu", eval_mb_size=mb, experience=SimpleNamespace(dataset=ListDataset(x, y, eval_x))
    )


def gaussian_stream(num_tasks: int, classes_per_task: int, dim: int, per_class: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num = num_tasks * classes_per_task
    centres = 2.0 * torch.randn(num, dim, generator=gen)
    scales = 0.5 + torch.rand(num, dim, generator=gen)

    def draw(c: int, n: int) -> torch.Tensor:
        return centres[c] + scales[c] * torch.randn(n, dim, generator=gen)

    tasks = []
    for t in range(num_tasks):
        classes = list(range(t * classes_per_task, (t + 1) * classes_per_task))
        x = torch.cat([draw(c, per_class) for c in classes])
        tasks.append((classes, x, torch.tensor(classes).repeat_interleave(per_class)))
    test_x = torch.cat([draw(c, 200) for c in range(num)])
    test_y = torch.arange(num).repeat_interleave(200)
    return tasks, test_x, test_y


def train_new_head(model: GaussianHeadsModel, classes: list[int], x: torch.Tensor, y: torch.Tensor, bias: float):
    """Fit the new task's head on its own classes only (as InfLoRA does), then bias it upwards."""
    head = nn.Linear(x.shape[1], len(classes))
    model.heads.append(head)
    model.task_classes.append(classes)
    local = y - classes[0]
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), local).backward()
        opt.step()
    with torch.no_grad():
        head.bias += bias
    head.requires_grad_(False)


def test_alignment_raises_accuracy_when_later_heads_dominate():
    torch.manual_seed(0)
    tasks, test_x, test_y = gaussian_stream(num_tasks=3, classes_per_task=2, dim=8, per_class=100, seed=0)

    def run(align: bool) -> float:
        model = GaussianHeadsModel(8)
        plugin = ClassifierAlignmentPlugin(epochs=5, samples_per_class=128, batch_size=128, seed=0)
        for t, (classes, x, y) in enumerate(tasks):
            train_new_head(model, classes, x, y, bias=3.0 * t)  # newer heads have ever larger logits
            strategy = fake_strategy(model, x, y, 64)
            if align:
                plugin.after_training_exp(strategy)
        with torch.no_grad():
            return (model(test_x).argmax(1) == test_y).float().mean().item()

    before, after = run(False), run(True)
    assert before < 0.6, f"the biased stream should be poor without alignment, got {before:.3f}"
    assert after > before + 0.25, f"alignment should fix the bias: {before:.3f} -> {after:.3f}"
    assert after > 0.85


def test_protocol_statistics_use_the_eval_view():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(40, 4, generator=gen)
    y = torch.tensor([0, 1] * 20)
    noisy = clean + 10 * torch.randn(40, 4, generator=gen)  # what an augmented training view would give
    model = GaussianHeadsModel(4)
    model.heads.append(nn.Linear(4, 2))
    model.task_classes.append([0, 1])
    plugin = ClassifierAlignmentPlugin()
    strategy = fake_strategy(model, noisy, y, 7, clean)
    plugin.after_training_exp(strategy)
    for c in (0, 1):
        x = clean[y == c].double()
        torch.testing.assert_close(plugin.means[c], x.mean(0))
        expected = torch.cov(x.T) + 1e-4 * torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(plugin.covariance(c), expected, rtol=1e-6, atol=1e-6)
    assert plugin.loss_history == []  # a single task: nothing to align


@pytest.mark.parametrize("kind", ["shared", "lowrank"])
def test_compact_covariances(kind):
    tasks, _, _ = gaussian_stream(num_tasks=1, classes_per_task=3, dim=6, per_class=50, seed=2)
    classes, x, y = tasks[0]
    model = GaussianHeadsModel(6)
    model.heads.append(nn.Linear(6, 3))
    model.task_classes.append(classes)
    strategy = fake_strategy(model, x, y, 32)
    full = ClassifierAlignmentPlugin(covariance="full", storage_dtype="float64")
    compact = ClassifierAlignmentPlugin(covariance=kind, covariance_rank=2, storage_dtype="float64")
    full.after_training_exp(strategy)
    compact.after_training_exp(strategy)
    eye = torch.eye(6, dtype=torch.float64)
    if kind == "shared":
        pooled = sum((y == c).sum().item() - 1 for c in classes)
        expected = sum((full.covariance(c) - 1e-4 * eye) * ((y == c).sum().item() - 1) for c in classes) / pooled
        for c in classes:
            torch.testing.assert_close(compact.covariance(c), expected + 1e-4 * eye)
    else:
        for c in classes:
            factor, noise = lowrank_covariance(full.covariance(c) - 1e-4 * eye, 2)
            torch.testing.assert_close(compact.covariance(c), factor @ factor.T + (noise + 1e-4) * eye)
            assert compact.covariance(c).trace().item() == pytest.approx(full.covariance(c).trace().item())
    assert compact.memory_bytes() < full.memory_bytes()
    # The plugin's sampler follows the stored Gaussians.
    compact.samples_per_class = 20000
    feats, targets = compact.sample(classes, torch.ones(3, dtype=torch.float64), torch.Generator().manual_seed(0))
    for i, c in enumerate(classes):
        s = feats[targets == i].double()
        torch.testing.assert_close(s.mean(0), compact.means[c], rtol=0, atol=0.1)
        cov = compact.covariance(c)
        torch.testing.assert_close(torch.cov(s.T), cov, rtol=0, atol=0.08 * cov.diagonal().max().item())


# ----------------------------------------------------------------------------------------------- InfLoRA stream
class BiasNewestHead(SupervisedPlugin):
    """Makes the newest head dominate (a strong form of the new-class bias CA corrects)."""

    def after_training_exp(self, strategy, **kwargs):
        with torch.no_grad():
            strategy.model.heads[-1].bias += 4.0


class Snapshot(SupervisedPlugin):
    """Records the backbone and heads at its point in the plugin order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        self.records.append(
            {
                "backbone": {k: v.clone() for k, v in model.backbone.state_dict().items() if torch.is_tensor(v)},
                "heads": [h.weight.detach().clone() for h in model.heads],
                "flags": [p.requires_grad for p in model.parameters()],
                "task_open": model.task_open,
            }
        )


def inflora_stream(seed: int = 0):
    train = SyntheticImages(range(6), per_class=24, seed=seed, noise=0.3)
    test = SyntheticImages(range(6), per_class=12, seed=seed + 100, noise=0.3)
    noise = lambda x: x + 2.0 * torch.randn_like(x)  # noqa: E731 -- train-only augmentation
    bench = nc_benchmark(
        train, test, n_experiences=3, task_labels=False, fixed_class_order=list(range(6)), train_transform=noise
    )
    return bench, test


def run_inflora(plugins, seed: int = 0):
    torch.manual_seed(seed)
    bench, test = inflora_stream(seed)
    model = InfLoRAViT(tiny_vit(seed=seed), rank=2)
    strategy = InfLoRAStrategy(
        model=model, lr=5e-3, train_mb_size=24, train_epochs=2, eval_mb_size=36, num_tasks=3,
        plugins=plugins, evaluator=EvaluationPlugin(), device="cpu",
    )  # fmt: skip
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
    model.eval()
    with torch.no_grad():
        pred = model(test.x).argmax(1)
    return model, (pred == torch.tensor(test.targets)).float().mean().item(), strategy


def test_inflora_stream_alignment_fixes_bias_and_keeps_backbone_bit_exact():
    _, biased_acc, _ = run_inflora([BiasNewestHead()])
    before, after = Snapshot(), Snapshot()
    plugin = ClassifierAlignmentPlugin(epochs=5, samples_per_class=64, batch_size=64, seed=0)
    model, aligned_acc, strategy = run_inflora([BiasNewestHead(), before, plugin, after])
    assert strategy.plugins.index(strategy.subspace_plugin) < strategy.plugins.index(plugin)
    assert biased_acc < 0.5, f"the biased heads should make new classes dominate, got {biased_acc:.3f}"
    assert aligned_acc > biased_acc + 0.2, f"alignment: {biased_acc:.3f} -> {aligned_acc:.3f}"
    assert sorted(plugin.means) == list(range(6))
    assert len(plugin.loss_history) == 2 and all(len(h) == 5 for h in plugin.loss_history)
    for b, a in zip(before.records, after.records):
        assert not b["task_open"]  # the subspace plugin has merged and frozen the task first
        for key, tensor in b["backbone"].items():
            assert torch.equal(tensor, a["backbone"][key]), f"backbone tensor {key} changed"
        assert a["flags"] == b["flags"]  # requires_grad restored (heads frozen again)
    assert not any(torch.equal(w0, w1) for w0, w1 in zip(before.records[2]["heads"], after.records[2]["heads"]))
    assert all(torch.equal(w0, w1) for w0, w1 in zip(before.records[0]["heads"], after.records[0]["heads"]))
    # Statistics are those of the eval view (no augmentation) through the final features.
    test = SyntheticImages(range(6), per_class=24, seed=0, noise=0.3)
    x = test.x[torch.tensor(test.targets) == 5]
    with torch.no_grad():
        feats = model.forward_pooled(x).double()
    torch.testing.assert_close(plugin.means[5], feats.mean(0), rtol=1e-5, atol=1e-5)
    eye = torch.eye(feats.shape[1], dtype=torch.float64)
    torch.testing.assert_close(plugin.covariance(5), torch.cov(feats.T) + 1e-4 * eye, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- state and settings
def test_state_dict_round_trip_and_reproducible_alignment():
    tasks, _, _ = gaussian_stream(num_tasks=2, classes_per_task=2, dim=5, per_class=30, seed=3)
    model = GaussianHeadsModel(5)
    plugin = ClassifierAlignmentPlugin(epochs=2, samples_per_class=16, batch_size=8, seed=1)
    for classes, x, y in tasks[:1]:
        train_new_head(model, classes, x, y, bias=0.0)
        plugin.after_training_exp(fake_strategy(model, x, y, 16))
    buffer = io.BytesIO()
    torch.save(plugin.state_dict(), buffer)
    restored = ClassifierAlignmentPlugin(**json.loads(json.dumps(plugin.config())))
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.classes == plugin.classes
    for c in plugin.classes:
        assert torch.equal(restored.covariance(c), plugin.covariance(c))
    classes, x, y = tasks[1]
    train_new_head(model, classes, x, y, bias=0.0)
    heads0 = [{k: v.clone() for k, v in h.state_dict().items()} for h in model.heads]
    results = []
    for p in (plugin, restored):
        for h, s in zip(model.heads, heads0):
            h.load_state_dict(s)
        p.after_training_exp(fake_strategy(model, x, y, 16))
        results.append([h.weight.clone() for h in model.heads])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="covariance='full'"):
        ClassifierAlignmentPlugin(covariance="shared").load_state_dict(plugin.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"samples_per_class": 2.5}, "samples_per_class must be an integer"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"momentum": 1.0}, "momentum must be a number"),
        ({"temperature": -0.1}, "temperature must be a number > 0"),
        ({"covariance_eps": -1e-4}, "covariance_eps must be a number >= 0"),
        ({"covariance": "diag"}, "covariance must be one of"),
        ({"covariance_rank": 0}, "covariance_rank must be an integer >= 1"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"storage_dtype": "float16"}, "storage_dtype must be one of"),
        ({"mean_scaling": "yes"}, "must be true or false"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierAlignmentPlugin(**kwargs)


def test_misuse_gives_clear_errors():
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    strategy = fake_strategy(nn.Linear(4, 2), x, y, 4)
    with pytest.raises(TypeError, match="forward_features"):
        ClassifierAlignmentPlugin().after_training_exp(strategy)
    model = GaussianHeadsModel(4)
    model.heads.append(nn.Linear(4, 2))
    model.task_classes.append([0, 1])
    strategy.model = model
    with pytest.raises(ValueError, match="covariance_rank=8 exceeds the feature dimension 4"):
        ClassifierAlignmentPlugin(covariance="lowrank", covariance_rank=8).after_training_exp(strategy)
    model.heads.append(nn.Linear(4, 2))
    model.task_classes.append([2, 3])
    late = ClassifierAlignmentPlugin()
    with pytest.raises(RuntimeError, match=r"no feature statistics for classes \[2, 3\]"):
        late.after_training_exp(strategy)  # attached late: classes 2, 3 never had statistics


def test_plugin_leaves_the_global_rng_alone():
    tasks, _, _ = gaussian_stream(num_tasks=2, classes_per_task=2, dim=4, per_class=20, seed=4)
    model = GaussianHeadsModel(4)
    plugin = ClassifierAlignmentPlugin(epochs=1, samples_per_class=8, batch_size=8, seed=0)
    torch.manual_seed(123)
    for classes, x, y in tasks:
        train_new_head(model, classes, x, y, bias=0.0)
        state = torch.get_rng_state()
        plugin.after_training_exp(fake_strategy(model, x, y, 8))
        assert torch.equal(torch.get_rng_state(), state)
    assert plugin.loss_history  # the alignment ran
