"""Test configuration shared by every test module.

Triton kernels run on the CPU through the interpreter when there is no GPU. The
interpreter is chosen when triton is imported, so the variable must be set here,
before any test module (or svdkernels.triton) imports triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of tiny problems: with more, OpenMP wake-ups cost
    more than the work, and on a busy machine far more. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
