"""Shared by the tests of ``svdkernels.kv``."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: with more than one intra-op thread, OpenMP wake-ups cost more
    than the work, and on a busy machine (other processes on the cores) far more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
