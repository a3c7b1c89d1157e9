"""Files of settings: presets and ``--config`` files, in JSON or YAML, read into one mapping of settings; and the
resolved config of a run written back as YAML (``<out>/config.yaml``) that ``--config`` reads again.

Every problem with such a file (missing, a folder, unreadable, malformed, not a mapping, a key given twice) is a
one-line :class:`ConfigError` naming the file. Torch-free; PyYAML is imported only for a YAML file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..schema import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")
SUFFIXES = (".json", *YAML_SUFFIXES)
#: Settings that say what to do with the output folder, not how to train: left out of a written config, so that
#: reading it back never overwrites or resumes by surprise.
ACTION_KEYS = ("overwrite", "resume", "resume_with_changes")

# YAML 1.1 reads 1e-3 as a string (it wants 1.0e-3); settings are numbers, so exponents without a dot are floats.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
                    r"(?:[eE][-+]?[0-9]+)?)$")


def _yaml_loader() -> Any:
    """A safe loader that reads ``1e-3`` as a number and refuses a key given twice (PyYAML keeps the last one)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice, first on line {seen[key] + 1}", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def _json_pairs(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice!r} is given twice")
    return dict(pairs)


def read_settings_file(path: Path, what: str) -> dict:
    """The mapping of settings in ``path`` (``.json``, ``.yaml`` or ``.yml``); ``what`` names it in messages
    ("config file", "preset")."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{what} {path} must be a .json, .yaml or .yml file")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the file")
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if path.suffix.lower() in YAML_SUFFIXES:
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_problem(err)}") from None
        kind = "YAML"
    else:
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs)
        except ValueError as err:
            raise ConfigError(f"{what} {path} is not valid JSON: {err}") from None
        kind = "JSON"
    if data is None:
        raise ConfigError(f"{what} {path} holds no settings; write one `key: value` per line (keys as in "
                          "`inflora-avalanche run --help`, with underscores)")
    if not isinstance(data, dict):
        shape = "a list" if isinstance(data, list) else f"a single value ({data!r:.40})"
        raise ConfigError(f"{what} {path} must hold a {kind} mapping of settings (key: value), not {shape}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{what} {path}: setting names are text, got {bad[0]!r}")
    return data


def _yaml_problem(err: Any) -> str:
    """PyYAML's message in one line: what is wrong and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def config_file_text(config: dict, preset: str) -> str:
    """``config`` as YAML that ``--config`` reads back to the same settings: every setting but the output actions
    (:data:`ACTION_KEYS`), with ``preset`` the base to read it on (a shipped preset's name or a preset file's path)."""
    import yaml

    values = {"preset": preset, **{k: v for k, v in config.items() if k not in ACTION_KEYS and k != "preset"}}
    header = ("# The resolved settings of this run. Run it again (into another --out) with\n"
              "#   inflora-avalanche run --config THIS_FILE --out NEW_FOLDER\n")
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
