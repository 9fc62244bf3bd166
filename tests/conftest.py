"""Test configuration shared by every test module.

Triton kernels run on the CPU through the interpreter when there is no GPU. The
interpreter is chosen when triton is imported, so the variable must be set here,
before any test module (or svdkernels.triton) imports triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
