"""Which linear layers of a ViT block get low-rank branches, and putting adapters on them: PEFT-style target
names, the fused ``attn.qkv`` and its rows, and the checks that a layer is called as a module (where the branch is
added)."""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

from torch import nn

from .lora import QKV_PARTS, LowRankLinear, qkv_row_ranges

TargetModules = Union[str, Sequence[str]]
DEFAULT_TARGET_MODULES = ("attn.qkv",)  # the reference's: the key and value rows of the fused qkv
ALL_LINEAR = "all-linear"


def _forward_source(module: nn.Module) -> Optional[str]:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # built without source files: the adapter's guard reports a bypass at run time
        return None


def is_fused_qkv(name: str) -> bool:
    """Whether the layer ``name`` is a fused query/key/value projection (whose rows are chosen by ``qkv_rows``)."""
    return name.rsplit(".", 1)[-1] == "qkv"


def qkv_problem(block: nn.Module, index: int) -> Optional[str]:
    """Why ``block``'s attention has no fused ``qkv`` InfLoRA can adapt; ``None`` when it has one.

    The attention must have a fused ``qkv`` ``nn.Linear`` (queries, keys, values stacked in that order) and call it
    as a module. timm's BEiT and EVA attentions with a separate q/v bias call ``F.linear(x, qkv.weight, bias)``
    instead; they are adapted by switching on their own ``qkv_bias_separate`` path (``qkv(x)`` plus the bias, the
    same sum).
    """
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    qkv = qkv.base_layer if isinstance(qkv, LowRankLinear) else qkv
    if not isinstance(qkv, nn.Linear):
        if attn is None:
            kind = "no attention"
        elif getattr(attn, "k_proj", None) is not None:
            kind = f"{type(attn).__name__} with separate q/k/v projections, not a fused qkv nn.Linear"
        else:
            kind = f"{type(attn).__name__} without a fused qkv nn.Linear"
        return f"block {index} ({type(block).__name__}) has {kind}"
    if qkv.out_features % 3 != 0:
        return f"block {index}: attn.qkv has {qkv.out_features} outputs, not 3 x an attention width"
    source = _forward_source(attn)
    if source is None:
        return None
    if "self.qkv(" not in source:
        return f"block {index}: {type(attn).__name__}.forward never calls attn.qkv(x) (it reads its weight directly)"
    if "qkv.weight" in source and getattr(attn, "q_bias", None) is not None and not hasattr(attn, "qkv_bias_separate"):
        return (
            f"block {index}: {type(attn).__name__} adds its q/v bias through F.linear(x, qkv.weight, ...), "
            "bypassing attn.qkv(x)"
        )
    return None


def normalize_target_modules(target_modules: Optional[TargetModules]) -> tuple[str, ...]:
    """``target_modules`` as a tuple of names (``None``: the default, ``"all-linear"`` stays one name)."""
    if target_modules is None:
        return DEFAULT_TARGET_MODULES
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not names or any(not isinstance(n, str) or not n.strip(".") for n in names):
        raise ValueError(f"target_modules must be module names relative to a block (e.g. ['attn.qkv', 'mlp.fc1']) "
                         f"or 'all-linear', got {target_modules!r}")
    if ALL_LINEAR in names and len(names) > 1:
        raise ValueError(f"target_modules: '{ALL_LINEAR}' already takes every linear layer; give it alone")
    return tuple(dict.fromkeys(names))


def block_linear_names(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of its ``nn.Linear`` layers, adapted or not, in module order."""
    names = []
    for name, module in block.named_modules():
        if isinstance(module, LowRankLinear):
            names.append(name)
        elif isinstance(module, nn.Linear) and not name.endswith(".base_layer"):
            names.append(name)
    return names


def resolve_targets(block: nn.Module, index: int, targets: Sequence[str]) -> list[str]:
    """The names (relative to ``block``, in module order) of the linear layers ``targets`` select in ``block``.

    As in PEFT, a target matches a module whose name equals it or ends with ``"." + target``; ``"all-linear"``
    selects every ``nn.Linear`` of the block. A target that matches nothing, or matches a module that is not an
    ``nn.Linear``, is refused."""
    linear = block_linear_names(block)
    if tuple(targets) == (ALL_LINEAR,):
        if not linear:
            raise ValueError(f"block {index} ({type(block).__name__}) has no nn.Linear layer to adapt")
        return linear
    modules = dict(block.named_modules())
    chosen: set[str] = set()
    for target in targets:
        hits = [n for n in modules if n and (n == target or n.endswith("." + target)) and not n.endswith(".base_layer")]
        if not hits:
            raise ValueError(f"target module {target!r} is not in block {index} ({type(block).__name__}); its linear "
                             f"layers are {', '.join(linear) or 'none'} (or pass 'all-linear')")
        for name in hits:
            if not isinstance(modules[name], (nn.Linear, LowRankLinear)):
                raise ValueError(f"target module {target!r} is {name} in block {index}, a {type(modules[name]).__name__}, "
                                 f"not an nn.Linear; branches go on linear layers ({', '.join(linear) or 'none'})")
        chosen.update(hits)
    return [n for n in linear if n in chosen]


def target_problem(block: nn.Module, index: int, name: str) -> Optional[str]:
    """Why the linear layer ``name`` of ``block`` cannot carry a branch (its module must call it as a module, which
    is where the branch is added); ``None`` when it can."""
    if name == "attn.qkv":
        return qkv_problem(block, index)
    parent_name, _, attr = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    source = _forward_source(parent)
    if source is not None and f"self.{attr}(" not in source:
        return (f"block {index}: {type(parent).__name__}.forward never calls {name}(x) (it reads its weight "
                "directly), so a branch there would be skipped")
    return None


def normalize_qkv_rows(qkv_rows: Sequence[str]) -> tuple[str, ...]:
    """``qkv_rows`` checked and put in weight order (``("v", "q")`` -> ``("q", "v")``)."""
    rows = (qkv_rows,) if isinstance(qkv_rows, str) else tuple(qkv_rows)
    if not rows or any(r not in QKV_PARTS for r in rows) or len(set(rows)) != len(rows):
        raise ValueError(f"qkv_rows must be distinct letters among q, k, v (e.g. ('k', 'v')), got {qkv_rows!r}")
    return tuple(p for p in QKV_PARTS if p in rows)


def wrap_layer(block: nn.Module, name: str, full_name: str, qkv_rows: Sequence[str], adapter_class: type,
               join_qkv_rows: bool) -> None:
    """Replace the linear layer ``name`` of ``block`` by an ``adapter_class`` wrapping it (on ``qkv_rows`` of a
    fused qkv)."""
    parent_name, _, attr = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    layer = getattr(parent, attr)
    rows = qkv_row_ranges(layer.out_features, qkv_rows, join_qkv_rows) if is_fused_qkv(name) else None
    adapter = adapter_class(layer, rows, layer_name=full_name)
    # BEiT / EVA: make the attention call qkv(x) and add its q/v bias after it (its own alternative path).
    if attr == "qkv" and getattr(parent, "q_bias", None) is not None and getattr(parent, "qkv_bias_separate", True) is False:
        parent.qkv_bias_separate = True
        adapter.restore_bias_separate = False
    setattr(parent, attr, adapter)


def unwrap_layer(block: nn.Module, name: str) -> None:
    """Put the plain layer back where :func:`wrap_layer` put its adapter."""
    parent_name, _, attr = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    adapter = getattr(parent, attr)
    if getattr(adapter, "restore_bias_separate", None) is not None:
        parent.qkv_bias_separate = adapter.restore_bias_separate
    setattr(parent, attr, adapter.base_layer)
