"""Which of Avalanche's plugins and criteria the low-rank strategies can honour, and the one-line refusal of those
they cannot, given when the strategy is built (before anything is trained).

A low-rank strategy trains new parameters for every task (the task's branches and head), freezes and merges them
when the task ends, and trains each sample on its own task's head. Plugins that hold old parameters in place,
project their gradients, rebuild the model, or read a single classifier layer therefore have nothing to act on or
break mid-run; they are refused with what to use instead. Every plugin class of ``avalanche.training.plugins`` is
in one of the two tables (``tests/test_plugin_support.py`` checks it), so a new Avalanche plugin is a decision,
not a surprise. A user's own plugin (a ``SupervisedPlugin`` subclass) is always accepted.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

_PARAMETERS = ("it protects the parameters it saw at the end of each experience, but a low-rank strategy trains new "
               "parameters for every task (that task's branches and head) and freezes the old ones, so it has "
               "nothing to hold; the subspace memory is what protects old tasks here. {baseline}")
_PROJECTION = ("it projects the gradients of the trained parameters away from those of stored old samples, but "
               "here they are new parameters every task, whose inputs already avoid the old tasks' subspace; its "
               "effect on these strategies is not measured. To train on old samples use ReplayPlugin")
_REPLAY_OTHER = "use ReplayPlugin (each replayed sample is trained on its own task's head)"

#: Avalanche plugins the low-rank strategies refuse: class name -> why, and what to use instead.
REFUSED_PLUGINS: dict[str, str] = {
    "EWCPlugin": _PARAMETERS.format(baseline="For an EWC baseline use Avalanche's EWC strategy (the runner's "
                                              "--method ewc)"),
    "MASPlugin": _PARAMETERS.format(baseline="For a MAS baseline use it with Avalanche's Naive strategy"),
    "SynapticIntelligencePlugin": _PARAMETERS.format(baseline="For an SI baseline use Avalanche's "
                                                               "SynapticIntelligence strategy"),
    "RWalkPlugin": _PARAMETERS.format(baseline="For an RWalk baseline use it with Avalanche's Naive strategy"),
    "AGEMPlugin": _PROJECTION,
    "GEMPlugin": _PROJECTION,
    "GDumbPlugin": "it re-initialises the model before every experience and trains it on its buffer alone, which "
                   "would discard the pretrained backbone and the merged branches; " + _REPLAY_OTHER,
    "FromScratchTrainingPlugin": "it re-initialises the model before every experience, which would discard the "
                                 "pretrained backbone and the merged branches",
    "CWRStarPlugin": "it consolidates the per-class weights of one named classifier layer, but these models have "
                     "one head per task; to re-balance the heads use ClassifierAlignmentPlugin",
    "BiCPlugin": "it trains a bias-correction layer per experience over the output columns on a held-out replay "
                 "buffer, which does not fit per-task heads; to re-balance the heads use ClassifierAlignmentPlugin",
    "MIRPlugin": "it picks replay samples by a virtual step of the model's whole output and optimiser, which do "
                 "not match per-task heads and an optimiser rebuilt for every task; " + _REPLAY_OTHER,
    "GSS_greedyPlugin": "it selects its buffer by gradients of the whole model, which here has new trainable "
                        "parameters every task; " + _REPLAY_OTHER,
    "RARPlugin": "its adversarial replay perturbs samples through a named feature layer of the whole model, which "
                 "does not fit per-task heads; " + _REPLAY_OTHER,
    "LFLPlugin": "it needs an Avalanche BaseModel with get_features(); to distil the previous model use LwFPlugin",
    "FeatureDistillationPlugin": "it needs a model that stores its features in model.features during forward; to "
                                 "distil the previous model use LwFPlugin",
    "CoPEPlugin": "it replaces the classifier by class prototypes over the model's output, which these models "
                  "do not have; use ClassifierAlignmentPlugin for a classifier built from class statistics",
    "GenerativeReplayPlugin": "it needs a generator trained by a generative strategy; " + _REPLAY_OTHER,
    "TrainGeneratorAfterExpPlugin": "it trains a generator of a generative strategy, which these strategies do "
                                    "not have; " + _REPLAY_OTHER,
    "CurrentDataNCMUpdate": "it updates an NCMClassifier, which these models do not have",
    "MemoryNCMUpdate": "it updates an NCMClassifier, which these models do not have",
    "NCMOracle": "it updates an NCMClassifier, which these models do not have",
    "CurrentDataFeCAMUpdate": "it updates a FeCAMClassifier, which these models do not have",
    "MemoryFeCAMUpdate": "it updates a FeCAMClassifier, which these models do not have",
    "FeCAMOracle": "it updates a FeCAMClassifier, which these models do not have",
    "LRSchedulerPlugin": "it would step a scheduler of an optimiser the strategy no longer uses (it builds a new one "
                         "for every task's branches): pass scheduler_factory=lambda optimizer, epochs: ... instead",
}

#: Avalanche plugins that work with the low-rank strategies (each checked by a test), and what they do there.
SUPPORTED_PLUGINS: dict[str, str] = {
    "EvaluationPlugin": "pass it as evaluator=; any metric, also before the first experience",
    "ReplayPlugin": "each replayed sample is trained on its own task's head (the old heads stay frozen), so its loss "
                    "reaches the current branches; the subspace passes use the experience's own data",
    "LwFPlugin": "adds its distillation loss from the second task on; refused together with input_transform",
    "EarlyStoppingPlugin": "stops an experience early (with eval_every and an eval stream); the task still closes",
    "SupervisedPlugin": "the base class of a user's own plugin",
}

#: Avalanche criteria that index the whole output by dataset label, which per-task heads do not give them.
REFUSED_CRITERIA = ("MaskedCrossEntropy", "ICaRLLossPlugin")


def _avalanche_class(obj: Any) -> Optional[str]:
    """The name of the Avalanche class ``obj`` is an instance of (itself or its nearest Avalanche base)."""
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("avalanche."):
            return cls.__name__
    return None


def check_plugins(plugins: Sequence[Any], input_transform: Any = None) -> None:
    """Refuse, in one line, plugins that cannot do what they promise with a low-rank strategy."""
    for plugin in plugins:
        if isinstance(plugin, type):
            raise ValueError(f"plugins holds the class {plugin.__name__}, not a plugin: pass "
                             f"{plugin.__name__}(...)")
        name = _avalanche_class(plugin)
        if name in REFUSED_PLUGINS:
            raise ValueError(f"{type(plugin).__name__} cannot be used with a low-rank strategy: {REFUSED_PLUGINS[name]}")
        if name in REFUSED_CRITERIA:
            raise ValueError(f"{type(plugin).__name__} cannot be used with a low-rank strategy: "
                             f"{_criterion_reason(name)}")
        if name == "LwFPlugin" and input_transform is not None:
            raise ValueError("LwFPlugin feeds the raw minibatch to its copy of the previous model, not what "
                             "input_transform makes of it: use one of LwFPlugin and input_transform")


def _criterion_reason(name: str) -> str:
    return (f"{name} indexes the whole output by dataset label, but each task trains on its own head's columns; "
            "use a criterion(logits, targets) such as nn.CrossEntropyLoss(label_smoothing=...)")


def check_criterion(criterion: Any) -> str:
    """The ``reduction`` of ``criterion`` (``"mean"`` or ``"sum"``), or a one-line ``ValueError`` for a criterion
    per-task heads cannot honour.

    Each task trains on its own head, so the criterion sees ``(logits over the task's classes, index of the label
    among them)``, and a batch that mixes tasks (replay) is scored per task and combined as the criterion's
    reduction would: a size-weighted mean, or a sum. A class-weighted criterion or a custom ``ignore_index`` would
    refer to dataset labels, not to those indices."""
    if isinstance(criterion, type):
        raise ValueError(f"criterion is the class {criterion.__name__}, not a criterion: pass "
                         f"{criterion.__name__}() (or any f(logits, targets))")
    name = _avalanche_class(criterion)
    if name in REFUSED_CRITERIA:
        raise ValueError(f"criterion {type(criterion).__name__} cannot be used with a low-rank strategy: "
                         f"{_criterion_reason(name)}")
    if not callable(criterion):
        raise ValueError(f"criterion must be callable as criterion(logits, targets), got {type(criterion).__name__}")
    if getattr(criterion, "weight", None) is not None:
        raise ValueError(f"criterion {type(criterion).__name__} has class weights (weight=...), but each task trains "
                         "on its own head, whose columns are not the dataset's labels; drop weight=, or balance "
                         "the classes in the data")
    if getattr(criterion, "ignore_index", -100) != -100:
        raise ValueError(f"criterion {type(criterion).__name__} has ignore_index={criterion.ignore_index}, but the "
                         "targets it sees are indices within the task's head, not dataset labels; drop ignore_index")
    reduction = getattr(criterion, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"criterion {type(criterion).__name__} has reduction={reduction!r}; the training loss must "
                         "be one number: use reduction='mean' or 'sum'")
    return reduction
