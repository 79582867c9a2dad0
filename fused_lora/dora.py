r"""DoRA (weight-decomposed LoRA) on the pure-PyTorch path: the row norm of ``W + s B A`` without ``[out, in]``
temporaries, and the autograd Function of PEFT's DoRA linear.

Internal for now (issue 14, first piece): not wired into ``fused_lora_linear``, the modules, ``from_peft`` or the
adapter files, and without Triton kernels. The base weight is a dense tensor (or, for the norm, a callable
returning the dense weight -- the hook where a quantized weight will be dequantized; NF4 comes later).

Definition (PEFT 0.21, ``tuners/lora/dora.py`` and ``variants.py``), per output feature ``i``::

    n_i = ||W_i + s B_i A||        (row norm over in_features; DETACHED: no gradient flows through n)
    c_i = m_i / n_i                (m: the trainable magnitude, PEFT's lora_magnitude_vector)
    no dropout, or eval:  y = c * (x W^T + s xa B^T) + b,                       xa = x A^T
    dropout D (train):    y = x W^T + b + (c - 1) * (D(x) W^T) + c * s * D(x) A^T B^T

with ``c`` scaling the columns of ``[M, N]`` and ``D(x) = keep * x / (1 - p)`` the stateless mask of
:mod:`fused_lora.dropout` (the LoRA path's mask for the same seed).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dropout import Dropout
from .torch_ops import _rounded, _scaled_to, compute_dtype

WeightLike = Union[torch.Tensor, Callable[[], torch.Tensor]]

# Rows per block where a block of W is converted to the norm's dtype (a bf16 W is never copied whole to fp32).
_BLOCK_BYTES = 1 << 22


def _norm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half-precision inputs too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_blocks(n: int, k: int):
    rows = max(1, _BLOCK_BYTES // (8 * max(k, 1)))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _dense(weight: WeightLike) -> torch.Tensor:
    return weight() if callable(weight) else weight


def weight_row_norm_sq(weight: WeightLike) -> torch.Tensor:
    """``||W_i||^2`` for every row of the frozen W, in fp32 (float64 for a float64 W): what the caller computes
    once per frozen weight and caches (invalidated when W changes). Row blocks: no full-size copy of a half W."""
    w = _dense(weight)
    ndt = _norm_dtype(w)
    out = torch.empty(w.shape[0], dtype=ndt, device=w.device)
    for r0, r1 in _row_blocks(*w.shape):
        blk = w[r0:r1].to(ndt)
        torch.linalg.vecdot(blk, blk, dim=1, out=out[r0:r1])
    return out


def default_rtol(dtype: torch.dtype) -> float:
    """The default tolerance of :func:`dora_row_norm_sq`: 256 units of roundoff of the norm's dtype (1.5e-5 in
    fp32, 2.8e-14 in float64) on the relative error of ``n_i``."""
    return 256 * torch.finfo(dtype).eps / 2


def dora_row_norm_sq(
    weight_norm_sq: torch.Tensor,
    weight: WeightLike,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    rtol: Optional[float] = None,
    fallback: bool = True,
    return_fallback_rows: bool = False,
):
    r"""``n_i^2 = ||W_i + s B_i A||^2`` for every output row, without an ``[out, in]`` temporary.

    Identity. Expanding the square of ``W_i + s B_i A`` (``B_i``: row ``i`` of B, ``[1, r]``)::

        n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

    ``||W_i||^2`` is given (``weight_norm_sq``, cached per frozen W: :func:`weight_row_norm_sq`); ``W A^T`` is one
    thin ``[out, r]`` product (W read once, in row blocks), ``A A^T`` is ``[r, r]``. Everything is computed in fp32
    (float64 when W, A or B is float64), from the adapters' own values.

    Cancellation bound. Let ``u`` be the unit roundoff, ``L = K + r`` the longest dot product involved, and
    ``beta_i = |s| sum_j |B_ij| ||A_j||`` (a cheap upper bound of ``||s B_i A||`` by the triangle inequality).
    Each term's rounding error is bounded by the same products taken in absolute value: ``||W_i||^2`` carries at
    most ``gamma_L ||W_i||^2``, the cross term ``gamma_L 2 ||W_i|| beta_i`` (Cauchy-Schwarz on each ``|W_i| |A_j|``)
    and the quadratic term ``gamma_L beta_i^2``, with ``gamma_L = L u / (1 - L u)``. So::

        |fl(n_i^2) - n_i^2| <= gamma_L (||W_i|| + beta_i)^2 ,    kappa_i = (||W_i|| + beta_i)^2 / n_i^2
        relative error of n_i  <=  gamma_L kappa_i / 2          (worst case)
                               ~   sqrt(L) u kappa_i / 2        (typical: rounding errors of random sign)

    ``(||W_i|| + beta_i)^2 <= 2 (||W_i||^2 + beta_i^2)``: the identity loses relative accuracy in proportion to
    ``(||W_i||^2 + s^2 ||B_i A||^2) / n_i^2``, i.e. when ``W_i`` and ``-s B_i A`` nearly cancel. The direct form is
    better conditioned there (its error is ``~ u sqrt(kappa_i)``, the square root: it never squares the
    cancelling quantities before subtracting them).

    Fallback. Rows whose typical estimate ``sqrt(L) u kappa_i / 2`` exceeds ``rtol`` (default
    :func:`default_rtol`: 256 u, 1.5e-5 in fp32; a row with ``fl(n_i^2) <= 0`` always) are recomputed directly,
    ``||W_i + s B_i A||^2`` for those rows only (row blocks of ``W[rows] + s B[rows] A``, ``[rows, K]``), in
    float64: for fp32 inputs those few rows come out at float64 accuracy, i.e. at the accuracy the data allow.
    With the default, a row falls back when ``kappa_i > 512 / sqrt(L)`` (16 at K = 1024, 8 at K = 4096): only
    genuine cancellation, never a typical DoRA row (B small next to W: ``kappa_i ~ 1``).

    Args:
        weight_norm_sq: ``[N]`` the cached ``||W_i||^2`` (fp32 or float64).
        weight: the dense W ``[N, K]``, or a callable returning it (dequantized on demand).
        lora_A, lora_B: ``[r, K]``, ``[N, r]``.
        rtol: the tolerance on the relative error of ``n_i`` described above.
        fallback: False gives the identity alone (to show what the fallback repairs; tests only).
        return_fallback_rows: also return the bool ``[N]`` mask of the rows recomputed directly.

    Returns ``n^2`` ``[N]`` in the norm dtype (and the mask when asked).
    """
    w = _dense(weight)
    ndt = _norm_dtype(w, lora_A, lora_B)
    n_out, k = w.shape
    r = lora_A.shape[0]
    a = lora_A.to(ndt)
    b = lora_B.to(ndt)
    s = float(scaling)
    wsq = weight_norm_sq.to(ndt)

    # W A^T, one thin product over row blocks of W
    wat = torch.empty((n_out, r), dtype=ndt, device=w.device)
    for r0, r1 in _row_blocks(n_out, k):
        torch.mm(w[r0:r1].to(ndt), a.t(), out=wat[r0:r1])
    gram = a @ a.t()  # [r, r]
    cross = torch.linalg.vecdot(wat, b, dim=1)
    quad = torch.linalg.vecdot(b @ gram, b, dim=1)
    n_sq = wsq + (2.0 * s) * cross + (s * s) * quad

    # cancellation estimate (see the docstring)
    beta = abs(s) * (b.abs() @ torch.linalg.vector_norm(a, dim=1))
    scale_sq = (wsq.clamp_min(0).sqrt() + beta).square()
    u = torch.finfo(ndt).eps / 2
    tol = default_rtol(ndt) if rtol is None else float(rtol)
    estimate = (0.5 * math.sqrt(k + r) * u) * scale_sq / n_sq  # n_sq <= 0 with scale_sq > 0: inf or negative
    bad = (estimate > tol) | ((n_sq <= 0) & (scale_sq > 0))
    if fallback and bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        a64 = lora_A.to(torch.float64)
        for i0, i1 in _row_blocks(rows.numel(), k):
            idx = rows[i0:i1]
            direct = w[idx].to(torch.float64).addmm_(lora_B[idx].to(torch.float64), a64, alpha=s)
            n_sq[idx] = torch.linalg.vecdot(direct, direct, dim=1).to(ndt)
    if return_fallback_rows:
        return n_sq, bad
    return n_sq


class DoraFunction(torch.autograd.Function):
    r"""Autograd Function of PEFT's DoRA linear on 2-D inputs (torch path).

    ``DoraFunction.apply(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, weight_norm_sq)``:
    x ``[M, K]``, the frozen W ``[N, K]`` (must not require grad), A ``[r, K]``, B ``[N, r]``, the magnitude m
    ``[N]``, bias ``[N]`` or None, ``s = scaling``, ``dropout_p`` (0: no dropout, also eval), ``seed`` (the 0-dim
    int64 tensor of :func:`fused_lora.dropout.seed_tensor`; None when p = 0), ``weight_norm_sq`` the cached
    ``||W_i||^2`` (None: computed here).

    Forward, with ``n = sqrt(dora_row_norm_sq(...))`` (a constant: detached), ``c = m / n`` ``[N]``, keep-probability
    ``q = 1 - p`` and the 0/1 mask ``k`` so that ``D(x) = k * x / q``::

        p = 0:  xa = x A^T,     z = x W^T + s xa B^T,               y = c * z + b
        p > 0:  xa = D(x) A^T,  bd = D(x) W^T,  z = bd + s xa B^T,   y = x W^T + b + (c - 1) * bd + c * s xa B^T
                                                                          (= x W^T - bd + c * z + b)

    (p = 0 is the case ``D = identity``, ``bd = x W^T``, of the second line.) Element-wise, with ``c_n`` scaling
    column n: ``y[i,n] = sum_k x[i,k] W[n,k] + b[n] + (c_n - 1) bd[i,n] + c_n s sum_j xa[i,j] B[n,j]``.

    Backward, ``g = dL/dy`` ``[M, N]``, ``gc = g * c`` (columns scaled):

    * ``dL/dm_n = sum_i g[i,n] dy[i,n]/dc_n * dc_n/dm_n = sum_i g[i,n] z[i,n] / n_n``  (n is a constant), i.e.
      ``dm = sum_rows(g * z) / n``; at p = 0, ``z = x W^T + s x A^T B^T``; at p > 0, ``z = D(x) W^T + s xa B^T``;
    * ``dB = s gc^T xa`` ``[N, r]``;  ``gb = gc B`` ``[M, r]``;  ``dA = s gb^T D(x)`` ``[r, K]``;
    * x reaches y through ``x W^T`` (weight 1), through ``bd`` (weight ``c - 1``, behind D) and through xa
      (behind D); D is linear and its own adjoint (same mask, same ``1/q``)::

          dx = g W + D( (g * (c - 1)) W + s gb A )          p > 0
          dx = gc W + s gb A                                 p = 0 (the same with D = identity)

    * ``dbias = sum_rows g``. W gets no gradient (frozen; a W requiring grad is refused), nor does n.

    Saved for backward: x, W, A, B, xa ``[M, r]``, z ``[M, N]`` (in x's dtype: what dm needs; an ``M x out``
    tensor like y -- recomputing it would cost a second base GEMM in backward), c and n ``[N]``, the seed. Nothing
    of size ``M x K`` beyond x: the mask is regenerated from the seed.

    Dtypes: products run in :func:`fused_lora.torch_ops.compute_dtype` (x's dtype, or fp32 for CPU half under the
    fp32 policy) with A and B rounded to x's dtype where they enter them (as in the LoRA path); the norm, c, and
    the column epilogues (``c * z``, ``(c - 1) * bd``) in fp32 (float64 for float64 inputs); xa and z rounded to x's
    dtype. Gradients come back in each input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, weight_norm_sq):
        if weight.requires_grad:
            raise ValueError("DoraFunction: the base weight is frozen (no gradient through W or the norm); got a "
                             "weight that requires grad")
        dtype, cdt = x.dtype, compute_dtype(x)
        ndt = _norm_dtype(x, weight, lora_A, lora_B)
        edt = torch.promote_types(cdt, ndt)  # the epilogues' dtype
        s = float(scaling)
        if weight_norm_sq is None:
            weight_norm_sq = weight_row_norm_sq(weight)
        n = dora_row_norm_sq(weight_norm_sq, weight, lora_A, lora_B, s).clamp_min(0).sqrt()
        c = magnitude.detach().to(ndt) / n
        ce = c.to(edt)
        be = None if bias is None else bias.detach().to(edt)

        xc, wc = x.to(cdt), weight.to(cdt)
        ac, bc = _rounded(lora_A, dtype, cdt), _rounded(lora_B, dtype, cdt)
        m_rows, k = x.shape
        base = F.linear(xc, wc)
        if dropout_p > 0:
            dropout = Dropout(float(dropout_p), int(seed.item()))
            xm = dropout.keep_mask(m_rows, k, x.device, dtype=cdt).mul_(xc)  # k * x (transient, not saved)
            bd = torch.mm(xm, wc.t()).mul_(dropout.scale)
            xa = torch.mm(xm, ac.t()).mul_(dropout.scale).to(dtype)
            del xm
            lora = torch.mm(xa.to(cdt), bc.t()).mul_(s)
            z = (bd + lora).to(dtype)
            y = base.to(edt).add_(bd.to(edt) * (ce - 1)).add_(lora.to(edt) * ce)
        else:
            xa = F.linear(xc, ac).to(dtype)
            zc = base.addmm_(xa.to(cdt), bc.t(), alpha=s)
            z = zc.to(dtype)
            y = zc.to(edt) * ce
        if be is not None:
            y.add_(be)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, z, c, n, seed)
        ctx.scaling, ctx.dropout_p = s, float(dropout_p)
        ctx.dtypes = (None if bias is None else bias.dtype, magnitude.dtype)
        return y.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa, z, c, n, seed = ctx.saved_tensors
        need_x, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        bias_dtype, m_dtype = ctx.dtypes
        s, p = ctx.scaling, ctx.dropout_p
        dtype, cdt = x.dtype, compute_dtype(x)
        edt = torch.promote_types(cdt, c.dtype)
        ce = c.to(edt)
        ge = grad_out.to(edt)
        gc = (ge * ce).to(dtype).to(cdt)  # g * c, rounded to x's dtype like the kernels' stored intermediates
        ac, bc = _rounded(lora_A, dtype, cdt), _rounded(lora_B, dtype, cdt)
        wc = weight.to(cdt)
        dx = da = db = dm = dbias = None

        if need_m:
            dm = (ge * z.to(edt)).sum(0).div_(n.to(edt)).to(m_dtype)
        if need_bias:
            dbias = ge.sum(0).to(bias_dtype)
        if need_b:
            db = _scaled_to(torch.mm(gc.t(), xa.to(cdt)), s, lora_B.dtype)
        if need_x or need_a:
            gb = torch.mm(gc, bc).to(dtype).to(cdt)  # [M, r]
        xc = x.to(cdt)
        if p > 0:
            dropout = Dropout(p, int(seed.item()))
            keep = dropout.keep_mask(*x.shape, x.device, dtype=cdt)
            if need_x:
                inner = torch.mm((ge * (ce - 1)).to(dtype).to(cdt), wc).addmm_(gb, ac, alpha=s)
                dx = torch.mm(grad_out.to(cdt), wc).addcmul_(inner, keep, value=dropout.scale).to(dtype)
                del inner
            if need_a:
                da = _scaled_to(torch.mm(gb.t(), keep.mul_(xc)), s * dropout.scale, lora_A.dtype)
        else:
            if need_x:
                dx = torch.mm(gc, wc).addmm_(gb, ac, alpha=s).to(dtype)
            if need_a:
                da = _scaled_to(torch.mm(gb.t(), xc), s, lora_A.dtype)
        return dx, None, da, db, dm, dbias, None, None, None, None
