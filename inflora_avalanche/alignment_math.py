"""Classifier-alignment math (SLCA, used by InfLoRA+CA), free of Avalanche.

Per-class feature statistics accumulated in float64, Gaussian sampling from full, shared or low-rank covariances,
the mean-scaling rule and the normalised-logit cross-entropy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

COVARIANCE_KINDS = ("full", "shared", "lowrank")
LOGIT_NORM_EPS = 1e-7


class ClassMomentAccumulator:
    """Streaming per-class count, mean and scatter matrix of feature vectors, in float64.

    Each class's sums are taken relative to its first sample (the "shifted data" algorithm), so the scatter stays
    accurate when features have a large mean. Tensors live on ``device``.
    """

    def __init__(self, dim: int, device: Optional[torch.device] = None) -> None:
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = dim
        self.device = device
        self._shift: dict[int, torch.Tensor] = {}
        self._sum: dict[int, torch.Tensor] = {}
        self._outer: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of ``features`` (N, dim) with integer ``labels`` (N,)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        features = features.to(device=self.device, dtype=torch.float64)
        labels = labels.to(self.device)
        for label in torch.unique(labels).tolist():
            x = features[labels == label]
            if label not in self._count:
                self._shift[label] = x[0].clone()
                self._sum[label] = torch.zeros_like(x[0])
                self._outer[label] = x.new_zeros(self.dim, self.dim)
                self._count[label] = 0
            xs = x - self._shift[label]
            self._sum[label] += xs.sum(0)
            self._outer[label].addmm_(xs.T, xs)
            self._count[label] += x.shape[0]

    @property
    def classes(self) -> list[int]:
        return sorted(self._count)

    def count(self, label: int) -> int:
        return self._count[label]

    def mean(self, label: int) -> torch.Tensor:
        return self._shift[label] + self._sum[label] / self._count[label]

    def scatter(self, label: int) -> torch.Tensor:
        """``sum_i (x_i - mean)(x_i - mean)^T`` over the class's samples (float64)."""
        s, n = self._sum[label], self._count[label]
        scatter = self._outer[label] - torch.outer(s, s) / n
        return (scatter + scatter.T) / 2

    def covariance(self, label: int) -> torch.Tensor:
        """The unbiased sample covariance (as ``torch.cov``); zero for a class with a single sample."""
        return self.scatter(label) / max(self._count[label] - 1, 1)


def lowrank_covariance(covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Probabilistic-PCA approximation ``U U^T + noise * I`` of a covariance, keeping its trace.

    ``U`` (d, rank) spans the ``rank`` leading eigenvectors, scaled by ``sqrt(lambda_i - noise)``; ``noise`` is the mean
    of the remaining eigenvalues (the maximum-likelihood isotropic residual). Computed in float64.
    """
    dim = covariance.shape[-1]
    if not 1 <= rank <= dim:
        raise ValueError(f"covariance_rank must be in [1, {dim}] (the feature dimension), got {rank}")
    eigvals, eigvecs = torch.linalg.eigh(covariance.double())  # ascending
    eigvals = eigvals.clamp_min(0.0)
    top_vals, top_vecs = eigvals[-rank:], eigvecs[:, -rank:]
    noise = float(eigvals[:-rank].mean()) if rank < dim else 0.0
    return top_vecs * (top_vals - noise).clamp_min(0.0).sqrt(), noise


def covariance_factor(covariance: torch.Tensor) -> torch.Tensor:
    """A float64 matrix ``A`` with ``A A^T = covariance``: Cholesky, or (for a singular matrix) a clamped eigen-root."""
    cov = covariance.double()
    cov = (cov + cov.T) / 2
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return factor
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return eigvecs * eigvals.clamp_min(0.0).sqrt()


def sample_gaussian(
    mean: torch.Tensor,
    factor: Optional[torch.Tensor],
    num_samples: int,
    noise_std: float = 0.0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``num_samples`` draws of ``mean + factor @ z1 + noise_std * z2`` with standard normal z1, z2.

    Their covariance is ``factor @ factor.T + noise_std**2 * I``; ``factor`` may be square (full covariance),
    tall (d, k) for a low-rank one, or ``None`` for an isotropic one.
    """
    dim = mean.shape[-1]
    out = mean.to(dtype).expand(num_samples, dim).clone()
    if factor is not None:
        z = torch.randn(num_samples, factor.shape[1], device=mean.device, dtype=dtype, generator=generator)
        out.addmm_(z, factor.to(dtype).T)
    if noise_std > 0:
        noise = torch.randn(num_samples, dim, device=mean.device, dtype=dtype, generator=generator)
        out.add_(noise, alpha=noise_std)
    return out


def mean_scale_factors(task_of_class: Sequence[int], current_task: int) -> torch.Tensor:
    """SLCA's mean scaling ``0.9 + 0.1 * (task(c) + 1) / (t + 1)``: older classes' means are shrunk more."""
    tasks = torch.as_tensor(list(task_of_class), dtype=torch.float64)
    if len(tasks) and (tasks.min() < 0 or tasks.max() > current_task):
        raise ValueError(f"class tasks must be in [0, {current_task}], got {tasks.tolist()}")
    return 0.9 + 0.1 * (tasks + 1) / (current_task + 1)


def normalized_logits(logits: torch.Tensor, task_sizes: Sequence[int], temperature: float) -> torch.Tensor:
    """Logits divided by the mean over tasks of each task's logit L2 norm (+1e-7), then by ``temperature``.

    ``logits`` holds the tasks' columns side by side, ``task_sizes[i]`` columns for task i.
    """
    if sum(task_sizes) != logits.shape[-1]:
        raise ValueError(f"task_sizes sum to {sum(task_sizes)} but logits have {logits.shape[-1]} columns")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    norms = torch.stack([chunk.norm(p=2, dim=-1) for chunk in logits.split(list(task_sizes), dim=-1)], dim=-1)
    scale = norms.mean(dim=-1, keepdim=True) + LOGIT_NORM_EPS
    return logits / scale / temperature


def normalized_logit_loss(
    logits: torch.Tensor, targets: torch.Tensor, task_sizes: Sequence[int], temperature: float
) -> torch.Tensor:
    """Cross-entropy on :func:`normalized_logits` (targets index the concatenated columns)."""
    return F.cross_entropy(normalized_logits(logits, task_sizes, temperature), targets)


def cosine_factor(epoch: int, num_epochs: int) -> float:
    """``CosineAnnealingLR`` with ``T_max = num_epochs`` stepped per epoch: ``(1 + cos(pi e / E)) / 2``."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))
