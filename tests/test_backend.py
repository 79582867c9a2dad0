"""Backend selection: set_backend, use_backend, FUSED_LORA_BACKEND, and the rule for "auto" / "triton"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_lora
from fused_lora._backend import resolve_backend, triton_available

from conftest import INTERPRETING


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (backend state and TRITON_INTERPRET are read at import)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_LORA_BACKEND")}
    base.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=base,
                          timeout=300)


def test_set_and_use_backend_nest():
    assert fused_lora.get_backend() == "auto"
    with fused_lora.use_backend("torch"):
        assert fused_lora.get_backend() == "torch"
        with fused_lora.use_backend("TRITON "):
            assert fused_lora.get_backend() == "triton"
        assert fused_lora.get_backend() == "torch"
    assert fused_lora.get_backend() == "auto"
    fused_lora.set_backend("torch")
    try:
        assert fused_lora.get_backend() == "torch"
    finally:
        fused_lora.set_backend("auto")


@pytest.mark.parametrize("bad", ["cuda", "", None, 3])
def test_invalid_names_rejected(bad):
    with pytest.raises(ValueError, match="is not a fused-lora backend"):
        fused_lora.set_backend(bad)
    with pytest.raises(ValueError, match="is not a fused-lora backend"):
        with fused_lora.use_backend(bad):
            pass


def test_auto_uses_torch_on_cpu():
    assert resolve_backend(torch.device("cpu")) == "torch"
    if triton_available():
        assert resolve_backend(torch.device("cuda")) == "triton"


def test_triton_on_cpu_runs_in_interpreter_only():
    if INTERPRETING:
        with fused_lora.use_backend("triton"):
            assert resolve_backend(torch.device("cpu")) == "triton"
    if not triton_available():
        pytest.skip("triton not installed")
    proc = _run_python(
        """
        import torch, fused_lora
        fused_lora.set_backend("triton")
        try:
            fused_lora.fused_lora_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1), 1.0)
        except RuntimeError as e:
            print("ERR", e)
        """
    )
    assert "ERR fused-lora backend 'triton' needs CUDA tensors, got tensors on cpu" in proc.stdout, proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stdout


def test_environment_variable():
    proc = _run_python("import fused_lora; print(fused_lora.get_backend())", FUSED_LORA_BACKEND="torch")
    assert proc.stdout.strip() == "torch", proc.stderr
    proc = _run_python("import fused_lora", FUSED_LORA_BACKEND="tritno")
    assert proc.returncode != 0 and "FUSED_LORA_BACKEND='tritno' is not a fused-lora backend" in proc.stderr


def test_kernels_install_under_fused_lora_namespace(tmp_path):
    """`kernels/` ships as fused_lora.kernels; a top-level `kernels` would shadow Hugging Face's package."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fused_lora.__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(
            """
            import importlib.util, fused_lora.kernels as k
            spec = importlib.util.find_spec("kernels")
            print(k.__name__, "none" if spec is None else spec.origin)
            """
        )],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    name, top_level = proc.stdout.split()
    assert name == "fused_lora.kernels", proc.stderr
    assert top_level == "none" or not top_level.startswith(repo), top_level
