"""Shared by the tests of ``svdkernels.kv``: every test here runs on one thread
(``one_thread`` in tests/conftest.py; the problems are tiny)."""
import pytest


@pytest.fixture(autouse=True)
def _kv_one_thread(one_thread):
    yield
