"""The InfLoRA adapter: per-task low-rank branches wrapped around any ``nn.Linear``, on a chosen slice of its rows.

Torch only. :class:`InfLoRALinear` knows nothing of ViTs or tasks; :class:`~inflora_avalanche.model.InfLoRAViT`
decides which layers it wraps (``target_modules``) and which output rows a fused ``qkv`` exposes (``qkv_rows``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# Which finished branches a delta includes: all, none, a slice of the finished rank rows or a list of them.
BranchRows = Union[bool, slice, Sequence[int]]
RowRanges = tuple[tuple[int, int], ...]
QKV_PARTS = ("q", "k", "v")


def qkv_row_ranges(out_features: int, parts: Sequence[str], join: bool = True) -> RowRanges:
    """The output rows of a fused ``qkv`` (queries, keys, values stacked in that order) holding ``parts`` (a
    subset of ``"q"``, ``"k"``, ``"v"``), as ``(start, stop)`` ranges in row order; adjacent ranges are joined
    unless ``join`` is false (one range per projection, for adapters that give each projection its own pair)."""
    if out_features % 3:
        raise ValueError(f"a fused qkv has 3 x attention-width outputs, this layer has {out_features}")
    parts = list(parts)
    unknown = [p for p in parts if p not in QKV_PARTS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"qkv_rows must be distinct letters among q, k, v (e.g. ('k', 'v')), got {tuple(parts)}")
    width = out_features // 3
    ranges: list[list[int]] = []
    for i, part in enumerate(QKV_PARTS):
        if part not in parts:
            continue
        if join and ranges and ranges[-1][1] == i * width:
            ranges[-1][1] = (i + 1) * width
        else:
            ranges.append([i * width, (i + 1) * width])
    return tuple((start, stop) for start, stop in ranges)


class LowRankLinear(nn.Module):
    """What every low-rank adapter of this package shares: it wraps an ``nn.Linear`` (``base_layer``, frozen) and
    adds low-rank updates to some of its output rows (``row_ranges``: ordered, disjoint ``(start, stop)`` ranges;
    all rows by default). Subclasses define the branches: :meth:`get_delta_weight` (the one computation of the update
    that merging, export and the diagnostics use) and the forward."""

    def __init__(self, base_layer: nn.Linear, row_ranges: Optional[Sequence[tuple[int, int]]] = None,
                 layer_name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.layer_name = layer_name  # e.g. "blocks.3.attn.qkv", for error messages
        ranges = [(0, self.out_features)] if row_ranges is None else [(int(a), int(b)) for a, b in row_ranges]
        if not ranges or any(not 0 <= a < b <= self.out_features for a, b in ranges) or \
                any(ranges[i][1] > ranges[i + 1][0] for i in range(len(ranges) - 1)):
            raise ValueError(f"row_ranges must be ordered, disjoint ranges within [0, {self.out_features}], "
                             f"got {row_ranges}")
        self.row_ranges: RowRanges = tuple(ranges)
        self.adapted_rows = sum(b - a for a, b in ranges)

    def adapted(self, tensor: torch.Tensor) -> torch.Tensor:
        """The adapted rows of ``tensor`` (a weight, a bias or a delta of the base layer's shape), in row order."""
        if len(self.row_ranges) == 1:
            start, stop = self.row_ranges[0]
            return tensor[start:stop]
        return torch.cat([tensor[start:stop] for start, stop in self.row_ranges], dim=0)

    def scatter_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor of the base weight's shape (``dtype``, on its device) holding ``rows`` (adapted rows x
        in_features, in row order) at the adapted rows and zeros elsewhere."""
        weight = self.base_layer.weight
        full = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        offset = 0
        for start, stop in self.row_ranges:
            full[start:stop] = rows[offset:offset + stop - start]
            offset += stop - start
        return full

    def add_to_rows(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``out`` (the base layer's output) with ``delta`` (its adapted rows, in row order) added to them."""
        delta = delta.to(out.dtype)
        if self.adapted_rows == self.out_features:
            return out + delta
        if len(self.row_ranges) == 1:
            start, stop = self.row_ranges[0]
            out[..., start:stop] += delta
            return out
        offset = 0
        for start, stop in self.row_ranges:
            out[..., start:stop] += delta[..., offset:offset + stop - start]
            offset += stop - start
        return out

    def get_delta_weight(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _add_to_weight(self, delta: torch.Tensor, sign: float, what: str) -> None:
        self.base_layer.weight.copy_(self._weight_plus(delta, sign, what))

    def _weight_plus(self, delta: torch.Tensor, sign: float, what: str) -> torch.Tensor:
        """``weight + sign * delta`` summed in ``delta``'s precision and rounded once to the weight's dtype. A
        non-finite result (NaN, inf, or an overflow of that dtype) raises ``ValueError`` naming the layer instead of
        corrupting (or exporting) the weight."""
        weight = self.base_layer.weight.detach()
        updated = (weight.to(delta.dtype) + sign * delta).to(weight.dtype)
        if not torch.isfinite(updated).all():
            if not torch.isfinite(weight).all():
                cause = "the weight already holds NaN or inf"
            else:
                cause = "its branches hold NaN or inf" if not torch.isfinite(delta).all() else "the sum overflows"
            raise ValueError(
                f"low-rank layer {self.layer_name or '(unnamed)'}: {what} would put non-finite values into its "
                f"weight ({cause}: training diverged?); the weight was left unchanged"
            )
        return updated

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                raise AttributeError(
                    f"low-rank layer {self.__dict__.get('layer_name') or '(unnamed)'}: its module read .{name} of "
                    "this layer directly instead of calling it, which would skip the branches; this backbone is not "
                    "supported with this target"
                ) from None
            raise

    def _check_row_ranges(self, state: Any) -> None:
        saved = [tuple(r) for r in state.get("row_ranges", self.row_ranges)]
        if tuple(saved) != self.row_ranges:
            raise ValueError(f"layer {self.layer_name or '(unnamed)'}: the checkpoint adapts rows {saved}, this "
                             f"layer adapts {list(self.row_ranges)} (another qkv_rows setting?)")


class InfLoRALinear(LowRankLinear):
    """Wraps an ``nn.Linear`` (``base_layer``, frozen) and adds per-task low-rank branches to some of its outputs.

    Per task the branch is ``out[rows] += up @ (down @ x)``: ``down`` (rank x in_features) is designed and frozen;
    ``up`` (adapted rows x rank) starts at zero and is trained. ``rows`` are ``row_ranges`` of the base layer's
    output (all of them by default; the key and value rows of a fused ``qkv`` for the reference's InfLoRA). Finished
    branches are kept in ``past_down`` / ``past_up`` (stacked along the rank axis) and, by default, merged into
    ``base_layer.weight``: the forward then costs one plain linear plus the current branch, however many tasks came
    before.
    """

    def __init__(self, base_layer: nn.Linear, row_ranges: Optional[Sequence[tuple[int, int]]] = None,
                 layer_name: str = "") -> None:
        super().__init__(base_layer, row_ranges, layer_name)
        weight = base_layer.weight
        self.register_buffer("down", weight.new_zeros(0, self.in_features))
        self.up = nn.Parameter(weight.new_zeros(self.adapted_rows, 0))
        self.register_buffer("past_down", weight.new_zeros(0, self.in_features))
        self.register_buffer("past_up", weight.new_zeros(self.adapted_rows, 0))
        self.merged = True

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def rank(self) -> int:
        """Rank of the open branch (0 when none is open)."""
        return int(self.down.shape[0])

    @property
    def num_finished(self) -> int:
        """Total rank of the finished branches (tasks x rank)."""
        return int(self.past_down.shape[0])

    def start_branch(self, rank: int) -> None:
        """Open a new task's branch: a zero ``down`` to be designed and a zero, trainable ``up``."""
        if self.rank:
            raise RuntimeError("a branch is already open; finish it before starting another")
        weight = self.base_layer.weight
        self.down = weight.new_zeros(rank, self.in_features)
        self.up = nn.Parameter(weight.new_zeros(self.adapted_rows, rank))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the open branch trains: its ``up`` (``down`` is designed and frozen)."""
        return [self.up] if self.rank else []

    @torch.no_grad()
    def set_down(self, down: torch.Tensor) -> None:
        if down.shape != self.down.shape:
            raise ValueError(f"down must have shape {tuple(self.down.shape)}, got {tuple(down.shape)}")
        self.down.copy_(down.to(self.down.dtype))

    @torch.no_grad()
    def finish_branch(self) -> None:
        """Freeze the open branch, keep it in the history and (if merged) fold it into ``base_layer.weight``."""
        if not self.rank:
            return
        if self.merged:
            self._add_to_weight(self.get_delta_weight(finished=False), 1.0, "merging the open branch")
        up = self.up.detach()
        self.past_down = torch.cat([self.past_down, self.down], dim=0)
        self.past_up = torch.cat([self.past_up, up], dim=1)
        self.down = self.down.new_zeros(0, self.in_features)
        self.up = nn.Parameter(up.new_zeros(self.adapted_rows, 0))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every finished branch into ``base_layer.weight`` (the default state)."""
        if not self.merged:
            self._add_to_weight(self.get_delta_weight(current=False), 1.0, "merging the finished branches")
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the finished branches out of ``base_layer.weight``; the forward then re-sums them (the reference's
        way)."""
        if self.merged:
            self._add_to_weight(self.get_delta_weight(current=False), -1.0, "unmerging the finished branches")
            self.merged = False

    # ----------------------------------------------------------------------------------------------- delta weight
    def get_delta_weight(
        self, finished: BranchRows = True, current: bool = True, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The low-rank update of ``base_layer.weight``: ``up @ down`` of the chosen branches on the adapted rows.

        The one place the update is computed: merging, unmerging, export and the diagnostics all use it. Returns a
        tensor of the base weight's shape (zeros outside the adapted rows), in ``dtype`` (float64 by default, so
        that merges and unmerges round once, into the weight) on the weight's device, detached.

        Args:
            finished: the finished branches to include: ``True`` all of them, ``False`` none, or a slice / list of
                their rank rows (rows of ``past_down``; task ``t`` of rank ``r`` is ``slice(t * r, (t + 1) * r)``).
            current: include the open (current) branch.

        ``base_layer.weight`` plus ``get_delta_weight(finished=not merged)`` is the weight the layer applies now.
        """
        weight = self.base_layer.weight
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
        if up is None or not up.shape[1]:
            return torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        return self.scatter_rows(up @ torch.cat(downs, dim=0).to(dtype), dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``base_layer.weight`` with every branch folded in (finished ones not merged yet, and the open one): the
        weight the layer applies now, as a new tensor of the base weight's dtype and device. The adapter is not
        modified."""
        return self._weight_plus(self.get_delta_weight(finished=not self.merged, current=True), 1.0, "exporting")

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.num_finished == 0:
            down, up = self.down, self.up
        else:
            down = torch.cat([self.past_down, self.down], dim=0)
            up = torch.cat([self.past_up, self.up], dim=1)
        if down.shape[0] == 0:
            return out
        # One low-rank path for every adapted row, added to their slices of the output.
        return self.add_to_rows(out, F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)))

    def extra_repr(self) -> str:
        rows = ", ".join(f"{a}:{b}" for a, b in self.row_ranges)
        return f"rows=[{rows}], rank={self.rank}, finished_rank={self.num_finished}, merged={self.merged}"

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {"merged": self.merged, "row_ranges": [list(r) for r in self.row_ranges]}

    def set_extra_state(self, state: Any) -> None:
        self._check_row_ranges(state)
        self.merged = bool(state["merged"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Checkpoints of 0.2 named the wrapped layer "qkv": read them under today's name.
        for suffix in ("weight", "bias"):
            old, new = f"{prefix}qkv.{suffix}", f"{prefix}base_layer.{suffix}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        # Branch shapes grow with the tasks: take the checkpoint's shapes before copying its values.
        for name in ("down", "past_down", "past_up"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[key].shape))
        key = prefix + "up"
        if key in state_dict and state_dict[key].shape != self.up.shape:
            self.up = nn.Parameter(self.up.new_zeros(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
