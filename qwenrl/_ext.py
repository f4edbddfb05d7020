"""The one place that loads the C++ extension ``qwenrl._C``, building it on first use if needed.

Where it comes from, in this order:

1. a prebuilt ``qwenrl._C`` next to this file: what ``make`` / ``python setup.py build_ext
   --inplace`` / ``pip install --no-build-isolation`` build against the installed torch;
2. a just-in-time build of the C++ sources shipped with the package (``csrc/``, installed as
   ``qwenrl/_csrc``) with torch's ninja-based ``torch.utils.cpp_extension.load``, cached in
   ``$QWENRL_EXT_DIR`` or ``~/.cache/qwenrl/ext`` (``$XDG_CACHE_HOME`` respected), in a folder
   per torch version, Python version and CPU (the code is built with ``-march=native``). The
   first build takes a few minutes; ``python -m qwenrl.build_ext`` does it ahead of time. A
   plain ``pip install`` ships no compiled code, since under pip's build isolation no torch
   is importable to build against;
3. nothing: the reason is kept (:func:`extension_error`) and the loss falls back to its
   PyTorch reference with one warning (:mod:`qwenrl.loss.dispatch`). ``QWENRL_NO_JIT=1`` skips
   step 2.

Nothing here imports torch at module level: ``setup.py`` reads :func:`cxx_flags` from this file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

_error: str | None = None
JIT_NAME = "qwenrl_C"


def cxx_flags() -> list[str]:
    """Compiler flags of the extension (setup.py and the just-in-time build share them).
    ``QWENRL_PORTABLE=1`` drops ``-march=native`` (a build shipped to other machines)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("QWENRL_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


def source_dir() -> Path | None:
    """The C++ sources: ``qwenrl/_csrc`` in an installed package, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if any(candidate.glob("*.cpp")):
            return candidate
    return None


def _cpu_tag() -> str:
    """A short hash of the CPU's model and feature flags: -march=native code is per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        text = platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_dir() -> Path:
    """Where the just-in-time build goes: one folder per torch, Python and CPU."""
    import torch

    root = os.environ.get("QWENRL_EXT_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(cache, "qwenrl", "ext")
    portable = "-portable" if os.environ.get("QWENRL_PORTABLE", "0") == "1" else ""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"torch{torch.__version__}-{py}-{platform.machine()}-{_cpu_tag()}{portable}"
    return Path(root) / tag


def build_jit(verbose: bool = False) -> ModuleType:
    """Builds (or loads the cached build of) the extension from its sources; raises on failure."""
    from torch.utils.cpp_extension import load

    sources = source_dir()
    if sources is None:
        raise ImportError("the C++ sources of qwenrl._C are not installed with the package")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not verbose and not any(out.glob(f"{JIT_NAME}*.so")):
        print(
            f"qwenrl: building the C++ extension in {out} (once per torch version; "
            "`python -m qwenrl.build_ext` does it ahead of time)...",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=JIT_NAME,
        sources=sorted(str(p) for p in sources.glob("*.cpp")),
        extra_cflags=cxx_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(out),
        verbose=verbose,
    )


@functools.cache
def load_extension() -> ModuleType | None:
    """Returns the extension module, or None (with the reason kept for :func:`extension_error`)."""
    global _error
    _error = None
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        from qwenrl import _C

        return _C
    except ImportError as exc:
        prebuilt_error = str(exc)
    if os.environ.get("QWENRL_NO_JIT") == "1":
        _error = f"{prebuilt_error}; QWENRL_NO_JIT=1 skips the just-in-time build"
        return None
    try:
        return build_jit()
    except Exception as exc:  # no compiler, no ninja, no sources: the reference takes over
        _error = f"no prebuilt qwenrl._C ({prebuilt_error}) and the just-in-time build failed: "
        _error += f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
        return None


def extension_error() -> str | None:
    """Why the extension could not be loaded (None when it was)."""
    load_extension()
    return _error


def require_extension(what: str) -> ModuleType:
    """Returns the extension or raises an ImportError saying what needed it and how to build it."""
    ext = load_extension()
    if ext is None:
        raise ImportError(
            f"{what} needs the C++ extension qwenrl._C, which could not be loaded ({_error}). "
            "It needs a C++ compiler with OpenMP; build it with `python -m qwenrl.build_ext` "
            "(or `make ext` in a checkout)."
        )
    return ext
