"""Classifier alignment (SLCA; the "InfLoRA+CA" variant) as an Avalanche plugin.

The pure math lives in :mod:`inflora_avalanche.alignment_math`; this module holds the plugin.

Protocol the plugin needs from ``strategy.model`` (or ``strategy.model.module`` when wrapped):

- ``forward_pooled(x) -> (B, d)`` (an ``InfLoRAViT``), or else ``forward_features(x) -> (B, d)``: the pre-head
  feature of a batch of inputs;
- ``heads``: a sequence of modules, one per task, each mapping ``(B, d)`` features to that task's logits;
- ``task_classes``: a sequence (aligned with ``heads``) of the dataset labels each head's columns stand for.

and from the strategy: ``experience`` (its ``dataset.eval()`` gives the test-time view), ``device``,
``eval_mb_size``; the feature pass runs as the strategy runs its forwards (:func:`plugins.forward_context`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

from .alignment_math import (
    COVARIANCE_KINDS,
    ClassMomentAccumulator,
    cosine_factor,
    covariance_factor,
    lowrank_covariance,
    mean_scale_factors,
    normalized_logit_loss,
    sample_gaussian,
)
from .plugins import forward_context

LR_SCHEDULES = ("cosine", "constant")
STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = "" if high == float("inf") else f" and < {high}"
        raise ValueError(f"{name} must be a number {bound}{upper}, got {value!r}")


def feature_model(model: nn.Module) -> nn.Module:
    """The module with ``forward_features``, ``heads`` and ``task_classes`` inside ``model`` (unwraps ``.module``)."""
    inner = getattr(model, "module", model)
    missing = [a for a in ("forward_features", "heads", "task_classes") if not hasattr(inner, a)]
    if missing:
        raise TypeError(
            f"classifier alignment needs a model with forward_features(x), heads and task_classes; "
            f"{type(inner).__name__} lacks {', '.join(missing)}"
        )
    return inner


class ClassifierAlignmentPlugin(SupervisedPlugin):
    """SLCA classifier alignment after every training experience.

    After each training experience, one no-grad pass over the experience's training data with test-time
    transforms gives, per new class, the mean and covariance of the pre-head features (float64 sums; kept on the
    strategy's device). From the second experience on, the heads of all seen tasks are retrained on features
    sampled from the class Gaussians ``N(mu_c * s_c, S_c + eps I)``, ``s_c = 0.9 + 0.1 (task(c) + 1) / (t + 1)``,
    with cross-entropy on normalised logits (divided by the mean per-task logit norm and by ``temperature``).
    Only the heads' parameters are trained; their ``requires_grad`` flags are restored afterwards.

    Add it after the plugin that finishes the task (for InfLoRA, the strategy's ``SubspaceUpdatePlugin`` comes
    first by default). All arguments are JSON-able; defaults are the InfLoRA+CA reference values.

    Args:
        epochs: alignment epochs per experience.
        samples_per_class: features drawn per seen class in each epoch.
        batch_size: minibatch size of the alignment SGD.
        lr, momentum, weight_decay: SGD settings of the heads.
        lr_schedule: ``"cosine"`` (per-epoch cosine annealing over ``epochs``) or ``"constant"``.
        temperature: divides the normalised logits.
        logit_normalization: ``False`` trains on raw logits (plain cross-entropy, no temperature).
        covariance_eps: added to the covariance diagonal before sampling.
        mean_scaling: shrink older tasks' class means as above (``False``: sample around the means).
        covariance: ``"full"`` (one d x d per class, the reference), ``"shared"`` (one pooled within-class
            covariance for all classes) or ``"lowrank"`` (per class ``covariance_rank`` leading directions plus
            an isotropic residual). See ``docs/classifier-alignment.md`` for the memory trade-off.
        covariance_rank: rank kept by ``"lowrank"``.
        storage_dtype: ``"float32"`` or ``"float64"``, dtype of the stored covariances (sums are float64 anyway).
        seed: seeds the sampling (with the task index); ``None`` uses torch's global generator.
        num_workers: workers of the feature-pass DataLoader.
        eval_mb_size: batch size of the feature pass; ``None`` uses the strategy's ``eval_mb_size``.
    """

    def __init__(
        self,
        epochs: int = 5,
        samples_per_class: int = 256,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "cosine",
        temperature: float = 0.1,
        logit_normalization: bool = True,
        covariance_eps: float = 1e-4,
        mean_scaling: bool = True,
        covariance: str = "full",
        covariance_rank: int = 32,
        storage_dtype: str = "float32",
        seed: Optional[int] = None,
        num_workers: int = 0,
        eval_mb_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_int("epochs", epochs, 1)
        _check_int("samples_per_class", samples_per_class, 1)
        _check_int("batch_size", batch_size, 1)
        _check_float("lr", lr, 0.0, low_open=True)
        _check_float("momentum", momentum, 0.0, 1.0)
        _check_float("weight_decay", weight_decay, 0.0)
        _check_float("temperature", temperature, 0.0, low_open=True)
        _check_float("covariance_eps", covariance_eps, 0.0)
        _check_int("covariance_rank", covariance_rank, 1)
        _check_int("num_workers", num_workers, 0)
        if eval_mb_size is not None:
            _check_int("eval_mb_size", eval_mb_size, 1)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if covariance not in COVARIANCE_KINDS:
            raise ValueError(f"covariance must be one of {COVARIANCE_KINDS}, got {covariance!r}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}, got {storage_dtype!r}")
        if not isinstance(logit_normalization, bool) or not isinstance(mean_scaling, bool):
            raise ValueError("logit_normalization and mean_scaling must be true or false")
        if seed is not None:
            _check_int("seed", seed, 0)
        self.epochs = epochs
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.lr_schedule = lr_schedule
        self.temperature = float(temperature)
        self.logit_normalization = logit_normalization
        self.covariance_eps = float(covariance_eps)
        self.mean_scaling = mean_scaling
        self.covariance_kind = covariance
        self.covariance_rank = covariance_rank
        self.storage_dtype = storage_dtype
        self.seed = seed
        self.num_workers = num_workers
        self.eval_mb_size = eval_mb_size

        self.counts: Dict[int, int] = {}
        self.means: Dict[int, torch.Tensor] = {}  # float64, (d,)
        self.covariances: Dict[int, torch.Tensor] = {}  # "full": (d, d) without eps
        self.lowrank_factors: Dict[int, torch.Tensor] = {}  # "lowrank": (d, k)
        self.lowrank_noise: Dict[int, float] = {}  # "lowrank": isotropic residual variance
        self.shared_scatter: Optional[torch.Tensor] = None  # "shared": float64 (d, d) sum of class scatters
        self.shared_dof: int = 0
        self.loss_history: list[list[float]] = []  # mean alignment loss per epoch, one list per alignment

    # ----------------------------------------------------------------------------------------------- config
    @property
    def aligns_single_class_tasks(self) -> bool:
        """Whether alignment can teach a task of one class apart from the others: not with logit normalisation,
        which divides each task's logits by their norm and so leaves a one-class head only its sign."""
        return not self.logit_normalization

    def config(self) -> dict:
        """The constructor arguments (JSON-able)."""
        return {
            "epochs": self.epochs,
            "samples_per_class": self.samples_per_class,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "lr_schedule": self.lr_schedule,
            "temperature": self.temperature,
            "logit_normalization": self.logit_normalization,
            "covariance_eps": self.covariance_eps,
            "mean_scaling": self.mean_scaling,
            "covariance": self.covariance_kind,
            "covariance_rank": self.covariance_rank,
            "storage_dtype": self.storage_dtype,
            "seed": self.seed,
            "num_workers": self.num_workers,
            "eval_mb_size": self.eval_mb_size,
        }

    # ----------------------------------------------------------------------------------------------- callback
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = feature_model(strategy.model)
        device = torch.device(strategy.device)
        self.to(device)
        self.update_statistics(strategy, model, device)
        if len(model.heads) > 1:
            self.align(model, device)

    # ----------------------------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def update_statistics(self, strategy: Any, model: nn.Module, device: torch.device) -> list[int]:
        """Feature statistics of every class in the current experience (test-time view); returns those classes."""
        dataset = strategy.experience.dataset.eval()
        batch = self.eval_mb_size or getattr(strategy, "eval_mb_size", None) or 64
        # A private generator: creating a loader iterator draws a seed, which must not advance the global RNG (the
        # training run with alignment then follows the same path as the one without).
        loader = DataLoader(
            dataset, batch_size=batch, shuffle=False, num_workers=self.num_workers, generator=torch.Generator()
        )
        forward = forward_context(strategy, training=False)
        accumulator: Optional[ClassMomentAccumulator] = None
        was_training = model.training
        model.eval()
        try:
            for mbatch in loader:
                x, y = mbatch[0].to(device), mbatch[1].to(device)
                features = forward.features(model, x)
                if accumulator is None:
                    accumulator = ClassMomentAccumulator(features.shape[1], device)
                accumulator.update(features.float(), y)
        finally:
            model.train(was_training)
        if accumulator is None:
            raise ValueError("the experience has no training samples: classifier alignment has no features to use")
        self._store(accumulator)
        return accumulator.classes

    def _store(self, acc: ClassMomentAccumulator) -> None:
        dtype = STORAGE_DTYPES[self.storage_dtype]
        if self.covariance_kind == "lowrank" and self.covariance_rank > acc.dim:
            raise ValueError(
                f"covariance_rank={self.covariance_rank} exceeds the feature dimension {acc.dim}; lower it, "
                "or use covariance='full'"
            )
        for label in acc.classes:
            n = acc.count(label)
            self.counts[label] = n
            self.means[label] = acc.mean(label)
            if self.covariance_kind == "full":
                self.covariances[label] = acc.covariance(label).to(dtype)
            elif self.covariance_kind == "lowrank":
                factor, noise = lowrank_covariance(acc.covariance(label), self.covariance_rank)
                self.lowrank_factors[label] = factor.to(dtype)
                self.lowrank_noise[label] = noise
            else:
                scatter = acc.scatter(label)
                self.shared_scatter = scatter if self.shared_scatter is None else self.shared_scatter + scatter
                self.shared_dof += n - 1

    @property
    def classes(self) -> list[int]:
        """Classes with statistics."""
        return sorted(self.means)

    def covariance(self, label: int) -> torch.Tensor:
        """The covariance that class ``label``'s features are sampled from (float64, eps included)."""
        if label not in self.means:
            raise KeyError(f"no statistics for class {label}; known classes: {self.classes}")
        dim = self.means[label].shape[0]
        eye = torch.eye(dim, dtype=torch.float64, device=self.means[label].device)
        if self.covariance_kind == "full":
            cov = self.covariances[label].double()
        elif self.covariance_kind == "lowrank":
            factor = self.lowrank_factors[label].double()
            cov = factor @ factor.T + self.lowrank_noise[label] * eye
        else:
            assert self.shared_scatter is not None
            cov = self.shared_scatter / max(self.shared_dof, 1)
        return cov + self.covariance_eps * eye

    def memory_bytes(self) -> int:
        """Bytes held by the stored statistics."""
        tensors = list(self.means.values()) + list(self.covariances.values()) + list(self.lowrank_factors.values())
        if self.shared_scatter is not None:
            tensors.append(self.shared_scatter)
        return sum(t.numel() * t.element_size() for t in tensors)

    def sample(
        self, labels: list[int], scales: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples_per_class`` float32 features per class of ``labels`` (means times ``scales``), and the index of
        each sample's class in ``labels``."""
        n = self.samples_per_class
        shared_factor = None
        if self.covariance_kind == "shared":
            shared_factor = covariance_factor(self.covariance(labels[0]))
        chunks = []
        for label, scale in zip(labels, scales.tolist()):
            mean = self.means[label] * scale
            if self.covariance_kind == "lowrank":
                noise_std = (self.lowrank_noise[label] + self.covariance_eps) ** 0.5
                chunks.append(sample_gaussian(mean, self.lowrank_factors[label], n, noise_std, generator))
            else:
                factor = shared_factor if shared_factor is not None else covariance_factor(self.covariance(label))
                chunks.append(sample_gaussian(mean, factor, n, 0.0, generator))
        features = torch.cat(chunks)
        targets = torch.arange(len(labels), device=features.device).repeat_interleave(n)
        return features, targets

    # ----------------------------------------------------------------------------------------------- alignment
    def align(self, model: nn.Module, device: torch.device) -> list[float]:
        """Retrain all heads on sampled features; returns the mean loss of each epoch."""
        heads = list(model.heads)
        task_classes = [[int(c) for c in classes] for classes in model.task_classes]
        if len(task_classes) != len(heads):
            raise ValueError(f"model has {len(heads)} heads but {len(task_classes)} task_classes entries")
        labels = [c for classes in task_classes for c in classes]
        missing = [c for c in labels if c not in self.means]
        if missing:
            raise RuntimeError(
                f"no feature statistics for classes {missing}: the plugin must be attached from the first "
                "experience on (or its state loaded) so that every seen class has statistics"
            )
        current = len(heads) - 1
        task_of = [t for t, classes in enumerate(task_classes) for _ in classes]
        if self.mean_scaling:
            scales = mean_scale_factors(task_of, current)
        else:
            scales = torch.ones(len(labels), dtype=torch.float64)
        sizes = [len(c) for c in task_classes]
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.seed + current)

        params = [p for head in heads for p in head.parameters()]
        dtypes = [next(head.parameters()).dtype for head in heads]
        flags = [p.requires_grad for p in params]
        modes = [head.training for head in heads]
        losses: list[float] = []
        try:
            for p in params:
                p.requires_grad_(True)
            for head in heads:
                head.eval()
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
                for epoch in range(self.epochs):
                    factor = cosine_factor(epoch, self.epochs) if self.lr_schedule == "cosine" else 1.0
                    for group in optimizer.param_groups:
                        group["lr"] = self.lr * factor
                    with torch.no_grad():
                        features, targets = self.sample(labels, scales, generator)
                        order = torch.randperm(len(targets), device=device, generator=generator)
                        features, targets = features[order], targets[order]
                    total, count = 0.0, 0
                    for start in range(0, len(targets), self.batch_size):
                        x = features[start : start + self.batch_size]
                        y = targets[start : start + self.batch_size]
                        logits = torch.cat([head(x.to(dtype)) for head, dtype in zip(heads, dtypes)], dim=1).float()
                        if self.logit_normalization:
                            loss = normalized_logit_loss(logits, y, sizes, self.temperature)
                        else:
                            loss = nn.functional.cross_entropy(logits, y)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach()) * len(y)
                        count += len(y)
                    losses.append(total / count)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
            for head, mode in zip(heads, modes):
                head.train(mode)
        self.loss_history.append(losses)
        return losses

    # ----------------------------------------------------------------------------------------------- state
    def to(self, device: torch.device) -> "ClassifierAlignmentPlugin":
        """Move the statistics to ``device``."""
        self.means = {c: t.to(device) for c, t in self.means.items()}
        self.covariances = {c: t.to(device) for c, t in self.covariances.items()}
        self.lowrank_factors = {c: t.to(device) for c, t in self.lowrank_factors.items()}
        if self.shared_scatter is not None:
            self.shared_scatter = self.shared_scatter.to(device)
        return self

    def state_dict(self) -> dict:
        """Configuration and class statistics (tensors keep their device)."""
        return {
            "config": self.config(),
            "counts": dict(self.counts),
            "means": dict(self.means),
            "covariances": dict(self.covariances),
            "lowrank_factors": dict(self.lowrank_factors),
            "lowrank_noise": dict(self.lowrank_noise),
            "shared_scatter": self.shared_scatter,
            "shared_dof": self.shared_dof,
            "loss_history": [list(h) for h in self.loss_history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore statistics saved by :meth:`state_dict` (the covariance kind must match)."""
        saved = state["config"]
        for key in ("covariance", "covariance_rank"):
            if saved[key] != self.config()[key] and (key == "covariance" or self.covariance_kind == "lowrank"):
                raise ValueError(
                    f"statistics were saved with {key}={saved[key]!r} but this plugin has {key}="
                    f"{self.config()[key]!r}; construct the plugin with the saved value"
                )
        self.counts = {int(c): int(n) for c, n in state["counts"].items()}
        self.means = {int(c): t for c, t in state["means"].items()}
        self.covariances = {int(c): t for c, t in state["covariances"].items()}
        self.lowrank_factors = {int(c): t for c, t in state["lowrank_factors"].items()}
        self.lowrank_noise = {int(c): float(v) for c, v in state["lowrank_noise"].items()}
        self.shared_scatter = state["shared_scatter"]
        self.shared_dof = int(state["shared_dof"])
        self.loss_history = [list(h) for h in state.get("loss_history", [])]
