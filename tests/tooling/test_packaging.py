"""The checkout as an install: nothing in it shadows an installed distribution, and the Triton
kernels ship as ``qwenrl.kernels``.

``python -m qwenrl.train`` and ``python -m pytest`` put the repository root first on
``sys.path``. A top-level folder that is a regular package there (one with ``__init__.py``)
wins over an installed distribution of the same import name: transformers imports the
``kernels`` distribution whenever a model module loads, and the checkout has a ``kernels/``
folder. So that folder holds no ``__init__.py``: from the root it is at most a namespace
portion, which a regular installed package beats.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run from the repository root exactly as a user does (`python -c` puts the working directory
# first on sys.path, like `python -m`), after transformers has imported its hub kernels.
_RESOLVE = r"""
import importlib, importlib.metadata as md, json, sys
from pathlib import Path
import transformers.modeling_utils  # imports the `kernels` distribution (transformers >= 5.25)
root = Path.cwd().resolve()
ours = {"qwenrl"}
providers = md.packages_distributions()
names = sorted(
    p.stem if p.suffix == ".py" else p.name
    for p in root.iterdir()
    if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")
)
report = {}
for name in names:
    dists = set(providers.get(name, [])) - ours
    if not dists:
        continue
    module = importlib.import_module(name)
    places = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
    mine = (root / name, root / f"{name}.py")  # the checkout's own folder or module
    report[name] = {
        "dists": sorted(dists),
        "places": [str(p) for p in places if p],
        "from_checkout": any(
            Path(p).resolve().is_relative_to(m.resolve()) for p in places if p for m in mine
        ),
    }
print(json.dumps(report))
"""


def _resolve_from_root() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _RESOLVE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_checkout_folder_shadows_an_installed_distribution():
    report = _resolve_from_root()
    # Not vacuous: the `kernels` distribution is installed (a dev dependency) and the checkout
    # has a `kernels/` folder, so that name is checked.
    assert "kernels" in report, report
    shadowed = {name: r for name, r in report.items() if r["from_checkout"]}
    assert not shadowed, f"checkout folders shadow installed distributions: {shadowed}"


def test_kernels_folder_is_not_a_regular_package():
    # The rule the test above checks at run time, stated where a reader adds a file.
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_triton_kernels_import_as_qwenrl_kernels():
    code = "import qwenrl.kernels.efe as m; print(m.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve() == (ROOT / "kernels" / "efe.py").resolve()


def test_every_package_in_the_tree_ships_in_the_wheel():
    """pyproject.toml lists the packages by hand: each folder of qwenrl/ with an __init__.py
    must be among them, or a non-editable install silently lacks it."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "qwenrl").rglob("__init__.py")
        if "kernels" not in init.parts  # qwenrl.kernels is mapped from kernels/ (package-dir)
    }
    assert found and found <= listed, sorted(found - listed)
    assert "qwenrl.kernels" in listed and "qwenrl._csrc" in listed


@pytest.mark.parametrize("package", ["qwenrl.eval", "qwenrl.train"])
def test_lazy_packages_export_exactly_their_names(package):
    """Each public name resolves from the submodule it is mapped to, without importing the rest
    at package import; anything else is an AttributeError that names the package."""
    code = f"""
import importlib, sys
pkg = importlib.import_module({package!r})
assert sorted(pkg.__all__) == sorted(pkg._EXPORTS), "__all__ and the export map differ"
assert "qwenrl.models" not in sys.modules, "importing the package loaded the models"
for name in pkg.__all__:
    value = getattr(pkg, name)
    assert value is getattr(sys.modules[{package!r} + "." + pkg._EXPORTS[name]], name), name
try:
    pkg.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err) and {package!r} in str(err), err
else:
    raise AssertionError("an unknown name resolved")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
