"""Settings shared by the test suite (tests/) and the benchmarks (bench/).

* Temp files and compiler caches (torch.compile, Triton, a just-in-time build of qwenrl._C)
  stay inside the checkout (``.cache/``), not in system folders, unless ``TMPDIR`` / the cache
  variables say otherwise.
* Without CUDA, Triton runs in its interpreter. Triton reads ``TRITON_INTERPRET`` once, when it
  is first imported, and transformers imports it indirectly before any Triton test module is
  collected: so it is set here, before anything else.
* ``QWENRL_REQUIRE_EXT=1`` (set by ``make test`` / ``make bench``, hence by CI) turns a missing
  C++ extension into an error instead of skipped tests, so a failed build cannot pass as green.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

_CACHE = Path(__file__).resolve().parent / ".cache"
(_CACHE / "tmp").mkdir(parents=True, exist_ok=True)
os.environ.setdefault("TMPDIR", str(_CACHE / "tmp"))
tempfile.tempdir = os.environ["TMPDIR"]  # also if something asked tempfile before this ran
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_CACHE / "triton"))
os.environ.setdefault("QWENRL_EXT_DIR", str(_CACHE / "ext"))  # a just-in-time C++ build
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("QWENRL_REQUIRE_EXT") == "1":
        from qwenrl._ext import extension_error, load_extension

        if load_extension() is None:
            raise pytest.UsageError(
                "QWENRL_REQUIRE_EXT=1 but the C++ extension qwenrl._C cannot be imported "
                f"({extension_error()}); build it with `make ext`"
            )
