"""Sequential LoRA: InfLoRA's branches and training, but a random down-projection and no subspace memory.

This is the ablation that isolates what InfLoRA's designed subspace contributes: the model, heads, trained
parameters, optimiser and schedule are InfLoRA's own; only ``design_down`` differs (a random orthonormal
subspace, scaled like InfLoRA's by 1/sqrt(3)) and no memory is kept between tasks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..plugins import SubspaceUpdatePlugin, unwrap_model


def random_down_projection(dim: int, rank: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A ``rank x dim`` matrix with orthonormal rows spanning a uniformly random subspace, over sqrt(3)."""
    if not 0 < rank < dim:
        raise ValueError(f"rank must be in [1, {dim - 1}] for width {dim}, got {rank}")
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-uniform orientation
    return q.T.contiguous() / math.sqrt(3.0)


class RandomSubspacePlugin(SubspaceUpdatePlugin):
    """A :class:`SubspaceUpdatePlugin` whose branches get a random subspace and which keeps no memory.

    No covariance passes run (nothing would use them); after each task the branch is merged, as in InfLoRA.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(num_tasks=1)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap_model(strategy.model)
        for name, adapter in model.adapters():
            no_covariance = torch.zeros(adapter.in_features, adapter.in_features, dtype=torch.float64)
            adapter.set_down(self.design_down(name, no_covariance, adapter.rank))

    def design_down(self, name: str, covariance: torch.Tensor, rank: int) -> torch.Tensor:
        """A random orthonormal down-projection; only the width of ``covariance`` is used."""
        return random_down_projection(int(covariance.shape[0]), rank, self._generator)

    def update_task_memory(self, strategy: Any) -> None:
        """No memory: the strategy merges the branch and freezes the head, as in InfLoRA."""

    def state_dict(self) -> dict:
        """The base plugin's state and the random generator's, so that a resumed run draws the next task's
        subspace, not the first one's again."""
        return {**super().state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != "generator"})
        if "generator" in state:
            self._generator.set_state(state["generator"])
