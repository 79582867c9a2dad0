"""The pure-PyTorch implementation of the fused LoRA linear: forward and backward.

It runs wherever the Triton kernels do not (CPU, or ``set_backend("torch")``), with the same API, the same dropout
masks and the same rounding points as the kernels (``xa`` and ``gb`` are rounded to the activation dtype, every
product accumulates in at least fp32). The math and its derivation are in
:class:`fused_lora.functional.FusedLoraFunction`.

Adapters wider than the activations (fp32 A / B over bf16 x, as PEFT keeps them): the small ``[r, K]`` / ``[N, r]``
matrices are rounded to the activation dtype, where the kernels round their tiles, and then converted to the
dtype the products run in; x is never converted for them. The gradients of A and B come back in the adapters'
dtype, scaled in the wider of that dtype and the compute dtype (one rounding).

Speed on CPU comes from what is *not* done: no separate scale or add passes (``addmm`` with ``alpha = scaling``
accumulates the LoRA term into the base product in place), no stored dropout mask (it is regenerated from the
seed), and no copy of x into the adapter dtype.

Half precision on the CPU follows one of two compute policies (:func:`set_cpu_half_compute`):

* ``"fp32"``: the products are computed in fp32 and rounded once to the activation dtype -- what a native
  half-precision GEMM with fp32 accumulation computes, only faster where the CPU has no bf16/fp16 matrix units (no
  AVX512-BF16 / AMX): PyTorch's half-precision matmuls there are 10-150x slower than fp32. This policy converts x
  (and g) to fp32 on purpose, a transient copy per product; the gradients of fp32 adapters are then fp32 results,
  never rounded to half precision.
* ``"native"``: the products run in the activation dtype (PyTorch's own half-precision GEMMs): no copy of x in
  another dtype. With fp32 adapters, the products giving their gradients come rounded to the activation dtype out
  of their half-precision GEMMs (PyTorch's CPU GEMMs have no half-in, fp32-out form); the Triton kernels return
  them unrounded.
* ``"auto"`` (default): ``"native"`` where the CPU has native units for the dtype, ``"fp32"`` elsewhere.

Both policies round at the same points (but for the adapters' gradients just said); they can differ in the last bit
of an element (summation order). CUDA tensors always compute in their own dtype, as the native policy.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from ._settings import Setting
from .dropout import Dropout

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


CPU_HALF_COMPUTE_POLICIES = ("auto", "fp32", "native")

_CPU_HALF_COMPUTE = Setting("CPU half-precision compute policy", "policy", CPU_HALF_COMPUTE_POLICIES,
                            "FUSED_LORA_CPU_HALF_COMPUTE", "auto")


def set_cpu_half_compute(policy: str) -> None:
    """How the torch path multiplies fp16 / bf16 CPU tensors: ``"fp32"`` (fp32 products rounded once),
    ``"native"`` (PyTorch's half-precision GEMMs) or ``"auto"`` (native where the CPU has bf16 / fp16 matrix
    units, fp32 elsewhere). Also set by the environment variable ``FUSED_LORA_CPU_HALF_COMPUTE`` at import."""
    _CPU_HALF_COMPUTE.set(policy)


def get_cpu_half_compute() -> str:
    """The CPU half-precision compute policy requested (``use_cpu_half_compute`` overrides the default)."""
    return _CPU_HALF_COMPUTE.get()


def use_cpu_half_compute(policy: str) -> Iterator[None]:
    """Context manager: the CPU half-precision compute policy for the calls made inside it (this thread only).
    Backward passes run by autograd use the policy in force when their forward ran."""
    return _CPU_HALF_COMPUTE.use(policy)


def resolved_cpu_half_compute(dtype: torch.dtype) -> str:
    """``"fp32"`` or ``"native"``: what the policy in force means for CPU activations of ``dtype``."""
    policy = get_cpu_half_compute()
    if policy == "auto":
        return "native" if dtype not in _HALF or _cpu_has_native(dtype) else "fp32"
    return policy


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the torch path multiplies in for activations like ``t``."""
    if t.dtype in _HALF and t.device.type == "cpu" and resolved_cpu_half_compute(t.dtype) == "fp32":
        return torch.float32
    return t.dtype


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense tensor: itself, or a quantized weight's operands dequantized to ``dtype`` (the activation
    dtype: for NF4, bitsandbytes' dequantized weights, as the kernels use them) -- a transient copy."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.dequantize(dtype)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout: Optional[Dropout],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = x @ W^T + scaling * xa @ B^T + bias`` with ``xa = D(x) @ A^T``, for 2-D x; ``weight`` a dense tensor
    or :class:`~fused_lora.nf4.NF4Operands`. Returns ``(y, xa)``."""
    dtype, cdt = x.dtype, compute_dtype(x)
    xc, ac = x.to(cdt), _rounded(lora_A, dtype, cdt)
    bc = None if bias is None else bias.to(cdt)

    # The base GEMM first, then the products that read x again while it is still in cache.
    y = F.linear(xc, dense_weight(weight, dtype).to(cdt), bc)
    xa = F.linear(xc, ac) if dropout is None else _masked_down_projection(xc, ac, dropout)
    # xa is kept in the activation dtype (it is saved for backward); the up-projection uses the rounded
    # value, exactly as the Triton kernels do.
    xa = xa.to(dtype)
    y.addmm_(xa.to(cdt), _transposed(_rounded(lora_B, dtype, cdt)), alpha=scaling)
    return y.to(dtype), xa


# With dropout, the masked products run over blocks of rows: each block's 0/1 mask is generated into one reused
# buffer of about _MASK_BLOCK_BYTES, applied and consumed while it is in cache -- never an [M, K] mask, whose first
# touch alone costs as much as a rank-16 product on a CPU. The base GEMMs stay whole (splitting them is slower;
# benchmarks/README.md). The dA partial sums accumulate in the compute dtype, so only fp32 compute is split:
# half-precision compute (CUDA, CPUs with native bf16 GEMMs) takes the whole mask in one block and dA stays one
# product with fp32 accumulation.
_MASK_BLOCK_BYTES = 1 << 20


def _mask_block_rows(m: int, k: int, cdt: torch.dtype) -> int:
    """Rows per block of the masked products (see _MASK_BLOCK_BYTES); at least 1, also when m == 0."""
    if cdt != torch.float32:
        return max(m, 1)
    return max(1, min(m, _MASK_BLOCK_BYTES // (4 * max(k, 1))))


def _masked_down_projection(xc: torch.Tensor, ac: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """``xa = D(x) @ A^T`` in row blocks: each block's mask is turned into the masked block of x in place."""
    (m, k), r = xc.shape, ac.shape[0]
    xa = torch.empty((m, r), dtype=xc.dtype, device=xc.device)
    rows = _mask_block_rows(m, k, xc.dtype)
    keep_buf = torch.empty((rows, k), dtype=xc.dtype, device=xc.device)
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        xd = dropout.keep_mask(r1 - r0, k, xc.device, row_start=r0, out=keep_buf[: r1 - r0]).mul_(xc[r0:r1])
        # the 1 / (1 - p) scale applied to the GEMM's accumulator (alpha): one rounding, as in the kernels
        xa[r0:r1].addmm_(xd, ac.t(), beta=0, alpha=dropout.scale)
    return xa


def _masked_lora_grads(dx, gb, a, xc, dropout: Dropout, dx_scale: float, need_da: bool, gb_alpha: float = 1.0,
                       dx_inner: Optional[torch.Tensor] = None):
    """In row blocks sharing one mask per block: ``dx += dx_scale * keep * (gb_alpha * gb @ a + dx_inner)`` in place
    when ``dx`` is given (``dx_inner``: an optional ``[M, K]`` term under the mask, DoRA's), and, when ``need_da``,
    returns the unscaled ``gb^T (keep * x)`` (None otherwise)."""
    m, k = xc.shape
    rows = _mask_block_rows(m, k, xc.dtype)
    keep_buf = torch.empty((rows, k), dtype=xc.dtype, device=xc.device)
    prod_buf = None if dx is None else torch.empty((rows, k), dtype=xc.dtype, device=xc.device)
    da = None
    for r0 in range(0, max(m, 1), rows):  # m == 0: one empty block, so dA comes out as zeros
        r1 = min(r0 + rows, m)
        keep = dropout.keep_mask(r1 - r0, k, xc.device, row_start=r0, out=keep_buf[: r1 - r0])
        if dx is not None:
            if dx_inner is None:
                prod = torch.mm(gb[r0:r1], a, out=prod_buf[: r1 - r0])
            else:
                prod = torch.addmm(dx_inner[r0:r1], gb[r0:r1], a, alpha=gb_alpha, out=prod_buf[: r1 - r0])
            dx[r0:r1].addcmul_(prod, keep, value=dx_scale)
        if need_da:
            xd = keep.mul_(xc[r0:r1])  # the block's mask is not needed after this: reuse its buffer
            da = torch.mm(gb[r0:r1].t(), xd) if da is None else da.addmm_(gb[r0:r1].t(), xd)
    return da


def _rounded(adapter: torch.Tensor, dtype: torch.dtype, cdt: torch.dtype) -> torch.Tensor:
    """A or B (small) as the products take it: rounded to the activation dtype ``dtype`` (where the kernels round
    their tiles), then in the compute dtype ``cdt`` (itself, no copy, when already in both)."""
    return adapter.to(dtype).to(cdt)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous transpose of B (small): g @ B and the B-update of y run 20-40% faster on CPU BLAS with the rank
    dimension contiguous (measured at 2048 x 1024 x 16 in fp32)."""
    return t.t().contiguous()


def _scaled_to(product: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * product`` in ``dtype`` (an adapter's gradient), scaled in the wider of ``dtype`` and the product's
    dtype: a half-precision product for fp32 adapters is rounded once (by its GEMM), not again after the scaling."""
    return product.to(torch.promote_types(product.dtype, dtype)).mul_(scale).to(dtype)


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
    """Gradients ``(dx, dweight, dlora_A, dlora_B, dbias)`` (``fused_lora.functional.LoraGrads`` order) for the
    inputs flagged in ``needs`` (same order; None for the others). ``weight``: a dense tensor or NF4 operands.

    Everything that reads g runs back to back, then the one product that reads x, for cache reuse."""
    need_dx, need_dw, need_da, need_db, need_dbias = needs
    dtype, cdt = x.dtype, compute_dtype(x)
    g = grad_out.to(cdt)
    ac = _rounded(lora_A, dtype, cdt)
    dx = dw = da = db = dbias = None

    if need_dx:
        dx = torch.mm(g, dense_weight(weight, dtype).to(cdt))
    if need_dx or need_da:
        # gb = g @ B, rounded to the activation dtype like the kernels' stored gb.
        gb = F.linear(g, _transposed(_rounded(lora_B, dtype, cdt))).to(dtype).to(cdt)
    if need_db:
        # (xa^T g)^T as F.linear(xa^T, g^T): the fastest of the equivalent layouts on CPU BLAS (measured)
        db = _scaled_to(F.linear(xa.to(cdt).t(), g.t()), scaling, lora_B.dtype).t().contiguous()
    if need_dbias:
        dbias = g.sum(0).to(dtype)
    if need_dw:
        dw = torch.mm(g.t(), x.to(cdt)).to(weight.dtype)

    lora_scale = scaling if dropout is None else scaling * dropout.scale
    if dropout is None:
        if need_dx:
            dx.addmm_(gb, ac, alpha=scaling)
        if need_da:
            # gb^T x as F.linear(gb^T, x^T): likewise the fastest layout measured
            da = F.linear(gb.t(), x.to(cdt).t())
    elif need_dx or need_da:
        da = _masked_lora_grads(dx, gb, ac, x.to(cdt), dropout, lora_scale, need_da)
    if need_dx:
        dx = dx.to(dtype)
    if need_da:
        da = _scaled_to(da, lora_scale, lora_A.dtype)
    return dx, dw, da, db, dbias


# ----------------------------------------------------------------------------------------------------------------
# DoRA (math and derivation: fused_lora.functional.FusedDoraFunction). ``scale`` is c = m / n ``[N]`` in fp32 (float64
# for float64 inputs); the column epilogues run in the wider of it and the compute dtype.
# ----------------------------------------------------------------------------------------------------------------


def dora_forward(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout: Optional[Dropout],
    scale: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, xa, z)`` of the DoRA linear on 2-D x: ``xa = D(x) A^T``, ``z = D(x) W^T + s xa B^T`` and
    ``y = (x W^T + s xa B^T) + (c - 1) * z + b`` (with D = identity: ``y = c * z + b``).

    On CPU every new ``[M, N]`` tensor costs its first touch, as much as a pass over it: the epilogues run in place
    (``addmm_``, ``addcmul_``) on the two outputs, and the only other big tensor is the dropout's masked x."""
    dtype, cdt = x.dtype, compute_dtype(x)
    edt = torch.promote_types(cdt, scale.dtype)
    ce = scale.to(edt)
    xc, wc = x.to(cdt), dense_weight(weight, dtype).to(cdt)
    ac, bt = _rounded(lora_A, dtype, cdt), _transposed(_rounded(lora_B, dtype, cdt))
    if dropout is None:
        xa = F.linear(xc, ac).to(dtype)
        z = F.linear(xc, wc).addmm_(xa.to(cdt), bt, alpha=scaling)
        ze = z.to(edt)
        y = ze * ce if bias is None else torch.addcmul(bias.to(edt), ze, ce)  # a new tensor: z is returned too
        return y.to(dtype), xa, z.to(dtype)
    # the bias joins the base GEMM where the epilogue runs in the compute dtype, else the fp32 epilogue
    y = F.linear(xc, wc, bias.to(cdt) if bias is not None and edt == cdt else None)
    m_rows, k = x.shape
    xm = dropout.keep_mask(m_rows, k, x.device, dtype=cdt).mul_(xc)  # keep * x: transient, never saved
    z = torch.mm(xm, wc.t()).mul_(dropout.scale)  # D(x) W^T
    xa = torch.mm(xm, ac.t()).mul_(dropout.scale).to(dtype)
    del xm
    xac = xa.to(cdt)
    z.addmm_(xac, bt, alpha=scaling)
    y.addmm_(xac, bt, alpha=scaling)
    if edt == cdt:
        y.addcmul_(z, ce - 1)
    else:
        y = y.to(edt).addcmul_(z.to(edt), ce - 1)
        if bias is not None:
            y.add_(bias.to(edt))
    return y.to(dtype), xa, z.to(dtype)


def _rows_scaled(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, cdt: torch.dtype) -> torch.Tensor:
    """``scale[:, None] * t`` for an ``[N, *]`` W or B, computed in the scale's dtype and rounded to x's dtype
    ``dtype`` (an operand of the products), in the compute dtype ``cdt``: ``(g * c) W = g (c * W)`` without an
    ``[M, N]`` temporary."""
    return (t.to(scale.dtype) * scale[:, None]).to(dtype).to(cdt)


def _colsum_of_product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_rows(a * b)`` in ``dtype``, over blocks of rows on CPU (no ``[M, N]`` temporary)."""
    m, n = a.shape
    rows = max(m, 1) if a.device.type != "cpu" else max(1, min(m, _MASK_BLOCK_BYTES // (8 * max(n, 1))))
    out = torch.zeros(n, dtype=dtype, device=a.device)
    buf = torch.empty((min(rows, m), n), dtype=dtype, device=a.device)  # one block's products, reused
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        out += torch.mul(a[r0:r1].to(dtype), b[r0:r1].to(dtype), out=buf[: r1 - r0]).sum(0)
    return out


def dora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dropout: Optional[Dropout],
    needs: Tuple[bool, bool, bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients ``(dx, dlora_A, dlora_B, dmagnitude, dbias)`` (``fused_lora.functional.DoraGrads`` order) for the
    inputs flagged in ``needs``: dA / dB in the adapters' dtype, dmagnitude in the scale's dtype (fp32 or float64),
    dbias in x's.

    ``g * c`` is never formed: it only enters products, ``(g * c) B = g (c * B)``, ``(g * c)^T xa = c * (g^T xa)``
    and ``(g * c) W = g (c * W)`` (likewise ``g * (c - 1)``), where c scales the small B, an ``[N, r]`` result or
    W -- the kernels scale g's tiles in registers instead (the same values up to where the one rounding to x's
    dtype falls)."""
    need_dx, need_da, need_db, need_dm, need_dbias = needs
    dtype, cdt = x.dtype, compute_dtype(x)
    edt = torch.promote_types(cdt, scale.dtype)
    ce = scale.to(edt)
    g = grad_out.to(cdt)
    ac = _rounded(lora_A, dtype, cdt)
    dx = da = db = dm = dbias = None

    if need_dm:
        dm = _colsum_of_product(grad_out, z, edt).div_(norm.to(edt)).to(scale.dtype)
    if need_dbias:
        dbias = g.sum(0).to(dtype)
    if need_db:  # (xa^T g)^T as in lora_backward, its columns scaled by c
        db = _scaled_to(F.linear(xa.to(cdt).t(), g.t()).to(edt).mul_(ce), scaling, lora_B.dtype).t().contiguous()
    if need_dx or need_da:
        gb = F.linear(g, _transposed(_rows_scaled(lora_B, ce, dtype, cdt))).to(dtype).to(cdt)  # [M, r]
    wc = dense_weight(weight, dtype).to(cdt) if need_dx else None
    if dropout is None:
        if need_dx:
            dx = torch.mm(g, _rows_scaled(wc, ce, dtype, cdt)).addmm_(gb, ac, alpha=scaling).to(dtype)
        if need_da:
            da = _scaled_to(F.linear(gb.t(), x.to(cdt).t()), scaling, lora_A.dtype)
    elif need_dx or need_da:
        # dx = g W + D((g * (c - 1)) W + s gb A): the masked part over row blocks, as in lora_backward
        inner = torch.mm(g, _rows_scaled(wc, ce - 1, dtype, cdt)) if need_dx else None
        dx = torch.mm(g, wc) if need_dx else None
        da = _masked_lora_grads(dx, gb, ac, x.to(cdt), dropout, dropout.scale, need_da, gb_alpha=scaling,
                                dx_inner=inner)
        del inner
        dx = None if dx is None else dx.to(dtype)
        da = None if da is None else _scaled_to(da, scaling * dropout.scale, lora_A.dtype)
    return dx, da, db, dm, dbias
