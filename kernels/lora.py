"""Triton kernels of the fused LoRA linear, and their launch wrappers.

Five kernels (math and derivation: ``fused_lora.functional.FusedLoraFunction``; ``s`` = scaling, ``q`` = 1 - p):

forward
  1. ``_lora_down_kernel``       xa = D(x) @ A^T                        reads x once, writes [M, r]
  2. ``_lora_linear_fwd_kernel`` y = x @ W^T + s * xa @ B^T + bias      the base GEMM; the LoRA term seeds the
                                                                        accumulator, the bias is its epilogue
backward
  3. ``_lora_grad_out_kernel``   gb = g @ B, dB = s * g^T @ xa, dbias   reads g once for all three
  4. ``_lora_dgrad_kernel``      dx = g @ W + (s/q) * m * (gb @ A)      the dgrad GEMM; the masked LoRA term seeds
                                                                        the accumulator
  5. ``_lora_grad_a_kernel``     dA = (s/q) * gb^T @ (m * x)            reads x once, split over M

Extra DRAM traffic over the two base GEMMs: one read of x in forward and one read of x and g in backward, plus
``[M, r]`` / ``[r, K]`` / ``[N, r]`` vectors: the dropout mask ``m`` is regenerated from its seed in kernels 1, 4
and 5 and never touches memory. Everything accumulates in fp32; ``xa`` and ``gb`` are stored in the activation
dtype (they are the operands of later tensor-core products). fp32 inputs follow
``torch.backends.cuda.matmul.allow_tf32`` like PyTorch's own matmuls ("ieee" otherwise).

A and B may be fp32 over fp16 / bf16 activations (PEFT's adapters): their tiles are converted to the activation
dtype in registers, right after the load (a no-op when the dtypes agree; other rank tiles, see
``_FP32_ADAPTERS_SEED_BLOCK_R``), and the dA / dB accumulators stay fp32 until they are converted once, on the host,
to the adapters' dtype. Adapters in any other dtype are rounded to the activation dtype by the launch wrappers
(``_adapter_operand``).

DoRA (``dora_forward`` / ``dora_backward``; math: ``fused_lora.functional.FusedDoraFunction``) runs the same five
kernels with a DORA flag and c = m / n ``[N]``: kernel 2 applies c as a per-column epilogue and also stores z (what
dm needs); with dropout it keeps a second accumulator for ``D(x) W^T`` (the mask regenerated on x's tile, x and W
read once). Kernel 3 scales g's tile by c for gb and dB and sums ``g * z`` by column for dm; kernel 4 scales g's
tile by c, or, with dropout, keeps ``g W`` and ``(g * (c - 1)) W`` in two accumulators (W read once) and masks the
second after the loop. Kernels 1 and 5 are LoRA's.

Kernels 2 and 4 are the same GEMM skeleton (``_gemm_tile``, ``_lora_seed``, ``_gemm_main_loop``,
``_store_tile``) with their own epilogue between the pieces: kernel 2 reduces over K and adds the bias, kernel 4
reduces over N and applies the dropout mask to its LoRA term.

The launch wrappers ``lora_forward`` / ``lora_backward`` take what ``fused_lora.torch_ops`` takes. The base weight
is a dense ``[N, K]`` tensor or an NF4 operands record (read by attribute, see ``_weight_args``); ``dropout`` is
None or an object with int ``key``, int ``threshold`` and float ``scale`` (``fused_lora.dropout.Dropout``).
This package imports nothing from ``fused_lora``: the caller turns its own types into these arguments.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launcher, config, config_family
from .dropout import dropout_keep
from .nf4 import nf4_decode_tile, nf4_dequantize

# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_pids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile col), GROUP_M tile rows at a time so neighbours share operands in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# The GEMM skeleton shared by the forward (``y = x @ W^T``: output columns over N, reduction over K) and the dgrad
# (``dx = g @ W``: output columns over K, reduction over N). "a" is the activation operand (x or g), "o" the
# output-column axis, "red" the reduction axis. The right operands (B and W in the forward, A and W in the dgrad)
# are passed with their own strides, rows first; RIGHT_T says that they are read transposed (their rows are the
# output columns: the forward).


@triton.jit
def _gemm_tile(
    M, OUT, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RED: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The index vectors of this program's ``[BLOCK_M, BLOCK_O]`` tile of an ``[M, OUT]`` output:
    ``(rm, ro, rm_in, ro_in, rr, rred)``.

    ``rm`` / ``ro``: the true row / column indices (the store masks them). ``rm_in`` / ``ro_in``: the same wrapped
    into range (int64), which the loads use: always in bounds, so the loads need no row or column mask. ``rr`` /
    ``rred``: offsets within a rank block and within a reduction step (made here, ahead of both loops: the shipped
    configurations' register counts were measured with this instruction order)."""
    pid_m, pid_o = _grouped_pids(M, OUT, BLOCK_M, BLOCK_O, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rm_in = (rm % M).to(tl.int64)
    ro_in = (ro % OUT).to(tl.int64)
    return rm, ro, rm_in, ro_in, tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_RED)


@triton.jit
def _lora_seed(
    left_ptr, right_ptr, rm_in, ro_in, rr, R,
    stride_lm, stride_lr, stride_right_row, stride_right_col,
    RIGHT_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """fp32 ``left[rm_in, :R] @ right_op[:R, ro_in]``: a GEMM's LoRA term, unscaled, which seeds its accumulator.

    ``left``: the ``[M, R]`` xa or gb, in the activation dtype. ``right``: B ``[OUT, R]`` read as B^T (RIGHT_T) or
    A ``[R, OUT]``, in the adapters' dtype, converted to the left operand's after the load (both dot operands
    need one type). r is small: a few dots."""
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    left_ptrs = left_ptr + rm_in[:, None] * stride_lm + rr[None, :] * stride_lr
    if RIGHT_T:
        right_ptrs = right_ptr + ro_in[None, :] * stride_right_row + rr[:, None] * stride_right_col
        stride_rr = stride_right_col
    else:
        right_ptrs = right_ptr + rr[:, None] * stride_right_row + ro_in[None, :] * stride_right_col
        stride_rr = stride_right_row
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        left = tl.load(left_ptrs, mask=r_ok[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=r_ok[:, None], other=0.0).to(left_ptr.dtype.element_ty)
        acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
        left_ptrs += BLOCK_R * stride_lr
        right_ptrs += BLOCK_R * stride_rr
    return acc


@triton.jit
def _gemm_main_loop(
    acc, acc2, a_ptr, w_ptr, nf4_code_ptr, nf4_absmax_ptr, col_scale_ptr,
    rm, rm_in, ro, rred, OUT, RED, K,
    stride_am, stride_ared, stride_wn, stride_wk, stride_wq, drop_key, drop_threshold,
    RIGHT_T: tl.constexpr, W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_RED: tl.constexpr, SCALE_A: tl.constexpr, SECOND: tl.constexpr,
):
    """``(acc + a_op[rm_in, :RED] @ w_op[:RED, ro], acc2 + a2[rm_in, :RED] @ w_op[:RED, ro])``, accumulated in fp32
    over the reduction axis; each W tile is loaded once for both.

    ``w_op`` is W^T (RIGHT_T: the forward, whose output columns are W's rows) or W (the dgrad); W is ``[N, K]``
    (``OUT`` / ``RED``: the output and reduction extents, N and K in either order).
    Dense W: element strides ``stride_wn`` / ``stride_wk``. W_NF4: ``w_ptr`` holds W's packed NF4 codes, byte
    ``j`` at ``w_ptr + j * stride_wq`` (``nf4_code_ptr``: the 16-value table, ``nf4_absmax_ptr``: the decoded fp32
    absmax per block, both contiguous); each W tile is dequantized in registers and rounded to ``a``'s dtype,
    exactly as the dequantize kernel rounds the whole weight, so both NF4 paths see bit-identical weights.

    DoRA's variants (constexpr; LoRA's GEMMs use neither): SCALE_A: ``a_op = a * col_scale[red]``, a's columns
    scaled by the fp32 vector ``col_scale_ptr`` over the reduction axis and rounded to a's dtype (the dgrad's
    ``g * c``). SECOND: the second accumulator -- 0: none (acc2 comes back as it is); 1: ``a2 = keep * a``, the
    dropout mask regenerated on a's true indices ``(rm, red)`` (the forward's ``D(x) W^T``, unscaled); 2:
    ``a2 = a * (col_scale[red] - 1)`` (the dgrad's ``(g * (c - 1)) W``)."""
    ro_w = ro % OUT  # int32 for the NF4 decoder (its index arithmetic runs in the indices' type)
    a_ptrs = a_ptr + rm_in[:, None] * stride_am + rred[None, :] * stride_ared
    if RIGHT_T:
        w_ptrs = w_ptr + ro_w.to(tl.int64)[None, :] * stride_wn + rred[:, None] * stride_wk
        stride_wred = stride_wk
    else:
        w_ptrs = w_ptr + rred[:, None] * stride_wn + ro_w.to(tl.int64)[None, :] * stride_wk
        stride_wred = stride_wn
    for red0 in range(0, RED, BLOCK_RED):
        red_ok = (red0 + rred) < RED
        a = tl.load(a_ptrs, mask=red_ok[None, :], other=0.0)
        if W_NF4:
            if RIGHT_T:
                w_rows, w_cols = ro_w[None, :], (red0 + rred)[:, None]
            else:
                w_rows, w_cols = (red0 + rred)[:, None], ro_w[None, :]
            w = nf4_decode_tile(w_ptr, nf4_code_ptr, nf4_absmax_ptr, rows=w_rows, cols=w_cols, in_features=K,
                                mask=red_ok[:, None], BLOCKSIZE=NF4_BLOCKSIZE,
                                packed_stride=stride_wq).to(a_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptrs, mask=red_ok[:, None], other=0.0)
        if SCALE_A or SECOND == 2:
            col_scale = tl.load(col_scale_ptr + red0 + rred, mask=red_ok, other=0.0)
        if SCALE_A:
            acc = tl.dot((a.to(tl.float32) * col_scale[None, :]).to(a_ptr.dtype.element_ty), w, acc,
                         input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if SECOND == 1:
            a2 = tl.where(dropout_keep(rm, red0 + rred, RED, drop_key, drop_threshold), a, 0.0)
            acc2 = tl.dot(a2, w, acc2, input_precision=INPUT_PRECISION)
        if SECOND == 2:
            a2 = (a.to(tl.float32) * (col_scale - 1.0)[None, :]).to(a_ptr.dtype.element_ty)
            acc2 = tl.dot(a2, w, acc2, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_RED * stride_ared
        w_ptrs += BLOCK_RED * stride_wred
    return acc, acc2


@triton.jit
def _store_tile(out_ptr, acc, rm, ro, M, OUT, stride_om, stride_oo):
    """Store the fp32 tile ``acc`` at true indices ``(rm, ro)`` of the ``[M, OUT]`` output, in its dtype."""
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + ro[None, :] * stride_oo
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (ro < OUT)[None, :])


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    drop_key, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[BLOCK_M, BLOCK_R] = D(x) @ A^T for one row block and one rank block (A's tiles converted to x's dtype
    after the load). M_BUCKET: autotuning key only."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    at_ptrs = a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # A^T tile [BLOCK_K, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(rm, k0 + rk, K, drop_key, drop_threshold), x, 0.0)
        at = tl.load(at_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, at, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * drop_scale
    xa_ptrs = xa_ptr + rm[:, None].to(tl.int64) * stride_xam + rr[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, nf4_code_ptr, nf4_absmax_ptr, scale_ptr, z_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wq, stride_xam, stride_xar, stride_bn, stride_br,
    stride_bias, stride_ym, stride_yn, stride_zm, stride_zn,
    scaling, drop_key, drop_threshold, drop_scale,
    HAS_BIAS: tl.constexpr, W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[BLOCK_M, BLOCK_N] = x @ W^T + scaling * xa @ B^T + bias.

    W dense (``stride_wn`` / ``stride_wk``) or, with W_NF4, packed NF4 codes (see ``_gemm_main_loop``).
    ``stride_bias``: the bias's element stride (0: broadcast).

    DORA (``fused_lora.functional.FusedDoraFunction``; ``scale_ptr``: c = m / n, fp32 ``[N]``), with
    ``L = xa @ B^T``: also stores ``z = D(x) @ W^T + scaling * L`` (``z_ptr``), and ``y = (x @ W^T + scaling * L)
    + (c - 1) * z + bias``. Without dropout ``z`` is the one accumulator and ``y = c * z + bias``; with dropout
    (HAS_DROPOUT) the main loop keeps a second accumulator for ``(m * x) @ W^T``, the mask regenerated on x's
    tile, seeded with ``scaling * q * L`` so that ``z = acc2 / q`` (``drop_scale`` = 1 / q)."""
    rm, rn, rm_in, rn_in, rr, rk = _gemm_tile(M, N, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, GROUP_M)
    acc = _lora_seed(xa_ptr, b_ptr, rm_in, rn_in, rr, R, stride_xam, stride_xar, stride_bn, stride_br,
                     RIGHT_T=True, INPUT_PRECISION=INPUT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_N,
                     BLOCK_R=BLOCK_R)
    acc2 = acc
    if DORA and HAS_DROPOUT:
        acc2 = acc * (scaling / drop_scale)
    acc = acc * scaling
    acc, acc2 = _gemm_main_loop(acc, acc2, x_ptr, w_ptr, nf4_code_ptr, nf4_absmax_ptr, scale_ptr, rm, rm_in, rn, rk,
                                N, K, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_wq, drop_key,
                                drop_threshold, RIGHT_T=True, W_NF4=W_NF4, NF4_BLOCKSIZE=NF4_BLOCKSIZE,
                                INPUT_PRECISION=INPUT_PRECISION, BLOCK_RED=BLOCK_K, SCALE_A=False,
                                SECOND=1 if DORA and HAS_DROPOUT else 0)
    if DORA:
        c = tl.load(scale_ptr + rn_in)[None, :]
        if HAS_DROPOUT:
            z = acc2 * drop_scale
            acc = acc + (c - 1.0) * z
        else:
            z = acc
            acc = acc * c
        _store_tile(z_ptr, z, rm, rn, M, N, stride_zm, stride_zn)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in * stride_bias).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, rm, rn, M, N, stride_ym, stride_yn)


@triton.jit
def _lora_grad_out_kernel(
    g_ptr, b_ptr, xa_ptr, gb_ptr, db_ptr, dbias_ptr, scale_ptr, z_ptr, dm_ptr,
    M, N, R, M_BUCKET,
    stride_gm, stride_gn, stride_bn, stride_br, stride_xam, stride_xar, stride_gbm, stride_gbr,
    stride_dbp, stride_dbn, stride_dbr, stride_dbiasp, stride_zm, stride_zn, stride_dmp,
    scaling,
    STORE_GB: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, PARTIALS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DORA: tl.constexpr, COMPUTE_DM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over a block of rows of g: gb = g @ B (complete per program; B's tiles converted to g's dtype after
    the load), and this block's share of dB = scaling * g^T @ xa and dbias = colsum(g).

    The dB / dbias shares are added atomically into fp32 buffers, or, with PARTIALS (torch's deterministic mode),
    written to a per-row-block slice ``[pid_m]`` that the host sums in a fixed order.

    DORA (``scale_ptr``: c, fp32 ``[N]``): gb and dB take ``gc = g * c`` (g's tile scaled in registers, rounded to
    g's dtype), dbias takes g; COMPUTE_DM adds this block's share of ``colsum(g * z)`` (``z_ptr``: the forward's z,
    ``[M, N]``) into ``dm_ptr`` like dbias (the host divides by n).
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    r_ok = rr < R
    rm64 = rm.to(tl.int64)

    if COMPUTE_DB:
        xa = tl.load(xa_ptr + rm64[:, None] * stride_xam + rr[None, :] * stride_xar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    g_ptrs = g_ptr + rm64[:, None] * stride_gm + rn[None, :] * stride_gn
    b_ptrs = b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br
    db_ptrs = db_ptr + pid_m * stride_dbp + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr
    dbias_ptrs = dbias_ptr + pid_m * stride_dbiasp + rn
    z_ptrs = z_ptr + rm64[:, None] * stride_zm + rn[None, :] * stride_zn
    dm_ptrs = dm_ptr + pid_m * stride_dmp + rn
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        gs = g
        if DORA:
            c = tl.load(scale_ptr + n0 + rn, mask=n_ok, other=0.0)
            gs = (g.to(tl.float32) * c[None, :]).to(g_ptr.dtype.element_ty)
        if STORE_GB:
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(g_ptr.dtype.element_ty)
            gb = tl.dot(gs, b, gb, input_precision=INPUT_PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(gs), xa, input_precision=INPUT_PRECISION) * scaling
            db_mask = n_ok[:, None] & r_ok[None, :]
            if PARTIALS:
                tl.store(db_ptrs, db, mask=db_mask)
            else:
                tl.atomic_add(db_ptrs, db, mask=db_mask, sem="relaxed")
        if COMPUTE_DBIAS:
            if pid_r == 0:
                colsum = tl.sum(g.to(tl.float32), axis=0)
                if PARTIALS:
                    tl.store(dbias_ptrs, colsum, mask=n_ok)
                else:
                    tl.atomic_add(dbias_ptrs, colsum, mask=n_ok, sem="relaxed")
        if COMPUTE_DM:
            if pid_r == 0:
                z = tl.load(z_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                dm = tl.sum(g.to(tl.float32) * z.to(tl.float32), axis=0)
                if PARTIALS:
                    tl.store(dm_ptrs, dm, mask=n_ok)
                else:
                    tl.atomic_add(dm_ptrs, dm, mask=n_ok, sem="relaxed")
        g_ptrs += BLOCK_N * stride_gn
        b_ptrs += BLOCK_N * stride_bn
        db_ptrs += BLOCK_N * stride_dbn
        dbias_ptrs += BLOCK_N
        z_ptrs += BLOCK_N * stride_zn
        dm_ptrs += BLOCK_N
    if STORE_GB:
        gb_ptrs = gb_ptr + rm64[:, None] * stride_gbm + rr[None, :] * stride_gbr
        tl.store(gb_ptrs, gb.to(gb_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_dgrad_kernel(
    g_ptr, w_ptr, gb_ptr, a_ptr, dx_ptr, nf4_code_ptr, nf4_absmax_ptr, scale_ptr,
    M, N, K, R, M_BUCKET,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_wq, stride_gbm, stride_gbr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    lora_scale, scaling, drop_key, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx[BLOCK_M, BLOCK_K] = g @ W + lora_scale * m * (gb @ A), lora_scale = scaling / (1 - p) (``drop_scale``:
    1 / (1 - p)). W dense or packed NF4, as in ``_lora_linear_fwd_kernel``.

    DORA (``scale_ptr``: c, fp32 ``[N]``): without dropout ``dx = (g * c) @ W + scaling * gb @ A``, g's tile scaled
    in registers; with dropout ``dx = g @ W + m * ((g * (c - 1)) @ W + scaling * gb @ A) / q``, two accumulators
    over one pass of W, the mask applied after the loop."""
    rm, rk, rm_in, rk_in, rr, rn = _gemm_tile(M, K, BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, GROUP_M)
    acc = _lora_seed(gb_ptr, a_ptr, rm_in, rk_in, rr, R, stride_gbm, stride_gbr, stride_ar, stride_ak,
                     RIGHT_T=False, INPUT_PRECISION=INPUT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_K,
                     BLOCK_R=BLOCK_R)
    if DORA and HAS_DROPOUT:
        acc2 = acc * scaling
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        if HAS_DROPOUT:  # the mask regenerated from its seed, on the true indices
            acc = tl.where(dropout_keep(rm, rk, K, drop_key, drop_threshold), acc, 0.0)
        acc = acc * lora_scale
        acc2 = acc
    acc, acc2 = _gemm_main_loop(acc, acc2, g_ptr, w_ptr, nf4_code_ptr, nf4_absmax_ptr, scale_ptr, rm, rm_in, rk, rn,
                                K, N, K, stride_gm, stride_gn, stride_wn, stride_wk, stride_wq, drop_key,
                                drop_threshold, RIGHT_T=False, W_NF4=W_NF4, NF4_BLOCKSIZE=NF4_BLOCKSIZE,
                                INPUT_PRECISION=INPUT_PRECISION, BLOCK_RED=BLOCK_N,
                                SCALE_A=DORA and not HAS_DROPOUT, SECOND=2 if DORA and HAS_DROPOUT else 0)
    if DORA and HAS_DROPOUT:
        acc += tl.where(dropout_keep(rm, rk, K, drop_key, drop_threshold), acc2, 0.0) * drop_scale
    _store_tile(dx_ptr, acc, rm, rk, M, K, stride_dxm, stride_dxk)


@triton.jit
def _lora_grad_a_kernel(
    x_ptr, gb_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_gbm, stride_gbr, stride_dap, stride_dar, stride_dak,
    lora_scale, drop_key, drop_threshold,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial dA[split, BLOCK_R, BLOCK_K] = lora_scale * gb^T @ (m * x) over this program's share of the rows.

    The grid's third axis splits M into ``num_programs(2)`` contiguous ranges (enough programs to fill the GPU
    without atomics); the host sums the fp32 partials in a fixed order.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows_per_split = tl.cdiv(tl.cdiv(M, tl.num_programs(2)), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = rk < K
    r_ok = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    # rk runs up to K (not BLOCK_K as in the other kernels): int64, or a column-major x of 2**31 elements overflows
    x_cols = rk.to(tl.int64)[None, :] * stride_xk
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rm64 = rm.to(tl.int64)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + x_cols,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(rm, rk, K, drop_key, drop_threshold), x, 0.0)
        gb = tl.load(gb_ptr + rm64[:, None] * stride_gbm + rr[None, :] * stride_gbr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(gb), x, acc, input_precision=INPUT_PRECISION)
    da_ptrs = da_ptr + pid_s * stride_dap + rr[:, None] * stride_dar + rk[None, :] * stride_dak
    tl.store(da_ptrs, acc * lora_scale, mask=r_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# shipped configurations (every one is compiled for sm_80 and sm_90 by tests/test_aot_compile.py, which requires
# zero spills; see _launch.Launcher)
# ----------------------------------------------------------------------------------------------------------------

# Families (see _launch.config_family): "half" = bf16/fp16 on tensor cores, "tf32" = fp32 with allow_tf32,
# "ieee" = exact fp32 on FMA units, whose dots keep both operands in registers: hence its smaller tiles (larger ones
# spill). "-nf4": the GEMMs with NF4 weights dequantized in the main loop, used for at most NF4_FUSED_MAX_TOKENS
# rows: narrow row tiles, since the pipeliner multi-buffers the decoder's gathers and the wide dense tiles would not
# fit in shared memory. "-fp32a": the dense GEMMs with fp32 adapters over 16-bit activations (their LoRA seed
# converts fp32 tiles, 16 rank columns at a time: _FP32_ADAPTERS_SEED_BLOCK_R): the "half" tilings, but for one
# dgrad tile at 3 stages (ptxas gave it a stack frame at 4).


class GemmTile(NamedTuple):
    """One tiling of the two GEMMs, which share their tilings by role: the forward's output columns are N and it
    reduces over K; the dgrad's output columns are K and it reduces over N."""

    num_warps: int
    num_stages: int
    rows: int  # BLOCK_M: rows of x (forward) or g (dgrad) per program
    cols: int  # output columns per program: BLOCK_N (forward), BLOCK_K (dgrad)
    step: int  # reduction step of the main loop: BLOCK_K (forward), BLOCK_N (dgrad)
    group_m: int = 8  # GROUP_M: tile rows per L2 group (_grouped_pids)

    def forward(self):
        return config(num_warps=self.num_warps, num_stages=self.num_stages, BLOCK_M=self.rows, BLOCK_N=self.cols,
                      BLOCK_K=self.step, GROUP_M=self.group_m)

    def dgrad(self):
        return config(num_warps=self.num_warps, num_stages=self.num_stages, BLOCK_M=self.rows, BLOCK_K=self.cols,
                      BLOCK_N=self.step, GROUP_M=self.group_m)


_GEMM_TILES = dict(
    half=[
        GemmTile(num_warps=8, num_stages=3, rows=128, cols=256, step=64),
        GemmTile(num_warps=8, num_stages=4, rows=128, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=4, rows=128, cols=64, step=64),
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=64, step=64),
    ],
    tf32=[
        GemmTile(num_warps=8, num_stages=3, rows=128, cols=128, step=32),
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=128, step=32),
        GemmTile(num_warps=4, num_stages=4, rows=128, cols=64, step=32),
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=64, step=32),
    ],
    tf32_nf4=[
        GemmTile(num_warps=4, num_stages=3, rows=16, cols=64, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=32, cols=64, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=64, cols=64, step=32),
        GemmTile(num_warps=4, num_stages=3, rows=32, cols=128, step=32),
        GemmTile(num_warps=8, num_stages=3, rows=64, cols=128, step=32),
    ],
)
_FWD_TILES = dict(
    _GEMM_TILES,
    half_fp32a=_GEMM_TILES["half"],
    ieee=[
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=64, step=16),
        GemmTile(num_warps=8, num_stages=2, rows=32, cols=64, step=32),
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=32, step=32),
        GemmTile(num_warps=4, num_stages=2, rows=32, cols=32, step=32),
    ],
    half_nf4=[
        GemmTile(num_warps=4, num_stages=3, rows=16, cols=64, step=128),
        GemmTile(num_warps=4, num_stages=3, rows=32, cols=64, step=128),
        GemmTile(num_warps=4, num_stages=3, rows=16, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=32, cols=128, step=64),
        GemmTile(num_warps=8, num_stages=3, rows=64, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=64, cols=64, step=64),
    ],
    ieee_nf4=[
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=64, step=16),
        GemmTile(num_warps=8, num_stages=2, rows=32, cols=64, step=16),  # a 32-wide step spills here
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=32, step=32),
        GemmTile(num_warps=4, num_stages=2, rows=16, cols=64, step=32),
    ],
)
_DGRAD_TILES = dict(
    _GEMM_TILES,
    half_fp32a=[
        GemmTile(num_warps=8, num_stages=3, rows=128, cols=256, step=64),
        GemmTile(num_warps=8, num_stages=4, rows=128, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=128, cols=64, step=64),  # "half"'s at 4 stages: a stack frame
        GemmTile(num_warps=4, num_stages=4, rows=64, cols=64, step=64),
    ],
    ieee=[
        GemmTile(num_warps=8, num_stages=3, rows=64, cols=64, step=16),
        GemmTile(num_warps=8, num_stages=2, rows=32, cols=64, step=32),
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=32, step=32),
        GemmTile(num_warps=4, num_stages=2, rows=32, cols=32, step=32),
    ],
    half_nf4=[
        GemmTile(num_warps=4, num_stages=3, rows=16, cols=64, step=128),
        GemmTile(num_warps=4, num_stages=3, rows=16, cols=128, step=64),
        GemmTile(num_warps=8, num_stages=3, rows=32, cols=128, step=64),  # 8 warps: at 4 it spills
        GemmTile(num_warps=4, num_stages=4, rows=32, cols=64, step=64),
        GemmTile(num_warps=8, num_stages=3, rows=64, cols=128, step=64),
        GemmTile(num_warps=4, num_stages=3, rows=64, cols=64, step=64),
    ],
    ieee_nf4=[
        GemmTile(num_warps=8, num_stages=3, rows=64, cols=64, step=16),
        GemmTile(num_warps=8, num_stages=2, rows=32, cols=64, step=32),
        GemmTile(num_warps=8, num_stages=2, rows=64, cols=32, step=32),
        GemmTile(num_warps=8, num_stages=2, rows=32, cols=32, step=32),
        GemmTile(num_warps=4, num_stages=2, rows=16, cols=64, step=32),
    ],
)


# DoRA's variants of the two GEMMs have their own families (own tuners): "-dora" (a column-scale epilogue, z
# stored; the forward's and dgrad's scaled g) and "-dora2" (with dropout: two accumulators). Their tilings are their
# LoRA family's, less those measured to spill (benchmarks.aot, Triton 3.6 and 3.9) -- for "-dora2" also every tile
# of more than 128 x 128 outputs (two such fp32 accumulators do not fit in registers). Tiles as (rows, cols, step).
_DORA_SPILLS = {
    "fwd": {
        "half_dora2": {(128, 128, 64), (128, 64, 64)},
        "half_fp32a_dora": {(128, 256, 64)},
        "half_fp32a_dora2": {(128, 128, 64), (128, 64, 64)},
        "tf32_dora2": {(128, 128, 32), (128, 64, 32)},
        "half_nf4_dora2": {(32, 64, 128), (64, 64, 64)},
        "tf32_nf4_dora2": {(64, 64, 32)},
        "ieee_nf4_dora": {(64, 64, 16), (16, 64, 32)},
        "ieee_nf4_dora2": {(16, 64, 32), (32, 64, 16)},
    },
    "dgrad": {
        "half_dora": {(128, 256, 64)},
        "half_dora2": {(64, 128, 64), (128, 128, 64)},
        "half_fp32a_dora2": {(64, 128, 64), (128, 128, 64)},
        "tf32_dora2": {(128, 64, 32)},
        "ieee_dora2": {(32, 64, 32)},
        "half_nf4_dora": {(16, 64, 128)},
        "half_nf4_dora2": {(16, 64, 128), (16, 128, 64), (64, 128, 64), (64, 64, 64)},
        "tf32_nf4_dora2": {(16, 64, 64), (32, 64, 64), (64, 128, 32)},
        "ieee_nf4_dora": {(32, 64, 32), (16, 64, 32)},
        "ieee_nf4_dora2": {(32, 32, 32), (16, 64, 32)},
    },
}
for _role, _tables in (("fwd", _FWD_TILES), ("dgrad", _DGRAD_TILES)):
    for _family in ("half", "half_fp32a", "tf32", "ieee", "half_nf4", "tf32_nf4", "ieee_nf4"):
        for _suffix, _max_outputs in (("_dora", None), ("_dora2", 128 * 128)):
            _spills = _DORA_SPILLS[_role].get(_family + _suffix, set())
            _tables[_family + _suffix] = [
                t for t in _tables[_family]
                if (t.rows, t.cols, t.step) not in _spills
                and (_max_outputs is None or t.rows * t.cols <= _max_outputs)]


def _gemm_families(tables, role):
    """``{family: [triton.Config]}`` for one GEMM (``role``: ``GemmTile.forward`` or ``GemmTile.dgrad``)."""
    return {family.replace("_", "-"): [role(tile) for tile in tiles] for family, tiles in tables.items()}


# The row-streaming kernels: lora_down and grad_a over (rows of x, columns of x = K), grad_out over (rows of g,
# columns of g = N). lora_down and grad_a share their tensor-core tilings.
_DOWN_TILES = dict(
    half=[
        config(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_K=128),
        config(num_warps=4, num_stages=4, BLOCK_M=32, BLOCK_K=128),
        config(num_warps=4, num_stages=3, BLOCK_M=128, BLOCK_K=64),
        config(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_K=128),
    ],
    tf32=[
        config(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_K=64),
        config(num_warps=4, num_stages=4, BLOCK_M=32, BLOCK_K=64),
        config(num_warps=4, num_stages=3, BLOCK_M=128, BLOCK_K=32),
    ],
    ieee=[
        config(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_K=32),
        config(num_warps=8, num_stages=3, BLOCK_M=64, BLOCK_K=64),
        config(num_warps=4, num_stages=3, BLOCK_M=16, BLOCK_K=64),
        config(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_K=32),
    ],
)
# The first configuration of each family is also the fixed tiling of torch's deterministic mode (per-row-block
# partial sums instead of atomics): the largest BLOCK_M there keeps that buffer small.
_GRAD_OUT_TILES = dict(
    half=[
        config(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=64),
        config(num_warps=8, num_stages=3, BLOCK_M=64, BLOCK_N=128),
        config(num_warps=4, num_stages=3, BLOCK_M=32, BLOCK_N=64),
        config(num_warps=8, num_stages=3, BLOCK_M=32, BLOCK_N=128),
        config(num_warps=4, num_stages=3, BLOCK_M=32, BLOCK_N=32),
    ],
    tf32=[
        config(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=64),
        config(num_warps=4, num_stages=3, BLOCK_M=32, BLOCK_N=32),
        config(num_warps=8, num_stages=2, BLOCK_M=16, BLOCK_N=64),
        config(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32),
    ],
    ieee=[
        config(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=64),
        config(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=32),
        config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=64),  # more warps or stages spill here
        config(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32),
    ],
)
# DoRA's grad_out (scaled g, the z tile for dm): the tilings of its family that do not spill with it ("-dora").
_GRAD_OUT_TILES.update({
    "half-dora": [_GRAD_OUT_TILES["half"][i] for i in (0, 2, 3)],
    "tf32-dora": _GRAD_OUT_TILES["tf32"][1:],
    "ieee-dora": _GRAD_OUT_TILES["ieee"][3:],
})
_GRAD_A_TILES = dict(
    half=_DOWN_TILES["half"],
    tf32=_DOWN_TILES["tf32"],
    ieee=[
        config(num_warps=4, num_stages=3, BLOCK_M=32, BLOCK_K=32),
        config(num_warps=4, num_stages=3, BLOCK_M=16, BLOCK_K=64),
        config(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_K=32),
    ],
)

# In the interpreter: small tiles, so small test shapes cover several tiles and every boundary mask.
LORA_DOWN = Launcher(
    _lora_down_kernel, _DOWN_TILES, key=["M_BUCKET", "K", "R"],
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_K=32),
)

LINEAR_FWD = Launcher(
    _lora_linear_fwd_kernel, _gemm_families(_FWD_TILES, GemmTile.forward), key=["M_BUCKET", "N", "K", "R"],
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
)

GRAD_OUT = Launcher(
    _lora_grad_out_kernel, _GRAD_OUT_TILES, key=["M_BUCKET", "N", "R"],
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=32),
    reset_to_zero=["db_ptr", "dbias_ptr"],
)

DGRAD = Launcher(
    _lora_dgrad_kernel, _gemm_families(_DGRAD_TILES, GemmTile.dgrad), key=["M_BUCKET", "N", "K", "R"],
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, GROUP_M=2),
)

GRAD_A = Launcher(
    _lora_grad_a_kernel, _GRAD_A_TILES, key=["M_BUCKET", "K", "R"],
    interpreter_config=config(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_K=32),
)

LAUNCHERS = (LORA_DOWN, LINEAR_FWD, GRAD_OUT, DGRAD, GRAD_A)

# ----------------------------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------------------------

# Rank handled per tile: tl.dot needs >= 16, and more than 64 columns of rank per tile costs registers for no gain
# (larger ranks loop or use more programs).
_MAX_BLOCK_R = 64
# fp32 adapters over 16-bit activations: each fp32 A / B tile is held in registers for its conversion, and the
# kernels that load them were measured (benchmarks.aot, Triton 3.6 and 3.9) to need other rank tiles. lora_down: at
# most 32 (64 spilled on sm_80 at its 64 x 128 tile; for 32 < r <= 64 x is then read by two programs). The LoRA
# seed of the dense GEMMs ("-fp32a" tilings): 16 whatever r (32 and 64 spilled at their 128 x 256 tiles; the seed
# loops over r). That of the NF4 GEMMs: 64 whatever r (16 and 32 spilled at their 32 x 128 tile on Triton 3.6; the
# masked rank columns cost a few short dots). grad_out and grad_a: as for adapters in x's dtype.
_FP32_ADAPTERS_DOWN_MAX_BLOCK_R = 32
_FP32_ADAPTERS_SEED_BLOCK_R = {False: 16, True: _MAX_BLOCK_R}  # by W_NF4


def block_r(r: int, limit: int = _MAX_BLOCK_R) -> int:
    return min(limit, max(16, triton.next_power_of_2(r)))


def _down_block_r(r: int, fp32_adapters: bool) -> int:
    return block_r(r, _FP32_ADAPTERS_DOWN_MAX_BLOCK_R if fp32_adapters else _MAX_BLOCK_R)


def _seed_block_r(r: int, fp32_adapters: bool, w_nf4: bool) -> int:
    """BLOCK_R of a GEMM's LoRA seed (``_lora_seed``)."""
    return _FP32_ADAPTERS_SEED_BLOCK_R[w_nf4] if fp32_adapters else block_r(r)


def _adapter_operand(adapter: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """A or B as the kernels read it: as it is in x's dtype, or in fp32 over fp16 / bf16 x (PEFT's adapters; each
    tile is rounded to x's dtype in registers, a signature compiled and checked ahead of time); any other adapter
    dtype is rounded to x's dtype here -- the same rounding, once, on a tiny ``[r, K]`` / ``[N, r]`` tensor."""
    if adapter.dtype == x_dtype or (adapter.dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)):
        return adapter
    return adapter.to(x_dtype)


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: powers of two, so varying sequence lengths reuse a tuning."""
    return triton.next_power_of_2(max(m, 1))


def input_precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Token count up to which an NF4 weight is dequantized inside the GEMM main loops (every row block of x decodes
# its W tiles again, so that work grows with M / BLOCK_M) rather than once into a transient dense buffer read by
# the dense kernels. 128 = one or two row tiles; a starting point to be tuned on a GPU (benchmarks/README.md).
NF4_FUSED_MAX_TOKENS = 128


def _weight_args(weight, M: int, dtype: torch.dtype) -> dict:
    """The kernels' W arguments for a dense ``[N, K]`` tensor or an NF4 operands record.

    The record is read by attribute (any object with them; ``fused_lora.nf4.NF4Operands`` in practice):
    ``packed``, the uint8 NF4 codes, two per byte (high nibble first), shape ``((n + 1) // 2, 1)`` in any layout
    whose flattening has one stride; ``code``, the fp32 ``[16]`` table; ``absmax``, the fp32 ``[n_blocks]``
    per-block absmax, decoded (the record decodes double-quantized statistics when this is read); ``qabsmax``,
    ``absmax2``, ``code2``, ``offset``, ``nested_blocksize``: the double-quantized statistics as stored (``qabsmax``
    None for plain ones), which the dequantize kernel decodes itself; ``blocksize``; ``shape``, ``(N, K)``.

    NF4 with at most ``NF4_FUSED_MAX_TOKENS`` rows of x: the packed codes and the absmax go to the GEMMs, which
    dequantize W tile by tile in registers. More rows: ``nf4_dequantize`` into a transient dense buffer (freed
    after the launch), then the dense path. Both give bit-identical weights. The packed codes (the big operand) are
    read in place through one element stride (``stride_wq``); the table and the absmax are indexed flat, so they
    are made contiguous (a no-op for the usual buffers)."""
    if isinstance(weight, torch.Tensor):
        return dict(w_ptr=weight, nf4_code_ptr=weight, nf4_absmax_ptr=weight, stride_wn=weight.stride(0),
                    stride_wk=weight.stride(1), stride_wq=0, W_NF4=False, NF4_BLOCKSIZE=64)
    n_out, n_in = (int(s) for s in weight.shape)
    packed = weight.packed.reshape(-1)  # a view for every layout of the [k, 1] buffer that has one flat stride
    int32_ok = max(n_out * n_in, (packed.numel() - 1) * packed.stride(0) + 1) < 2**31  # the decoder's indices
    if M <= NF4_FUSED_MAX_TOKENS and int32_ok:
        return dict(w_ptr=packed, nf4_code_ptr=weight.code.contiguous(), nf4_absmax_ptr=weight.absmax.contiguous(),
                    stride_wn=0, stride_wk=0, stride_wq=packed.stride(0), W_NF4=True,
                    NF4_BLOCKSIZE=int(weight.blocksize))
    if weight.qabsmax is not None:  # the kernel decodes double-quantized statistics itself (one launch)
        dense = nf4_dequantize(weight.packed, weight.code, weight.qabsmax, (n_out, n_in), weight.blocksize, dtype,
                               absmax2=weight.absmax2, code2=weight.code2, offset=weight.offset,
                               nested_blocksize=weight.nested_blocksize)
    else:
        dense = nf4_dequantize(weight.packed, weight.code, weight.absmax, (n_out, n_in), weight.blocksize, dtype)
    return _weight_args(dense, M, dtype)


def _dropout_args(dropout) -> dict:
    if dropout is None:
        return dict(drop_key=0, drop_threshold=-32768, HAS_DROPOUT=False)
    return dict(drop_key=dropout.key, drop_threshold=dropout.threshold, HAS_DROPOUT=True)


def grad_a_splits(m: int) -> int:
    """Row ranges of the dA kernel: about 512 rows each, at most 32 (bounded fp32 partial buffer)."""
    return max(1, min(32, triton.cdiv(m, 512)))


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused LoRA linear on 2-D x (any strides): ``y = x @ W^T + scaling * D(x) @ A^T @ B^T + bias``.

    ``weight``: a dense ``[N, K]`` tensor or an NF4 operands record (see ``_weight_args``); ``dropout``: None or an
    object with ``key``, ``threshold`` and ``scale``. Returns ``(y, xa)``, ``xa = D(x) @ A^T`` (saved for
    backward)."""
    y, xa, _ = _forward(x, weight, lora_A, lora_B, bias, scaling, dropout, None)
    return y, xa


def dora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout, scale: torch.Tensor):
    """Forward of the fused DoRA linear on 2-D x (``fused_lora.functional.FusedDoraFunction``): ``scale`` is
    c = m / n ``[N]`` (fp32; a float64 one is rounded to fp32). Returns ``(y, xa, z)``."""
    return _forward(x, weight, lora_A, lora_B, bias, scaling, dropout, scale.to(torch.float32).contiguous())


def _forward(x, weight, lora_A, lora_B, bias, scaling, dropout, scale):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    lora_A, lora_B = _adapter_operand(lora_A, x.dtype), _adapter_operand(lora_B, x.dtype)
    fp32_adapters, prec, bucket = lora_A.dtype != x.dtype, input_precision(x), m_bucket(M)
    down_r = _down_block_r(R, fp32_adapters)
    family = config_family(x.dtype, prec)
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    drop = _dropout_args(dropout)
    drop_scale = 1.0 if dropout is None else dropout.scale
    LORA_DOWN(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, down_r)), family,
        x_ptr=x, a_ptr=lora_A, xa_ptr=xa, M=M, K=K, R=R, M_BUCKET=bucket,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        drop_scale=drop_scale, **drop,
        INPUT_PRECISION=prec, BLOCK_R=down_r,
    )
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dora = scale is not None
    two_acc = dora and dropout is not None
    z = torch.empty((M, N), dtype=x.dtype, device=x.device) if dora else None
    w_args = _weight_args(weight, M, x.dtype)
    LINEAR_FWD(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        config_family(x.dtype, prec, w_args["W_NF4"], fp32_adapters, dora=_dora_kind(dora, dropout)),
        x_ptr=x, xa_ptr=xa, b_ptr=lora_B, bias_ptr=bias if bias is not None else y, y_ptr=y,
        scale_ptr=scale if dora else y, z_ptr=z if dora else y,  # placeholders are never dereferenced
        M=M, N=N, K=K, R=R, M_BUCKET=bucket, **w_args,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1), stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_zm=z.stride(0) if dora else 0, stride_zn=z.stride(1) if dora else 0,
        # the mask only where the kernel uses it (DoRA with dropout): a varying key would also make Triton compile
        # the kernel again whenever its value's divisibility changes
        scaling=scaling, drop_scale=drop_scale,
        drop_key=drop["drop_key"] if two_acc else 0, drop_threshold=drop["drop_threshold"] if two_acc else 0,
        HAS_BIAS=bias is not None, INPUT_PRECISION=prec, DORA=dora, HAS_DROPOUT=two_acc,
        BLOCK_R=_seed_block_r(R, fp32_adapters, w_args["W_NF4"]),
    )
    return y, xa, z


def _dora_kind(dora: bool, dropout) -> int:
    """0: LoRA, 1: DoRA without dropout, 2: DoRA with dropout (two accumulators); see ``config_family``."""
    return 0 if not dora else (1 if dropout is None else 2)


def _grad_out(g, lora_B, xa, scaling, store_gb, compute_db, compute_dbias, prec, family, BLOCK_R, scale=None,
              z=None):
    """Launch kernel 3; returns (gb or None, dB fp32 or None, dbias fp32 or None, colsum(g * z) fp32 or None).
    DoRA: ``scale`` (c, fp32 ``[N]``) scales g for gb and dB; ``z`` given: the colsum for dm."""
    M, N = g.shape
    R = lora_B.shape[1]
    dev = g.device
    gb = torch.empty((M, R), dtype=g.dtype, device=dev) if store_gb else None
    partials = torch.are_deterministic_algorithms_enabled()
    compute_dm = z is not None
    cfg = None
    if partials:
        # A fixed tiling, so the per-row-block buffers can be sized before the launch.
        cfg = GRAD_OUT.fixed_config() or GRAD_OUT.configs[family][0]
        n_slices = triton.cdiv(M, cfg.kwargs["BLOCK_M"])
        new = torch.empty
    else:
        n_slices, new = 1, torch.zeros
    db = new((n_slices, N, R), dtype=torch.float32, device=dev) if compute_db else None
    dbias = new((n_slices, N), dtype=torch.float32, device=dev) if compute_dbias else None
    dm = new((n_slices, N), dtype=torch.float32, device=dev) if compute_dm else None
    dummy = xa  # pointer arguments of disabled outputs are never dereferenced
    GRAD_OUT(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R)), family, cfg,
        g_ptr=g, b_ptr=lora_B, xa_ptr=xa, gb_ptr=gb if gb is not None else dummy,
        db_ptr=db if db is not None else dummy, dbias_ptr=dbias if dbias is not None else dummy,
        scale_ptr=scale if scale is not None else dummy, z_ptr=z if compute_dm else dummy,
        dm_ptr=dm if compute_dm else dummy,
        M=M, N=N, R=R, M_BUCKET=m_bucket(M),
        stride_gm=g.stride(0), stride_gn=g.stride(1), stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        stride_gbm=gb.stride(0) if gb is not None else 0, stride_gbr=gb.stride(1) if gb is not None else 0,
        stride_dbp=db.stride(0) if partials and db is not None else 0,
        stride_dbn=db.stride(1) if db is not None else 0, stride_dbr=db.stride(2) if db is not None else 0,
        stride_dbiasp=dbias.stride(0) if partials and dbias is not None else 0,
        stride_zm=z.stride(0) if compute_dm else 0, stride_zn=z.stride(1) if compute_dm else 0,
        stride_dmp=dm.stride(0) if partials and compute_dm else 0,
        scaling=scaling, STORE_GB=store_gb, COMPUTE_DB=compute_db, COMPUTE_DBIAS=compute_dbias, PARTIALS=partials,
        INPUT_PRECISION=prec, DORA=scale is not None, COMPUTE_DM=compute_dm, BLOCK_R=BLOCK_R,
    )
    return (gb, *(None if t is None else t.sum(0) for t in (db, dbias, dm)))


def lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout,
    needs: Tuple[bool, bool, bool, bool, bool],
):
    """Gradients ``(dx, dweight, dlora_A, dlora_B, dbias)`` for the inputs flagged in ``needs``, None for the others.

    ``needs`` and the result follow one order, that of fused_lora's gradient names: (x, weight, lora_A, lora_B,
    bias). ``weight`` and ``dropout`` as in :func:`lora_forward`; ``xa`` is the forward's. ``dweight`` (a plain
    GEMM) exists for a dense weight only."""
    need_dx, need_dw, need_da, need_db, need_dbias = needs
    dx, da, db, dbias, _ = _backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout,
                                     (need_dx, need_da, need_db, need_dbias, False), None, None)
    dw = None
    if need_dw:
        # Only when the user unfroze a dense W: the weight gradient is a plain GEMM with nothing to fuse.
        if not isinstance(weight, torch.Tensor):
            raise ValueError("lora_backward: no weight gradient for an NF4 weight (needs[1] must be False)")
        dw = torch.mm(grad_out.t(), x).to(weight.dtype)
    return dx, dw, da, db, dbias


def dora_backward(grad_out, x, weight, lora_A, lora_B, xa, z, scale, norm, scaling: float, dropout, needs):
    """Gradients ``(dx, dlora_A, dlora_B, dmagnitude, dbias)`` of the fused DoRA linear for the inputs flagged in
    ``needs`` (same order): ``z``, ``scale`` (c) and ``norm`` (n) are the forward's; dmagnitude comes back in fp32
    (float64 for a float64 n), ``colsum(g * z) / n``."""
    need_dx, need_da, need_db, need_dm, need_dbias = needs
    dx, da, db, dbias, dm = _backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout,
                                      (need_dx, need_da, need_db, need_dbias, need_dm),
                                      scale.to(torch.float32).contiguous(), z)
    if dm is not None:
        dm = dm.to(norm.dtype).div_(norm)
    return dx, da, db, dm, dbias


def _backward(g, x, weight, lora_A, lora_B, xa, scaling, dropout, needs, scale, z):
    """``(dx, dA, dB, dbias, colsum(g * z))`` for ``needs`` = (x, A, B, bias, the colsum); DoRA when ``scale``."""
    need_dx, need_da, need_db, need_dbias, need_dm = needs
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dtype_a, dtype_b = lora_A.dtype, lora_B.dtype  # of the gradients
    lora_A, lora_B = _adapter_operand(lora_A, x.dtype), _adapter_operand(lora_B, x.dtype)
    fp32_adapters, prec, bucket = lora_A.dtype != x.dtype, input_precision(x), m_bucket(M)
    BLOCK_R = block_r(R)
    family = config_family(x.dtype, prec)
    drop = _dropout_args(dropout)
    drop_scale = 1.0 if dropout is None else dropout.scale
    lora_scale = scaling * drop_scale
    dora = scale is not None
    dx = da = db = dbias = dm = None

    need_gb = need_dx or need_da
    if need_gb or need_db or need_dbias or need_dm:
        gb, db, dbias, dm = _grad_out(g, lora_B, xa, scaling, need_gb, need_db, need_dbias, prec,
                                      family + "-dora" if dora else family, BLOCK_R, scale, z if need_dm else None)
        db = db.to(dtype_b) if db is not None else None  # fp32 accumulators: rounded once, if at all
        dbias = dbias.to(g.dtype) if dbias is not None else None

    if need_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        w_args = _weight_args(weight, M, x.dtype)
        DGRAD(
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),),
            config_family(x.dtype, prec, w_args["W_NF4"], fp32_adapters, dora=_dora_kind(dora, dropout)),
            g_ptr=g, gb_ptr=gb, a_ptr=lora_A, dx_ptr=dx, scale_ptr=scale if dora else dx,
            M=M, N=N, K=K, R=R, M_BUCKET=bucket,
            **w_args, stride_gm=g.stride(0), stride_gn=g.stride(1),
            stride_gbm=gb.stride(0), stride_gbr=gb.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
            lora_scale=lora_scale, scaling=scaling, drop_scale=drop_scale, **drop, INPUT_PRECISION=prec, DORA=dora,
            BLOCK_R=_seed_block_r(R, fp32_adapters, w_args["W_NF4"]),
        )

    if need_da:
        splits = grad_a_splits(M)
        partial = torch.empty((splits, R, K), dtype=torch.float32, device=x.device)
        GRAD_A(
            lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, BLOCK_R), splits), family,
            x_ptr=x, gb_ptr=gb, da_ptr=partial, M=M, K=K, R=R, M_BUCKET=bucket,
            stride_xm=x.stride(0), stride_xk=x.stride(1), stride_gbm=gb.stride(0), stride_gbr=gb.stride(1),
            stride_dap=partial.stride(0), stride_dar=partial.stride(1), stride_dak=partial.stride(2),
            lora_scale=lora_scale, **drop, INPUT_PRECISION=prec, BLOCK_R=BLOCK_R,
        )
        da = partial.sum(0).to(dtype_a)
    return dx, da, db, dbias, dm
