"""The runner's config schema: the common settings (stream, model, budget, where and how) and every method's own
(declared with the method, :mod:`inflora_avalanche.methods.settings`): each setting's type, default, help, and what it
means for resume.

The command-line flags (``--<key-with-dashes>``), the defaults shown by ``--help``, the validation and the resume
identity are all derived from :data:`FIELDS`; :mod:`.presets` layers presets over it. Torch-free on purpose:
``--help`` and every configuration error come before any heavy import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .. import streams as S
from ..methods import DIAGNOSTICS, EXPORT, REGISTRY, SCHEDULES, methods_with, setting_groups, setting_owners
from ..methods.settings import check_optimiser_flags, check_plain_training  # noqa: F401  (re-exported)
from ..schema import (KIND_CHECKS, ConfigError, Field, FileSettings, Given, check_value, drop,  # noqa: F401
                      given_as, mentioned, names)  # (re-exported)

_F = Field
COMMON_FIELDS: tuple[Field, ...] = (
    # ------------------------------------------------------------------ what runs
    _F("method", "str", "inflora", "method to run (see `inflora-avalanche presets`)", resume="identity"),
    _F("description", "text", "", "free text shown in the summary", resume="free"),
    _F("seeds", "ints", [0], "seeds; mean ± std is reported over them", resume="identity"),
    _F("demo", "bool", False, "offline CPU demo on scikit-learn's digits with a tiny random ViT (not the benchmark)",
       resume="free"),
    _F("published", "json", {}, "published figures shown next to ours in the summary", resume="free"),
    # ------------------------------------------------------------------ data stream
    _F("benchmark", "choice", S.DEFAULT_STREAM, "data stream", group="stream", choices=S.stream_names,
       resume="identity"),
    _F("data_root", "path", None, "data folder (" + "; ".join(s.data for s in S.REGISTRY.values()
                                                               if s.data_root != "unused") + ")",
       group="stream", nullable=True, resume="free"),
    _F("download", "bool", True, "download CIFAR-100 when it is missing", group="stream", resume="free"),
    _F("n_experiences", "int", 10, "number of experiences (tasks)", group="stream", minimum=1, resume="identity",
       aliases=("--experiences",)),
    _F("class_order", "ints", None, "class order (a permutation of the labels); default 0..C-1", group="stream",
       nullable=True, resume="identity"),
    _F("classes", "int_or_strs", None, "folder streams: the first N classes (name order) or the named class folders",
       group="stream", nullable=True, resume="identity"),
    _F("max_train_per_class", "int", None, "folder/synthetic streams: at most this many training images per class",
       group="stream", minimum=1, nullable=True, resume="identity"),
    _F("max_test_per_class", "int", None, "folder/synthetic streams: at most this many test images per class",
       group="stream", minimum=1, nullable=True, resume="identity"),
    _F("test_fraction", "float", 0.2, "share of each class held out for testing (ImageNet-R, folders without "
       "train/ and val/)", group="stream", resume="identity"),
    _F("split_seed", "int", 0, "seed of the per-class train/test split", group="stream", minimum=0,
       resume="identity"),
    _F("split_manifest", "path", None, "reuse the split manifest (JSON) of an earlier run", group="stream",
       nullable=True, resume="free"),
    _F("domains", "strs", None, "DomainNet: the domains to use (default all six)", group="stream", nullable=True,
       resume="identity"),
    _F("resolution", "int", 224, "input resolution in pixels", group="stream", minimum=1, resume="identity"),
    _F("normalize", "bool", False, "normalise pixels with mean/std (the paper feeds [0, 1] pixels)", group="stream",
       resume="identity"),
    _F("mean", "floats", None, "normalisation mean (3 numbers; default ImageNet's)", group="stream", nullable=True,
       resume="identity"),
    _F("std", "floats", None, "normalisation std (3 numbers; default ImageNet's)", group="stream", nullable=True,
       resume="identity"),
    _F("device_augment", "bool", False, "Split CIFAR-100: keep uint8 tensors and crop/flip/resize them in batches "
       "on the device", group="stream"),
    # ------------------------------------------------------------------ model
    _F("backbone", "str", "vit_base_patch16_224.augreg_in21k", "timm model name of the backbone", group="model",
       resume="identity"),
    _F("pretrained", "bool", True, "load timm's pretrained weights (downloaded once, then cached)", group="model",
       resume="identity"),
    _F("weights", "path", None, "local backbone checkpoint (.safetensors/.pth/.npz, timm key names) instead of "
       "timm's download", group="model", nullable=True, resume="free"),
    _F("backbone_kwargs", "json", {}, "JSON object passed to timm.create_model (e.g. {\"dynamic_img_size\": true})",
       group="model", resume="identity"),
    # ------------------------------------------------------------------ optimisation
    _F("optimizer", "str", "adam", "optimiser (rebuilt for every experience): adam (the reference's), sgd, or a timm "
       "optimiser such as adamw, lamb, lion, nesterov (timm.optim.create_optimizer_v2)", group="method",
       metavar="NAME"),
    _F("lr", "float", 5e-4, "learning rate (InfLoRA: of the branches and, unless --head-lr, the head)",
       group="method", minimum=0),
    _F("head_lr", "float", None, "learning rate of the classifier head (default: --lr)", group="method", minimum=0,
       nullable=True),
    _F("lr_reference_batch", "int", None, "scale every learning rate by batch_size / this (the linear scaling "
       "rule; L2P's lr is given for batch 256)", group="method", minimum=1, nullable=True),
    _F("lr_scale", "float", 1.0, "multiply every learning rate (the same factor for all methods of a comparison)",
       group="training", minimum=0),
    _F("lr_schedule", "choice", "cosine", "per-epoch schedule: cosine (the reference's CosineSchedule), annealing "
       "(torch's CosineAnnealingLR), step (x gamma at each milestone) or constant", group="method",
       choices=("cosine", "annealing", "step", "constant")),
    _F("epochs", "int", 20, "training epochs per experience", group="training", minimum=1),
    _F("batch_size", "int", 128, "training minibatch size (global under torchrun)", group="training", minimum=1),
    _F("eval_batch_size", "int", None, "evaluation minibatch size (default: --batch-size)", group="training",
       minimum=1, nullable=True, resume="free"),
    _F("precision", "choice", "auto", "auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32",
       group="training", choices=("auto", "bf16", "fp32")),
    _F("train_shuffle", "choice", "true", "shuffle the training data each epoch (true), not at all (false), or "
       "one seeded order per experience that is the same for any number of processes (fixed)", group="training",
       choices=("true", "false", "fixed")),
    _F("deterministic", "bool", False, "deterministic torch kernels", group="training"),
    # ------------------------------------------------------------------ where and how
    _F("device", "str", "auto", "auto, cpu, cuda, cuda:N or mps", resume="free"),
    _F("num_workers", "int", None, "DataLoader worker processes (default: up to 8 CPU cores)", minimum=0,
       nullable=True, resume="free"),
    _F("cpu_threads", "int", None, "torch CPU threads (1 avoids oversubscription for tiny models)", minimum=1,
       nullable=True, resume="free"),
    _F("out", "path", None, "results folder (default results/<preset>/<date-time>); must be new or empty",
       nullable=True, resume="free"),
    _F("overwrite", "bool", False, "allow writing into an existing non-empty --out folder", resume="free"),
    _F("resume", "bool", False, "continue the run in --out from its checkpoint (written after every experience)",
       resume="free"),
    _F("resume_with_changes", "bool", False, "--resume also when training settings (lr, epochs, ...) differ from "
       "the checkpoint's: later experiences train with the new ones, and results.json records per experience which "
       "were used", resume="free"),
    _F("export", "path", None, "after every experience, write the merged model as a timm folder "
       "DIR/seed<N>/after_exp<t>/ (model.safetensors + config.json; methods: " + ", ".join(methods_with(EXPORT)) + ")",
       nullable=True, resume="free"),
    _F("progress", "bool", None, "progress bars (default: only when the output is a terminal)", nullable=True,
       resume="free"),
    _F("diagnostics", "bool", True, "subspace diagnostics per layer and task (methods: "
       + ", ".join(methods_with(DIAGNOSTICS)) + ")", resume="identity"),
)
#: Every setting a config holds: the common ones, then each method's own (group "method").
FIELDS: tuple[Field, ...] = COMMON_FIELDS + tuple(f for g in setting_groups() for f in g.fields)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in FIELDS}
METHOD_KEYS = frozenset(f.name for f in FIELDS if f.group == "method")
RESUME_IDENTITY_KEYS = frozenset(f.name for f in FIELDS if f.resume == "identity") | {"preset"}
RESUME_FREE_KEYS = frozenset(f.name for f in FIELDS if f.resume == "free")


# --------------------------------------------------------------------------------------------------- values
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(FIELD_BY_NAME) - {"preset"})
    if unknown:
        hint = _closest(unknown[0])
        raise ConfigError(f"unknown setting(s) {unknown} in {where}" + (f"; did you mean {hint!r}?" if hint else
                          "; `inflora-avalanche run --help` lists them all"))
    for key, value in values.items():
        if key != "preset":
            check_value(FIELD_BY_NAME[key], value, where)


def _closest(name: str) -> Optional[str]:
    import difflib

    match = difflib.get_close_matches(name, list(FIELD_BY_NAME), n=1)
    return match[0] if match else None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: dict) -> dict:
    """Every value by its field, then the rules that tie settings together; :class:`ConfigError` in one line."""
    check_values(config, "the config")
    missing = sorted(set(FIELD_BY_NAME) - set(config))
    _check(not missing, f"settings missing from the config: {missing}")
    c = config
    if isinstance(c["train_shuffle"], bool):
        c["train_shuffle"] = "true" if c["train_shuffle"] else "false"
    _check(bool(c["seeds"]), "seeds must name at least one seed")
    _check(len(set(c["seeds"])) == len(c["seeds"]), f"seeds must be distinct, got {c['seeds']}")
    _check(all(0 <= s < 2**32 for s in c["seeds"]), f"seeds must be in 0 .. 2**32-1, got {c['seeds']}")
    _check(c["lr"] > 0, f"lr must be positive, got {c['lr']}")
    for key in ("head_lr", "backbone_lr"):
        _check(c[key] is None or c[key] > 0, f"{key} must be positive, got {c[key]}")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c["device"]) is not None,
           f"device must be auto, cpu, cuda, cuda:N or mps, got {c['device']!r}")
    for key in ("mean", "std"):
        _check(c[key] is None or len(c[key]) == 3, f"{key} must be 3 numbers, got {c[key]!r}")
    _check(0 < c["test_fraction"] < 1, f"test_fraction must be in (0, 1), got {c['test_fraction']}")
    for group in setting_groups():  # every method's own rules (the config holds every method's settings)
        if group.check is not None:
            group.check(c)
    stream = S.get_stream(c["benchmark"])
    if c["classes"] is not None or c["max_train_per_class"] or c["max_test_per_class"]:
        _check(stream.subsets, "classes / max_train_per_class / max_test_per_class only apply to "
               f"{names(S.streams_where(lambda s: s.subsets))} streams")
    if _is_int(c["classes"]):
        _check(c["classes"] >= 1, f"classes must be positive, got {c['classes']}")
        _check(c["classes"] % c["n_experiences"] == 0,
               f"{c['classes']} classes cannot be split evenly into {c['n_experiences']} experiences")
    if stream.data_root == "required":
        _check(bool(c["data_root"]), f"the {c['benchmark']} stream needs --data-root (the folder that holds the images)")
    for key in ("weights", "split_manifest"):
        if c[key] is not None:
            path = Path(c[key]).expanduser()
            _check(not path.is_dir(), f"--{key.replace('_', '-')} {c[key]} is a folder; give the file")
            _check(path.is_file(), f"--{key.replace('_', '-')} {c[key]}: no such file")
    check_input_size(c)
    known = stream.num_classes
    if known is not None:
        _check(known % c["n_experiences"] == 0,
               f"the {known} classes of {c['benchmark']} cannot be split evenly into {c['n_experiences']} experiences; "
               f"choose --n-experiences among {[n for n in range(1, known + 1) if known % n == 0]}")
    if _is_int(c["classes"]):
        _check(c["classes"] >= 2, "classes: 1 class in all, but class-incremental learning needs at least two")
    counted = known if known is not None else c["classes"] if _is_int(c["classes"]) else len(c["classes"] or [])
    if counted and not c["split_manifest"]:  # a manifest fixes the classes: checked once the stream is built
        check_one_class_experiences(c, counted)
    _check(not (c["resume_with_changes"] and c["overwrite"]), "--resume-with-changes continues the run in --out and "
           "--overwrite starts it anew; pass only one of them")
    if c["resume_with_changes"]:
        c["resume"] = True
    _check(not (c["resume"] and c["overwrite"]),
           "--resume continues the run in --out and --overwrite starts it anew; pass only one of them")
    _check(not (c["device_augment"] and not stream.device_augment),
           f"--device-augment does nothing for the {stream.name} stream (only "
           f"{names(S.REGISTRY[n].label for n in S.streams_where(lambda s: s.device_augment))}, kept as decoded "
           "uint8 tensors, is augmented on the device): drop it")
    return config


def check_one_class_experiences(config: dict, num_classes: int) -> None:
    """A low-rank method with one class per experience learns only through classifier alignment without logit
    normalisation (a task's own head has nothing to tell its class from; the old heads are frozen and no old
    samples are kept): refused otherwise, with the option that makes it work."""
    method = config["method"]
    if num_classes != config["n_experiences"] or method not in (setting_owners("rank") or []):
        return
    alignment = config.get("classifier_alignment")
    if isinstance(alignment, dict) and alignment.get("logit_normalization") is False:
        return
    how = ("add --classifier-alignment '{\"logit_normalization\": false}' (classifier alignment trains every head on "
           "the stored class statistics after each task)" if "classifier_alignment" in _method_keys(method)
           else "use --method inflora_ca with --classifier-alignment '{\"logit_normalization\": false}'")
    raise ConfigError(f"{num_classes} classes in {config['n_experiences']} experiences is one class per experience: "
                      f"a task of one class gives {method} nothing to learn (its head has no other class to tell it "
                      f"from; the old heads are frozen and no old samples are kept); {how}, or choose fewer "
                      "experiences")


def _method_keys(method: str) -> set:
    return {f.name for f in REGISTRY[method].fields}


def check_input_size(config: dict) -> None:
    """``resolution`` and an ``img_size`` fixed in ``backbone_kwargs`` must agree, unless the backbone takes any size
    (``dynamic_img_size``): the model would otherwise meet images of another size only when training starts."""
    kwargs = config["backbone_kwargs"]
    size = kwargs.get("img_size")
    if size is None or kwargs.get("dynamic_img_size"):
        return
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    if not all(_is_int(x) and x >= 1 for x in sizes) or len(sizes) not in (1, 2):
        raise ConfigError(f"backbone_kwargs img_size must be a positive integer or [height, width], got {size!r}")
    if any(x != config["resolution"] for x in sizes):
        raise ConfigError(
            f"--resolution {config['resolution']} conflicts with backbone_kwargs img_size {size} (the model is built "
            f"for {size}-pixel inputs): set both to the same size (--backbone-kwargs with \"img_size\": "
            f"{config['resolution']}), or add \"dynamic_img_size\": true to backbone_kwargs")


# Settings that mean nothing next to another one given explicitly: (key, when, why).
CONFLICTS: tuple = (
    ("split_manifest", ("classes", "max_train_per_class", "max_test_per_class", "split_seed", "test_fraction"),
     "the manifest fixes the classes and the split"),
    ("weights", ("pretrained",), "the local weights file replaces timm's pretrained weights"),
)


def check_conflicts(config: dict, explicit: set) -> None:
    """Refuse settings the user gave (``explicit``: flags, keys of a config file) that another setting makes
    meaningless or the stream does not read (one line each)."""
    for key, others, why in CONFLICTS:
        clash = sorted(k for k in others if k in explicit)
        if config.get(key) and key in explicit and clash:
            flags = ", ".join(given_as(k, explicit) for k in clash)
            where = " from the file" if all(k in getattr(explicit, "files", {}) for k in clash) else ""
            raise ConfigError(f"{given_as(key, explicit)} and {flags} were both given, but {why}: drop "
                              f"{', '.join(k if where else given_as(k, explicit) for k in clash)}{where}")
    for key, verb in (("milestones", "apply"), ("gamma", "applies")):
        if key in explicit and config["lr_schedule"] != "step":
            raise ConfigError(f"{given_as(key, explicit)} {verb} to {mentioned('lr_schedule', explicit)} step, not "
                              f"{config['lr_schedule']}: drop one of them")
    statistics = [k for k in ("mean", "std") if k in explicit]
    if statistics and not config["normalize"]:
        flags = " and ".join(given_as(k, explicit) for k in statistics)
        verb = "applies" if len(statistics) == 1 else "apply"
        files = getattr(explicit, "files", {})
        how = drop(statistics, explicit) if all(k in files for k in statistics) else f"drop {flags}"
        raise ConfigError(f"{flags} only {verb} with --normalize (pixels are fed as they are without it): add "
                          f"--normalize or {how}")
    check_stream_settings(config, explicit)
    check_optimiser_flags(config, explicit)


def _readers(key: str) -> list[str]:
    """The streams that read the stream setting ``key``."""
    if key == "data_root":
        return S.streams_where(lambda s: s.data_root != "unused")
    if key in ("split_seed", "test_fraction", "split_manifest"):
        return S.streams_where(lambda s: s.split_manifest)
    return S.streams_where(lambda s: key in s.reads)


STREAM_READ_KEYS = ("data_root", "download", "domains", "normalize", "mean", "std", "split_seed", "test_fraction",
                    "split_manifest")
TEST_FOLDERS = ("val", "test")  # as streams.folder.detect_layout (not imported: it needs torch)


def check_stream_settings(config: dict, explicit: set) -> None:
    """Stream settings given by the user (flags, a config file) that the chosen stream does not read are refused in
    one line, rather than ignored: a data folder for a generated stream, DomainNet's domains elsewhere, a split seed
    where the split is fixed, ..."""
    stream = S.get_stream(config["benchmark"])
    unread = [k for k in STREAM_READ_KEYS  # null, or a switch turned off (--no-download), asks for nothing
              if k in explicit and config[k] not in (None, False) and config["benchmark"] not in _readers(k)]
    if len(unread) == 1:
        key = unread[0]
        readers = _readers(key)
        raise ConfigError(f"{given_as(key, explicit)} does nothing for the {stream.name} stream (only "
                          f"{names(readers)} read{'s' if len(readers) == 1 else ''} it): {drop([key], explicit)}")
    if unread:
        each = "; ".join(f"{given_as(k, explicit)} (read by {names(_readers(k))})" for k in unread)
        raise ConfigError(f"these settings do nothing for the {stream.name} stream: {each}: {drop(unread, explicit)}")
    given = [k for k in ("split_seed", "test_fraction") if k in explicit]
    root = Path(config["data_root"]).expanduser() if config["data_root"] else None
    if given and root is not None and (root / "train").is_dir() and any((root / t).is_dir() for t in TEST_FOLDERS):
        flags = " and ".join(given_as(k, explicit) for k in given)
        what = " and ".join(k for k in given) if all(k in getattr(explicit, "files", {}) for k in given) else flags
        raise ConfigError(f"{flags} do{'es' if len(given) == 1 else ''} nothing here: {root} has train/ and val/ "
                          f"folders, used as they are (no seeded split): drop {what}"
                          f"{' from the file' if what != flags else ''}")


def check_method_settings(config: dict, explicit: set) -> None:
    """``run``: settings given on the command line that the chosen method does not read (another method's own
    settings, or a flag of a capability it lacks) are refused, not ignored (``compare`` passes every flag to every
    method, and each takes what it uses)."""
    method = REGISTRY.get(config["method"])
    if method is None:
        return
    if not method.has(SCHEDULES):
        check_plain_training(config)
    foreign: dict[str, list] = {}
    for key in sorted(explicit & set(FIELD_BY_NAME)):
        owners = setting_owners(key)
        if owners is not None and config["method"] not in owners:
            foreign.setdefault(", ".join(owners), []).append(key)
    if "diagnostics" in explicit and config["diagnostics"] and not method.has(DIAGNOSTICS):
        foreign.setdefault(", ".join(methods_with(DIAGNOSTICS)), []).append("diagnostics")
    unread = [k for group in method.settings for k in group.unread if k in explicit]
    if unread:
        raise ConfigError(f"{', '.join(given_as(k, explicit) for k in unread)} {'is' if len(unread) == 1 else 'are'} "
                          f"not read by {method.name}: {drop(unread, explicit)}")
    if len(foreign) == 1:
        (owners, keys), = foreign.items()
        raise ConfigError(f"{', '.join(given_as(k, explicit) for k in keys)} only appl"
                          f"{'ies' if len(keys) == 1 else 'y'} to {owners}, not {config['method']}: "
                          f"{drop(keys, explicit)}")
    if foreign:
        each = "; ".join(f"{', '.join(given_as(k, explicit) for k in keys)} only to {owners}"
                         for owners, keys in foreign.items())
        raise ConfigError(f"these settings do not apply to {config['method']} ({each}): "
                          f"{drop([k for keys in foreign.values() for k in keys], explicit)}")


def check_capability(method: str, capability: str, what: str, fix: str) -> None:
    """Refuse ``what`` in one line when ``method`` lacks ``capability``, naming the methods that have it."""
    if not REGISTRY[method].has(capability):
        raise ConfigError(f"{what} does not apply to {method}, only to {', '.join(methods_with(capability))}: {fix}")
