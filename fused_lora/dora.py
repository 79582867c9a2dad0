r"""DoRA (weight-decomposed LoRA): the row norm of ``W + s B A`` without ``[out, in]`` temporaries, its per-weight
cache, and DoRA's column scale. The autograd Function is :class:`fused_lora.functional.FusedDoraFunction`
(``fused_lora_linear(..., magnitude=m)``); its implementations are ``fused_lora.torch_ops.dora_forward`` /
``dora_backward`` and the Triton kernels' of the same names.

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
import weakref
from typing import Callable, Optional, Union

import torch


WeightLike = Union[torch.Tensor, Callable[[], torch.Tensor]]

# Bytes per block of rows where W is converted to the norm's dtype (a bf16 W is never copied whole to fp32): a
# cache-sized block on CPU; on a GPU, where each block costs kernel launches, up to 64 MiB (a 4096 x 4096 W whole).
_BLOCK_BYTES = {"cpu": 1 << 22, "cuda": 1 << 26}


def norm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half-precision inputs too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_blocks(n: int, k: int, device: torch.device):
    rows = max(1, _BLOCK_BYTES.get(torch.device(device).type, _BLOCK_BYTES["cpu"]) // (8 * max(k, 1)))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def weight_row_norm_sq(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``||W_i||^2`` for every row of the frozen W, in fp32 (float64 for a float64 W): what the caller computes
    once per frozen weight and caches (:class:`WeightNormCache`). Row blocks: no full-size copy of a half W.

    ``weight``: a dense ``[out, in]`` tensor, an :class:`~fused_lora.nf4.NF4Weight` or NF4 operands (dequantized
    to ``dtype``, default the weight's own dtype for an NF4Weight and fp32 for operands: the values the GEMMs
    multiply with when ``dtype`` is the math dtype), or a callable returning the dense W."""
    w = _dense_in(weight, dtype)
    ndt = norm_dtype(w)
    out = torch.empty(w.shape[0], dtype=ndt, device=w.device)
    for r0, r1 in _row_blocks(*w.shape, w.device):
        blk = w[r0:r1].to(ndt)
        torch.linalg.vecdot(blk, blk, dim=1, out=out[r0:r1])
    return out


def _dense_in(weight, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The dense W of a tensor, a callable, or a quantized weight (``dequantize(dtype)``)."""
    if isinstance(weight, torch.Tensor):
        return weight
    if callable(weight) and not hasattr(weight, "dequantize"):
        return weight()
    if dtype is None:
        dtype = getattr(weight, "dtype", torch.float32)
    return weight.dequantize(dtype)


def _tensor_key(t: torch.Tensor):
    """What identifies a tensor's current values without reading them: its memory and its version counter (shared
    by views and bumped by every in-place change made through them: ``load_state_dict``, ``copy_``, ``add_``).
    None where a tensor has no version counter (inference-mode tensors): no caching then."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (t.data_ptr(), version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class WeightNormCache:
    """``||W_i||^2`` of one frozen base weight, computed once and kept until the weight changes.

    :meth:`get` recomputes when the weight is another object, has new storage (``module.to(...)``,
    ``param.data = ...``, a re-quantized NF4 merge) or a new version (in-place changes: ``load_state_dict``,
    ``copy_``, ``add_``), or when another dtype is asked for. In-place edits through ``.data`` bypass the version
    counter: call :meth:`invalidate` after them (merge / unmerge in fused-lora do)."""

    def __init__(self):
        self._key = None
        self._value: Optional[torch.Tensor] = None

    def invalidate(self) -> None:
        self._key, self._value = None, None

    def __getstate__(self):
        return {}  # pickling / deepcopy: a fresh cache (the key holds weak references)

    def __setstate__(self, state) -> None:
        self.__init__()

    def get(self, weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The cached ``||W_i||^2`` of ``weight`` (a tensor or an NF4Weight; see :func:`weight_row_norm_sq`)."""
        tensors = [weight] if isinstance(weight, torch.Tensor) else \
            [t for t in (getattr(weight, f, None) for f in getattr(weight, "TENSOR_FIELDS", ())) if t is not None]
        keys = tuple(_tensor_key(t) for t in tensors)
        if not keys or any(k is None for k in keys):
            return weight_row_norm_sq(weight, dtype)
        # and the object holding the weight's memory (a view's base: modules hand out new views of one buffer on
        # every call), so that memory freed and reused by another tensor is not mistaken for the cached weight
        owner = tensors[0] if tensors[0]._base is None else tensors[0]._base
        key = (dtype, tuple(getattr(weight, "shape", ())), weakref.ref(owner), keys)
        if self._key is None or not _same_key(self._key, key):
            with torch.no_grad():
                self._value = weight_row_norm_sq(weight, dtype)
            self._key = key
        return self._value


def _same_key(a, b) -> bool:
    """Keys of :meth:`WeightNormCache.get`: the same dtype, shape, live owner and tensors in the same state."""
    owner = a[2]()
    return owner is not None and owner is b[2]() and a[:2] == b[:2] and a[3] == b[3]


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_norm_sq: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``n = ||W + s B A||_row`` ``[out]`` in fp32 (float64 for float64 inputs), detached: DoRA's weight norm (what
    PEFT's ``get_weight_norm`` computes with an ``[out, in]`` temporary), by :func:`dora_row_norm_sq`. Used by
    merge and to initialise the magnitude (``m = n`` makes a new DoRA layer start as its base layer).
    ``weight`` / ``dtype``: as in :func:`weight_row_norm_sq`."""
    with torch.no_grad():
        dense = _dense_in(weight, dtype)
        wsq = weight_row_norm_sq(dense) if weight_norm_sq is None else weight_norm_sq
        return dora_row_norm_sq(wsq, dense, lora_A.detach(), lora_B.detach(), scaling).clamp_min(0).sqrt()


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
    w = _dense_in(weight, None)
    ndt = norm_dtype(w, lora_A, lora_B)
    n_out, k = w.shape
    r = lora_A.shape[0]
    a = lora_A.to(ndt)
    b = lora_B.to(ndt)
    s = float(scaling)
    wsq = weight_norm_sq.to(ndt)

    # W A^T, one thin product over row blocks of W
    wat = torch.empty((n_out, r), dtype=ndt, device=w.device)
    for r0, r1 in _row_blocks(n_out, k, w.device):
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
        for i0, i1 in _row_blocks(rows.numel(), k, w.device):
            idx = rows[i0:i1]
            direct = w[idx].to(torch.float64).addmm_(lora_B[idx].to(torch.float64), a64, alpha=s)
            n_sq[idx] = torch.linalg.vecdot(direct, direct, dim=1).to(ndt)
    if return_fallback_rows:
        return n_sq, bad
    return n_sq


def dora_scale(weight, dtype: torch.dtype, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
               scaling: float, weight_norm_sq: Optional[torch.Tensor] = None):
    """``(c, n)``: DoRA's column scale ``c = m / n`` and the weight norm ``n = ||W + s B A||_row`` ``[out]``, both in
    fp32 (float64 when W, A, B or m is float64), from the values the GEMMs use: ``weight`` is a dense tensor or
    quantized operands (dequantized to ``dtype``, the activation dtype). ``weight_norm_sq``: the cached
    ``||W_i||^2`` (computed here when None). Detached: no gradient flows through n (PEFT's definition)."""
    with torch.no_grad():
        dense = _dense_in(weight, dtype)
        wsq = weight_row_norm_sq(dense) if weight_norm_sq is None else weight_norm_sq
        ndt = norm_dtype(dense, lora_A, lora_B, magnitude)
        n = dora_row_norm_sq(wsq, dense, lora_A, lora_B, scaling).clamp_min_(0).sqrt_().to(ndt)
        return magnitude.detach().to(ndt) / n, n
