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

# (device, backend) pairs that can run here.
DEVICE_BACKENDS = [("cpu", "torch")]
if INTERPRETING:
    DEVICE_BACKENDS.append(("cpu", "triton"))
if HAS_CUDA:
    DEVICE_BACKENDS += [("cuda", "torch")] + ([("cuda", "triton")] if triton_available() else [])


def pytest_report_header(config):
    mode = "interpreter" if INTERPRETING else ("compiled" if triton_available() else "unavailable")
    return f"fused-lora: CUDA={HAS_CUDA}, Triton kernels: {mode}, device/backends: {DEVICE_BACKENDS}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
