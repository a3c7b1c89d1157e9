"""Subspace math of InfLoRA: input covariances, the design of the down-projection, and GPM / DualGPM memory.

Torch only, no Avalanche import, so every function can be tested on plain matrices. Covariances are accumulated in
float32 on the model's device; decompositions and projections run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

MemoryKind = Literal["remove", "retain"]
MemoryAlgorithm = Literal["dualgpm", "gpm"]
MEMORY_ALGORITHMS = ("dualgpm", "gpm")
DOWN_SCALE = 1.0 / math.sqrt(3.0)  # the reference divides the designed singular vectors by sqrt(3)


class CovarianceAccumulator:
    """Running uncentred covariance ``(1/N) sum x x^T`` over all token vectors seen by :meth:`update`.

    The sum lives on the device of the first batch, in float32; each update is one matmul.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.sum: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None  # kept on the device: no host sync per batch

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add every vector along the last axis of ``x`` (any leading shape)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of width {self.dim}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim).float()
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, device=flat.device, dtype=torch.float32)
            self.count = torch.zeros((), device=flat.device, dtype=torch.float64)
        self.sum.addmm_(flat.T, flat)
        self.count += flat.shape[0]

    @property
    def num_vectors(self) -> int:
        return 0 if self.count is None else int(self.count.item())

    def covariance(self) -> torch.Tensor:
        """The accumulated covariance, float64, symmetrised."""
        if self.sum is None or self.num_vectors == 0:
            raise ValueError("no inputs were accumulated: the pass over the experience's data saw no samples")
        cov = self.sum.double() / self.count
        return 0.5 * (cov + cov.T)


def energy_threshold(task: int, num_tasks: int, lamb: float, lame: float) -> float:
    """The threshold schedule ``eps_t = lamb + (lame - lamb) * t / T``."""
    validate_thresholds(lamb, lame)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return lamb + (lame - lamb) * task / num_tasks


def validate_thresholds(lamb: float, lame: float) -> None:
    if not 0.0 < lamb <= 1.0:
        raise ValueError(f"lamb must be in (0, 1], got {lamb}; the paper uses 0.95 (CIFAR-100) or 0.98 (ImageNet-R)")
    if not 0.0 < lame <= 1.0:
        raise ValueError(f"lame must be in (0, 1], got {lame}; the paper uses 1.0")
    if lame < lamb:
        raise ValueError(f"lame ({lame}) must be >= lamb ({lamb}): the threshold grows from lamb to lame over tasks")


@dataclass
class LayerMemory:
    """The subspace memory of one layer: an orthonormal basis (d x k, float64) and what it spans.

    ``remove``: the basis spans the old tasks' input space. ``retain``: it spans the complement, the still-free space.
    """

    dim: int
    basis: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kind: MemoryKind = "remove"

    def __post_init__(self) -> None:
        if self.basis is None:
            self.basis = torch.zeros(self.dim, 0, dtype=torch.float64)
        if self.kind not in ("remove", "retain"):
            raise ValueError(f"memory kind must be 'remove' or 'retain', got {self.kind!r}")

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])

    @property
    def is_empty(self) -> bool:
        return self.kind == "remove" and self.size == 0

    def projector(self, device: Optional[torch.device] = None) -> torch.Tensor:
        basis = self.basis.to(device=device, dtype=torch.float64)
        return basis @ basis.T

    def old_space_dim(self) -> int:
        """Dimension of the space the old tasks occupy, whatever the kind."""
        return self.size if self.kind == "remove" else self.dim - self.size

    def state_dict(self) -> dict:
        return {"basis": self.basis.detach().cpu().clone(), "kind": self.kind}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LayerMemory":
        basis = state["basis"].to(torch.float64)
        return cls(dim=int(basis.shape[0]), basis=basis, kind=state["kind"])


def project_out_old_inputs(cov: torch.Tensor, memory: Optional[LayerMemory]) -> torch.Tensor:
    """``C~``: the covariance with the old tasks' input space projected away (``remove``) or kept out (``retain``)."""
    cov = cov.to(torch.float64)
    if memory is None or memory.is_empty:
        return cov
    proj = memory.projector(cov.device)
    if memory.kind == "remove":
        return cov - proj @ cov
    return proj @ cov


def design_down_projection(cov: torch.Tensor, rank: int, memory: Optional[LayerMemory] = None) -> torch.Tensor:
    """The frozen down-projection ``D`` (rank x d, float64): leading left singular vectors of ``C~``, over sqrt(3)."""
    dim = cov.shape[0]
    if not 0 < rank < dim:
        raise ValueError(f"rank must be in [1, {dim - 1}] for width {dim}, got {rank}")
    projected = project_out_old_inputs(cov, memory)
    left, _, _ = torch.linalg.svd(projected, full_matrices=False)
    return canonical_signs(left[:, :rank]).T.contiguous() * DOWN_SCALE


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` (columns) with each column's sign chosen so that its largest-magnitude entry is positive.

    LAPACK may return a singular vector or its negation for the same input (seen: the same matrix, bit for bit,
    decomposed twice in one process); the span, the projector and everything trained from it are the same either
    way (Adam is sign-equivariant, so a negated ``down`` trains an exactly negated ``up``), but the stored tensors
    would differ. A fixed sign keeps saved states and resumed runs bit-identical."""
    if vectors.numel() == 0:
        return vectors
    peak = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vectors, 0, peak))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def _first_task_components(sq: torch.Tensor, eps: float) -> int:
    share = torch.cumsum(sq, 0) / sq.sum()
    return max(1, int((share < eps).sum().item()))


def update_memory(memory: LayerMemory, cov: torch.Tensor, eps: float, algorithm: MemoryAlgorithm = "dualgpm") -> LayerMemory:
    """One memory update with the covariance ``cov`` of a finished task's inputs and threshold ``eps``.

    Follows the reference: shares of energy use the squared singular values of the covariance itself. Returns a new
    :class:`LayerMemory`; the argument is not modified.
    """
    if algorithm not in MEMORY_ALGORITHMS:
        raise ValueError(f"memory must be one of {MEMORY_ALGORITHMS}, got {algorithm!r}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {eps}")
    cov = cov.to(torch.float64)
    dim = memory.dim
    if cov.shape != (dim, dim):
        raise ValueError(f"covariance must be {dim} x {dim}, got {tuple(cov.shape)}")
    basis = memory.basis.to(device=cov.device, dtype=torch.float64)
    kind: MemoryKind = memory.kind

    left, sing, _ = torch.linalg.svd(cov, full_matrices=False)
    sq = sing**2
    total = sq.sum()
    if total <= 0:
        raise ValueError("the covariance is zero: the task's inputs carry no energy")

    if memory.is_empty:
        # (fix) the reference stores these vectors as 'retain' when they fill half the space; they span the old inputs.
        basis = left[:, : _first_task_components(sq, eps)]
        kind = "remove"
    elif kind == "remove":
        residual = cov - basis @ (basis.T @ cov)
        res_left, res_sing, _ = torch.linalg.svd(residual, full_matrices=False)
        res_share = res_sing**2 / total
        acc = float((total - (res_sing**2).sum()) / total)
        added = 0
        for share in res_share.tolist():
            if acc >= eps:
                break
            acc += share
            added += 1
        if added:
            basis = torch.cat([basis, res_left[:, :added]], dim=1)[:, :dim]
    else:  # retain: the basis spans the free space; shrink it by what the new task occupies
        inside = basis @ (basis.T @ cov)
        in_left, in_sing, _ = torch.linalg.svd(inside, full_matrices=False)
        in_share = in_sing**2 / total
        acc = float((in_sing**2).sum() / total)
        taken = 0
        for share in in_share.tolist():
            if acc < 1.0 - eps:
                break
            acc -= share
            taken += 1
        if taken:
            used = in_left[:, :taken]
            shrunk = basis - used @ (used.T @ basis)
            keep = max(basis.shape[1] - taken, 0)
            shrunk_left, _, _ = torch.linalg.svd(shrunk, full_matrices=False)
            basis = shrunk_left[:, :keep]

    if algorithm == "dualgpm" and kind == "remove" and basis.shape[1] > dim / 2:
        basis = orthogonal_complement(basis)
        kind = "retain"
    return LayerMemory(dim=dim, basis=basis.cpu(), kind=kind)


def orthogonal_complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (d x (d - k)) of the complement of the span of ``basis`` (d x k, orthonormal columns)."""
    dim, k = basis.shape
    full, _, _ = torch.linalg.svd(basis.to(torch.float64), full_matrices=True)
    return full[:, k:dim].contiguous()


def energy_in_subspace(cov: torch.Tensor, memory: LayerMemory) -> float:
    """Share of the input energy ``trace(C)`` that lies in the old tasks' subspace (a diagnostic)."""
    cov = cov.to(torch.float64)
    total = torch.trace(cov)
    if total <= 0 or memory.is_empty:
        return 0.0
    inside = torch.trace(memory.projector(cov.device) @ cov)
    if memory.kind == "retain":
        inside = total - inside
    return float(inside / total)
