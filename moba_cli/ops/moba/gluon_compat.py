"""Which Triton releases can run the Gluon backward (gluon_bwd.py), and the Gluon names that moved between them.

Gluon is Triton's experimental explicit-layout dialect; its names change between releases. Checked: Triton 3.6
and 3.8 (compiled for sm_90 by tests/compile_sm90.py in CI). The one rename the kernel meets between them:

* the CTA-wide barrier: ``gl.thread_barrier()`` (3.6) became ``gl.barrier()`` (3.8).

``async_copy_global_to_shared`` is ``async_load`` in 3.8 and still answers to its old name; both are looked up.
Where a name the kernel needs is missing, :func:`gluon_supported` says which, and the op runs the Triton
backward instead, with one warning (:func:`gluon_usable`). A kernel that fails to compile on a release that
has the names (its API changed in a way not listed here) is reported by :func:`mark_unsupported` the same way.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Any

# The oldest Gluon the kernel was compiled with (it was written and measured on 3.6; earlier Gluon is untested).
MIN_TRITON = (3, 6)

# Names gluon_bwd.py imports from here: (module, names newest first). Looked up on first use (module
# __getattr__ below): importing Gluon takes a noticeable fraction of a second, which only its backward pays.
_MOVED: dict[str, tuple[str, tuple[str, ...]]] = {
    "cta_barrier": ("gl", ("barrier", "thread_barrier")),
    "async_load": ("async_copy", ("async_load", "async_copy_global_to_shared")),
}
# The rest of what gluon_bwd.py uses, by module.
_NEEDS: dict[str, tuple[str, ...]] = {
    "gl": ("allocate_shared_memory", "arange", "atomic_add", "convert_layout", "exp2", "load", "store", "where",
           "zeros", "static_assert", "BlockedLayout", "SliceLayout", "DotOperandLayout", "NVMMADistributedLayout",
           "NVMMASharedLayout"),
    "async_copy": ("commit_group", "wait_group"),
    "hopper": ("fence_async_shared", "warpgroup_mma", "warpgroup_mma_wait"),
}

_failure: str | None = None  # set by mark_unsupported: this process's Triton could not compile the kernel
_warned = False


def _modules() -> dict[str, ModuleType]:
    """Gluon's language modules the kernel uses (ImportError where this Triton lacks them)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    return {"gl": gl, "async_copy": async_copy, "hopper": hopper}


def _pick(module: ModuleType, names: tuple[str, ...]) -> Any:
    """The first of ``names`` that ``module`` has, else None."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    return None


def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def gluon_supported() -> tuple[bool, str]:
    """Whether this Triton has the Gluon API the Hopper backward needs, and why not (empty when it has).
    Does not look at the GPU: the caller checks the device (sm_90), dtype and head dim."""
    if _failure is not None:
        return False, _failure
    return _api_check()


@functools.cache
def _api_check() -> tuple[bool, str]:
    try:
        version = _triton_version()
    except ImportError:
        return False, "Triton is not installed"
    except ValueError:
        import triton

        return False, f"unrecognised Triton version {triton.__version__!r}"
    if version < MIN_TRITON:
        return False, f"Triton {version[0]}.{version[1]} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}"
    try:
        modules = _modules()
    except ImportError as exc:
        return False, f"Triton {version[0]}.{version[1]} has no Gluon Hopper API ({exc})"
    wanted = [*_MOVED.values(), *((key, (name,)) for key, names in _NEEDS.items() for name in names)]
    missing = [f"{key}.{'/'.join(names)}" for key, names in wanted if _pick(modules[key], names) is None]
    if missing:
        return False, f"Triton {version[0]}.{version[1]}'s Gluon lacks {', '.join(missing)}"
    return True, ""


def gluon_usable() -> bool:
    """:func:`gluon_supported`, with the one fallback warning where not: for the op's choice of backward once
    it knows the call would take the Gluon kernel (Hopper, bf16/fp16, head dim 128, not turned off)."""
    ok, why = gluon_supported()
    if not ok:
        warn_fallback(why)
    return ok


def mark_unsupported(reason: str) -> None:
    """Record that the Gluon kernel cannot be used in this process (it failed to compile), so that
    :func:`gluon_supported` answers no from now on."""
    global _failure
    _failure = reason


def warn_fallback(reason: str) -> None:
    """Warn, once a process, that the backward runs the Triton kernel instead of the Gluon one."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"MoBA: the Gluon (Hopper) backward is not available: {reason}; using the Triton backward "
                      "(correct, somewhat slower; MOBA_BWD_GLUON=0 silences this)", RuntimeWarning, stacklevel=3)


def _resolve(key: str, names: tuple[str, ...]) -> Any:
    """The Gluon function among ``names`` (newest name first), or a stand-in that fails at compile time
    where this Triton has none of them (gluon_supported() already said no, so the kernel is never built)."""
    try:
        found = _pick(_modules()[key], names)
    except ImportError:
        found = None
    if found is None:
        def missing(*args, **kwargs):
            raise NotImplementedError(f"this Triton's Gluon has none of {names}")

        return missing
    return found


def __getattr__(name: str) -> Any:
    """The names of ``_MOVED``, resolved for this Triton on first use."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(*_MOVED[name])
    globals()[name] = value
    return value
