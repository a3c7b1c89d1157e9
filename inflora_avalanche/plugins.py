"""Avalanche plugins of InfLoRA."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from .distributed import all_reduce_sum_, broadcast_
from .model import InfLoRAViT, LowRankViT
from .subspace import (
    MEMORY_ALGORITHMS,
    CovarianceAccumulator,
    LayerMemory,
    design_down_projection,
    energy_threshold,
    update_memory,
    validate_thresholds,
)


def unwrap_model(model: nn.Module) -> LowRankViT:
    """The ``LowRankViT`` (an ``InfLoRAViT``, an ``SDLoRAViT``) inside ``model`` (which may be wrapped, e.g. by
    DistributedDataParallel)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, LowRankViT):
        raise TypeError(f"these plugins need an InfLoRAViT or SDLoRAViT model, got {type(inner).__name__}")
    return inner


def stream_length(experience: Any) -> Optional[int]:
    """Number of experiences in the stream ``experience`` comes from, when Avalanche knows it.

    Raises ``ValueError`` for a slice of a stream (``train_stream[:2]`` of an ``nc_benchmark``, whose experiences
    point at the slice): its length is not the number of tasks."""
    try:
        stream = experience.origin_stream
        length = len(stream)
    except Exception:  # unset origin_stream, lazy streams of unknown length
        return None
    full = getattr(getattr(stream, "benchmark", None), f"{getattr(stream, 'name', '')}_stream", None)
    try:
        full_length = None if full is None else len(full)
    except Exception:
        full_length = None
    if full_length is not None and full_length != length:
        raise ValueError(f"the experience comes from a slice of {length} of the stream's {full_length} experiences; "
                         f"pass num_tasks= (e.g. num_tasks={full_length}) to InfLoRAStrategy: it sets the threshold "
                         "schedule")
    return length


def experience_classes(experience: Any) -> list[int]:
    """The sorted labels of ``experience``: Avalanche's class timeline when the stream has one, else the labels of
    its data (``benchmark_from_datasets`` streams have no timeline)."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        targets = experience.dataset.targets
        classes = getattr(targets, "uniques", None) or set(int(t) for t in targets)
    return sorted(int(c) for c in classes)


class ForwardContext:
    """How a strategy runs a forward: its input transform (e.g. batched augmentation on the device) and its autocast.

    Plugins that pass over data themselves (covariances, diagnostics, classifier alignment) get one from
    ``strategy.forward_context(training)`` so that their features are exactly those the strategy trains and
    evaluates on."""

    def __init__(self, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 autocast: Optional[Callable[[], ContextManager]] = None) -> None:
        self.transform = transform
        self.autocast = autocast or nullcontext

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The pooled pre-head features of ``x`` (already on the model's device): ``model.forward_pooled`` of an
        ``InfLoRAViT``, else ``model.forward_features`` (any model that returns ``(B, d)`` there)."""
        if self.transform is not None:
            x = self.transform(x)
        pooled = getattr(model, "forward_pooled", None) or model.forward_features
        with self.autocast():
            return pooled(x)


def forward_context(strategy: Any, training: bool = False) -> ForwardContext:
    """The one way plugins run their own forwards: as ``strategy`` runs its own (``InfLoRAStrategy.forward_context``:
    input transform, autocast), or a plain forward for strategies that transform nothing."""
    own = getattr(type(strategy), "forward_context", None)
    return own(strategy, training) if callable(own) else ForwardContext()


@torch.no_grad()
def pass_with_input_hooks(
    model: InfLoRAViT,
    batches: Iterable[Any],
    device: torch.device,
    on_input: Callable[[str, torch.Tensor], None],
    forward: Optional["ForwardContext"] = None,
) -> None:
    """One no-grad, eval-mode pass of ``model`` over ``batches`` (up to its pooled features), calling ``on_input(name, x)`` with
    the input of every adapted layer (outside autocast). Each batch is an Avalanche minibatch (inputs first) or a
    tensor; ``forward`` is how the strategy runs its forwards (its input transform and autocast)."""

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            with torch.autocast(device_type=device.type, enabled=False):
                on_input(name, args[0])

        return hook

    handles = [adapter.register_forward_pre_hook(make_hook(name)) for name, adapter in model.adapters()]
    was_training = model.training
    model.eval()
    try:
        forward = forward or ForwardContext()
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            forward.features(model, x.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def collect_input_covariances(
    model: InfLoRAViT,
    batches: Iterable[Any],
    device: torch.device,
    forward: Optional["ForwardContext"] = None,
) -> Dict[str, torch.Tensor]:
    """The uncentred covariance of every adapted layer's input over one pass of ``batches`` (see
    :func:`pass_with_input_hooks`), summed in float32 on ``device`` and returned in float64. Under
    ``torch.distributed`` each rank passes over its shard and the sums are all-reduced before anything is decomposed,
    so every rank gets the covariance of the whole data."""
    accumulators = {name: CovarianceAccumulator(adapter.in_features) for name, adapter in model.adapters()}
    pass_with_input_hooks(model, batches, device, lambda name, x: accumulators[name].update(x), forward)
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
    covariance; the new branch's ``down`` is designed from it, away from the memory. When the strategy closes the
    task (:meth:`update_task_memory`, before it merges the branches): a second pass with the trained branch live
    and the GPM / DualGPM memory update at threshold ``eps_t``. Each adapted layer has its own covariance and
    memory.

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
        self._loader: Any = None

    # ----------------------------------------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = unwrap_model(strategy.model)
        if not isinstance(model, InfLoRAViT):
            raise TypeError(f"SubspaceUpdatePlugin designs InfLoRA branches: it needs an InfLoRAViT, got "
                            f"{type(model).__name__}")
        if self.num_tasks is None:
            self.num_tasks = stream_length(strategy.experience)
            if self.num_tasks is None:
                raise ValueError(
                    "cannot tell how many experiences the stream has; pass num_tasks= to InfLoRAStrategy or "
                    "SubspaceUpdatePlugin (it sets the threshold schedule)"
                )
        self._loader = strategy.dataloader  # the task's own data (a replay plugin may swap the loader in later)
        covariances = self._covariances(strategy, model)
        for name, adapter in model.adapters():
            adapter.set_down(self.design_down(name, covariances[name], adapter.rank))
            broadcast_(adapter.down)  # all ranks decomposed the same matrix; rank 0's result makes them bit-identical

    def design_down(self, name: str, covariance: torch.Tensor, rank: int) -> torch.Tensor:
        """The new branch's ``down`` for layer ``name`` (override for ablations, e.g. a random subspace)."""
        return design_down_projection(covariance, rank, self.memories.get(name))

    def update_task_memory(self, strategy: Any) -> None:
        """Called by the strategy when the task's training ends, before it merges the branches: a pass over the
        task's data with the trained branch live, then the memory update of every adapted layer."""
        model = unwrap_model(strategy.model)
        task = model.num_tasks - 1
        assert self.num_tasks is not None
        eps = energy_threshold(min(task, self.num_tasks), self.num_tasks, self.lamb, self.lame)
        covariances = self._covariances(strategy, model)
        self._loader = None
        for name, adapter in model.adapters():
            current = self.memories.get(name, LayerMemory(dim=adapter.in_features))
            self.memories[name] = update_memory(current, covariances[name], eps, self.memory_algorithm)
        self.thresholds.append(eps)

    def _covariances(self, strategy: Any, model: InfLoRAViT) -> Dict[str, torch.Tensor]:
        loader = self._loader if self._loader is not None else strategy.dataloader
        return collect_input_covariances(model, loader, torch.device(strategy.device),
                                         forward_context(strategy, training=True))

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
