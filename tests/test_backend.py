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
    base = {k: v for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "FUSED_LORA_BACKEND", "FUSED_LORA_CPU_HALF_COMPUTE")}
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
        assert resolve_backend(torch.device("cuda")) == "fastest"  # timed per problem: test_autoselect.py


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


def test_cpu_half_compute_policy_setting():
    """set_cpu_half_compute / use_cpu_half_compute / FUSED_LORA_CPU_HALF_COMPUTE, validated like the backend."""
    default = fused_lora.get_cpu_half_compute()  # "auto" unless FUSED_LORA_CPU_HALF_COMPUTE says otherwise
    assert default == os.environ.get("FUSED_LORA_CPU_HALF_COMPUTE", "auto").strip().lower()
    with fused_lora.use_cpu_half_compute("FP32"):
        assert fused_lora.get_cpu_half_compute() == "fp32"
        with fused_lora.use_cpu_half_compute("native"):
            assert fused_lora.get_cpu_half_compute() == "native"
        assert fused_lora.get_cpu_half_compute() == "fp32"
    assert fused_lora.get_cpu_half_compute() == default
    fused_lora.set_cpu_half_compute("native")
    try:
        assert fused_lora.get_cpu_half_compute() == "native"
    finally:
        fused_lora.set_cpu_half_compute(default)
    for bad in ("bf16", "", None):
        with pytest.raises(ValueError, match="is not a CPU half-precision compute policy; choose one of auto, fp32"):
            fused_lora.set_cpu_half_compute(bad)
    proc = _run_python("import fused_lora; print(fused_lora.get_cpu_half_compute())",
                       FUSED_LORA_CPU_HALF_COMPUTE="fp32")
    assert proc.stdout.strip() == "fp32", proc.stderr
    proc = _run_python("import fused_lora", FUSED_LORA_CPU_HALF_COMPUTE="fast")
    assert proc.returncode != 0 and "FUSED_LORA_CPU_HALF_COMPUTE='fast' is not a CPU half-precision" in proc.stderr


_WHICH_KERNELS = """
    import importlib.util
    import fused_lora.kernels as ours
    assert ours.__name__ == "fused_lora.kernels" and hasattr(ours, "lora_forward")
    try:
        import kernels
    except ModuleNotFoundError as exc:
        print("absent", exc.name)
    else:
        if getattr(kernels, "__file__", None) is None:  # a PEP 420 namespace package: nothing in it
            assert not [name for name in vars(kernels) if not name.startswith("__")], vars(kernels)
            assert importlib.util.find_spec("kernels") is kernels.__spec__
            print("empty namespace")
        else:
            print("found", kernels.__file__)
    """


def _which_kernels(cwd, *args, **env) -> str:
    """What `import kernels` finds in a fresh interpreter started in ``cwd`` (``python [args] -c``)."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base.update(env)
    proc = subprocess.run([sys.executable, *args, "-c", textwrap.dedent(_WHICH_KERNELS)], capture_output=True,
                          text=True, cwd=cwd, env=base, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kernels_folder_never_shadows_hugging_face_kernels(tmp_path):
    """`kernels/` ships as fused_lora.kernels. A top-level `kernels` is Hugging Face's package (bitsandbytes and
    transformers import it): from anywhere, the repository root (the working directory, first on sys.path)
    included, `import kernels` finds that package when it is installed. When it is not, the repository root
    gives what Python gives for any folder named kernels without __init__.py (an empty namespace package, which
    transformers' availability check reads as absent) and anywhere else ModuleNotFoundError."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fused_lora.__file__)))
    hf = tmp_path / "site" / "kernels"
    hf.mkdir(parents=True)
    (hf / "__init__.py").write_text("def get_kernel(*args, **kwargs):\n    return None\n")
    assert _which_kernels(tmp_path) == "absent kernels"
    assert _which_kernels(repo) == "empty namespace"
    for cwd in (tmp_path, repo):
        found = _which_kernels(cwd, PYTHONPATH=str(tmp_path / "site"))
        assert found == f"found {hf / '__init__.py'}", (cwd, found)
    # the repository under two spellings (a symlink on PYTHONPATH, the real path as the working directory)
    (tmp_path / "link").symlink_to(repo)
    assert _which_kernels(repo, PYTHONPATH=str(tmp_path / "link")) == "empty namespace"
    # the repository root ahead of the installed package on sys.path, as `python -m pytest` run there puts it
    found = _which_kernels(tmp_path, PYTHONPATH=os.pathsep.join([repo, str(tmp_path / "site")]))
    assert found == f"found {hf / '__init__.py'}", found


def test_transformers_sees_no_kernels_package_from_the_repository_root():
    """transformers' availability check imports a `kernels` that has no metadata: from the repository root it
    must conclude what it concludes elsewhere (this process runs there under `make test`)."""
    pytest.importorskip("transformers")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fused_lora.__file__)))
    code = ("from transformers.utils import import_utils as u; "
            "print(u._is_package_available('kernels', return_version=True)[0], u.is_kernels_available())")
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=300)
    elsewhere = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert here.returncode == 0 and elsewhere.returncode == 0, here.stderr + elsewhere.stderr
    assert here.stdout == elsewhere.stdout, (here.stdout, elsewhere.stdout)
