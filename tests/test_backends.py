"""Backend selection: defaults by device, the context manager, the environment variable."""
import subprocess
import sys

import pytest
import torch

from svdkernels import backends


def test_default_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select_backend("rsvd", torch.device("cpu")) == "reference"


def test_context_manager_overrides_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with backends.use_backend("reference"):
        assert backends.requested_backend() == "reference"
    assert backends.requested_backend() is None


def test_context_manager_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with backends.use_backend("reference"):
        assert backends.select_backend("rsvd", torch.device("cpu")) == "reference"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend() == "reference"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with backends.use_backend("cuda-magic"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="SVDKERNELS_BACKEND"):
        backends.requested_backend()


def test_cpp_without_kernel_is_an_error(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with backends.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="cpp"):
            backends.select_backend("rsvd", torch.device("cpu"))


def test_import_is_lazy():
    # Importing the package must not import triton, initialise CUDA or compile.
    code = (
        "import sys, torch, svdkernels; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialised'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
