"""tools/deps.py: how requirements.lock becomes pip constraints, and how a user's torch is kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("qwenrl_tools_deps", ROOT / "tools" / "deps.py")
deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deps)


def _lock(tmp_path: Path, env: str | None = None) -> Path:
    path = tmp_path / "requirements.lock"
    path.write_text(
        "# a lock\n"
        f"# environment: {env or deps.environment_tag()}\n"
        "numpy==2.4.6\nsympy==1.14.0\ntorch==2.13.0\nTransformers==5.25.0\ntriton==3.9.0\n"
    )
    return path


class _Dist:
    def __init__(self, version: str, requires: list[str]):
        self.version, self.requires = version, requires


def _installed(monkeypatch, dists: dict[str, _Dist]) -> None:
    def distribution(name):
        try:
            return dists[deps.canonical(name)]
        except KeyError:
            raise deps.md.PackageNotFoundError(name) from None

    def version(name):
        return distribution(name).version

    monkeypatch.setattr(deps.md, "distribution", distribution)
    monkeypatch.setattr(deps.md, "version", version)


def _pins(text: str) -> dict[str, str]:
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return {deps.canonical(ln.partition("==")[0]): ln.partition("==")[2] for ln in lines}


def test_lock_is_used_as_is_without_a_torch(tmp_path, monkeypatch):
    _installed(monkeypatch, {})
    pins = _pins(deps.constraints(_lock(tmp_path)))
    assert pins == {
        "numpy": "2.4.6",
        "sympy": "1.14.0",
        "torch": "2.13.0",
        "transformers": "5.25.0",
        "triton": "3.9.0",
    }


def test_lock_is_used_as_is_with_the_locked_torch(tmp_path, monkeypatch):
    # The CPU wheel reports a local label: 2.13.0+cpu is the locked 2.13.0.
    _installed(monkeypatch, {"torch": _Dist("2.13.0+cpu", ["sympy>=1.13"])})
    assert _pins(deps.constraints(_lock(tmp_path)))["sympy"] == "1.14.0"


def test_a_users_cuda_torch_is_kept_with_its_requirements(tmp_path, monkeypatch):
    _installed(
        monkeypatch,
        {
            "torch": _Dist(
                "2.14.1+cu130",
                [
                    "sympy>=1.13.3",
                    "triton==3.10.0; platform_system == 'Linux'",
                    "nvidia-cublas==13.1.0; platform_system == 'Linux'",
                    "opt-einsum>=3.3; extra == 'opt-einsum'",  # an extra: not followed
                    "pywin32; platform_system == 'NoSuchOS'",  # another platform: not followed
                ],
            ),
            "sympy": _Dist("1.13.3", ["mpmath<1.4,>=1.1.0"]),
            "mpmath": _Dist("1.3.0", []),
            "triton": _Dist("3.10.0", []),
            "nvidia-cublas": _Dist("13.1.0", []),
            "opt-einsum": _Dist("3.4.0", []),
        },
    )
    text = deps.constraints(_lock(tmp_path))
    pins = _pins(text)
    assert pins["torch"] == "2.14.1+cu130"  # never replaced by the lock's CPU build
    assert pins["triton"] == "3.10.0"  # the triton that torch pins, not the lock's
    assert pins["sympy"] == "1.13.3" and pins["mpmath"] == "1.3.0"  # recursively
    assert pins["nvidia-cublas"] == "13.1.0"
    assert "opt-einsum" not in pins
    assert pins["numpy"] == "2.4.6" and pins["transformers"] == "5.25.0"  # the rest: the lock
    assert "kept" in text


def test_a_torch_below_the_floor_is_an_error_not_a_download(tmp_path, monkeypatch):
    _installed(monkeypatch, {"torch": _Dist("2.5.1+cu124", [])})
    with pytest.raises(SystemExit, match=r"torch 2\.5\.1\+cu124 is older than .*torch>=2\.13"):
        deps.constraints(_lock(tmp_path))


def test_another_python_installs_from_the_ranges_keeping_torchs_version(
    tmp_path, monkeypatch, capsys
):
    _installed(monkeypatch, {})
    text = deps.constraints(_lock(tmp_path, env="CPython 3.99, plan9 z80"))
    assert _pins(text) == {"torch": "2.13.0"}
    assert "made on CPython 3.99, plan9 z80" in capsys.readouterr().err


def test_torch_floor_reads_pyproject():
    floor = deps.Requirement(deps.torch_floor())
    assert floor.name == "torch" and floor.specifier.contains("2.13.0")
    assert not floor.specifier.contains("2.12.1")


def test_the_committed_lock_pins_every_distribution_exactly():
    env, pins = deps.read_lock(ROOT / "requirements.lock")
    assert env, "requirements.lock names the environment it was made in"
    for key in ("torch", "transformers", "kernels", "triton", "numpy", "setuptools", "pip"):
        assert key in pins, key
    for line in pins.values():
        name, sep, version = line.partition("==")
        assert sep and version and "+" not in version, line
