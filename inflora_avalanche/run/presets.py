"""Presets: the shipped experiment presets (``presets/<name>.json``), each method's own hyper-parameters
(``presets/methods/<method>.json``), and the layering that makes a config of them:

    schema defaults < the method's preset < the preset < command-line flags

Method hyper-parameters (``group="method"``) of a preset apply only to the method that preset names: running a
preset with another ``--method`` (or inside ``compare``) takes that method's own values instead. Torch-free.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

from ..methods import setting_owners
from .config import DEFAULTS, METHOD_KEYS, ConfigError, check_conflicts, check_values, validate_config

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
METHOD_PRESET_DIR = PRESET_DIR / "methods"
DEMO_PRESET = "demo_digits"


def list_presets() -> list[str]:
    """Names of the experiment presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def list_method_presets() -> list[str]:
    return sorted(p.stem for p in METHOD_PRESET_DIR.glob("*.json"))


def _read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{what} {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


def resolve_preset_name(name: str, prefix: str = "") -> str:
    """A shipped preset's name, also when given without the script's prefix (``inflora_ca`` -> ``cifar100_...``)."""
    names = list_presets()
    if name not in names and prefix and prefix + name in names:
        return prefix + name
    return name


def load_preset(name_or_path: str) -> dict:
    """A preset by name (shipped with the package) or by the path of a JSON file; checked key by key."""
    path = Path(name_or_path).expanduser()
    if path.suffix != ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(list_presets())} or a .json file")
    preset = _read_json_object(path, "preset")
    preset.setdefault("preset", path.stem)
    check_values({k: v for k, v in preset.items() if k != "preset"}, f"preset {path.name}")
    return preset


def load_method_preset(method: str) -> dict:
    """The hyper-parameters a method brings (``presets/methods/<method>.json``)."""
    path = METHOD_PRESET_DIR / f"{method}.json"
    if not path.is_file():
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(list_method_presets())}")
    preset = _read_json_object(path, "method preset")
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
    return str(_read_json_object(path, "method preset").get("label", method)) if path.is_file() else method


def layered_config(preset: str, method: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """Schema defaults < method preset < ``preset`` (its method keys only for its own method) < ``overrides``.

    ``method=None`` takes the preset's method. The result is validated."""
    config = validate_config(merge_layers(preset, method, overrides))
    check_conflicts(config, set(overrides or {}))
    return config


def merge_layers(preset: str, method: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """:func:`layered_config` without the final validation (each layer is still checked value by value)."""
    overrides = dict(overrides or {})
    method = method or overrides.pop("method", None)
    chosen = load_preset(preset)
    method = method or chosen.get("method") or DEFAULTS["method"]
    if chosen.get("method", DEFAULTS["method"]) != method:
        chosen = {k: v for k, v in chosen.items() if k not in METHOD_KEYS}
    config = copy.deepcopy(DEFAULTS)
    config.update(load_method_preset(method))
    config.update(chosen)
    config["method"] = method
    check_values(overrides, "the command line")
    config.update(overrides)
    return config
