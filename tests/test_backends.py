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


def test_dtypes_the_triton_kernels_lack_go_to_the_reference(monkeypatch):
    # The op module decides: a CUDA call in a dtype the family's kernels do not
    # compute in runs on the reference by default, and forcing triton is an error.
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    cuda, supported = torch.device("cuda"), (torch.float32, torch.bfloat16)
    assert backends.select_backend("op", cuda, dtype=torch.float32, triton_dtypes=supported) == "triton"
    assert backends.select_backend("op", cuda, dtype=torch.float64, triton_dtypes=supported) == "reference"
    monkeypatch.setattr(backends, "triton_interpreted", lambda: True)
    with backends.use_backend("triton"), pytest.raises(RuntimeError, match="float32, bfloat16, got torch.float64"):
        backends.select_backend("op", cuda, dtype=torch.float64, triton_dtypes=supported)
