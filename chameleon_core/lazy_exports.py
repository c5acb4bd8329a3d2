"""Package names imported on first use (PEP 562), for `chameleon_core` and `pipeline` alike.

A package's `__init__` maps each exported name to the submodule that defines it; the submodule is
imported only when the name is first read, so importing one light submodule does not pull in torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, whose `exports` map name -> submodule.

    A name, once read, is stored in the package's `namespace` so later reads skip `__getattr__`.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
