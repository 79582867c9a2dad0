"""bitsandbytes as a test oracle for NF4, held to the format's definition.

The format (``nf4-format.md``, bitsandbytes' CUDA kernels and its scalar CPU code) numbers blocks over the flat,
row-major weight: element ``i`` uses ``absmax[i // blocksize]``, so blocks cross rows when ``in_features`` is not a
multiple of the blocksize. bitsandbytes' AVX-512 CPU kernel (``dequantizeBlockwise4bitCpu`` in ``csrc/cpu_ops.cpp``,
0.49 to 0.50.x at least) indexes absmax per row instead, ``absmax[row * (in_features // blocksize) + col //
blocksize]``: wrong whenever ``in_features`` is not a multiple of the blocksize (see
``test_bitsandbytes_cpu_dequantize_row_indexing`` in test_nf4_format.py). Which code runs depends on the host CPU,
so no test may use a 2-D ``dequantize_4bit`` on the CPU as its oracle. Two ways around it, both bitsandbytes' own
code:

* :func:`dequantize` -- ``dequantize_4bit`` through a flat quant state (one row: both indexings agree);
* :func:`format_exact_cpu_dequantize` -- while PEFT's or bitsandbytes' own layers run, the CPU kernel of
  ``bitsandbytes::dequantize_4bit`` is bitsandbytes' generic PyTorch implementation (its CPU fallback for odd
  shapes), which indexes blocks over the flat array.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Optional

import torch

import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code


def dequantize(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` to ``dtype`` (default: the state's),
    computed through a flat copy of the quant state (``shape = (numel,)``) and reshaped; like ``dequantize_4bit``,
    a packed tensor in the legacy ``[1, n]`` layout gives the transposed weight."""
    flat = copy.copy(quant_state)
    shape = torch.Size(quant_state.shape)
    flat.shape = torch.Size([shape.numel()])
    flat.dtype = dtype or quant_state.dtype
    out = F.dequantize_4bit(packed.reshape(-1, 1), flat).reshape(shape)
    return out.t() if packed.shape[0] == 1 else out


def _dequantize_4bit_by_format(A, absmax, blocksize, quant_type, shape, dtype):
    A = A if A.dtype == torch.uint8 else A.view(torch.uint8)  # packed codes stored in another dtype
    return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape,
                                    dtype)


@contextlib.contextmanager
def format_exact_cpu_dequantize():
    """Inside the block, ``bitsandbytes::dequantize_4bit`` on CPU tensors (used by ``Linear4bit`` / ``matmul_4bit``
    forward and backward, hence by PEFT's QLoRA layer) indexes absmax over the flat weight; the registration is
    removed on exit, restoring bitsandbytes' own kernel."""
    lib = torch.library.Library("bitsandbytes", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            lib.impl("dequantize_4bit", _dequantize_4bit_by_format, "CPU")
        yield
    finally:
        lib._destroy()
