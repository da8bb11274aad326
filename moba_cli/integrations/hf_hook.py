"""Register the ``moba`` attention with transformers on ``import moba_cli``, without importing transformers.

transformers takes seconds to import and is optional, so ``import moba_cli`` must not import it. Instead:

* transformers' model code already loaded: register now;
* transformers installed but not loaded: a one-shot import hook registers right after
  ``transformers.modeling_utils`` (home of ``AttentionInterface``) finishes loading;
* transformers absent: nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

_TARGET = "transformers.modeling_utils"


def _register() -> None:
    from moba_cli.integrations.attention import register

    register()


class _Loader(importlib.abc.Loader):
    """Wraps transformers' own loader for ``modeling_utils`` and registers once it has run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001 - importlib protocol
        self._inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != _TARGET:
            return None
        # One shot: step aside, let the normal machinery find the real spec, then wrap its loader.
        _remove_finder()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install_transformers_hook() -> None:
    """Make ``moba`` a transformers attention implementation as soon as transformers is usable."""
    if _TARGET in sys.modules:
        _register()
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ImportError, ValueError):
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
