"""Which implementation runs a fused LoRA call: the Triton kernels or the pure-PyTorch path.

Rule (documented in the README):

* ``"auto"`` (default): for CUDA tensors when Triton imports, the faster of the Triton kernels and the torch path
  (cuBLAS), chosen per pass and problem by timing both once (``fused_lora._autoselect``); the torch path
  otherwise.
* ``"triton"``: always the kernels. On CPU tensors they run only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported); otherwise the call fails with a clear error.
* ``"torch"``: always the pure-PyTorch path.

The choice comes from :func:`set_backend`, the :func:`use_backend` context manager, or the environment
variable ``FUSED_LORA_BACKEND`` read at import time.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

import torch

from ._settings import Setting

BACKENDS = ("auto", "triton", "torch")

_BACKEND = Setting("fused-lora backend", "backend", BACKENDS, "FUSED_LORA_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"`` or ``"torch"``."""
    _BACKEND.set(name)


def get_backend() -> str:
    """The backend currently requested (``use_backend`` overrides ``set_backend``)."""
    return _BACKEND.get()


def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting a backend for the calls made inside it (this thread only).

    Backward passes run by autograd use the backend chosen when their forward ran.
    """
    return _BACKEND.use(name)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when Triton imports in this process."""
    return _triton_import_error() is None


def triton_interpreting() -> bool:
    """True when the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    if not triton_available():
        return False
    from fused_lora.kernels import INTERPRETING

    return INTERPRETING


def resolve_backend(device: torch.device) -> str:
    """Return ``"triton"``, ``"torch"`` or ``"fastest"`` (CUDA under ``"auto"`` with Triton: per pass and problem,
    the faster of the two, see ``fused_lora._autoselect``) for tensors on ``device`` under the current setting."""
    requested = get_backend()
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "fastest" if device.type == "cuda" and triton_available() else "torch"
    # requested == "triton": never fall back silently.
    if not triton_available():
        raise RuntimeError(
            "fused-lora backend 'triton' was requested but Triton does not import "
            f"({_triton_import_error()}); install triton or use set_backend('torch')"
        )
    if device.type == "cuda" or triton_interpreting():
        return "triton"
    raise RuntimeError(
        f"fused-lora backend 'triton' needs CUDA tensors, got tensors on {device}. To run the Triton kernels on "
        "CPU tensors, set TRITON_INTERPRET=1 before triton is imported (the Triton interpreter); otherwise use "
        "set_backend('auto') or set_backend('torch')"
    )
