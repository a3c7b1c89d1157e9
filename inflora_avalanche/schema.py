"""The parts of a settings schema: :class:`Field` (one setting: type, default, help, resume meaning), the value
checks and :class:`ConfigError`.

The runner's common schema (:mod:`inflora_avalanche.run.config`) and every method's own settings
(:mod:`inflora_avalanche.methods`) are made of these. Torch-free, so ``--help`` and configuration errors come before
any heavy import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union


class ConfigError(ValueError):
    """A mistake in the presets or options; the message says what to change."""


@dataclass(frozen=True)
class Field:
    """One setting. ``kind``: int, float, bool, str (non-empty), text, choice, ints, floats, strs, json, path,
    int_or_ints, int_or_strs.

    ``resume``: ``"identity"`` (a checkpoint made with another value is refused), ``"free"`` (may change freely
    between a run and its resume: does not change what is computed) or ``"warn"`` (allowed, reported as a change).
    ``choices``: the allowed values (of a ``choice``, or of every item of ``strs``), or a function giving them when
    asked (a registry that may grow, such as the streams). ``metavar``: the placeholder ``--help`` shows.
    """

    name: str
    kind: str
    default: Any
    help: str
    group: str = "run"
    choices: Union[tuple, Callable[[], tuple]] = ()
    minimum: Optional[float] = None
    nullable: bool = False
    resume: str = "warn"
    aliases: tuple = ()
    metavar: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> tuple:
        """The allowed values (``()``: any)."""
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KIND_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "path": (lambda v: isinstance(v, str) and v != "", "a path"),
    "choice": (lambda v: isinstance(v, str), "one of the choices"),
    "ints": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
    "floats": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "strs": (lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v), "a list of names"),
    "json": (lambda v: isinstance(v, dict), "a JSON object"),
    "int_or_ints": (lambda v: _is_int(v) or (isinstance(v, list) and v and all(_is_int(x) for x in v)),
                    "an integer or a list of integers"),
    "int_or_strs": (lambda v: _is_int(v) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
                    "an integer or a list of names"),
}


def check_value(field: Field, value: Any, where: str) -> None:
    """Type, choices, finiteness and lower bound of one value; raises :class:`ConfigError` naming the flag."""
    if value is None:
        if not field.nullable:
            raise ConfigError(f"{field.name} ({where}) must be set, got null")
        return
    if field.kind == "choice" and field.name == "train_shuffle" and isinstance(value, bool):
        return  # presets may write true/false for the shuffle switch
    check, what = KIND_CHECKS[field.kind]
    if not check(value):
        raise ConfigError(f"{field.name} ({where}) must be {what}, got {value!r}; set it with {field.flag}")
    allowed = field.allowed()
    if allowed and field.kind == "strs":
        bad = [x for x in value if x not in allowed]
        if bad:
            raise ConfigError(f"{field.name} ({where}) takes names among {', '.join(allowed)}, got {bad[0]!r}; set "
                              f"it with {field.flag}")
    elif allowed and value not in allowed:
        raise ConfigError(f"{field.name} ({where}) must be one of {', '.join(allowed)}, got {value!r}")
    if field.kind in ("float", "floats"):
        numbers = value if isinstance(value, list) else [value]
        if not all(math.isfinite(x) for x in numbers):
            raise ConfigError(f"{field.name} ({where}) must be a finite number, got {value!r}; set it with "
                              f"{field.flag}")
    if field.minimum is not None:
        numbers = value if isinstance(value, list) else [value]
        low = [x for x in numbers if _is_number(x) and x < field.minimum]
        if low:
            raise ConfigError(f"{field.name} ({where}) must be >= {field.minimum:g}, got {value!r}")


class FileSettings(dict):
    """The settings of a ``--config`` file; ``name``: the file's name, as its messages say it."""

    def __init__(self, values: Any = (), name: str = "") -> None:
        super().__init__(values)
        self.name = name


class Given(set):
    """The settings the user gave (a set of keys), and ``files``: those that came from a config file rather than the
    command line, each with the file's name. A refusal names such a setting by its key and file (:func:`given_as`),
    not by a flag the user never typed."""

    def __init__(self, keys: Any = (), files: Optional[dict] = None) -> None:
        super().__init__(keys)
        self.files = dict(files or {})


def given_as(key: str, given: Any = None) -> str:
    """``key`` as the user gave it: ``rank (config file run.yaml)`` from a config file, else its flag ``--rank``."""
    file = getattr(given, "files", {}).get(key)
    return f"{key} (config file {file})" if file else "--" + key.replace("_", "-")


def mentioned(key: str, given: Any = None) -> str:
    """Another setting named in a refusal of ``given``'s: its key when it came from the config file, else its flag."""
    return key if key in getattr(given, "files", {}) else "--" + key.replace("_", "-")


def drop(keys: Any, given: Any = None) -> str:
    """``drop it`` / ``drop them`` (``... from the file`` when they all came from the config file)."""
    keys = list(keys)
    files = getattr(given, "files", {})
    where = " from the file" if keys and all(k in files for k in keys) else ""
    return f"drop {'it' if len(keys) == 1 else 'them'}{where}"


def names(items: Any, last: str = "and") -> str:
    """``a, b and c`` (for messages)."""
    items = [str(x) for x in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
