"""The one place that knows whether the C++ extension ``qwenrl._C`` was built."""

from __future__ import annotations

import functools
from types import ModuleType

_error: str | None = None


@functools.cache
def load_extension() -> ModuleType | None:
    """Returns ``qwenrl._C``, or None (with the reason kept for :func:`extension_error`)."""
    global _error
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        from qwenrl import _C
    except ImportError as exc:
        _error = str(exc)
        return None
    return _C


def extension_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    load_extension()
    return _error


def require_extension(what: str) -> ModuleType:
    """Returns ``qwenrl._C`` or raises an ImportError saying what needed it and how to build it."""
    ext = load_extension()
    if ext is None:
        raise ImportError(
            f"{what} needs the C++ extension qwenrl._C, which is not built ({_error}). "
            "Build it with `pip install -e . --no-build-isolation` (or `make setup`)."
        )
    return ext
