"""What the installed package needs, and what it must not: run-time dependencies and the package boundaries.

* numpy is not a dependency: importing fused_lora, quantizing to NF4 (whose double quantization keys a lookup table)
  and training a step must work where numpy cannot be imported.
* The ahead-of-time compile checker is test / report tooling (``benchmarks/aot.py``, which patches Triton
  internals): the runtime package never imports it.
* ``kernels/`` (installed as ``fused_lora.kernels``) takes tensors and scalars and never imports ``fused_lora``: the
  dependency goes one way only.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WITHOUT_NUMPY = r"""
import sys
sys.modules["numpy"] = None  # `import numpy` now raises ImportError, as where numpy is not installed
import torch
import fused_lora
from fused_lora import FusedLoraLinear, apply_lora, merge_and_unload, quantize_nf4  # noqa: F401

torch.manual_seed(0)
for quantize in (None, "nf4"):
    layer = FusedLoraLinear.from_linear(torch.nn.Linear(96, 40), r=4, lora_dropout=0.1, quantize=quantize)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0
    layer.merge()
    layer.unmerge()
w = quantize_nf4(torch.randn(16, 80), blocksize=64, double_quant=True)
assert w.nested and w.dequantize().shape == (16, 80)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
apply_lora(model, ["0", "2"], r=2)
torch.nn.init.normal_(model[0].lora_B)
fused_lora.save_adapter(model, sys.argv[1])
fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
fresh.load_state_dict(model.state_dict(), strict=False)
fused_lora.load_adapter(fresh, sys.argv[1])
assert torch.equal(fresh[0].lora_B, model[0].lora_B)
merge_and_unload(model)
loaded = sorted(name for name in sys.modules if name in ("fused_lora.aot", "aot") or name.startswith("benchmarks"))
assert not loaded, loaded
print("ok")
"""


def test_runs_without_numpy_and_without_the_aot_tooling(tmp_path):
    """Train, merge, quantize to NF4, save and load a PEFT adapter file, where numpy cannot be imported."""
    env = dict(os.environ, FUSED_LORA_BACKEND="torch", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY, str(tmp_path / "adapter")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_kernels_load_without_the_aot_tooling():
    pytest.importorskip("triton")
    code = ("import sys, fused_lora.kernels.lora, fused_lora.kernels.nf4; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'benchmarks' or m == 'fused_lora.aot'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-3000:])


def test_kernels_never_import_fused_lora():
    kernels_dir = os.path.join(ROOT, "kernels")
    offenders = []
    for name in sorted(os.listdir(kernels_dir)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(kernels_dir, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            else:
                continue
            offenders += [f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] == "fused_lora"
                          and not m.startswith("fused_lora.kernels")]
    assert not offenders, offenders


def test_numpy_is_not_a_declared_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(dep.split(";")[0].strip().lower().startswith("numpy") for dep in project["dependencies"])
