"""The pure-PyTorch implementation of the fused LoRA linear: forward and backward.

It runs wherever the Triton kernels do not (CPU, or ``set_backend("torch")``), with the same API, the same dropout
masks and the same rounding points as the kernels (``xa`` and ``gb`` are rounded to the activation dtype, every
product accumulates in at least fp32). The math and its derivation are in
:class:`fused_lora.functional.FusedLoraFunction`.

Speed on CPU comes from what is *not* done: no separate scale or add passes (``addmm`` with ``alpha = scaling``
accumulates the LoRA term into the base product in place), no stored dropout mask (it is regenerated from the
seed), and no copy of x into the adapter dtype.

Half precision on CPUs without native bf16/fp16 matrix units (no AVX512-BF16 / AMX): PyTorch's bf16 and fp16
matmuls there are 10-150x slower than fp32 (measured 2048x1024x1024 on an AVX2 Zen 3: fp32 35 ms, bf16 250 ms to
5.4 s depending on layout). On such CPUs the products are computed in fp32 and rounded once to the activation
dtype, which is what a native half-precision GEMM with fp32 accumulation computes, only faster.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .dropout import Dropout
from .nf4 import NF4Weight

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _cpu_has_native(dtype: torch.dtype) -> bool:
    probe = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }[dtype]
    for name in probe:
        fn = getattr(torch.cpu, name, None)
        if fn is not None and fn():
            return True
    return False


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the torch path multiplies in for activations like ``t``."""
    if t.dtype in _HALF and t.device.type == "cpu" and not _cpu_has_native(t.dtype):
        return torch.float32
    return t.dtype


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense tensor: itself, or an ``NF4Weight`` dequantized to ``dtype`` (the activation dtype, so the
    values are bitsandbytes' dequantized weights, as the kernels use them) -- a transient copy."""
    if isinstance(weight, NF4Weight):
        return weight.dequantize_torch(dtype)
    return weight


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout: Optional[Dropout],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = x @ W^T + scaling * xa @ B^T + bias`` with ``xa = D(x) @ A^T``, for 2-D x; ``weight`` dense or an
    ``NF4Weight``. Returns ``(y, xa)``."""
    dtype, cdt = x.dtype, compute_dtype(x)
    xc, ac = x.to(cdt), lora_A.to(cdt)
    bc = None if bias is None else bias.to(cdt)

    # The base GEMM first, then the products that read x again while it is still in cache.
    y = F.linear(xc, dense_weight(weight, dtype).to(cdt), bc)
    if dropout is None:
        xa = F.linear(xc, ac)
    else:
        # the 0/1 mask in the compute dtype, turned into the masked x in place (one M x K buffer, not two)
        xd = dropout.keep_mask(x.shape[0], x.shape[1], x.device, dtype=cdt).mul_(xc)
        xa = F.linear(xd, ac).mul_(dropout.scale)
        del xd
    # xa is kept in the activation dtype (it is saved for backward); the up-projection uses the rounded
    # value, exactly as the Triton kernels do.
    xa = xa.to(dtype)
    y.addmm_(xa.to(cdt), _transposed(lora_B, cdt), alpha=scaling)
    return y.to(dtype), xa


# Rows per step of the masked LoRA term of dx: the [rows, K] product stays in one cache-sized buffer instead of
# a fresh M x K tensor (whose first touch costs page faults comparable to the product itself on CPU).
_MASKED_PRODUCT_ROWS = 256


def _add_masked_product_(dx, gb, a, keep, alpha) -> None:
    """``dx += alpha * keep * (gb @ a)`` in row blocks through one reused buffer."""
    rows = max(1, min(_MASKED_PRODUCT_ROWS, dx.shape[0]))
    buf = torch.empty((rows, dx.shape[1]), dtype=dx.dtype, device=dx.device)
    for r0 in range(0, dx.shape[0], rows):
        r1 = min(r0 + rows, dx.shape[0])
        prod = torch.mm(gb[r0:r1], a, out=buf[: r1 - r0])
        dx[r0:r1].addcmul_(prod, keep[r0:r1], value=alpha)


def _transposed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous transpose of B (small): g @ B and the B-update of y run 20-40% faster on CPU BLAS with the rank
    dimension contiguous (measured at 2048 x 1024 x 16 in fp32)."""
    return t.to(dtype).t().contiguous()


def lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout: Optional[Dropout],
    needs: Tuple[bool, bool, bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients ``(dx, dW, dA, dB, dbias)`` for the inputs flagged in ``needs`` (None for the others).

    Everything that reads g runs back to back, then the one product that reads x, for cache reuse (unlike the
    forward's order, its effect on the 2-core benchmark machine was within the noise)."""
    need_dx, need_dw, need_da, need_db, need_dbias = needs
    dtype, cdt = x.dtype, compute_dtype(x)
    g = grad_out.to(cdt)
    ac = lora_A.to(cdt)
    dx = dw = da = db = dbias = None

    if need_dx:
        dx = torch.mm(g, dense_weight(weight, dtype).to(cdt))
    if need_dx or need_da:
        # gb = g @ B, rounded to the activation dtype like the kernels' stored gb.
        gb = F.linear(g, _transposed(lora_B, cdt)).to(dtype).to(cdt)
    if need_db:
        # (xa^T g)^T as F.linear(xa^T, g^T): the fastest of the equivalent layouts on CPU BLAS (measured)
        db = F.linear(xa.to(cdt).t(), g.t()).mul_(scaling).t().contiguous().to(lora_B.dtype)
    if need_dbias:
        dbias = g.sum(0).to(dtype)
    if need_dw:
        dw = torch.mm(g.t(), x.to(cdt)).to(weight.dtype)

    keep = None
    if dropout is not None and (need_dx or need_da):
        keep = dropout.keep_mask(x.shape[0], x.shape[1], x.device, dtype=cdt)
    lora_scale = scaling if dropout is None else scaling * dropout.scale
    if need_dx:
        if keep is None:
            dx.addmm_(gb, ac, alpha=scaling)
        else:
            _add_masked_product_(dx, gb, ac, keep, lora_scale)
        dx = dx.to(dtype)
    if need_da:
        xc = x.to(cdt)
        xd = xc if keep is None else keep.mul_(xc)  # the mask is not needed after this: reuse its buffer
        # gb^T xd as F.linear(gb^T, xd^T): likewise the fastest layout measured
        da = F.linear(gb.t(), xd.t()).mul_(lora_scale).to(lora_A.dtype)
    return dx, dw, da, db, dbias
