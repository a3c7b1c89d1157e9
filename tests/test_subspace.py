"""Subspace math on matrices alone: accumulator, threshold schedule, down-projection design, GPM / DualGPM memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inflora_avalanche.subspace import (
    CovarianceAccumulator,
    LayerMemory,
    design_down_projection,
    energy_in_subspace,
    energy_threshold,
    orthogonal_complement,
    update_memory,
)


def random_covariance(dim: int, rank: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A PSD covariance of ``rank`` random directions with geometrically decaying energy, plus a small isotropic floor."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    weights = decay ** torch.arange(rank, dtype=torch.float64)
    return basis @ torch.diag(weights) @ basis.T + 1e-4 * torch.eye(dim, dtype=torch.float64)


# ------------------------------------------------------------------------------------- reference transcription (numpy)
def spec_update(basis: np.ndarray, kind: str, cov: np.ndarray, eps: float, dual: bool) -> tuple[np.ndarray, str]:
    """The memory update of the spec (inflora-algorithm.md, step 5), transcribed directly in numpy."""
    d = cov.shape[0]
    u, s, _ = np.linalg.svd(cov)
    total = (s**2).sum()
    if basis.shape[1] == 0 and kind == "remove":
        share = np.cumsum(s**2) / total
        r0 = max(1, int((share < eps).sum()))
        basis, kind = u[:, :r0], "remove"
    elif kind == "remove":
        r = cov - basis @ basis.T @ cov
        u2, s2, _ = np.linalg.svd(r)
        acc = (total - (s2**2).sum()) / total
        n = 0
        for i in range(len(s2)):
            if acc < eps:
                acc += s2[i] ** 2 / total
                n += 1
            else:
                break
        basis = np.hstack([basis, u2[:, :n]])[:, :d]
    else:
        r = basis @ basis.T @ cov
        u2, s2, _ = np.linalg.svd(r)
        acc = (s2**2).sum() / total
        n = 0
        for i in range(len(s2)):
            if acc >= 1 - eps:
                acc -= s2[i] ** 2 / total
                n += 1
            else:
                break
        if n:
            k = basis.shape[1]
            shrunk = basis - u2[:, :n] @ u2[:, :n].T @ basis
            u3, _, _ = np.linalg.svd(shrunk, full_matrices=False)
            basis = u3[:, : max(k - n, 0)]
    if dual and kind == "remove" and basis.shape[1] > d / 2:
        full, _, _ = np.linalg.svd(basis, full_matrices=True)
        basis, kind = full[:, basis.shape[1] :], "retain"
    return basis, kind


def projector(basis) -> np.ndarray:
    b = np.asarray(basis)
    return b @ b.T


def covariance_sequence(dim: int, tasks: int, seed: int) -> list[torch.Tensor]:
    return [random_covariance(dim, rank=dim // 3, seed=seed * 100 + t) for t in range(tasks)]


# ------------------------------------------------------------------------------------------------------------ tests
def test_accumulator_equals_direct_covariance():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 7, 16, generator=gen) for _ in range(3)]  # images x tokens x width
    acc = CovarianceAccumulator(16)
    for b in batches:
        acc.update(b)
    flat = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    expected = flat.T @ flat / flat.shape[0]
    assert acc.num_vectors == 84
    torch.testing.assert_close(acc.covariance(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="width 16"):
        acc.update(torch.randn(3, 8))
    with pytest.raises(ValueError, match="no inputs"):
        CovarianceAccumulator(4).covariance()


def test_threshold_schedule():
    assert energy_threshold(0, 10, 0.95, 1.0) == pytest.approx(0.95)
    assert energy_threshold(5, 10, 0.95, 1.0) == pytest.approx(0.975)
    assert energy_threshold(9, 10, 0.98, 1.0) == pytest.approx(0.998)
    values = [energy_threshold(t, 10, 0.9, 0.99) for t in range(10)]
    assert all(b > a for a, b in zip(values, values[1:]))
    for lamb, lame in [(0.0, 1.0), (1.2, 1.0), (0.95, 1.5), (0.99, 0.95), (-0.1, 0.5)]:
        with pytest.raises(ValueError):
            energy_threshold(0, 10, lamb, lame)


@pytest.mark.parametrize("algorithm", ["dualgpm", "gpm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_matches_spec_transcription(algorithm: str, seed: int):
    dim, tasks = 24, 8
    memory = LayerMemory(dim=dim)
    ref_basis, ref_kind = np.zeros((dim, 0)), "remove"
    kinds = []
    for t, cov in enumerate(covariance_sequence(dim, tasks, seed)):
        eps = energy_threshold(t, tasks, 0.9, 1.0)
        memory = update_memory(memory, cov, eps, algorithm)
        ref_basis, ref_kind = spec_update(ref_basis, ref_kind, cov.numpy(), eps, dual=algorithm == "dualgpm")
        assert memory.kind == ref_kind
        assert memory.size == ref_basis.shape[1]
        np.testing.assert_allclose(projector(memory.basis), projector(ref_basis), atol=1e-8)
        kinds.append(memory.kind)
    if algorithm == "dualgpm":
        assert "retain" in kinds, "the sequence should fill more than half the space and switch"
    else:
        assert set(kinds) == {"remove"}


@pytest.mark.parametrize("algorithm", ["dualgpm", "gpm"])
def test_memory_invariants(algorithm: str):
    dim, tasks = 20, 12
    memory = LayerMemory(dim=dim)
    for t, cov in enumerate(covariance_sequence(dim, tasks, seed=7)):
        before_old = memory.old_space_dim()
        memory = update_memory(memory, cov, energy_threshold(t, tasks, 0.95, 1.0), algorithm)
        basis = memory.basis
        assert basis.dtype == torch.float64
        assert memory.size <= dim
        torch.testing.assert_close(basis.T @ basis, torch.eye(memory.size, dtype=torch.float64), atol=1e-10, rtol=0)
        assert memory.old_space_dim() >= before_old, "the old tasks' space never shrinks"
        if algorithm == "dualgpm" and memory.kind == "remove":
            assert memory.size <= dim / 2, "a remove memory larger than d/2 must have switched to retain"


def test_switch_happens_exactly_past_half():
    dim = 16
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    # Task 0: eight strong directions and a weak ninth one; the leading 8 stay below eps = 0.999 -> 8 = d/2: 'remove'.
    first = q[:, :8] @ q[:, :8].T + 0.5 * torch.outer(q[:, 8], q[:, 8])
    memory = update_memory(LayerMemory(dim=dim), first, eps=0.999, algorithm="dualgpm")
    assert (memory.kind, memory.size) == ("remove", 8)
    # Task 1: one new direction -> 9 > d/2 switches to the 7-dimensional complement, 'retain'.
    second = 10.0 * torch.outer(q[:, 9], q[:, 9])
    memory = update_memory(memory, second, eps=0.999, algorithm="dualgpm")
    assert (memory.kind, memory.size) == ("retain", 7)
    free = torch.cat([q[:, 8:9], q[:, 10:]], dim=1)  # the directions no memory holds
    np.testing.assert_allclose(projector(memory.basis), projector(free), atol=1e-8)
    gpm = update_memory(update_memory(LayerMemory(dim=dim), first, 0.999, "gpm"), second, 0.999, "gpm")
    assert (gpm.kind, gpm.size) == ("remove", 9)


def test_first_task_fix_stores_remove():
    dim = 10
    cov = random_covariance(dim, rank=dim, seed=5, decay=0.95)  # energy spread: many components needed
    memory = update_memory(LayerMemory(dim=dim), cov, eps=0.99, algorithm="gpm")
    assert memory.kind == "remove" and memory.size > dim / 2  # the reference would have mislabelled this 'retain'


def test_down_projection_avoids_remove_basis_and_lies_in_retain_space():
    dim, rank = 24, 4
    memory = LayerMemory(dim=dim)
    covs = covariance_sequence(dim, 6, seed=11)
    for t, cov in enumerate(covs[:-1]):
        down = design_down_projection(cov, rank, memory)
        assert down.shape == (rank, dim)
        torch.testing.assert_close(down @ down.T, torch.eye(rank, dtype=torch.float64) / 3, atol=1e-10, rtol=0)
        if memory.kind == "remove" and memory.size:
            assert torch.linalg.norm(down @ memory.basis) < 1e-8
        if memory.kind == "retain":
            inside = down @ memory.basis @ memory.basis.T
            torch.testing.assert_close(inside, down, atol=1e-8, rtol=0)
        memory = update_memory(memory, cov, energy_threshold(t, 6, 0.95, 1.0), "dualgpm")
    assert memory.kind == "retain", "the sequence should have exercised both memory kinds"


def test_first_down_projection_is_leading_subspace():
    cov = random_covariance(12, rank=12, seed=2, decay=0.6)
    down = design_down_projection(cov, 3, None)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    top = eigvecs[:, -3:]
    torch.testing.assert_close(projector(down.T * math.sqrt(3)), projector(top.numpy()), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        design_down_projection(cov, 12, None)


def test_energy_share_and_complement():
    dim = 8
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cov = q[:, :2] @ q[:, :2].T  # energy only in two directions
    remove = LayerMemory(dim=dim, basis=q[:, :1], kind="remove")
    assert energy_in_subspace(cov, remove) == pytest.approx(0.5)
    retain = LayerMemory(dim=dim, basis=orthogonal_complement(q[:, :1]), kind="retain")
    assert energy_in_subspace(cov, retain) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="remove"):
        LayerMemory(dim=dim, kind="forget")  # type: ignore[arg-type]
