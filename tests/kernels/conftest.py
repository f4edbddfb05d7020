"""Every test in tests/kernels runs the Triton kernels: each is marked ``triton``, the marker
``make gpu-check`` selects to run them compiled on the GPU (QWENRL_TRITON_TEST_DEVICE=cuda)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.triton)
