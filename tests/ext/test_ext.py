"""How the C++ extension is found: prebuilt, built just in time, or missing with a reason."""

from __future__ import annotations

import sys

import pytest
import torch

import qwenrl
import qwenrl._ext as ext


@pytest.fixture
def no_prebuilt(monkeypatch):
    """As in a plain `pip install`: no compiled qwenrl._C next to the package."""
    monkeypatch.delattr(qwenrl, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "qwenrl._C", None)  # import raises ImportError
    ext.load_extension.cache_clear()
    yield
    ext.load_extension.cache_clear()


def test_failed_build_keeps_the_reason(monkeypatch, no_prebuilt):
    def no_compiler(verbose=False):
        raise RuntimeError("Error building extension 'qwenrl_C': c++: not found")

    monkeypatch.setattr(ext, "build_jit", no_compiler)
    assert ext.load_extension() is None
    assert "just-in-time build failed" in ext.extension_error()
    assert "c++: not found" in ext.extension_error()
    with pytest.raises(ImportError, match="python -m qwenrl.build_ext"):
        ext.require_extension("the test")


def test_no_jit_skips_the_build(monkeypatch, no_prebuilt):
    monkeypatch.setenv("QWENRL_NO_JIT", "1")
    monkeypatch.setattr(ext, "build_jit", lambda verbose=False: pytest.fail("built"))
    assert ext.load_extension() is None
    assert "QWENRL_NO_JIT" in ext.extension_error()


def test_jit_build_is_used_when_there_is_no_prebuilt(monkeypatch, no_prebuilt):
    sentinel = object()
    monkeypatch.setattr(ext, "build_jit", lambda verbose=False: sentinel)
    assert ext.load_extension() is sentinel and ext.extension_error() is None


def test_build_dir_per_torch_and_cpu_and_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENRL_EXT_DIR", str(tmp_path))
    path = ext.build_dir()
    assert path.parent == tmp_path
    assert (
        f"torch{torch.__version__}" in path.name
        and f"py{sys.version_info.major}{sys.version_info.minor}" in path.name
    )
    monkeypatch.setenv("QWENRL_PORTABLE", "1")
    assert ext.build_dir() != path and "-march=native" not in ext.cxx_flags()
    monkeypatch.delenv("QWENRL_EXT_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ext.build_dir().parent == tmp_path / "xdg" / "qwenrl" / "ext"


def test_sources_are_found_in_the_checkout():
    src = ext.source_dir()
    assert src is not None
    for name in ("bindings.cpp", "efe_loss.cpp", "huge_pages.cpp", "huge_pages.h"):
        assert (src / name).exists(), name
