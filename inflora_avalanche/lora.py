"""The InfLoRA adapter: low-rank key and value branches wrapped around a ViT block's fused ``qkv`` projection."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# Which finished branches a delta includes: all, none, a slice of the finished rank rows or a list of them.
BranchRows = Union[bool, slice, Sequence[int]]


class InfLoRAQKV(nn.Module):
    """Wraps ``attn.qkv`` (an ``nn.Linear`` from width d to 3 x attention width) and adds low-rank branches.

    Per task the branch is ``[k; v] += up @ (down @ x)``: ``down`` (rank x d) is designed and frozen, shared by keys
    and values; ``up`` (2 x attention width, rank) stacks the key rows over the value rows, starts at zero and is
    trained. Queries are never touched. Finished branches are kept in ``past_down`` / ``past_up`` (stacked along the
    rank axis) and, by default, merged into ``qkv.weight``: the forward then costs one plain linear plus the current
    branch, however many tasks came before.
    """

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        if not isinstance(qkv, nn.Linear) or qkv.out_features % 3 != 0:
            raise ValueError("InfLoRA needs attn.qkv to be one nn.Linear producing queries, keys and values")
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        self.in_features = qkv.in_features
        self.attn_dim = qkv.out_features // 3
        weight = qkv.weight
        self.register_buffer("down", weight.new_zeros(0, self.in_features))
        self.up = nn.Parameter(weight.new_zeros(2 * self.attn_dim, 0))
        self.register_buffer("past_down", weight.new_zeros(0, self.in_features))
        self.register_buffer("past_up", weight.new_zeros(2 * self.attn_dim, 0))
        self.merged = True
        self.layer_name = ""  # set by InfLoRAViT (e.g. "blocks.3.attn.qkv"), for error messages

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def num_finished(self) -> int:
        """Total rank of the finished branches (tasks x rank)."""
        return int(self.past_down.shape[0])

    @property
    def up_key(self) -> torch.Tensor:
        return self.up[: self.attn_dim]

    @property
    def up_value(self) -> torch.Tensor:
        return self.up[self.attn_dim :]

    def start_branch(self, rank: int) -> None:
        """Open a new task's branch: a zero ``down`` to be designed and a zero, trainable ``up``."""
        if self.rank:
            raise RuntimeError("a branch is already open; finish it before starting another")
        weight = self.qkv.weight
        self.down = weight.new_zeros(rank, self.in_features)
        self.up = nn.Parameter(weight.new_zeros(2 * self.attn_dim, rank))

    @torch.no_grad()
    def set_down(self, down: torch.Tensor) -> None:
        if down.shape != self.down.shape:
            raise ValueError(f"down must have shape {tuple(self.down.shape)}, got {tuple(down.shape)}")
        self.down.copy_(down.to(self.down.dtype))

    @torch.no_grad()
    def finish_branch(self) -> None:
        """Freeze the open branch, keep it in the history and (if merged) fold it into ``qkv.weight``."""
        if not self.rank:
            return
        if self.merged:
            self._add_to_weight(self.get_delta_weight(finished=False), 1.0, "merging the open branch")
        up = self.up.detach()
        self.past_down = torch.cat([self.past_down, self.down], dim=0)
        self.past_up = torch.cat([self.past_up, up], dim=1)
        self.down = self.down.new_zeros(0, self.in_features)
        self.up = nn.Parameter(up.new_zeros(2 * self.attn_dim, 0))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every finished branch into ``qkv.weight`` (the default state)."""
        if not self.merged:
            self._add_to_weight(self.get_delta_weight(current=False), 1.0, "merging the finished branches")
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the finished branches out of ``qkv.weight``; the forward then re-sums them (the reference's way)."""
        if self.merged:
            self._add_to_weight(self.get_delta_weight(current=False), -1.0, "unmerging the finished branches")
            self.merged = False

    # ----------------------------------------------------------------------------------------------- delta weight
    def get_delta_weight(
        self, finished: BranchRows = True, current: bool = True, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The low-rank update of ``qkv.weight``: ``up @ down`` of the chosen branches on the key and value rows.

        The one place the update is computed: merging, unmerging, export and the diagnostics all use it. Returns a
        tensor of ``qkv.weight``'s shape (zeros on the query rows), in ``dtype`` (float64 by default, so that merges
        and unmerges round once, into the weight) on the weight's device, detached.

        Args:
            finished: the finished branches to include: ``True`` all of them, ``False`` none, or a slice / list of
                their rank rows (rows of ``past_down``; task ``t`` of rank ``r`` is ``slice(t * r, (t + 1) * r)``).
            current: include the open (current) branch.

        ``qkv.weight`` plus ``get_delta_weight(finished=not merged)`` is the weight the layer applies now.
        """
        weight = self.qkv.weight
        delta = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        ups, downs = [], []
        if finished is not False and self.num_finished:
            rows = slice(None) if finished is True else finished
            if not isinstance(rows, slice):
                rows = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
            ups.append(self.past_up.detach()[:, rows])
            downs.append(self.past_down.detach()[rows])
        if current and self.rank:
            ups.append(self.up.detach())
            downs.append(self.down.detach())
        up = torch.cat(ups, dim=1).to(dtype) if ups else None
        if up is not None and up.shape[1]:
            delta[self.attn_dim :] = up @ torch.cat(downs, dim=0).to(dtype)
        return delta

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``qkv.weight`` with every branch folded in (finished ones not merged yet, and the open one): the weight
        the layer applies now, as a new tensor of ``qkv.weight``'s dtype and device. The adapter is not modified."""
        return self._weight_plus(self.get_delta_weight(finished=not self.merged, current=True), 1.0, "exporting")

    def _add_to_weight(self, delta: torch.Tensor, sign: float, what: str) -> None:
        self.qkv.weight.copy_(self._weight_plus(delta, sign, what))

    def _weight_plus(self, delta: torch.Tensor, sign: float, what: str) -> torch.Tensor:
        """``qkv.weight + sign * delta`` summed in ``delta``'s precision and rounded once to the weight's dtype. A
        non-finite result (NaN, inf, or an overflow of that dtype) raises ``ValueError`` naming the layer instead of
        corrupting (or exporting) the weight."""
        weight = self.qkv.weight.detach()
        updated = (weight.to(delta.dtype) + sign * delta).to(weight.dtype)
        if not torch.isfinite(updated).all():
            if not torch.isfinite(weight).all():
                cause = "qkv.weight already holds NaN or inf"
            else:
                cause = "its branches hold NaN or inf" if not torch.isfinite(delta).all() else "the sum overflows"
            raise ValueError(
                f"InfLoRA layer {self.layer_name or '(unnamed)'}: {what} would put non-finite values into "
                f"qkv.weight ({cause}: training diverged?); the weight was left unchanged"
            )
        return updated

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        if self.merged or self.num_finished == 0:
            down, up = self.down, self.up
        else:
            down = torch.cat([self.past_down, self.down], dim=0)
            up = torch.cat([self.past_up, self.up], dim=1)
        if down.shape[0] == 0:
            return out
        # One fused low-rank path for keys and values, added in place to their slice of the qkv output.
        delta = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        out[..., self.attn_dim :] += delta.to(out.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                raise AttributeError(
                    f"InfLoRA layer {self.__dict__.get('layer_name') or '(unnamed)'}: the attention module read "
                    f"attn.qkv.{name} directly instead of calling attn.qkv(x), which would skip the InfLoRA branch; "
                    "this backbone's attention is not supported"
                ) from None
            raise

    def extra_repr(self) -> str:
        return f"rank={self.rank}, finished_rank={self.num_finished}, merged={self.merged}"

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {"merged": self.merged}

    def set_extra_state(self, state: Any) -> None:
        self.merged = bool(state["merged"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Branch shapes grow with the tasks: take the checkpoint's shapes before copying its values.
        for name in ("down", "past_down", "past_up"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[key].shape))
        key = prefix + "up"
        if key in state_dict and state_dict[key].shape != self.up.shape:
            self.up = nn.Parameter(self.up.new_zeros(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
