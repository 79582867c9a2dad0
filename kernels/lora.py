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

The launch wrappers ``lora_forward`` / ``lora_backward`` have the same signatures as ``fused_lora.torch_ops``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launcher, config, config_family
from .dropout import dropout_keep
from .nf4 import nf4_decode_tile

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


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    drop_key, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[BLOCK_M, BLOCK_R] = D(x) @ A^T for one row block and one rank block. M_BUCKET: autotuning key only."""
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
        at = tl.load(at_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, at, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * drop_scale
    xa_ptrs = xa_ptr + rm[:, None].to(tl.int64) * stride_xam + rr[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, nf4_code_ptr, nf4_absmax_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wq, stride_xam, stride_xar, stride_bn, stride_br,
    stride_bias, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[BLOCK_M, BLOCK_N] = x @ W^T + scaling * xa @ B^T + bias.

    W_NF4: ``w_ptr`` holds W's packed NF4 codes, byte ``j`` at ``w_ptr + j * stride_wq`` (``nf4_code_ptr``: the
    16-value table, ``nf4_absmax_ptr``: the decoded fp32 absmax per block, both contiguous); each W tile is
    dequantized in registers inside the main loop, rounded to x's dtype exactly as ``NF4Weight.dequantize`` rounds
    it, so both QLoRA paths see bit-identical weights. ``stride_bias``: the bias's element stride (0: broadcast)."""
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads use wrapped row/col indices (always in bounds, no mask); the store masks the true ones.
    rm_in = (rm % M).to(tl.int64)
    rn_in = (rn % N).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)

    # The LoRA up-projection seeds the accumulator: acc = scaling * xa @ B^T (r is small: a few dots).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa_ptrs = xa_ptr + rm_in[:, None] * stride_xam + rr[None, :] * stride_xar
    bt_ptrs = b_ptr + rn_in[None, :] * stride_bn + rr[:, None] * stride_br  # B^T tile [BLOCK_R, BLOCK_N]
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        xa = tl.load(xa_ptrs, mask=r_ok[None, :], other=0.0)
        bt = tl.load(bt_ptrs, mask=r_ok[:, None], other=0.0)
        acc = tl.dot(xa, bt, acc, input_precision=INPUT_PRECISION)
        xa_ptrs += BLOCK_R * stride_xar
        bt_ptrs += BLOCK_R * stride_br
    acc = acc * scaling

    # The base GEMM accumulates on top.
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    wt_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None] * stride_wk  # W^T tile [BLOCK_K, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        if W_NF4:
            wt = nf4_decode_tile(w_ptr, nf4_code_ptr, nf4_absmax_ptr, nf4_absmax_ptr, nf4_code_ptr, nf4_absmax_ptr,
                                 (rn % N)[None, :], (k0 + rk)[:, None], K, k_ok[:, None],
                                 NF4_BLOCKSIZE, False, 1, stride_wq).to(x_ptr.dtype.element_ty)
        else:
            wt = tl.load(wt_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in * stride_bias).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _lora_grad_out_kernel(
    g_ptr, b_ptr, xa_ptr, gb_ptr, db_ptr, dbias_ptr,
    M, N, R, M_BUCKET,
    stride_gm, stride_gn, stride_bn, stride_br, stride_xam, stride_xar, stride_gbm, stride_gbr,
    stride_dbp, stride_dbn, stride_dbr, stride_dbiasp,
    scaling,
    STORE_GB: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, PARTIALS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over a block of rows of g: gb = g @ B (complete per program), and this block's share of
    dB = scaling * g^T @ xa and dbias = colsum(g).

    The dB / dbias shares are added atomically into fp32 buffers, or, with PARTIALS (torch's deterministic mode),
    written to a per-row-block slice ``[pid_m]`` that the host sums in a fixed order.
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
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if STORE_GB:
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            gb = tl.dot(g, b, gb, input_precision=INPUT_PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(g), xa, input_precision=INPUT_PRECISION) * scaling
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
        g_ptrs += BLOCK_N * stride_gn
        b_ptrs += BLOCK_N * stride_bn
        db_ptrs += BLOCK_N * stride_dbn
        dbias_ptrs += BLOCK_N
    if STORE_GB:
        gb_ptrs = gb_ptr + rm64[:, None] * stride_gbm + rr[None, :] * stride_gbr
        tl.store(gb_ptrs, gb.to(gb_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_dgrad_kernel(
    g_ptr, w_ptr, gb_ptr, a_ptr, dx_ptr, nf4_code_ptr, nf4_absmax_ptr,
    M, N, K, R, M_BUCKET,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_wq, stride_gbm, stride_gbr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    lora_scale, drop_key, drop_threshold,
    HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx[BLOCK_M, BLOCK_K] = g @ W + lora_scale * m * (gb @ A), lora_scale = scaling / (1 - p).
    W_NF4: W is dequantized tile by tile in the main loop (see ``_lora_linear_fwd_kernel``)."""
    pid_m, pid_k = _grouped_pids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm_in = (rm % M).to(tl.int64)
    rk_in = (rk % K).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)

    # The LoRA term (masked with the regenerated dropout mask) seeds the accumulator.
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    gb_ptrs = gb_ptr + rm_in[:, None] * stride_gbm + rr[None, :] * stride_gbr
    a_ptrs = a_ptr + rr[:, None] * stride_ar + rk_in[None, :] * stride_ak
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        gb = tl.load(gb_ptrs, mask=r_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_ok[:, None], other=0.0)
        acc = tl.dot(gb, a, acc, input_precision=INPUT_PRECISION)
        gb_ptrs += BLOCK_R * stride_gbr
        a_ptrs += BLOCK_R * stride_ar
    if HAS_DROPOUT:
        acc = tl.where(dropout_keep(rm, rk, K, drop_key, drop_threshold), acc, 0.0)
    acc = acc * lora_scale

    # The dgrad GEMM accumulates on top.
    g_ptrs = g_ptr + rm_in[:, None] * stride_gm + rn[None, :] * stride_gn
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk_in[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
        if W_NF4:
            w = nf4_decode_tile(w_ptr, nf4_code_ptr, nf4_absmax_ptr, nf4_absmax_ptr, nf4_code_ptr, nf4_absmax_ptr,
                                (n0 + rn)[:, None], (rk % K)[None, :], K, n_ok[:, None],
                                NF4_BLOCKSIZE, False, 1, stride_wq).to(g_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_wn

    dx_ptrs = dx_ptr + rm[:, None].to(tl.int64) * stride_dxm + rk[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rk < K)[None, :])


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
# shipped configurations (every one is compiled for sm_80 and sm_90 by tests/test_aot_compile.py)
# ----------------------------------------------------------------------------------------------------------------

# Families (see _launch.config_family): "half" = bf16/fp16 on tensor cores, "tf32" = fp32 with allow_tf32,
# "ieee" = exact fp32 on FMA units. FMA-path dots keep both operands in registers, hence its smaller tiles: the
# larger ones spill (measured by the compile check; e.g. 64x128x32 at 4 warps spills 1.2 KB/thread on sm_80).
def _tilings(names, rows):
    """Configurations from ``(num_warps, num_stages, *block sizes)`` rows, block sizes in ``names`` order."""
    return [config(warps, stages, **dict(zip(names, blocks))) for warps, stages, *blocks in rows]


def _families(names, **tables):
    return {family.replace("_", "-"): _tilings(names, rows) for family, rows in tables.items()}


# The two GEMMs share their tilings, written (warps, stages, rows of x, output columns, reduction step, GROUP_M):
# the forward's output columns are N (reduction over K), the dgrad's are K (reduction over N). "-nf4": tilings
# for NF4 weights dequantized in the main loop, used for at most NF4_FUSED_MAX_TOKENS rows (narrow row tiles; the
# decoder's gathers are multi-buffered by the pipeliner, so the wide dense tiles would need 250-340 KiB of shared
# memory).
_GEMM_TILES = dict(
    half=[(8, 3, 128, 256, 64, 8), (8, 4, 128, 128, 64, 8), (4, 4, 64, 128, 64, 8), (4, 4, 128, 64, 64, 8),
          (4, 4, 64, 64, 64, 8)],
    tf32=[(8, 3, 128, 128, 32, 8), (4, 4, 64, 128, 32, 8), (4, 4, 128, 64, 32, 8), (4, 4, 64, 64, 32, 8)],
    tf32_nf4=[(4, 3, 16, 64, 64, 8), (4, 3, 32, 64, 64, 8), (4, 3, 64, 64, 32, 8), (4, 3, 32, 128, 32, 8),
              (8, 3, 64, 128, 32, 8)],
)
_FWD_TILES = dict(
    _GEMM_TILES,
    ieee=[(8, 2, 64, 64, 16, 8), (8, 2, 32, 64, 32, 8), (8, 2, 64, 32, 32, 8), (4, 2, 32, 32, 32, 8)],
    half_nf4=[(4, 3, 16, 64, 128, 8), (4, 3, 32, 64, 128, 8), (4, 3, 16, 128, 64, 8), (4, 3, 32, 128, 64, 8),
              (8, 3, 64, 128, 64, 8), (4, 3, 64, 64, 64, 8)],
    # 32x64 rows x columns with a 16-wide reduction step: at 32 wide it spilled 8 bytes on sm_80 with Triton 3.6
    ieee_nf4=[(8, 2, 64, 64, 16, 8), (8, 2, 32, 64, 16, 8), (8, 2, 64, 32, 32, 8), (4, 2, 16, 64, 32, 8)],
)
_DGRAD_TILES = dict(
    _GEMM_TILES,
    ieee=[(8, 3, 64, 64, 16, 8), (8, 2, 32, 64, 32, 8), (8, 2, 64, 32, 32, 8), (4, 2, 32, 32, 32, 8)],
    # 32x128x64 at 8 warps: at 4 warps it spilled 16 bytes on sm_80 and sm_90 with Triton 3.6
    half_nf4=[(4, 3, 16, 64, 128, 8), (4, 3, 16, 128, 64, 8), (8, 3, 32, 128, 64, 8), (4, 4, 32, 64, 64, 8),
              (8, 3, 64, 128, 64, 8), (4, 3, 64, 64, 64, 8)],
    ieee_nf4=[(8, 3, 64, 64, 16, 8), (8, 2, 32, 64, 32, 8), (8, 2, 64, 32, 32, 8), (8, 2, 32, 32, 32, 8),
              (4, 2, 16, 64, 32, 8)],
)
# (warps, stages, rows per step, columns per program) of the three row-streaming kernels.
_DOWN_TILES = dict(
    half=[(4, 3, 64, 128), (4, 4, 32, 128), (4, 3, 128, 64), (8, 3, 128, 128)],
    tf32=[(4, 3, 64, 64), (4, 4, 32, 64), (4, 3, 128, 32)],
    ieee=[(4, 3, 64, 32), (8, 3, 64, 64), (4, 3, 16, 64), (4, 2, 16, 32)],
)

LORA_DOWN = Launcher(
    _lora_down_kernel, _families(("BLOCK_M", "BLOCK_K"), **_DOWN_TILES), key=["M_BUCKET", "K", "R"],
    interpreter_config=config(4, 1, BLOCK_M=16, BLOCK_K=32),
)

LINEAR_FWD = Launcher(
    _lora_linear_fwd_kernel, _families(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), **_FWD_TILES),
    key=["M_BUCKET", "N", "K", "R"],
    interpreter_config=config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
)

# The first configuration of each family is also the fixed tiling of torch's deterministic mode (per-row-block
# partial sums instead of atomics): the largest BLOCK_M there keeps that buffer small.
GRAD_OUT = Launcher(
    _lora_grad_out_kernel,
    _families(
        ("BLOCK_M", "BLOCK_N"),
        half=[(8, 3, 128, 64), (8, 3, 64, 128), (4, 3, 32, 64), (8, 3, 32, 128), (4, 3, 32, 32)],
        tf32=[(8, 2, 32, 64), (4, 3, 32, 32), (8, 2, 16, 64), (4, 2, 16, 32)],
        # 16x64 at 4 warps, 1 stage: at 8 warps and 2 or 3 stages it spilled 8 bytes on sm_80 with Triton 3.6
        ieee=[(8, 2, 32, 64), (8, 2, 32, 32), (4, 1, 16, 64), (4, 2, 16, 32)],
    ),
    key=["M_BUCKET", "N", "R"],
    interpreter_config=config(4, 1, BLOCK_M=16, BLOCK_N=32),
    reset_to_zero=["db_ptr", "dbias_ptr"],
)

DGRAD = Launcher(
    _lora_dgrad_kernel, _families(("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M"), **_DGRAD_TILES),
    key=["M_BUCKET", "N", "K", "R"],
    interpreter_config=config(4, 1, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, GROUP_M=2),
)

GRAD_A = Launcher(
    _lora_grad_a_kernel,
    _families(
        ("BLOCK_M", "BLOCK_K"),
        half=_DOWN_TILES["half"],
        tf32=_DOWN_TILES["tf32"],
        ieee=[(4, 3, 32, 32), (4, 3, 16, 64), (4, 2, 16, 32)],
    ),
    key=["M_BUCKET", "K", "R"],
    interpreter_config=config(4, 1, BLOCK_M=16, BLOCK_K=32),
)

LAUNCHERS = (LORA_DOWN, LINEAR_FWD, GRAD_OUT, DGRAD, GRAD_A)

# ----------------------------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------------------------

# Rank handled per tile: tl.dot needs >= 16, and more than 64 columns of rank per tile costs registers for no gain
# (larger ranks loop or use more programs).
_MAX_BLOCK_R = 64


def block_r(r: int) -> int:
    return min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


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
    """The kernels' W arguments for a dense ``[N, K]`` tensor or an ``NF4Weight``.

    NF4 with at most ``NF4_FUSED_MAX_TOKENS`` rows of x: the packed codes and the decoded fp32 absmax go to the
    kernels, which dequantize W tile by tile in registers. More rows: one Triton dequantize into a transient
    buffer (freed after the launch), then the dense path. Both give bit-identical weights.

    Any layout of the NF4 buffers: the packed codes (the big operand) are read in place through one element
    stride (``stride_wq``; see ``nf4_dequantize``); the 16-value table and the absmax (n / blocksize values,
    decoded afresh on every call for a nested weight anyway) are indexed flat, so they are made contiguous here."""
    from fused_lora.nf4 import NF4Weight

    if isinstance(weight, NF4Weight):
        packed = weight.data.reshape(-1)  # a view for every layout of the [k, 1] buffer that has one flat stride
        int32_ok = max(weight.numel, (packed.numel() - 1) * packed.stride(0) + 1) < 2**31  # the decoder's indices
        if M <= NF4_FUSED_MAX_TOKENS and int32_ok:
            return dict(w_ptr=packed, nf4_code_ptr=weight.code.contiguous(),
                        nf4_absmax_ptr=weight.absmax_fp32().contiguous(), stride_wn=0, stride_wk=0,
                        stride_wq=packed.stride(0), W_NF4=True, NF4_BLOCKSIZE=weight.blocksize)
        weight = weight.dequantize_triton(dtype)
    return dict(w_ptr=weight, nf4_code_ptr=weight, nf4_absmax_ptr=weight, stride_wn=weight.stride(0),
                stride_wk=weight.stride(1), stride_wq=0, W_NF4=False, NF4_BLOCKSIZE=64)


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
    """Forward of the fused LoRA linear on 2-D x (any strides); ``weight`` dense or an ``NF4Weight``.
    Returns ``(y, xa)``."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    BLOCK_R, prec, bucket = block_r(R), input_precision(x), m_bucket(M)
    family = config_family(x.dtype, prec)
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    drop = _dropout_args(dropout)
    LORA_DOWN(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R)), family,
        x_ptr=x, a_ptr=lora_A, xa_ptr=xa, M=M, K=K, R=R, M_BUCKET=bucket,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        drop_scale=1.0 if dropout is None else dropout.scale, **drop,
        INPUT_PRECISION=prec, BLOCK_R=BLOCK_R,
    )
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    w_args = _weight_args(weight, M, x.dtype)
    LINEAR_FWD(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        config_family(x.dtype, prec, w_args["W_NF4"]),
        x_ptr=x, xa_ptr=xa, b_ptr=lora_B, bias_ptr=bias if bias is not None else y, y_ptr=y,
        M=M, N=N, K=K, R=R, M_BUCKET=bucket, **w_args,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1), stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_ym=y.stride(0), stride_yn=y.stride(1),
        scaling=scaling, HAS_BIAS=bias is not None, INPUT_PRECISION=prec, BLOCK_R=BLOCK_R,
    )
    return y, xa


def _grad_out(g, lora_B, xa, scaling, store_gb, compute_db, compute_dbias, prec, family, BLOCK_R):
    """Launch kernel 3; returns (gb or None, dB fp32 or None, dbias fp32 or None)."""
    M, N = g.shape
    R = lora_B.shape[1]
    dev = g.device
    gb = torch.empty((M, R), dtype=g.dtype, device=dev) if store_gb else None
    partials = torch.are_deterministic_algorithms_enabled()
    cfg = None
    if partials:
        # A fixed tiling, so the per-row-block buffers can be sized before the launch.
        cfg = GRAD_OUT.fixed_config() or GRAD_OUT.configs[family][0]
        n_slices = triton.cdiv(M, cfg.kwargs["BLOCK_M"])
        db = torch.empty((n_slices, N, R), dtype=torch.float32, device=dev) if compute_db else None
        dbias = torch.empty((n_slices, N), dtype=torch.float32, device=dev) if compute_dbias else None
    else:
        db = torch.zeros((1, N, R), dtype=torch.float32, device=dev) if compute_db else None
        dbias = torch.zeros((1, N), dtype=torch.float32, device=dev) if compute_dbias else None
    dummy = xa  # pointer arguments of disabled outputs are never dereferenced
    db_arg = db if db is not None else dummy
    dbias_arg = dbias if dbias is not None else dummy
    GRAD_OUT(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R)), family, cfg,
        g_ptr=g, b_ptr=lora_B, xa_ptr=xa, gb_ptr=gb if gb is not None else dummy, db_ptr=db_arg, dbias_ptr=dbias_arg,
        M=M, N=N, R=R, M_BUCKET=m_bucket(M),
        stride_gm=g.stride(0), stride_gn=g.stride(1), stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        stride_gbm=gb.stride(0) if gb is not None else 0, stride_gbr=gb.stride(1) if gb is not None else 0,
        stride_dbp=db.stride(0) if partials and db is not None else 0,
        stride_dbn=db.stride(1) if db is not None else 0, stride_dbr=db.stride(2) if db is not None else 0,
        stride_dbiasp=dbias.stride(0) if partials and dbias is not None else 0,
        scaling=scaling, STORE_GB=store_gb, COMPUTE_DB=compute_db, COMPUTE_DBIAS=compute_dbias, PARTIALS=partials,
        INPUT_PRECISION=prec, BLOCK_R=BLOCK_R,
    )
    db = db.sum(0) if db is not None else None
    dbias = dbias.sum(0) if dbias is not None else None
    return gb, db, dbias


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
    """Gradients ``(dx, dW, dA, dB, dbias)`` for the inputs flagged in ``needs`` (None for the others)."""
    need_dx, need_dw, need_da, need_db, need_dbias = needs
    g = grad_out
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    BLOCK_R, prec, bucket = block_r(R), input_precision(x), m_bucket(M)
    family = config_family(x.dtype, prec)
    drop = _dropout_args(dropout)
    lora_scale = scaling * (1.0 if dropout is None else dropout.scale)
    dx = dw = da = db = dbias = None

    need_gb = need_dx or need_da
    if need_gb or need_db or need_dbias:
        gb, db, dbias = _grad_out(g, lora_B, xa, scaling, need_gb, need_db, need_dbias, prec, family, BLOCK_R)
        db = db.to(lora_B.dtype) if db is not None else None
        dbias = dbias.to(g.dtype) if dbias is not None else None

    if need_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        w_args = _weight_args(weight, M, x.dtype)
        DGRAD(
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),),
            config_family(x.dtype, prec, w_args["W_NF4"]),
            g_ptr=g, gb_ptr=gb, a_ptr=lora_A, dx_ptr=dx, M=M, N=N, K=K, R=R, M_BUCKET=bucket,
            **w_args, stride_gm=g.stride(0), stride_gn=g.stride(1),
            stride_gbm=gb.stride(0), stride_gbr=gb.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
            lora_scale=lora_scale, **drop, INPUT_PRECISION=prec, BLOCK_R=BLOCK_R,
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
        da = partial.sum(0).to(lora_A.dtype)

    if need_dw:
        # Only when the user unfroze a dense W: the weight gradient is a plain GEMM with nothing to fuse.
        dw = torch.mm(g.t(), x).to(weight.dtype)
    return dx, dw, da, db, dbias
