"""SD-LoRA (Wu et al., ICLR 2025) on the low-rank core: the adapter and the model. Torch and timm only.

Per task ``t`` every adapted projection (the q and v rows of each block's ``attn.qkv`` by default, as in the
official code) gets a trainable pair ``A_t`` (rank x d, Kaiming-uniform) and ``B_t`` (rows x rank, zero). Finished
pairs are frozen and enter as directions ``B_i A_i / (||B_i||_F ||A_i||_F)`` (the official code's product of norms)
scaled by one magnitude per task that every block shares and that keeps training; the open pair enters unnormalised,
scaled by its own magnitude. So old branches cannot be merged while training; :meth:`SDLoRAViT.folded` folds every
branch into the weights for an evaluation or an export and restores the exact weights afterwards.
The official behaviour, where it differs from the paper, and our fixes: ``docs/sdlora.md``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LowRankLinear
from .model import LowRankViT

MAGNITUDE_INIT = 0.8  # the official code re-creates every magnitude at 0.8 when a task starts
RankSchedule = Union[None, Sequence[tuple[int, int]]]
RANK_REDUCTION = ((0, 10), (4, 8), (8, 6))  # SD-LoRA-RR: rank 10 for tasks 0-3, 8 for 4-7, 6 from task 8


class SDLoRALinear(LowRankLinear):
    """SD-LoRA's adapter of one ``nn.Linear``: per task and per row range (one range per projection, e.g. q and v of
    a fused qkv) a pair ``A`` (``down``), ``B`` (``up``); the magnitudes belong to the model (shared by every layer).

    Shapes, with J row ranges of ``rows`` rows each: open pair ``down`` (J, r, d) and ``up`` (J, rows, r), both
    trained; finished pairs stacked along the rank axis in ``past_down`` (J, R, d), ``past_up`` (J, rows, R), with
    ``past_task`` (R,) the task of each rank row and ``past_scale`` (J, R) its ``1 / (||B|| ||A||)``.
    """

    def __init__(self, base_layer: nn.Linear, row_ranges: Optional[Sequence[tuple[int, int]]] = None,
                 layer_name: str = "") -> None:
        super().__init__(base_layer, row_ranges, layer_name)
        sizes = {stop - start for start, stop in self.row_ranges}
        if len(sizes) != 1:
            raise ValueError(f"SD-LoRA needs row ranges of one size (one pair per projection), got {self.row_ranges}")
        self.parts, self.rows = len(self.row_ranges), sizes.pop()
        weight = base_layer.weight
        self.down = nn.Parameter(weight.new_zeros(self.parts, 0, self.in_features))
        self.up = nn.Parameter(weight.new_zeros(self.parts, self.rows, 0))
        self.register_buffer("past_down", weight.new_zeros(self.parts, 0, self.in_features))
        self.register_buffer("past_up", weight.new_zeros(self.parts, self.rows, 0))
        self.register_buffer("past_scale", weight.new_zeros(self.parts, 0))
        self.register_buffer("past_task", torch.zeros(0, dtype=torch.long, device=weight.device))
        self.num_finished_tasks = 0
        self.folded = False
        self.__dict__["_owner"] = None  # the SDLoRAViT whose ``magnitudes`` scale the branches (not a submodule)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def rank(self) -> int:
        """Rank of the open pair (0 when none is open)."""
        return int(self.down.shape[1])

    @property
    def num_finished(self) -> int:
        """Total rank of the finished pairs."""
        return int(self.past_task.numel())

    def magnitudes(self) -> torch.Tensor:
        owner = self.__dict__["_owner"]
        if owner is None:
            raise RuntimeError(f"SD-LoRA layer {self.layer_name or '(unnamed)'} has no magnitudes: build it through "
                               "SDLoRAViT")
        return owner.magnitudes

    def start_branch(self, rank: int) -> None:
        """Open task ``t``'s pair: ``A`` Kaiming-uniform (a = sqrt 5, as ``nn.Linear``), ``B`` zero; both trained."""
        if self.rank:
            raise RuntimeError("a branch is already open; finish it before starting another")
        weight = self.base_layer.weight
        down = weight.new_empty(self.parts, rank, self.in_features)
        for part in down:
            nn.init.kaiming_uniform_(part, a=math.sqrt(5))
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(weight.new_zeros(self.parts, self.rows, rank))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.down, self.up] if self.rank else []

    @torch.no_grad()
    def finish_branch(self) -> None:
        """Freeze the open pair as a direction of its task: kept with ``1 / (||B|| ||A||)`` per projection (0 for a
        pair with a zero factor, which adds nothing; the official code would divide by zero)."""
        if not self.rank:
            return
        down, up = self.down.detach(), self.up.detach()
        norms = up.flatten(1).norm(dim=1) * down.flatten(1).norm(dim=1)  # (J,)
        scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
        rank = down.shape[1]
        self.past_down = torch.cat([self.past_down, down], dim=1)
        self.past_up = torch.cat([self.past_up, up], dim=2)
        self.past_scale = torch.cat([self.past_scale, scale[:, None].expand(-1, rank)], dim=1)
        task = torch.full((rank,), self.num_finished_tasks, dtype=torch.long, device=self.past_task.device)
        self.past_task = torch.cat([self.past_task, task])
        self.num_finished_tasks += 1
        self.down = nn.Parameter(down.new_zeros(self.parts, 0, self.in_features))
        self.up = nn.Parameter(up.new_zeros(self.parts, self.rows, 0))

    # ----------------------------------------------------------------------------------------------- delta weight
    def _past_coefficients(self) -> torch.Tensor:
        """(J, R): each finished rank row's magnitude over its pair's norm product."""
        return self.magnitudes()[self.past_task] * self.past_scale

    def get_delta_weight(self, finished: bool = True, current: bool = True,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The update of ``base_layer.weight`` with the current magnitudes: ``sum_i alpha_i B_i A_i / (||B_i||
        ||A_i||)`` over the finished pairs plus ``alpha_t B_t A_t`` of the open one, on the adapted rows (zeros
        elsewhere), in ``dtype``, detached. Folding, export and the tests use it. (Old branches share trained
        magnitudes, so there is no selection of finished rank rows as for InfLoRA: ``finished`` is all or none.)"""
        if not isinstance(finished, bool):
            raise TypeError(f"SD-LoRA's get_delta_weight takes finished=True/False, got {finished!r}")
        rows = torch.zeros(self.parts, self.rows, self.in_features, dtype=dtype, device=self.base_layer.weight.device)
        if finished and self.num_finished:
            up = self.past_up.detach().to(dtype) * self._past_coefficients().detach().to(dtype)[:, None, :]
            rows += up @ self.past_down.detach().to(dtype)
        if current and self.rank:
            alpha = self.magnitudes().detach()[self.num_finished_tasks].to(dtype)
            rows += alpha * (self.up.detach().to(dtype) @ self.down.detach().to(dtype))
        return self.scatter_rows(rows.reshape(self.parts * self.rows, self.in_features), dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies now (every branch with the current magnitudes), as a new tensor."""
        if self.folded:
            return self.base_layer.weight.detach().clone()
        return self._weight_plus(self.get_delta_weight(), 1.0, "exporting")

    @torch.no_grad()
    def fold(self) -> None:
        """Put :meth:`effective_weight` into ``base_layer.weight`` (the forward is then one plain linear), keeping
        the exact weight to restore (:meth:`unfold`). For evaluation and export only: magnitudes keep training."""
        if not self.folded:
            self.__dict__["_unfolded_weight"] = self.base_layer.weight.detach().clone()
            self.base_layer.weight.copy_(self.effective_weight())
            self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        """Restore the weight :meth:`fold` replaced, bit for bit."""
        if self.folded:
            self.base_layer.weight.copy_(self.__dict__.pop("_unfolded_weight"))
            self.folded = False

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.folded:
            if torch.is_grad_enabled() and self.rank:
                raise RuntimeError(f"SD-LoRA layer {self.layer_name or '(unnamed)'} is folded: its branches and "
                                   "magnitudes would get no gradient; train outside SDLoRAViT.folded()")
            return out
        if not (self.rank or self.num_finished):
            return out
        lead = x.shape[:-1]
        delta = x.new_zeros(*lead, self.parts, self.rows)
        if self.num_finished:  # all finished pairs in one matmul pair: ((x A^T) * alpha_i / (|B_i||A_i|)) B^T
            codes = F.linear(x, self.past_down.reshape(-1, self.in_features).to(x.dtype))
            codes = codes.reshape(*lead, self.parts, -1) * self._past_coefficients().to(x.dtype)
            delta = delta + torch.einsum("...jr,jor->...jo", codes, self.past_up.to(x.dtype))
        if self.rank:
            codes = F.linear(x, self.down.reshape(-1, self.in_features).to(x.dtype)).reshape(*lead, self.parts, -1)
            alpha = self.magnitudes()[self.num_finished_tasks].to(x.dtype)
            delta = delta + alpha * torch.einsum("...jr,jor->...jo", codes, self.up.to(x.dtype))
        return self.add_to_rows(out, delta.reshape(*lead, self.parts * self.rows))

    def extra_repr(self) -> str:
        rows = ", ".join(f"{a}:{b}" for a, b in self.row_ranges)
        return f"rows=[{rows}], rank={self.rank}, finished_tasks={self.num_finished_tasks}, folded={self.folded}"

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        if self.folded:
            raise RuntimeError(f"SD-LoRA layer {self.layer_name or '(unnamed)'} is folded: save it after unfold()")
        return {"row_ranges": [list(r) for r in self.row_ranges], "finished_tasks": self.num_finished_tasks}

    def set_extra_state(self, state: Any) -> None:
        self._check_row_ranges(state)
        self.num_finished_tasks = int(state["finished_tasks"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Shapes grow with the tasks: take the checkpoint's shapes before copying its values.
        for name in ("past_down", "past_up", "past_scale", "past_task"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[key].shape))
        for name in ("down", "up"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, nn.Parameter(getattr(self, name).new_zeros(state_dict[key].shape)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SDLoRAViT(LowRankViT):
    """SD-LoRA's model: a :class:`~inflora_avalanche.model.LowRankViT` with :class:`SDLoRALinear` adapters (by default
    on the q and v rows of every block's ``attn.qkv``, one pair per projection, as in the official code) and one
    magnitude per task shared by every adapted layer (``magnitudes``, trained with the open pair).

    Args (besides :class:`~inflora_avalanche.model.LowRankViT`'s):
        reset_magnitudes: re-create every magnitude at ``magnitude_init`` when a task starts, as the official code
            does (its learned magnitudes are thrown away at each task boundary). ``False`` keeps the learned values
            of the old tasks (ours; the new task's starts at ``magnitude_init``).
        magnitude_init: the value magnitudes start from (official: 0.8).
        rank_schedule: ``None`` (every task at ``rank``) or ``((first_task, rank), ...)``: the rank of the tasks
            from ``first_task`` on (SD-LoRA-RR: :data:`RANK_REDUCTION`, 10 / 8 / 6 from tasks 0 / 4 / 8). Old pairs
            keep their rank.
    """

    adapter_class = SDLoRALinear
    default_qkv_rows = ("q", "v")
    join_qkv_rows = False

    def __init__(self, backbone: Union[str, nn.Module], rank: int = 10, *, reset_magnitudes: bool = True,
                 magnitude_init: float = MAGNITUDE_INIT, rank_schedule: RankSchedule = None, **kwargs: Any) -> None:
        self.reset_magnitudes = bool(reset_magnitudes)
        self.magnitude_init = float(magnitude_init)
        self.rank_schedule = _check_schedule(rank_schedule)
        super().__init__(backbone, rank=rank, **kwargs)
        self.magnitudes = nn.Parameter(torch.zeros(0, device=next(self.backbone.parameters()).device))
        self._bind_adapters()

    def configure(self, *args: Any, **kwargs: Any) -> None:
        super().configure(*args, **kwargs)
        if "magnitudes" in self._parameters:
            self._bind_adapters()

    def _bind_adapters(self) -> None:
        for _, adapter in self.adapters():
            adapter.__dict__["_owner"] = self

    def branch_rank(self, task: int) -> int:
        """The rank of task ``task``'s pairs (``rank``, or the schedule's)."""
        rank = self.rank
        for first, value in self.rank_schedule:
            if task >= first:
                rank = value
        return rank

    def _refuse_folded(self, what: str) -> None:
        if any(adapter.folded for _, adapter in self.adapters()):
            raise RuntimeError(f"cannot {what} while the branches are folded: leave SDLoRAViT.folded() first")

    def start_task(self, classes: Sequence[int]) -> int:
        """A new head (initialised as the official code's: Kaiming-uniform for a linear layer, zero bias), a new
        pair in every adapted layer, and the magnitudes of tasks ``0..t`` (reset to ``magnitude_init`` unless
        ``reset_magnitudes`` is off)."""
        self._refuse_folded("start a task")
        task = super().start_task(classes)
        head = self.heads[-1]
        nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        nn.init.zeros_(head.bias)
        old = self.magnitudes.detach()
        values = torch.full((task + 1,), self.magnitude_init, dtype=old.dtype, device=old.device)
        if not self.reset_magnitudes:
            values[: old.numel()] = old
        self.magnitudes = nn.Parameter(values)
        return task

    def finish_task(self) -> None:
        self._refuse_folded("finish a task")
        super().finish_task()
        self.magnitudes.grad = None

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The open pairs (``"branches"``), the head and the magnitudes of every task so far (``"magnitudes"``)."""
        groups = super().trainable_parameter_groups()
        if self.task_open:
            groups["magnitudes"] = [self.magnitudes]
        return groups

    @contextmanager
    def folded(self) -> Iterator["SDLoRAViT"]:
        """Every branch folded into its layer (the forward costs what the frozen backbone's does), restored bit for
        bit on exit: for evaluation and export, never for training."""
        adapters = [adapter for _, adapter in self.adapters()]
        try:
            for adapter in adapters:
                adapter.fold()
            yield self
        finally:
            for adapter in adapters:
                adapter.unfold()

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "reset_magnitudes": self.reset_magnitudes,
                "magnitude_init": self.magnitude_init, "rank_schedule": [list(s) for s in self.rank_schedule]}

    def set_extra_state(self, state: Any) -> None:
        mine = {"reset_magnitudes": self.reset_magnitudes, "magnitude_init": self.magnitude_init,
                "rank_schedule": [list(s) for s in self.rank_schedule]}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"checkpoint was made with {key}={state[key]!r}, this model has {key}={value!r}")
        super().set_extra_state(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "magnitudes"
        if key in state_dict and state_dict[key].shape != self.magnitudes.shape:
            self.magnitudes = nn.Parameter(self.magnitudes.new_zeros(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_schedule(schedule: RankSchedule) -> tuple[tuple[int, int], ...]:
    if schedule is None:
        return ()
    steps = tuple((int(first), int(rank)) for first, rank in schedule)
    if any(first < 0 or rank < 1 for first, rank in steps) or [f for f, _ in steps] != sorted({f for f, _ in steps}):
        raise ValueError(f"rank_schedule must be ((first_task, rank), ...) with increasing first tasks >= 0 and ranks "
                         f">= 1, e.g. {RANK_REDUCTION}; got {schedule!r}")
    return steps
