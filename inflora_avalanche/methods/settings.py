"""The methods' own settings, in groups (one group may serve several methods, as InfLoRA's serves its variants).

A group is a title, its :class:`~inflora_avalanche.schema.Field`\\ s and, where settings tie together, a check of a
whole config that raises a one-line :class:`~inflora_avalanche.schema.ConfigError`. The registry
(:mod:`inflora_avalanche.methods`) says which method has which groups. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..optimizer_names import OPTIMIZERS, check_optimizer_name, number_of_betas, takes_momentum
from ..schema import ConfigError, Field, given_as, mentioned, names


@dataclass(frozen=True)
class Settings:
    """A group of method settings: shown as one section of ``--help``; ``check(config)`` runs once per validation.
    ``unread``: common settings that the methods of this group do not read (refused when given, not ignored)."""

    title: str
    fields: tuple[Field, ...]
    check: Optional[Callable[[dict], None]] = None
    unread: tuple[str, ...] = ()


def _m(name: str, kind: str, default, help: str, **kwargs) -> Field:
    return Field(name, kind, default, help, group="method", **kwargs)


QKV_PARTS = ("q", "k", "v")
ALL_LINEAR = "all-linear"


def check_inflora(config: dict) -> None:
    """The thresholds grow from ``lamb`` to ``lame``."""
    c = config
    if not 0 < c["lamb"] <= 1:
        raise ConfigError(f"lamb must be in (0, 1], got {c['lamb']}; the paper uses 0.95 (CIFAR-100) or 0.98 "
                          "(ImageNet-R)")
    if not 0 < c["lame"] <= 1:
        raise ConfigError(f"lame must be in (0, 1], got {c['lame']}; the paper uses 1.0")
    if c["lame"] < c["lamb"]:
        raise ConfigError(f"lame ({c['lame']}) must be >= lamb ({c['lamb']}): the threshold grows from lamb to lame "
                          "over tasks")


def check_low_rank(config: dict) -> None:
    """``target_modules`` and ``qkv_rows`` name each layer or row once (``qkv_rows`` is put in weight order, q k v)."""
    c = config
    targets = c["target_modules"]
    if any(not t.strip(".") or t != t.strip() for t in targets):
        raise ConfigError(f"--target-modules takes module names relative to a block (e.g. attn.qkv mlp.fc1) or "
                          f"{ALL_LINEAR}, got {targets}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"--target-modules names a module twice: {targets}")
    if ALL_LINEAR in targets and len(targets) > 1:
        raise ConfigError(f"--target-modules {ALL_LINEAR} already takes every linear layer of the adapted blocks; give "
                          f"it alone, got {targets}")
    rows = c["qkv_rows"]
    if len(set(rows)) != len(rows):
        raise ConfigError(f"--qkv-rows names a row twice: {rows}; give each of q, k, v at most once")
    c["qkv_rows"] = [p for p in QKV_PARTS if p in rows]


LOW_RANK = Settings("low-rank branches", (
    _m("rank", "int", 10, "rank of each task's branches", minimum=1, resume="identity"),
    _m("adapted_blocks", "int_or_ints", None, "blocks with branches (N = the first N; a list of indices; default "
       "all)", nullable=True, resume="identity"),
    _m("target_modules", "strs", ["attn.qkv"], "the linear layers of each adapted block that get branches, by their "
       f"name in the block (PEFT style: attn.qkv attn.proj mlp.fc1 mlp.fc2), or {ALL_LINEAR}", resume="identity",
       metavar="NAME"),
    _m("qkv_rows", "strs", ["k", "v"], f"rows of a fused attn.qkv that get branches: any of {names(QKV_PARTS)} "
       "(InfLoRA's paper: k v; SD-LoRA's: q v)", choices=QKV_PARTS, resume="identity", metavar="ROW"),
), check=check_low_rank)

INFLORA = Settings("InfLoRA", (
    _m("reset_final_norm", "bool", False, "replace the backbone's final LayerNorm by a fresh one (InfLoRA+CA)",
       resume="identity"),
    _m("classifier_alignment", "json", None, "InfLoRA+CA: ClassifierAlignmentPlugin settings (JSON object; {} = its "
       "defaults)", nullable=True, resume="identity"),
))

# Not Sequential LoRA's: its random subspaces keep no memory.
SUBSPACE_MEMORY = Settings("InfLoRA subspace memory", (
    _m("lamb", "float", 0.95, "threshold of the first task (eps_t = lamb + (lame - lamb) t / T)", resume="identity"),
    _m("lame", "float", 1.0, "threshold of the last task", resume="identity"),
    _m("memory", "choice", "dualgpm", "subspace memory", choices=("dualgpm", "gpm"), resume="identity"),
), check=check_inflora)

SDLORA = Settings("SD-LoRA", (
    _m("reset_magnitudes", "bool", True, "re-create every task's magnitude at --magnitude-init when a task starts, "
       "as the official code does (--no-reset-magnitudes keeps the learned ones)", resume="identity"),
    _m("magnitude_init", "float", 0.8, "the value magnitudes start from (official: 0.8)", minimum=0,
       resume="identity"),
    _m("rank_reduction", "bool", False, "SD-LoRA-RR: rank 10 for tasks 0-3, 8 for 4-7, 6 from task 8 (old branches "
       "keep theirs)", resume="identity"),
))

def check_optimiser(config: dict) -> None:
    """A known optimiser name, as many betas as it takes, a warmup shorter than a task."""
    c = config
    try:
        check_optimizer_name(c["optimizer"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    betas = c["betas"]
    if betas is not None:
        wanted = number_of_betas(c["optimizer"]) or 2
        if len(betas) != wanted or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"betas must be {wanted} numbers in [0, 1) for --optimizer {c['optimizer']}, got "
                              f"{betas}: give --betas with {wanted} numbers (or --set betas=null: its own)")
    if c["warmup_epochs"] and c["warmup_epochs"] >= c["epochs"]:
        raise ConfigError(f"--warmup-epochs {c['warmup_epochs']} must be below --epochs {c['epochs']} (the warmup "
                          "takes the first epochs of every task, then the schedule runs)")
    if not c["warmup_factor"] <= 1:
        raise ConfigError(f"--warmup-factor must be in [0, 1] (the lr multiplier of the first warmup epoch), got "
                          f"{c['warmup_factor']}")


def check_optimiser_flags(config: dict, explicit: set) -> None:
    """Optimiser flags the user gave that the chosen optimiser or schedule would not read are refused, not ignored."""
    optimizer = config["optimizer"]
    if "momentum" in explicit and optimizer in OPTIMIZERS and not takes_momentum(optimizer):
        raise ConfigError(f"{given_as('momentum', explicit)} applies to {mentioned('optimizer', explicit)} sgd, "
                          f"not {optimizer}: drop one of them (of timm's "
                          "optimisers, nesterov, momentum, lars, rmsprop, ... take one too)")
    if "betas" in explicit and optimizer in OPTIMIZERS and not number_of_betas(optimizer):
        raise ConfigError(f"{given_as('betas', explicit)} apply to {mentioned('optimizer', explicit)} adam, not "
                          f"{optimizer}: drop one of them (of timm's "
                          "optimisers, adamw, lamb, lion, nadam, ... take them too)")
    if "warmup_factor" in explicit and not config["warmup_epochs"]:
        factor = given_as("warmup_factor", explicit)
        raise ConfigError(f"{factor} applies to a warmup: add --warmup-epochs N or drop "
                          f"{'warmup_factor from the file' if factor != '--warmup-factor' else factor}")


OPTIMISER = Settings("optimiser and schedule", (
    _m("betas", "floats", None, "betas of an optimiser that takes them (unset: its own; adam's are 0.9 0.999)",
       nullable=True),
    _m("momentum", "float", 0.9, "momentum of sgd (and of timm optimisers that take one)", minimum=0),
    _m("weight_decay", "float", 0.0, "weight decay", minimum=0),
    _m("milestones", "ints", [], "epochs at which the step schedule multiplies the lr by gamma"),
    _m("gamma", "float", 0.1, "factor of the step schedule", minimum=0),
    _m("warmup_epochs", "int", 0, "linear warmup over the first N epochs of every task, then --lr-schedule from "
       "epoch N on (not shifted, as timm's warmup_t)", minimum=0),
    _m("warmup_factor", "float", 0.1, "lr multiplier of the first warmup epoch; it rises linearly towards 1",
       minimum=0),
), check=check_optimiser)

FINETUNE = Settings("full fine-tuning", (
    _m("backbone_lr", "float", None, "learning rate of the backbone", minimum=0, nullable=True),
))

EWC_SETTINGS = Settings("EWC", (
    _m("ewc_lambda", "float", 1e4, "penalty weight", minimum=0),
    _m("ewc_mode", "choice", "separate", "Avalanche's mode", choices=("separate", "online")),
))

LWF_SETTINGS = Settings("LwF", (
    _m("lwf_alpha", "float", 1.0, "distillation weight", minimum=0),
    _m("lwf_temperature", "float", 2.0, "distillation temperature", minimum=0),
))

L2P_SETTINGS = Settings("L2P", (
    _m("l2p_pool_size", "int", 10, "prompt pool size", minimum=1, resume="identity"),
    _m("l2p_prompt_length", "int", 5, "tokens per prompt", minimum=1, resume="identity"),
    _m("l2p_top_k", "int", 5, "prompts selected per image", minimum=1, resume="identity"),
    _m("l2p_sim_coefficient", "float", 0.1, "weight of the key-matching loss", minimum=0),
), unread=("head_lr",))  # the prompts, keys and head train at --lr


def check_plain_training(config: dict) -> None:
    """Methods without the ``schedules`` capability (the fine-tuning and prompt baselines) train with a constant-rate
    Adam; other optimiser settings are refused, not ignored (at the command line, and again where their strategies
    are built)."""
    if config["optimizer"] != "adam" or config["lr_schedule"] != "constant" or config["warmup_epochs"]:
        raise ConfigError(f"{config['method']} trains with Adam at a constant rate; drop --optimizer/--lr-schedule/"
                          f"--warmup-epochs (got {config['optimizer']}, {config['lr_schedule']}, warmup "
                          f"{config['warmup_epochs']})")
