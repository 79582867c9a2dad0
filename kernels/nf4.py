"""NF4 dequantization in Triton, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

Format and the exactness argument: ``fused_lora/nf4.py``. In short, element ``i`` of the flattened ``[out, in]``
weight (``i = row * in + col``) is::

    byte   = packed[i >> 1];  nibble = byte >> 4 if i is even else byte & 0xF     (high nibble first)
    A      = absmax[i // blocksize]                                               (plain)
    A      = f32(f32(code2[qabsmax[b]] * absmax2[b // nested_blocksize]) + offset) (nested, b = i // blocksize)
    w[i]   = T(f32(code[nibble] * A))

Two pieces:

* :func:`nf4_decode_tile` -- a ``@triton.jit`` helper decoding any tile of elements given their row and column
  indices (broadcastable, e.g. ``rows[:, None]`` and ``cols[None, :]`` for a ``W`` tile, or the transposed pair for
  a ``W^T`` tile), returning fp32. Meant to be reused inside fused dequant-GEMM kernels.
* ``_nf4_dequant_kernel`` + :func:`nf4_dequantize` -- one launch that writes the whole dequantized weight (nested
  absmax decode included) into any strided ``[out, in]`` output, e.g. a transposed view.

Exactness: the nested step needs two roundings (``code2 * absmax2`` then ``+ offset``); Triton/LLVM and ptxas
contract a multiply feeding an add into one FMA by default, so every kernel that calls :func:`nf4_decode_tile`
with ``NESTED=True`` must be launched with ``enable_fp_fusion=False`` (as :func:`nf4_dequantize` does; the
ahead-of-time check shows ``mul.rn.f32`` / ``add.rn.f32`` and no ``fma`` in its PTX). Kernels that cannot afford
that (a GEMM whose epilogue wants FMAs) take the absmax already decoded (``n / blocksize`` values, decoded by the
caller) and call the helper plain, as the LoRA GEMMs do. The final ``code * A`` has no add to fuse with, and the
conversion to fp16/bf16 is round-to-nearest-even (on GPUs, and in the test suite's interpreter, whose own
fp32 -> bf16 conversion truncates but which ``tests/triton_bf16.py`` gives exact bf16 conversions).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import FAMILIES, Launcher, config

# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def nf4_decode_tile(
    packed_ptr, code_ptr, absmax_ptr, rows, cols, in_features, mask,
    BLOCKSIZE: tl.constexpr, packed_stride=1,
    NESTED: tl.constexpr = False, absmax2_ptr=None, code2_ptr=None, offset_ptr=None,
    NESTED_BLOCKSIZE: tl.constexpr = 256,
):
    """fp32 values of the NF4 elements ``(rows, cols)`` of a ``[out, in_features]`` weight (broadcast shapes).

    ``packed_ptr``: uint8 codes, two per byte (high nibble = even flat index), byte ``j`` at element offset
    ``j * packed_stride`` (any layout whose flattening is one stride: slices, ``.t()`` of ``[1, k]``, stride 0);
    ``code_ptr``: the 16 fp32 NF4 values. The tables and statistics are read flat: pass contiguous ones.
    Plain (``NESTED=False``, the default): ``absmax_ptr`` is the fp32 ``[n_blocks]`` absmax and the nested
    arguments are left out. Nested: ``absmax_ptr`` is the uint8 ``qabsmax``, ``absmax2_ptr`` fp32
    ``[ceil(n_blocks / NESTED_BLOCKSIZE)]``, ``code2_ptr`` the 256 fp32 values and ``offset_ptr`` one fp32 value;
    the caller must be compiled with ``enable_fp_fusion=False`` (see the module docstring).
    ``mask`` (same broadcast shape) marks the elements to load; masked-off ones decode to 0 (a GEMM's K tail can
    feed them to ``tl.dot`` as they are).
    Index arithmetic happens in the integer type of ``rows`` / ``cols``: pass int64 indices when the weight has
    2**31 elements or more, or when the last packed byte's offset ``((n + 1) // 2 - 1) * packed_stride`` reaches
    2**31 (int32 is cheaper: most of this function's instructions are index arithmetic).
    Call it with keywords past ``mask``, e.g. ``nf4_decode_tile(p, c, a, rows=r, cols=c, in_features=k, mask=m,
    BLOCKSIZE=64, packed_stride=s)``.
    """
    flat = rows * in_features + cols  # row-major element index; blocks follow it across rows
    byte = tl.load(packed_ptr + (flat >> 1) * packed_stride, mask=mask, other=0).to(tl.int32)
    shift = ((flat & 1) ^ 1).to(tl.int32) * 4  # even element: high nibble
    value = tl.load(code_ptr + ((byte >> shift) & 0xF), mask=mask, other=0.0)  # masked-off elements: exactly 0
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)  # a separate rounding: no FMA (enable_fp_fusion=False)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    rows, cols, stride_packed, stride_om, stride_ok,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[BLOCK_M, BLOCK_N] tile of the dequantized ``[rows, cols]`` weight (row-major programs along a row).
    ``stride_packed``: element stride of the packed bytes (see ``nf4_decode_tile``).
    INDEX_64: element, packed or output offsets reach 2**31 (int64 index arithmetic, else int32)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < rows)[:, None] & (rn < cols)[None, :]
    if INDEX_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    w = nf4_decode_tile(
        packed_ptr, code_ptr, absmax_ptr, rows=rm[:, None], cols=rn[None, :], in_features=cols, mask=mask,
        BLOCKSIZE=BLOCKSIZE, packed_stride=stride_packed,
        NESTED=NESTED, absmax2_ptr=absmax2_ptr, code2_ptr=code2_ptr, offset_ptr=offset_ptr,
        NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
    )
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_ok
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# shipped configurations (every one is compiled for sm_80 and sm_90 by tests/test_aot_compile.py)
# ----------------------------------------------------------------------------------------------------------------

# A memory-bound gather/convert kernel with no tl.dot: the same configurations serve every output dtype, so each
# family key maps to the same list. 2K-8K elements per program, rows of 128-512 contiguous columns (coalesced,
# vectorized stores); no loop, hence one stage.
_DEQUANT_CONFIGS = [
    config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=256),
    config(num_warps=4, num_stages=1, BLOCK_M=8, BLOCK_N=512),
    config(num_warps=8, num_stages=1, BLOCK_M=32, BLOCK_N=256),
    config(num_warps=8, num_stages=1, BLOCK_M=16, BLOCK_N=512),
    config(num_warps=4, num_stages=1, BLOCK_M=32, BLOCK_N=128),
]

NF4_DEQUANT = Launcher(
    _nf4_dequant_kernel,
    {family: _DEQUANT_CONFIGS for family in FAMILIES},
    key=["rows", "cols"],
    # small tiles so small test shapes cover several tiles in both directions and every boundary mask
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=8, BLOCK_N=32),
)

LAUNCHERS = (NF4_DEQUANT,)

# ----------------------------------------------------------------------------------------------------------------
# launch wrapper
# ----------------------------------------------------------------------------------------------------------------


def _address_range(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last)`` byte addresses a non-empty tensor's elements span (gaps between them included)."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        if stride > 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' address ranges intersect (conservative for interleaved layouts)."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _address_range(a), _address_range(b)
    return a0 < b1 and b0 < a1


def nf4_dequantize(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    shape: Tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    out: Optional[torch.Tensor] = None,
    index_64: Optional[bool] = None,
) -> torch.Tensor:
    """Dequantize an NF4 weight of ``shape = (out, in)`` to ``dtype`` in one launch; returns ``out``.

    Plain: ``absmax`` fp32 ``[n_blocks]``. Nested (double quantization): ``absmax`` is the uint8 ``qabsmax`` and
    ``absmax2`` / ``code2`` / ``offset`` (fp32 0-dim or 1-element tensor, read on the device: no host sync) are given.
    Any strides: ``packed`` is read in place (through one element stride), the small tables and statistics are
    made contiguous when they are not.
    ``out`` may be any strided ``[out, in]`` tensor of ``dtype`` (e.g. ``buf.t()`` to write ``W^T``) that does not
    overlap the inputs.
    ``index_64``: 64-bit index arithmetic; by default only when element, packed-byte or output offsets reach 2**31.
    """
    rows, cols = (int(s) for s in shape)
    nested = absmax2 is not None
    if nested and (code2 is None or offset is None):
        raise ValueError("nested NF4 needs absmax2, code2 and offset together")
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    if tuple(out.shape) != (rows, cols) or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {(rows, cols)}, got {out.dtype} {tuple(out.shape)}")
    if rows == 0 or cols == 0:
        return out
    inputs = dict(packed=packed, code=code, absmax=absmax, absmax2=absmax2, code2=code2, offset=offset)
    for name, t in inputs.items():
        if t is not None and _overlap(out, t):
            raise ValueError(f"out overlaps the input {name}: the kernel would overwrite what it reads")
    # The packed codes (n / 2 bytes, the big operand) are read in place through one element stride: flattening
    # is a view for every layout of the [k, 1] buffer (slices, offsets, .t() of [1, k], stride 0); only a layout
    # that has no single flat stride is copied. The tables and statistics (16 and 256 values, n / blocksize
    # and n / (256 * blocksize) values: at most a quarter of the packed bytes, fp32 absmax at blocksize 32) are
    # indexed flat in the kernel, so a non-contiguous one is made contiguous here: a small copy, and a no-op for
    # the usual contiguous buffers.
    packed = packed.reshape(-1)
    code, absmax = code.contiguous(), absmax.contiguous()
    if nested:
        absmax2, code2, offset = absmax2.contiguous(), code2.contiguous(), offset.contiguous()
    dummy = absmax  # pointer arguments of the disabled (plain) path are never dereferenced
    if index_64 is None:
        last_out = (rows - 1) * out.stride(0) + (cols - 1) * out.stride(1)
        last_packed = (packed.numel() - 1) * packed.stride(0)
        index_64 = max(rows * cols, last_out + 1, last_packed + 1) >= 2**31
    family = "ieee" if dtype == torch.float32 else "half"
    NF4_DEQUANT(
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),), family,
        packed_ptr=packed, code_ptr=code, absmax_ptr=absmax,
        absmax2_ptr=absmax2 if nested else dummy, code2_ptr=code2 if nested else dummy,
        offset_ptr=offset if nested else dummy, out_ptr=out,
        rows=rows, cols=cols, stride_packed=packed.stride(0), stride_om=out.stride(0), stride_ok=out.stride(1),
        BLOCKSIZE=int(blocksize), NESTED=nested, NESTED_BLOCKSIZE=int(nested_blocksize), INDEX_64=bool(index_64),
        enable_fp_fusion=False,  # the nested absmax decode needs two separate fp32 roundings
    )
    return out
