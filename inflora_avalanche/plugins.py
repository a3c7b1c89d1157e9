"""Avalanche plugins of InfLoRA."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from .distributed import all_reduce_sum_, broadcast_
from .model import InfLoRAViT
from .subspace import (
    MEMORY_ALGORITHMS,
    CovarianceAccumulator,
    LayerMemory,
    design_down_projection,
    energy_threshold,
    update_memory,
    validate_thresholds,
)


def unwrap_model(model: nn.Module) -> InfLoRAViT:
    """The ``InfLoRAViT`` inside ``model`` (which may be wrapped, e.g. by DistributedDataParallel)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, InfLoRAViT):
        raise TypeError(f"InfLoRA plugins need an InfLoRAViT model, got {type(inner).__name__}")
    return inner


def stream_length(experience: Any) -> Optional[int]:
    """Number of experiences in the stream ``experience`` comes from, when Avalanche knows it."""
    try:
        return len(experience.origin_stream)
    except Exception:  # unset origin_stream, lazy streams of unknown length
        return None


@torch.no_grad()
def pass_with_input_hooks(
    model: InfLoRAViT,
    batches: Iterable[Any],
    device: torch.device,
    on_input: Callable[[str, torch.Tensor], None],
    autocast: Optional[ContextManager] = None,
    prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """One no-grad, eval-mode pass of ``model.forward_features`` over ``batches``, calling ``on_input(name, x)`` with
    the input of every adapted ``qkv`` (outside autocast). Each batch is an Avalanche minibatch (inputs first) or a
    tensor; ``prepare`` maps the inputs on the device before the forward (e.g. the strategy's batched augmentation)."""

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            with torch.autocast(device_type=device.type, enabled=False):
                on_input(name, args[0])

        return hook

    handles = [adapter.register_forward_pre_hook(make_hook(name)) for name, adapter in model.adapters()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = x.to(device, non_blocking=True)
            if prepare is not None:
                x = prepare(x)
            with autocast if autocast is not None else nullcontext():
                model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def collect_input_covariances(
    model: InfLoRAViT,
    batches: Iterable[Any],
    device: torch.device,
    autocast: Optional[ContextManager] = None,
    prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """The uncentred covariance of every adapted ``qkv``'s input over one pass of ``batches`` (see
    :func:`pass_with_input_hooks`), summed in float32 on ``device`` and returned in float64. Under
    ``torch.distributed`` each rank passes over its shard and the sums are all-reduced before anything is decomposed,
    so every rank gets the covariance of the whole data."""
    accumulators = {name: CovarianceAccumulator(adapter.in_features) for name, adapter in model.adapters()}
    pass_with_input_hooks(model, batches, device, lambda name, x: accumulators[name].update(x), autocast, prepare)
    for acc in accumulators.values():
        if acc.sum is None:  # a rank whose shard was empty still joins the all-reduce
            acc.sum = torch.zeros(acc.dim, acc.dim, device=device)
            acc.count = torch.zeros((), device=device, dtype=torch.float64)
        all_reduce_sum_(acc.sum)
        all_reduce_sum_(acc.count)
    return {name: acc.covariance() for name, acc in accumulators.items()}


class SubspaceUpdatePlugin(SupervisedPlugin, supports_distributed=True):
    """Designs each new task's down-projections before training and updates the subspace memory after it.

    Before a training experience: one no-grad pass over its training data gives every adapted layer's input
    covariance; the new branch's ``down`` is designed from it, away from the memory. After training: a second pass
    (with the trained branch active), the GPM / DualGPM memory update at threshold ``eps_t``, and the merge of the
    branch into ``qkv``.

    Args:
        lamb, lame: start and end of the threshold schedule ``eps_t = lamb + (lame - lamb) * t / T``.
        memory: ``"dualgpm"`` (switches to the complement once the memory fills half the space) or ``"gpm"``.
        num_tasks: T in the schedule; ``None`` reads it from the stream the experiences come from.
    """

    def __init__(
        self, lamb: float = 0.95, lame: float = 1.0, memory: str = "dualgpm", num_tasks: Optional[int] = None
    ) -> None:
        super().__init__()
        validate_thresholds(lamb, lame)
        if memory not in MEMORY_ALGORITHMS:
            raise ValueError(f"memory must be one of {MEMORY_ALGORITHMS}, got {memory!r}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.lamb = lamb
        self.lame = lame
        self.memory_algorithm = memory
        self.num_tasks = num_tasks
        self.memories: Dict[str, LayerMemory] = {}
        self.thresholds: list[float] = []

    # ----------------------------------------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap_model(strategy.model)
        if self.num_tasks is None:
            self.num_tasks = stream_length(strategy.experience)
            if self.num_tasks is None:
                raise ValueError(
                    "cannot tell how many experiences the stream has; pass num_tasks= to InfLoRAStrategy or "
                    "SubspaceUpdatePlugin (it sets the threshold schedule)"
                )
        covariances = self._covariances(strategy, model)
        for name, adapter in model.adapters():
            adapter.set_down(self.design_down(name, covariances[name], adapter.rank))
            broadcast_(adapter.down)  # all ranks decomposed the same matrix; rank 0's result makes them bit-identical

    def design_down(self, name: str, covariance: torch.Tensor, rank: int) -> torch.Tensor:
        """The new branch's ``down`` for layer ``name`` (override for ablations, e.g. a random subspace)."""
        return design_down_projection(covariance, rank, self.memories.get(name))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap_model(strategy.model)
        if not model.task_open:
            return
        task = model.num_tasks - 1
        assert self.num_tasks is not None
        eps = energy_threshold(min(task, self.num_tasks), self.num_tasks, self.lamb, self.lame)
        covariances = self._covariances(strategy, model)
        for name, adapter in model.adapters():
            current = self.memories.get(name, LayerMemory(dim=adapter.in_features))
            self.memories[name] = update_memory(current, covariances[name], eps, self.memory_algorithm)
        self.thresholds.append(eps)
        model.finish_task()

    def _covariances(self, strategy: Any, model: InfLoRAViT) -> Dict[str, torch.Tensor]:
        autocast = strategy.autocast() if hasattr(strategy, "autocast") else None
        prepare = getattr(strategy, "prepare_input", None)
        return collect_input_covariances(
            model, strategy.dataloader, torch.device(strategy.device), autocast, prepare=prepare
        )

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "lamb": self.lamb,
            "lame": self.lame,
            "memory": self.memory_algorithm,
            "num_tasks": self.num_tasks,
            "thresholds": list(self.thresholds),
            "layers": {name: mem.state_dict() for name, mem in self.memories.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("lamb", "lame", "memory"):
            mine = {"lamb": self.lamb, "lame": self.lame, "memory": self.memory_algorithm}[key]
            if state[key] != mine:
                raise ValueError(f"checkpoint was made with {key}={state[key]!r}, this plugin has {key}={mine!r}")
        self.num_tasks = state["num_tasks"]
        self.thresholds = list(state["thresholds"])
        self.memories = {name: LayerMemory.from_state_dict(s) for name, s in state["layers"].items()}
