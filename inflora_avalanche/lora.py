"""The InfLoRA adapter: low-rank key and value branches wrapped around a ViT block's fused ``qkv`` projection."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
        up = self.up.detach()
        if self.merged:
            self._add_to_weight(up, self.down, sign=1.0)
        self.past_down = torch.cat([self.past_down, self.down], dim=0)
        self.past_up = torch.cat([self.past_up, up], dim=1)
        self.down = self.down.new_zeros(0, self.in_features)
        self.up = nn.Parameter(up.new_zeros(2 * self.attn_dim, 0))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every finished branch into ``qkv.weight`` (the default state)."""
        if not self.merged:
            self._add_to_weight(self.past_up, self.past_down, sign=1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the finished branches out of ``qkv.weight``; the forward then re-sums them (the reference's way)."""
        if self.merged:
            self._add_to_weight(self.past_up, self.past_down, sign=-1.0)
            self.merged = False

    def _add_to_weight(self, up: torch.Tensor, down: torch.Tensor, sign: float) -> None:
        if down.shape[0] == 0:
            return
        delta = up.to(torch.float64) @ down.to(torch.float64)
        weight = self.qkv.weight
        kv = weight[self.attn_dim :]
        kv.copy_((kv.to(torch.float64) + sign * delta).to(weight.dtype))

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
