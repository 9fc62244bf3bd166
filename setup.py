"""Build script: the pure-Python package plus the optional C++ extension svdkernels._C.

The extension (csrc/) is compiled with torch.utils.cpp_extension against the torch
that is already installed, so install with ``--no-build-isolation``::

    pip install --no-build-isolation -e .

It is optional: when torch or a C++ compiler is missing, or the build fails, a
warning is printed and the pure-Python package is installed anyway (every op then
runs on its reference backend). Environment variables:

- ``SVDKERNELS_NO_EXTENSION=1``: skip the extension;
- ``SVDKERNELS_REQUIRE_EXTENSION=1``: a failed extension build fails the install
  (for CI, where the C++ tests must run rather than skip).

The kernels pick AVX-512 / AVX2 / portable code at run time (csrc/cpu/), so the
build uses no ``-march`` flag and the result runs on any CPU of the architecture.
CMakeLists.txt builds the same library without setuptools.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import setup

NAME = "svdkernels._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _warn(message: str) -> None:
    print(f"WARNING: svdkernels: {message}; installing without the C++ extension "
          "(ops run on their reference backends).", file=sys.stderr)


def _extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or nothing if the extension is skipped."""
    if _flag("SVDKERNELS_NO_EXTENSION"):
        print("svdkernels: SVDKERNELS_NO_EXTENSION is set, not building svdkernels._C", file=sys.stderr)
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        if _flag("SVDKERNELS_REQUIRE_EXTENSION"):
            raise
        _warn(f"torch is not importable at build time ({e}); install torch first and use --no-build-isolation")
        return {}

    here = os.path.dirname(os.path.abspath(__file__))

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that turns a failed build into a warning (unless required)."""

        def finalize_options(self) -> None:
            super().finalize_options()
            if getattr(self, "editable_mode", False) or self.inplace:
                # An editable install (what ./run.sh does on every call) would compile
                # in a fresh temporary directory each time; a persistent one lets
                # ninja rebuild only what changed.
                tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
                self.build_temp = os.path.join(here, "build", f"temp.{tag}")

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - compiler missing, headers missing, ...
                if _flag("SVDKERNELS_REQUIRE_EXTENSION"):
                    raise
                _warn(f"building {NAME} failed ({type(e).__name__}: {e})")
                # Nothing was built: later steps (the editable install's copy of
                # the library into the source tree) must not look for it.
                self.extensions = []

    sources = sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "**", "*.cpp"), recursive=True)
    )
    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        # Apple clang has no -fopenmp; at::parallel_for then runs serially.
        compile_args, link_args = ["-O3"], []
    else:
        # -fopenmp: at::parallel_for is inlined from torch's headers and uses OpenMP
        # (torch's own libgomp is the one loaded at run time).
        compile_args, link_args = ["-O3", "-fopenmp"], ["-fopenmp"]
    ext = CppExtension(
        NAME,
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_setup())
