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
from typing import Optional

import torch


# Bytes per block of rows where W is converted to the norm's dtype (a bf16 W is never copied whole to fp32): a
# cache-sized block on CPU; on a GPU, where each block costs kernel launches, up to 64 MiB (a 4096 x 4096 W whole).
_BLOCK_BYTES = {"cpu": 1 << 22, "cuda": 1 << 26}
# Where the fallback runs without a host-side branch (GPUs): the rows recomputed directly each call, at most.
SYNC_FREE_FALLBACK_ROWS = 64


def norm_dtype(*dtypes) -> torch.dtype:
    """float64 when any input (tensor or dtype) is float64, float32 otherwise (half-precision inputs too)."""
    return torch.float64 if any(getattr(t, "dtype", t) == torch.float64 for t in dtypes) else torch.float32


class _Rows:
    """A frozen W ``[N, K]`` read by blocks of rows, each a dense tensor in the dtype the GEMMs multiply with: a
    dense tensor's own rows (a callable returning one: called once), or an NF4 weight's rows dequantized block by
    block (:class:`~fused_lora.nf4.NF4Weight` or its operands, to ``dtype``; default the NF4Weight's own dtype,
    fp32 for operands) -- never a whole ``[N, K]`` copy."""

    def __init__(self, weight, dtype: Optional[torch.dtype] = None):
        if callable(weight) and not isinstance(weight, torch.Tensor) and not hasattr(weight, "dequantize"):
            weight = weight()
        if isinstance(weight, torch.Tensor):
            self.dense, self.nf4 = weight, None
            self.dtype, self.device = weight.dtype, weight.device
            self.shape = tuple(weight.shape)
        else:
            self.dense = None
            self.dtype = dtype or getattr(weight, "dtype", torch.float32)
            self.nf4 = weight.operands() if hasattr(weight, "operands") else weight
            self.shape = tuple(int(d) for d in self.nf4.shape)
            self.device = self.nf4.packed.device
            # an NF4 block of rows starts on a quantization block: row counts in multiples of `align`
            self.align = self.nf4.blocksize // math.gcd(self.shape[1], self.nf4.blocksize)

    def blocks(self):
        """``(r0, r1, W[r0:r1])`` over all rows."""
        n, k = self.shape
        rows = max(1, _BLOCK_BYTES.get(self.device.type, _BLOCK_BYTES["cpu"]) // (8 * max(k, 1)))
        if self.nf4 is not None:
            rows = -(-rows // self.align) * self.align
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            yield r0, r1, self._slice(r0, r1)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``W[idx]`` (a few rows: the fallback's), by index arithmetic on the device (no host-side read of idx)."""
        if self.nf4 is None:
            return self.dense[idx]
        w, k = self.nf4, self.shape[1]
        flat = idx[:, None] * k + torch.arange(k, device=idx.device)
        byte = w.packed.reshape(-1)[flat // 2].long()
        nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # high nibble first
        return (w.code[nibble] * w.absmax[flat // w.blocksize]).to(self.dtype)  # f32(code * absmax), one rounding

    def _slice(self, r0: int, r1: int) -> torch.Tensor:
        if self.nf4 is None:
            return self.dense[r0:r1]
        from .nf4 import NF4Operands

        w, k = self.nf4, self.shape[1]
        first, last = r0 * k, r1 * k  # flat element range; first is a multiple of the block size (align)
        rows = NF4Operands(w.packed.reshape(-1)[first // 2:(last + 1) // 2], w.code, w.blocksize, (r1 - r0, k),
                           absmax=w.absmax[first // w.blocksize:-(-last // w.blocksize)])
        return rows.dequantize(self.dtype)


def weight_row_norm_sq(weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``||W_i||^2`` for every row of the frozen W, in fp32 (float64 for a float64 W, and off the CPU, where
    :func:`dora_row_norm_sq` runs the identity in float64): what the caller computes once per frozen weight and
    caches (:class:`WeightNormCache`). Row blocks: no full-size copy of W in any dtype.

    ``weight``: a dense ``[out, in]`` tensor, an :class:`~fused_lora.nf4.NF4Weight` or NF4 operands (dequantized
    to ``dtype`` block by block, default the weight's own dtype for an NF4Weight and fp32 for operands: the values
    the GEMMs multiply with when ``dtype`` is the math dtype), or a callable returning the dense W."""
    rows = weight if isinstance(weight, _Rows) else _Rows(weight, dtype)
    ndt = torch.float64 if rows.device.type != "cpu" else norm_dtype(rows.dtype)  # the sync-free identity's dtype
    out = torch.empty(rows.shape[0], dtype=ndt, device=rows.device)
    for r0, r1, blk in rows.blocks():
        blk = blk.to(ndt)
        torch.linalg.vecdot(blk, blk, dim=1, out=out[r0:r1])
    return out


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
    ``param.data = ...``, a re-quantized NF4 merge) or a new version (in-place changes made through the tensor:
    ``load_state_dict``, ``copy_``, ``add_``), or when another dtype is asked for. In-place edits through ``.data``
    bypass the version counter: call :meth:`invalidate` after them (fused-lora's merge / unmerge and its PEFT path's
    do). One entry per device, each read and written as one tuple: ``nn.DataParallel`` replicas, which share this
    object across threads, each find their own weight's entry (a thread never returns another's value)."""

    def __init__(self):
        self._entries: dict = {}  # device -> (key, ||W_i||^2)

    def invalidate(self) -> None:
        self._entries = {}

    def __getstate__(self):
        return {}  # pickling / deepcopy: a fresh cache (the keys hold weak references)

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
        entries = self._entries
        entry = entries.get(tensors[0].device)
        if entry is not None and _same_key(entry[0], key):
            return entry[1]
        with torch.no_grad():
            value = weight_row_norm_sq(weight, dtype)
        entries[tensors[0].device] = (key, value)
        return value


def _same_key(a, b) -> bool:
    """Keys of :meth:`WeightNormCache.get`: the same dtype, shape, live owner and tensors in the same state."""
    owner = a[2]()
    return owner is not None and owner is b[2]() and a[:2] == b[:2] and a[3] == b[3]


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_norm_sq: Optional[torch.Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``n = ||W + s B A||_row`` ``[out]`` in fp32 (float64 for float64 inputs), detached: DoRA's weight norm (what
    PEFT's ``get_weight_norm`` computes with an ``[out, in]`` temporary), by :func:`dora_row_norm_sq`. Used by
    merge and to initialise the magnitude (``m = n`` makes a new DoRA layer start as its base layer).
    ``weight`` / ``dtype``: as in :func:`weight_row_norm_sq`."""
    with torch.no_grad():
        rows = _Rows(weight, dtype)
        wsq = weight_row_norm_sq(rows) if weight_norm_sq is None else weight_norm_sq
        n_sq = dora_row_norm_sq(wsq, rows, lora_A.detach(), lora_B.detach(), scaling)
        return n_sq.clamp_min(0).sqrt().to(norm_dtype(rows.dtype, lora_A, lora_B))


def default_rtol(dtype: torch.dtype) -> float:
    """The default tolerance of :func:`dora_row_norm_sq`: 256 units of roundoff of the norm's dtype (1.5e-5 in
    fp32, 2.8e-14 in float64) on the relative error of ``n_i``."""
    return 256 * torch.finfo(dtype).eps / 2


def dora_row_norm_sq(
    weight_norm_sq: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
    fallback: bool = True,
    return_fallback_rows: bool = False,
    sync_free: Optional[bool] = None,
):
    r"""``n_i^2 = ||W_i + s B_i A||^2`` for every output row, without an ``[out, in]`` temporary.

    Identity. Expanding the square of ``W_i + s B_i A`` (``B_i``: row ``i`` of B, ``[1, r]``)::

        n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

    ``||W_i||^2`` is given (``weight_norm_sq``, cached per frozen W: :func:`weight_row_norm_sq`); ``W A^T`` is one
    thin ``[out, r]`` product (W read once, in row blocks; an NF4 W dequantized block by block), ``A A^T`` is
    ``[r, r]``. Everything is computed in fp32 (float64 when W, A or B is float64), from the adapters' own values.

    Cancellation bound. Let ``u`` be the unit roundoff, ``L = K + r`` the longest dot product involved, and
    ``beta_i = |s| sum_j |B_ij| ||A_j||`` (an upper bound of ``||s B_i A||`` by the triangle inequality). Each
    term's rounding error is bounded by the same products taken in absolute value: ``||W_i||^2`` carries at most
    ``gamma_L ||W_i||^2``, the cross term ``gamma_L 2 ||W_i|| beta_i`` (Cauchy-Schwarz on each ``|W_i| |A_j|``) and
    the quadratic term ``gamma_L beta_i^2``, with ``gamma_L = L u / (1 - L u)``. So::

        |fl(n_i^2) - n_i^2| <= gamma_L (||W_i|| + beta_i)^2 ,    kappa_i = (||W_i|| + beta_i)^2 / n_i^2
        relative error of n_i  <=  gamma_L kappa_i / 2          (worst case)
                               ~   sqrt(L) u kappa_i / 2        (typical: rounding errors of random sign)

    ``(||W_i|| + beta_i)^2 <= 2 (||W_i||^2 + beta_i^2)``: the identity loses relative accuracy in proportion to
    ``(||W_i||^2 + s^2 ||B_i A||^2) / n_i^2``, i.e. when ``W_i`` and ``-s B_i A`` nearly cancel. The direct form is
    better conditioned there (its error is ``~ u sqrt(kappa_i)``, the square root: it never squares the
    cancelling quantities before subtracting them).

    Fallback. The typical estimate uses the computed ``||s B_i A|| = |s| sqrt(B_i (A A^T) B_i^T)`` in place of
    ``beta_i`` (``beta_i`` can exceed it by about ``sqrt(r)``, which would flag rows that do not cancel at all at
    high rank). Rows whose estimate ``sqrt(L) u kappa_i / 2`` exceeds ``rtol`` (default :func:`default_rtol` of the
    inputs' norm dtype: 256 u, 1.5e-5 for fp32 inputs; a row with ``fl(n_i^2) <= 0`` always) are recomputed
    directly, ``||W_i + s B_i A||^2`` for those rows only (``W[rows] + s B[rows] A``, ``[rows, K]``), in float64:
    for fp32 inputs those few rows come out at the accuracy the data allow. With the default, a row falls back when
    ``kappa_i > 512 / sqrt(L)`` (16 at K = 1024, 8 at K = 4096): only genuine cancellation (``n_i`` below a
    quarter of ``||W_i|| + ||s B_i A||`` at K = 1024), never a typical DoRA row (B small next to W:
    ``kappa_i ~ 1``).

    Without a host-side branch (``sync_free``; by default on every device but the CPU, where reading whether a
    row needs the fallback would wait for the GPU on every call): the identity runs in float64, whose ``u`` is
    ``2^-29`` of fp32's, so that a row needs the fallback only when ``kappa_i`` exceeds about ``4e9`` at K = 4096
    (``n_i`` below ``2e-5 (||W_i|| + ||s B_i A||)``); the ``SYNC_FREE_FALLBACK_ROWS`` rows of largest estimate are
    recomputed directly every call and kept where flagged (``torch.where``), the others keep the float64
    identity. (PEFT's own fp32 direct form has a relative error near ``6e-8 sqrt(kappa_i)``: ``4e-3`` there.)

    Args:
        weight_norm_sq: ``[N]`` the cached ``||W_i||^2`` (fp32 or float64).
        weight: the frozen W ``[N, K]``: a dense tensor, a callable returning it, or an NF4 weight (dequantized to
            ``dtype`` block by block; see :func:`weight_row_norm_sq`).
        lora_A, lora_B: ``[r, K]``, ``[N, r]``.
        rtol: the tolerance on the relative error of ``n_i`` described above.
        fallback: False gives the identity alone (to show what the fallback repairs; tests only).
        return_fallback_rows: also return the bool ``[N]`` mask of the rows flagged for the fallback.
        sync_free: the path without a host-side branch (default: off the CPU).

    Returns ``n^2`` ``[N]`` in the inputs' norm dtype (and the mask when asked).
    """
    rows = weight if isinstance(weight, _Rows) else _Rows(weight, dtype)
    out_dtype = norm_dtype(rows.dtype, lora_A, lora_B)
    sync_free = rows.device.type != "cpu" if sync_free is None else sync_free
    ndt = torch.float64 if sync_free else out_dtype
    n_out, k = rows.shape
    r = lora_A.shape[0]
    a = lora_A.to(ndt)
    b = lora_B.to(ndt)
    s = float(scaling)
    wsq = weight_norm_sq.to(ndt)

    # W A^T, one thin product over row blocks of W
    wat = torch.empty((n_out, r), dtype=ndt, device=rows.device)
    for r0, r1, blk in rows.blocks():
        torch.mm(blk.to(ndt), a.t(), out=wat[r0:r1])
    gram = a @ a.t()  # [r, r]
    cross = torch.linalg.vecdot(wat, b, dim=1)
    quad = torch.linalg.vecdot(b @ gram, b, dim=1)
    n_sq = wsq + (2.0 * s) * cross + (s * s) * quad

    # cancellation estimate (see the docstring)
    scale_sq = (wsq.clamp_min(0).sqrt() + abs(s) * quad.clamp_min(0).sqrt()).square()
    # the roundoff of the identity's dtype, or of the given ||W_i||^2 where that is coarser (an fp32 one carries
    # fp32's roundoff into a float64 identity)
    u = max(torch.finfo(ndt).eps, torch.finfo(weight_norm_sq.dtype).eps) / 2
    tol = default_rtol(out_dtype) if rtol is None else float(rtol)
    estimate = (0.5 * math.sqrt(k + r) * u) * scale_sq / n_sq  # n_sq <= 0 with scale_sq > 0: inf or negative
    bad = (estimate > tol) | ((n_sq <= 0) & (scale_sq > 0))
    if fallback:
        a64 = lora_A.to(torch.float64)

        def direct(idx):
            d = rows.gather(idx).to(torch.float64).addmm_(lora_B[idx].to(torch.float64), a64, alpha=s)
            return torch.linalg.vecdot(d, d, dim=1).to(ndt)

        if sync_free:
            idx = torch.where(bad, 1.0, 0.0).topk(min(n_out, SYNC_FREE_FALLBACK_ROWS)).indices
            n_sq[idx] = torch.where(bad[idx], direct(idx), n_sq[idx])
        elif bool(bad.any()):
            flagged = bad.nonzero().squeeze(1)
            for i0 in range(0, flagged.numel(), SYNC_FREE_FALLBACK_ROWS):
                idx = flagged[i0:i0 + SYNC_FREE_FALLBACK_ROWS]
                n_sq[idx] = direct(idx)
    n_sq = n_sq.to(out_dtype)
    if return_fallback_rows:
        return n_sq, bad
    return n_sq


def dora_scale(weight, dtype: torch.dtype, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
               scaling: float, weight_norm_sq: Optional[torch.Tensor] = None):
    """``(c, n)``: DoRA's column scale ``c = m / n`` and the weight norm ``n = ||W + s B A||_row`` ``[out]``, both in
    fp32 (float64 when W, A, B or m is float64), from the values the GEMMs use: ``weight`` is a dense tensor or
    quantized operands (dequantized to ``dtype``, the activation dtype, block by block). ``weight_norm_sq``: the
    cached ``||W_i||^2`` (computed here when None). Detached: no gradient flows through n (PEFT's definition)."""
    n = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_norm_sq, dtype)
    n = n.to(norm_dtype(n, magnitude))
    return magnitude.detach().to(n.dtype) / n, n
