"""The optimiser names the strategies and the runner accept, and what each takes (betas, momentum).

Torch-free, so the command line checks a name before any heavy import. ``adam`` (the reference's Adam) and ``sgd``
(torch's SGD with plain momentum, as the presets use it) are built by :mod:`inflora_avalanche.training`; every other
name is one of timm's optimisers, built by ``timm.optim.create_optimizer_v2``. Left out of timm's registry: those that
need packages timm does not install (``bnb*``: bitsandbytes, ``fused*``: apex), the second-order ``adahessian`` (its
backward needs ``create_graph``) and ``adafactor``/``cadafactor`` (they replace the learning rate the schedule sets).
"""

from __future__ import annotations

import difflib

OWN_OPTIMIZERS = ("adam", "sgd")

#: name -> (number of betas it takes, 0 for none; whether it takes a momentum), as timm 1.0's registry says.
OPTIMIZER_ARGS: dict[str, tuple[int, bool]] = {
    "adam": (2, False), "sgd": (0, True),
    "adabelief": (2, False), "adadelta": (0, False), "adafactorbv": (0, True), "adafactorbvc": (0, True),
    "adagrad": (0, False), "adamax": (2, False), "adamc": (2, False), "adamp": (2, False),
    "adamuon": (2, True), "adamw": (2, False), "adamwlegacy": (2, False), "adan": (3, False), "adanw": (3, False),
    "adopt": (2, False), "adoptc": (2, False), "adoptw": (2, False), "cadafactorbv": (0, True),
    "cadafactorbvc": (0, True), "cadamc": (2, False), "cadamp": (2, False), "cadamw": (2, False),
    "cadan": (3, False), "cadanw": (3, False), "cadopt": (2, False), "cadoptc": (2, False), "cadoptw": (2, False),
    "clamb": (2, False), "clambw": (2, False), "claprop": (2, False), "clion": (2, False), "clionc": (2, False),
    "cmars": (2, False), "cnadamc": (2, False), "cnadamw": (2, False), "crmsproptf": (0, True), "csgdc": (0, True),
    "csgdp": (0, True), "csgdw": (0, True), "kron": (0, True), "kronc": (0, True), "kronw": (0, True),
    "lamb": (2, False), "lambc": (2, False), "lambcd": (2, False), "lambcw": (2, False), "lambw": (2, False),
    "laprop": (2, False), "lapropc": (2, False), "larc": (0, True), "lars": (0, True), "lion": (2, False),
    "lionc": (2, False), "madgrad": (0, True), "madgradw": (0, True), "mars": (2, False), "momentum": (0, True),
    "muon": (2, True), "nadam": (2, False), "nadamc": (2, False), "nadamlegacy": (2, False), "nadamuon": (2, True),
    "nadamw": (2, False), "nesterov": (0, True), "nesterovw": (0, True), "nlarc": (0, True), "nlars": (0, True),
    "nmuon": (2, True), "novograd": (2, False), "novogradc": (2, False), "novogradw": (2, False),
    "radabelief": (2, False), "radam": (2, False), "radamlegacy": (2, False), "radamw": (2, False),
    "rmsprop": (0, True), "rmsproptf": (0, True), "rmsproptfc": (0, True), "rmsproptfw": (0, True),
    "sgdc": (0, True), "sgdp": (0, True), "sgdw": (0, True),
}
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_ARGS)
TIMM_OPTIMIZERS: tuple[str, ...] = tuple(n for n in OPTIMIZERS if n not in OWN_OPTIMIZERS)


#: timm's names left out, by name or prefix, and why.
LEFT_OUT = {"bnb": "it needs bitsandbytes", "fused": "it needs apex", "adahessian": "it is second-order (its backward "
            "needs create_graph)", "adafactor": "it sets its own learning rate", "cadafactor": "it sets its own "
            "learning rate"}


def check_optimizer_name(name: object) -> None:
    """One line naming the closest known name, or where the list is, or why one of timm's is left out."""
    if name in OPTIMIZER_ARGS:
        return
    why = next((why for key, why in LEFT_OUT.items() if str(name) == key or key in ("bnb", "fused")
                and str(name).startswith(key)), None)
    if why:
        raise ValueError(f"optimizer {name} is one of timm's, left out here because {why}; "
                         "inflora_avalanche.optimizer_names.OPTIMIZERS lists those that work")
    close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"optimizer must be adam, sgd or one of timm's optimisers such as adamw, lamb, lion, nesterov "
                     f"(inflora_avalanche.optimizer_names.OPTIMIZERS lists all {len(OPTIMIZERS)}), got {name!r}{hint}")


def number_of_betas(name: str) -> int:
    """How many betas ``name`` takes (0: none)."""
    return OPTIMIZER_ARGS[name][0]


def takes_momentum(name: str) -> bool:
    return OPTIMIZER_ARGS[name][1]

