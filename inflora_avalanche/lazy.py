"""Names a package hands on but imports only on first use, so that command-line tools validate their arguments
before paying for the import of torch, Avalanche and timm. Torch-free."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any], also: Iterable[str] = ()
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` (its ``__name__``) whose name ``n`` lives in its module
    ``exports[n]``; ``namespace`` is the package's ``globals()``, where a name is cached once imported, and ``also``
    are names the package defines itself."""
    names = sorted([*exports, *also])

    def getattr_(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(names))

    return names, getattr_, dir_
