"""Test configuration.

Without a GPU the Triton kernels run in the Triton interpreter: TRITON_INTERPRET=1 must be set before triton is
imported, which is why it happens here, before any test module imports fused_lora. With a GPU the kernels run
compiled on CUDA tensors and the interpreter stays off.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fused_lora._backend import triton_available, triton_interpreting  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = triton_available() and triton_interpreting()

if INTERPRETING:
    # The interpreter has no bf16 arithmetic of its own: give it exact bf16 dot, casts and elementwise ops (a
    # test-only extension, itself tested against PyTorch in test_triton_bf16_interpreter.py). Raises on a Triton
    # whose interpreter it does not fit, rather than letting the bf16 kernel tests run on wrong arithmetic.
    import triton_bf16  # noqa: E402

    triton_bf16.install()

# FUSED_LORA_TEST_COLLECT_CUDA=1: collect the CUDA parametrizations on a machine without CUDA, for
# `pytest --collect-only` only (tests/test_gpu_check.py checks which tests `make gpu-check` selects); such items are
# marked skipped, never run.
COLLECT_CUDA = os.environ.get("FUSED_LORA_TEST_COLLECT_CUDA") == "1" and not HAS_CUDA

# (device, backend) pairs that can run here.
DEVICE_BACKENDS = [("cpu", "torch")]
if INTERPRETING:
    DEVICE_BACKENDS.append(("cpu", "triton"))
if HAS_CUDA or COLLECT_CUDA:
    DEVICE_BACKENDS += [("cuda", "torch")] + ([("cuda", "triton")] if triton_available() else [])


def pytest_report_header(config):
    mode = "compiled" if triton_available() else "unavailable"
    if INTERPRETING:
        mode = "interpreter with exact bf16 (tests/triton_bf16.py)"
    return f"fused-lora: CUDA={HAS_CUDA}, Triton kernels: {mode}, device/backends: {DEVICE_BACKENDS}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Mark ``triton_kernels`` every test that runs or compiles the Triton kernels, so that `make
    test-oldest-triton` selects them (``-m triton_kernels``) without a list of names: tests parametrized with the
    "triton" backend, tests whose code names that backend, the kernels module or TRITON_INTERPRET (to compile), and
    the tests of modules that define their own @triton.jit kernels."""
    import inspect
    import re

    runs_kernels = re.compile(r"[\"']triton[\"']|fused_lora\.kernels|\bkernels\.(lora|nf4)\b|TRITON_INTERPRET")
    defines_kernels = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        module = getattr(item, "module", None)
        try:
            code = inspect.getsource(item.function) if hasattr(item, "function") else ""
            if module is not None and module not in defines_kernels:
                defines_kernels[module] = "@triton.jit" in inspect.getsource(module)
        except (OSError, TypeError):
            code = ""
        if params.get("backend") == "triton" or runs_kernels.search(code) or defines_kernels.get(module):
            item.add_marker("triton_kernels")
        _gpu_check_on_cuda_only(item, params)


def _gpu_check_on_cuda_only(item, params):
    """``make gpu-check`` runs the tests marked ``gpu_check`` (``-m gpu_check``) on CUDA: the mark is kept on their
    CUDA parametrizations and on marked tests without a ``device`` parameter, and taken off the others (mark the
    test functions themselves, not their module or class). CUDA items collected without CUDA
    (``FUSED_LORA_TEST_COLLECT_CUDA``) are skipped."""
    device = params.get("device")
    if device is not None and device != "cuda":
        item.own_markers[:] = [mark for mark in item.own_markers if mark.name != "gpu_check"]
    if device == "cuda" and not HAS_CUDA:
        item.add_marker(pytest.mark.skip(reason="CUDA parametrization collected without a CUDA device"))
