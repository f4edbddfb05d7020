"""Where the Triton tests run: ``QWENRL_TRITON_TEST_DEVICE`` (default ``cpu``, the Triton
interpreter; ``cuda`` for ``make gpu-check``), and why Triton cannot run there, if it cannot.

Importing this module sets ``TRITON_INTERPRET=1`` for the CPU: Triton reads it once, when it is
first imported, so the test modules import this before anything that imports Triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

DEVICE = os.environ.get("QWENRL_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_missing() -> str | None:
    """Why the Triton kernels cannot run on DEVICE, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if DEVICE == "cpu" and importlib.util.find_spec("numpy") is None:
        return "the Triton interpreter needs numpy"
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is set to something other than 1: no CPU interpreter"
    return None


@contextlib.contextmanager
def tensors_on_device(active: bool = True) -> Iterator[None]:
    """Inside, every tensor created lands on DEVICE when ``active`` (tests draw their inputs on
    the CPU first, then move them). The CPU is torch's own default: no default device is set
    for it (that would leave a TorchFunctionMode around every op of the tests run later)."""
    if DEVICE == "cpu" or not active:
        yield
        return
    import torch  # after TRITON_INTERPRET is settled

    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)
