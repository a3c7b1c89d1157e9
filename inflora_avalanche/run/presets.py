"""Presets: the shipped experiment presets (``presets/<name>.json``), each method's own hyper-parameters
(``presets/methods/<method>.json``), and the layering that makes a config of them:

    schema defaults < the method's preset < the preset < a --config file < command-line flags

Method hyper-parameters (``group="method"``) of a preset apply only to the method that preset names: running a
preset with another ``--method`` (or inside ``compare``) takes that method's own values instead. Torch-free.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

from ..methods import setting_owners
from .config import (DEFAULTS, METHOD_KEYS, ConfigError, FileSettings, Given, check_conflicts, check_values,
                     validate_config)
from .settings_file import SUFFIXES, read_settings_file

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
METHOD_PRESET_DIR = PRESET_DIR / "methods"
DEMO_PRESET = "demo_digits"


def list_presets() -> list[str]:
    """Names of the experiment presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def list_method_presets() -> list[str]:
    return sorted(p.stem for p in METHOD_PRESET_DIR.glob("*.json"))


def resolve_preset_name(name: str, prefix: str = "") -> str:
    """A shipped preset's name, also when given without the script's prefix (``inflora_ca`` -> ``cifar100_...``)."""
    names = list_presets()
    if name not in names and prefix and prefix + name in names:
        return prefix + name
    return name


def preset_path(name_or_path: str) -> Path:
    """The file of a preset: a shipped name, or a path (a ``.json``, ``.yaml`` or ``.yml`` suffix, or a folder in
    it)."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in SUFFIXES or "/" in str(name_or_path):
        return path
    return PRESET_DIR / f"{name_or_path}.json"


def is_shipped_preset(name: str) -> bool:
    return preset_path(name).parent == PRESET_DIR and preset_path(name).is_file()


def load_preset(name_or_path: str) -> dict:
    """A preset by name (shipped with the package) or by the path of a JSON or YAML file; checked key by key."""
    path = preset_path(name_or_path)
    if path.parent == PRESET_DIR and not path.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(list_presets())} or a .json "
                          "or .yaml file")
    preset = read_settings_file(path, "preset")
    preset.setdefault("preset", path.stem)
    check_label(preset["preset"], f"preset {path.name}")
    check_values({k: v for k, v in preset.items() if k != "preset"}, f"preset {path.name}")
    return preset


def check_label(value: object, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"preset ({where}) must be a preset name or file, got {value!r}")


def load_config_file(path: str) -> dict:
    """The settings of a ``--config`` file (JSON or YAML), each checked like a flag; ``preset`` (optional) names the
    preset they are laid over."""
    values = read_settings_file(Path(path), "config file")
    where = f"config file {Path(path).name}"
    if "preset" in values:
        check_label(values["preset"], where)
    check_values({k: v for k, v in values.items() if k != "preset"}, where)
    return FileSettings(values, Path(path).name)


def load_method_preset(method: str) -> dict:
    """The hyper-parameters a method brings (``presets/methods/<method>.json``)."""
    path = METHOD_PRESET_DIR / f"{method}.json"
    if not path.is_file():
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(list_method_presets())}")
    preset = read_settings_file(path, "method preset")
    preset.pop("label", None)
    check_values(preset, f"method preset {path.name}")
    bad = sorted(set(preset) - METHOD_KEYS)
    if bad:
        raise ConfigError(f"method preset {path.name} may only set method hyper-parameters, not {bad}")
    foreign = sorted(k for k in preset if method not in (setting_owners(k) or [method]))
    if foreign:
        raise ConfigError(f"method preset {path.name} sets {foreign}, settings of other methods than {method}")
    return preset


def method_label(method: str) -> str:
    path = METHOD_PRESET_DIR / f"{method}.json"
    return str(read_settings_file(path, "method preset").get("label", method)) if path.is_file() else method


def layered_config(preset: str, method: Optional[str] = None, overrides: Optional[dict] = None,
                   file_values: Optional[dict] = None) -> dict:
    """Schema defaults < method preset < ``preset`` (its method keys only for its own method) < ``file_values`` (a
    ``--config`` file) < ``overrides``.

    ``method=None`` takes the preset's method. The result is validated."""
    config = validate_config(merge_layers(preset, method, overrides, file_values))
    check_conflicts(config, given_keys(preset, method, overrides, file_values))
    return config


def merge_layers(preset: str, method: Optional[str] = None, overrides: Optional[dict] = None,
                 file_values: Optional[dict] = None) -> dict:
    """:func:`layered_config` without the final validation (each layer is still checked value by value)."""
    overrides = dict(overrides or {})
    file_values = {k: v for k, v in (file_values or {}).items() if k != "preset"}
    method = method or overrides.pop("method", None) or file_values.pop("method", None)
    chosen = load_preset(preset)
    method = method or chosen.get("method") or DEFAULTS["method"]
    if chosen.get("method", DEFAULTS["method"]) != method:
        chosen = {k: v for k, v in chosen.items() if k not in METHOD_KEYS}
    config = copy.deepcopy(DEFAULTS)
    config.update(load_method_preset(method))
    config.update(chosen)
    config["method"] = method
    config.update(copy.deepcopy(file_values))
    check_values(overrides, "the command line")
    config.update(overrides)
    return config


def given_keys(preset: str, method: Optional[str] = None, overrides: Optional[dict] = None,
               file_values: Optional[dict] = None) -> Given:
    """The settings the user gave: every flag, and each key of a ``--config`` file whose value differs from what the
    preset gives (so a run's written ``config.yaml``, which holds every setting, reads back without claiming them
    all as given). Those of the file (and not also flags) are recorded as the file's (``Given.files``, when
    ``file_values`` knows its file: :class:`FileSettings`), so that a refusal names the key and the file."""
    given = Given(overrides or {})
    if file_values:
        method = method or (overrides or {}).get("method") or file_values.get("method")
        base = merge_layers(preset, method)
        same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
        from_file = {k for k, v in file_values.items() if k != "preset" and not same(base.get(k), v)} - given
        given |= from_file
        name = getattr(file_values, "name", "")
        if name:
            given.files.update({k: name for k in from_file})
    return given
