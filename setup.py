"""Builds the Cython extensions (the kernel and the track_json scanner). All metadata lives in
pyproject.toml.

``SEGCORE_DEBUG=1`` builds with bounds checks, wraparound checks and no optimisation.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("SEGCORE_DEBUG", "") not in ("", "0")
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": not debug,
}
compile_args = ["-O0", "-g"] if debug else ["-O3"]

exts = [
    Extension(
        f"segcore.{name}",
        [f"src/segcore/{name}.pyx"],
        language="c++",
        extra_compile_args=compile_args + ["-std=c++17"],
    )
    for name in ("_kernel", "_json")
]

setup(ext_modules=cythonize(exts, compiler_directives=directives))
