"""Builds the C++ extension ``qwenrl._C`` from every source in csrc/, when torch is importable.

* ``pip install .`` / ``pip install git+...`` (pip's default build isolation: no torch in the
  build environment): a pure-Python package that carries the C++ sources; qwenrl builds the
  extension against the installed torch on first use, or with ``python -m qwenrl.build_ext``
  (see qwenrl/_ext.py).
* ``pip install -e . --no-build-isolation`` / ``python setup.py build_ext --inplace`` (what
  ``make`` does): the extension is built now, against the torch you already have.

Set QWENRL_PORTABLE=1 to build without -march=native (e.g. for a wheel shipped elsewhere).
"""

import glob
import importlib.util
from pathlib import Path

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # build isolation: no torch to build against, so build on first use
    setup()
else:
    # The compiler flags live in qwenrl/_ext.py (shared with the just-in-time build); that
    # file imports nothing heavy at module level, so it is loaded by path, not as a package.
    spec = importlib.util.spec_from_file_location(
        "qwenrl_ext_flags", Path(__file__).resolve().parent / "qwenrl" / "_ext.py"
    )
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    setup(
        ext_modules=[
            CppExtension(
                name="qwenrl._C",
                sources=sorted(glob.glob("csrc/*.cpp")),
                extra_compile_args={"cxx": flags.cxx_flags()},
                extra_link_args=["-fopenmp"],
            )
        ],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
