"""The stateless dropout mask: definition, statistics, and identical bits on both backends."""

from __future__ import annotations

import math

import pytest
import torch

from fused_lora import fused_lora_linear, use_backend
from fused_lora.dropout import Dropout, mix32

from conftest import DEVICE_BACKENDS


def _scalar_keep(dropout: Dropout, row: int, col: int, n_cols: int) -> bool:
    """The mask's definition evaluated with Python integers (independent of the tensor code)."""
    counter = (row * ((n_cols + 1) // 2) + col // 2) & 0xFFFFFFFF
    h = mix32(counter ^ (dropout.key & 0xFFFFFFFF))
    half = (h & 0xFFFF) if col % 2 == 0 else (h >> 16)
    signed = half - 65536 if half >= 32768 else half
    return signed >= round(dropout.p * 65536) - 32768


# lowbias32 (Chris Wellons' integer hash) test vectors, produced by a C reference implementation with uint32_t
# arithmetic: `x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16;`
LOWBIAS32_VECTORS = [
    (0x00000000, 0x00000000),
    (0x00000001, 0x688990C0),
    (0x00000002, 0xD1132181),
    (0xDEADBEEF, 0xE628C683),
    (0xFFFFFFFF, 0x6768824A),
    (0x80000000, 0xCC4B4124),
    (0x00003039, 0x912EFCF7),
]


@pytest.mark.parametrize("value,expect", LOWBIAS32_VECTORS)
def test_mix32_matches_c_reference(value, expect):
    assert mix32(value) == expect


def test_tensor_hash_matches_scalar_hash():
    """The int32 tensor version (wrapping multiply, masked arithmetic shifts) equals the unsigned definition."""
    from fused_lora.dropout import _as_int32, _mix32_

    values = [v for v, _ in LOWBIAS32_VECTORS] + list(range(-3000, 3000, 7)) + [2**31 - 1, -(2**31)]
    h = torch.tensor([_as_int32(v) for v in values], dtype=torch.int32)
    _mix32_(h)
    assert h.tolist() == [_as_int32(mix32(v)) for v in values]


@pytest.mark.parametrize("rows,cols,row_start", [(5, 7, 0), (3, 8, 11), (2, 1, 1 << 30), (4, 33, 0)])
def test_torch_mask_matches_scalar_definition(rows, cols, row_start):
    d = Dropout(0.3, seed=12345678901)
    mask = d.keep_mask(rows, cols, "cpu", row_start=row_start)
    expect = torch.tensor([[_scalar_keep(d, row_start + i, j, cols) for j in range(cols)] for i in range(rows)])
    assert torch.equal(mask, expect)


def test_mask_chunking_is_invisible(monkeypatch):
    """The torch path hashes rows in chunks; chunk boundaries must not change the mask."""
    import fused_lora.dropout as dropout_module

    d = Dropout(0.5, seed=3)
    full = d.keep_mask(50, 37, "cpu")
    monkeypatch.setattr(dropout_module, "_CHUNK_DRAWS", 19 * 3)  # 3 rows per chunk, odd column count
    assert torch.equal(d.keep_mask(50, 37, "cpu"), full)
    assert torch.equal(d.keep_mask(20, 37, "cpu", row_start=30), full[30:])


def test_mask_into_reused_buffer():
    """``out=``: the mask written into a caller's buffer (its dtype wins), the same bits as a fresh mask; a buffer
    of the wrong shape or layout is an error, not a silent partial write."""
    d = Dropout(0.3, seed=8)
    buf = torch.full((40, 37), 7.0)
    got = d.keep_mask(12, 37, "cpu", row_start=5, out=buf[3:15])
    assert got.data_ptr() == buf[3:15].data_ptr()
    assert torch.equal(got, d.keep_mask(12, 37, "cpu", row_start=5).float())
    assert torch.all(buf[:3] == 7.0) and torch.all(buf[15:] == 7.0)
    with pytest.raises(ValueError, match="contiguous"):
        d.keep_mask(12, 37, "cpu", out=buf[:13])
    with pytest.raises(ValueError, match="contiguous"):
        d.keep_mask(37, 12, "cpu", out=buf.t()[:, :12])  # right shape, column-major


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_within_four_sigma(p):
    rows, cols = 512, 1000
    n = rows * cols
    kept = Dropout(p, seed=2024).keep_mask(rows, cols, "cpu").sum().item()
    q = 1 - p
    assert abs(kept / n - q) <= 4 * math.sqrt(p * q / n), (kept / n, q)
    # columns of a pair share one draw but use independent halves: even and odd columns are kept equally often
    mask = Dropout(p, seed=7).keep_mask(rows, cols, "cpu").double()
    even, odd = mask[:, ::2].mean().item(), mask[:, 1::2].mean().item()
    assert abs(even - odd) <= 4 * math.sqrt(2 * p * q / (n / 2))


def test_masks_are_not_correlated_between_neighbours_or_seeds():
    a = Dropout(0.5, seed=1).keep_mask(256, 256, "cpu").double() * 2 - 1
    b = Dropout(0.5, seed=2).keep_mask(256, 256, "cpu").double() * 2 - 1
    n = a.numel()
    bound = 4 / math.sqrt(n)
    assert abs((a * b).mean().item()) <= bound  # different seeds
    assert abs((a[:, 1:] * a[:, :-1]).mean().item()) <= 4 / math.sqrt(a[:, 1:].numel())  # pair partners / neighbours
    assert abs((a[1:] * a[:-1]).mean().item()) <= 4 / math.sqrt(a[1:].numel())  # next row


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_kept_values_scaled_and_dropped_values_zero(device, backend):
    """With W = 0, A = I and B = I the output is exactly D(x): kept elements are x / (1 - p), the rest 0."""
    K, p = 32, 0.25
    x = torch.randn(40, K, device=device)
    eye = torch.eye(K, device=device)
    with use_backend(backend):
        y = fused_lora_linear(x, torch.zeros(K, K, device=device), eye, eye, 1.0, dropout_p=p, seed=77)
    keep = Dropout(p, 77).keep_mask(40, K, device)
    assert torch.equal(y != 0, keep & (x != 0))
    torch.testing.assert_close(y[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", [device for device, backend in DEVICE_BACKENDS if backend == "triton"])
@pytest.mark.parametrize("rows,cols", [(37, 100), (16, 33), (1, 1)])
def test_triton_mask_bits_equal_torch_mask(device, rows, cols):
    """The down-projection kernel with A = I returns D(x) itself: its zero pattern is the kernel's mask, which must
    be the torch path's mask computed on the CPU (in the interpreter on CPU, compiled on CUDA)."""
    from fused_lora.kernels.lora import lora_forward

    d = Dropout(0.4, seed=-5)  # negative seeds are folded to 64 bits
    x = (torch.randn(rows, cols).abs() + 0.5).to(device)  # no zeros: a zero output means dropped
    eye = torch.eye(cols, device=device)
    zeros = torch.zeros(1, min(cols, 64), device=device)
    _, xa = lora_forward(x, torch.zeros(1, cols, device=device), eye[: min(cols, 64)], zeros, None, 1.0, d)
    keep = d.keep_mask(rows, cols, "cpu")[:, : min(cols, 64)]
    assert torch.equal(xa.cpu() != 0, keep)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5])
def test_dropout_object_rejects_degenerate_p(bad):
    with pytest.raises(ValueError, match="0 < p < 1"):
        Dropout(bad, 0)
