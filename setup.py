"""Build script. The optional C++ extension svdkernels._C is added here once csrc/
holds kernels; until then this is a pure-Python package."""
from setuptools import setup

setup()
