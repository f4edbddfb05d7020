"""Builds the C++ extension ``qwenrl._C`` from every source in csrc/.

Build it against the torch you already have:  pip install -e . --no-build-isolation
Set QWENRL_PORTABLE=1 to build without -march=native (e.g. for a wheel shipped elsewhere).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
if os.environ.get("QWENRL_PORTABLE", "0") != "1":
    cxx_flags.append("-march=native")

setup(
    ext_modules=[
        CppExtension(
            name="qwenrl._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
