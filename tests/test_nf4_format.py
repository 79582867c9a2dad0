"""NF4 weights: byte-exact quantization and bit-exact dequantization against bitsandbytes (the oracle, dequantizing
through a flat quant state: see bnb_oracle.py for the upstream CPU bug this avoids), on the torch path and in the
Triton kernel, and lossless interop with bitsandbytes' Params4bit / Linear4bit / state dicts.

Everything here is exact: no tolerances (bf16 in the Triton interpreter too, through tests/triton_bf16.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo

from fused_lora import use_backend
from fused_lora.nf4 import BLOCKSIZES, NF4_CODE, NF4Weight, dynamic_map, quantize_nf4

from conftest import DEVICE_BACKENDS, HAS_CUDA

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

import bnb_oracle  # noqa: E402  (needs bitsandbytes)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape [out, in], blocksize): numel a multiple of the blocksize or not, odd numel, in % blocksize != 0 (blocks
# cross rows), a single partial block, every block size bitsandbytes accepts, and > 256 blocks (several
# second-level blocks of the double quantization, the last one partial).
CASES = [
    ((8, 64), 64),
    ((7, 9), 64),  # odd numel, one partial block
    ((5, 100), 64),  # blocks cross rows, partial last block
    ((3, 331), 32),  # odd numel
    ((64, 300), 32),  # 600 blocks -> 3 nested blocks
    ((16, 96), 128),
    ((9, 300), 256),
    ((4, 1000), 512),
    ((3, 700), 1024),
    ((2, 2500), 2048),
    ((3, 3000), 4096),  # 2 full blocks + a partial one
]


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes' CPU fallbacks (e.g. dequantize_4bit with an odd last dimension) are wrapped in torch.compile,
    which costs seconds per new shape. Dynamo is disabled for this module only: the patch restores the setting."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype, seed, scale=1.0):
    """Fresh random weights, never zeros; a per-row scale spread so blocks have different absmax."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    w *= torch.exp(torch.randn(shape[0], 1, generator=gen, dtype=torch.float64)) * scale
    return w.to(dtype)


def _assert_bits_equal(out, ref, name=""):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (
        f"{name}: {out.dtype} {tuple(out.shape)} vs {ref.dtype} {tuple(ref.shape)}")
    same = out.view(torch.uint8) if out.dtype == torch.uint8 else out.contiguous().view(-1).view(torch.uint8)
    want = ref.view(torch.uint8) if ref.dtype == torch.uint8 else ref.contiguous().view(-1).view(torch.uint8)
    bad = (same != want).sum().item()
    assert bad == 0, f"{name}: {bad} differing bytes"


# ------------------------------------------------------------------------------------------------------------------
# tables


def test_code_tables_match_bitsandbytes():
    _assert_bits_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"), "NF4 table")
    _assert_bits_equal(dynamic_map(), F.create_dynamic_map(), "dynamic map")


def test_bitsandbytes_cpu_dequantize_row_indexing():
    """The upstream bug that bnb_oracle.py works around, shown where this bitsandbytes has it, and fused-lora right
    either way. W [16, 96] at blocksize 64: blocks cross rows, so the format's flat block numbering and the per-row
    numbering of bitsandbytes' AVX-512 CPU kernel pick different absmax values. Each is computed here from its
    definition (codes decoded from the packed bytes, one fp32 product); bitsandbytes' 2-D dequantize_4bit must equal
    one of them exactly, and fused-lora (quantized by itself or read from bitsandbytes' bytes) the format's."""
    rows, cols, blocksize = 16, 96, 64
    w = _weight((rows, cols), torch.float32, seed=3)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    flat = torch.arange(rows * cols)
    byte = packed.reshape(-1)[flat // 2].long()
    codes = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    row, col = flat // cols, flat % cols
    by_format = (NF4_CODE[codes] * qs.absmax[flat // blocksize]).reshape(rows, cols)
    by_row = (NF4_CODE[codes] * qs.absmax[row * (cols // blocksize) + col // blocksize]).reshape(rows, cols)
    assert (by_format - by_row).abs().max() > 0.5  # the data tells the two indexings apart
    assert (by_format - w).abs().max() <= 0.5 * (1 - 0.7229568) * w.abs().max()  # half the widest NF4 level gap

    _assert_bits_equal(quantize_nf4(w, blocksize=blocksize, double_quant=False).dequantize(), by_format, "ours")
    _assert_bits_equal(NF4Weight.from_bnb((packed, qs)).dequantize(torch.float32), by_format, "ours from bnb")
    _assert_bits_equal(bnb_oracle.dequantize(packed, qs), by_format, "bitsandbytes through a flat state")
    theirs = F.dequantize_4bit(packed, qs)
    if not torch.equal(theirs, by_format):
        _assert_bits_equal(theirs, by_row, "bitsandbytes' 2-D dequantize, neither the format nor the known bug")
        with bnb_oracle.format_exact_cpu_dequantize():
            _assert_bits_equal(F.dequantize_4bit(packed, qs), by_format, "format_exact_cpu_dequantize")
        _assert_bits_equal(F.dequantize_4bit(packed, qs), by_row, "bitsandbytes' own kernel restored")


# ------------------------------------------------------------------------------------------------------------------
# quantization: bytes and statistics; dequantization on the torch path


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_quantize_and_dequantize_match_bitsandbytes(shape, blocksize, dtype, double_quant):
    w = _weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)

    assert ours.shape == shape and ours.dtype == dtype and ours.blocksize == blocksize
    assert ours.nested == double_quant
    _assert_bits_equal(ours.data, packed, "packed data")
    if double_quant:
        _assert_bits_equal(ours.qabsmax, qs.absmax, "qabsmax")
        _assert_bits_equal(ours.absmax2, qs.state2.absmax, "absmax2")
        _assert_bits_equal(ours.code2, qs.state2.code, "code2")
        _assert_bits_equal(ours.offset, qs.offset, "offset")
        assert ours.nested_blocksize == qs.state2.blocksize == 256
    else:
        _assert_bits_equal(ours.absmax, qs.absmax, "absmax")
    _assert_bits_equal(ours.code, qs.code, "code")

    for out_dtype in DTYPES:
        with use_backend("torch"):
            got = ours.dequantize(out_dtype)
        _assert_bits_equal(got, bnb_oracle.dequantize(packed, qs, out_dtype), f"dequantize -> {out_dtype}")
    assert ours.dequantize().dtype == dtype  # default: the original dtype


def test_double_quant_uses_bitsandbytes_lookup_table_rounding():
    """bitsandbytes' CPU 8-bit quantizer rounds through a 65536-bin lookup table, not to the nearest code; check
    that this data exercises the difference (else the test would be vacuous), then that we follow bitsandbytes."""
    w = _weight((256, 512), torch.bfloat16, seed=3, scale=0.02)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    # nearest-code rounding of the same centred absmax values
    absmax = w.float().reshape(-1, 64).abs().amax(1)
    y = (absmax - absmax.mean()).view(-1, 256)
    x = y / y.abs().amax(1, keepdim=True)
    nearest = (x.reshape(-1, 1) - qs.state2.code[None, :]).abs().argmin(1).to(torch.uint8)
    assert (nearest != qs.absmax).any(), "no value near a midpoint: the lookup-table rounding is not exercised"
    _assert_bits_equal(ours.qabsmax, qs.absmax, "qabsmax")
    _assert_bits_equal(ours.absmax2, qs.state2.absmax, "absmax2")
    _assert_bits_equal(ours.dequantize(), bnb_oracle.dequantize(packed, qs), "dequantize")


def test_ties_go_to_the_lower_code():
    """Values exactly on a midpoint between two NF4 codes (absmax 1, so they are not rescaled) take the lower code."""
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.zeros(2, 64)
    w[:, 0] = torch.tensor([1.0, -1.0])
    w[:, 1:16] = mids
    w[:, 16:31] = -mids
    w[:, 31:] = _weight((2, 33), torch.float32, seed=8) * 0.01
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    _assert_bits_equal(ours.data, packed, "packed data")
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], 1).view(2, 64)
    assert torch.equal(codes[0, 1:16].long(), torch.arange(15)), "the tie did not go to the lower code"


def _division_sensitive_pair():
    """(absmax, w) in fp32 for which ``w / absmax`` and ``w * (1 / absmax)`` fall on different sides of an NF4
    midpoint: the element's code tells which of the two a quantizer computed."""
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    am = torch.rand(2048, generator=torch.Generator().manual_seed(9)) + 0.5
    w = (mids[None, :].double() * am[:, None].double()).float()
    c_div = torch.bucketize((w / am[:, None]).clamp(-1, 1), mids)
    c_mul = torch.bucketize((w * torch.reciprocal(am)[:, None]).clamp(-1, 1), mids)
    hits = (c_div != c_mul).nonzero()
    assert len(hits), "no division-sensitive value found"
    i, j = hits[0].tolist()
    return am[i].item(), w[i, j].item(), c_div[i, j].item(), c_mul[i, j].item()


def test_full_blocks_multiply_by_the_reciprocal_and_the_partial_block_divides():
    """bitsandbytes scales full blocks by ``w * (1 / absmax)`` and the trailing partial block by ``w / absmax``;
    an element whose code depends on that choice sits in both kinds of block here."""
    am, value, code_div, code_mul = _division_sensitive_pair()
    w = _weight((1, 72), torch.float32, seed=10) * (0.1 * am)  # block 0: elements 0..63, partial block: 64..71
    w[0, 0] = w[0, 64] = am
    w[0, 1] = w[0, 65] = value
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], 1).view(-1)
    assert (codes[1].item(), codes[65].item()) == (code_mul, code_div)  # the rule this test pins down
    ours = quantize_nf4(w, double_quant=False)
    _assert_bits_equal(ours.data, packed, "packed data")
    _assert_bits_equal(ours.absmax, qs.absmax, "absmax")


def test_blockwise_8bit_quantizer_matches_bitsandbytes_cpu_kernel():
    """The second-level quantizer against bitsandbytes' C++ CPU kernel on many values (the lookup-table rounding
    differs from nearest-code rounding for about 0.4% of them: checked, so the test is not vacuous)."""
    from fused_lora.nf4 import _quantize_blockwise_8bit

    gen = torch.Generator().manual_seed(4)
    y = torch.randn(1 << 18, generator=gen) * torch.rand(1 << 18, generator=gen)
    y[256:512] = 0.0  # an all-zero block
    ref, ref_state = F.quantize_blockwise(y, blocksize=256)
    q, absmax = _quantize_blockwise_8bit(y, dynamic_map(), 256)
    _assert_bits_equal(q, ref, "codes")
    _assert_bits_equal(absmax, ref_state.absmax, "absmax")
    x = (y.view(-1, 256) * torch.reciprocal(absmax)[:, None]).nan_to_num(0.0).clamp(-1, 1).view(-1)
    code = dynamic_map()
    nearest = torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert (nearest != ref).float().mean().item() > 1e-3


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_blocks(double_quant):
    """A full all-zero block and an all-zero trailing partial block (whose stored absmax is bitsandbytes' 1e-38
    clamp): statistics and every other byte identical, dequantized values identical (and zero in those blocks)."""
    shape, bs = (6, 70), 64  # 420 elements: 6 full blocks + a partial block of 36
    w = _weight(shape, torch.float32, seed=5)
    flat = w.view(-1)
    flat[64:128] = 0.0  # block 1
    flat[384:] = 0.0  # the partial block
    packed, qs = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
    if double_quant:
        _assert_bits_equal(ours.qabsmax, qs.absmax, "qabsmax")
        _assert_bits_equal(ours.absmax2, qs.state2.absmax, "absmax2")
        _assert_bits_equal(ours.offset, qs.offset, "offset")
    else:
        _assert_bits_equal(ours.absmax, qs.absmax, "absmax")
        assert ours.absmax[1] == 0 and ours.absmax[-1] > 0  # the partial block's absmax is clamped
    outside = torch.ones(packed.numel(), dtype=torch.bool)
    outside[32:64] = False
    outside[192:] = False
    assert torch.equal(ours.data.view(-1)[outside], packed.view(-1)[outside])
    for out_dtype in DTYPES:
        got = ours.dequantize(out_dtype)
        _assert_bits_equal(got, bnb_oracle.dequantize(packed, qs, out_dtype), f"dequantize -> {out_dtype}")
        assert (got.view(-1)[64:128] == 0).all() and (got.view(-1)[384:] == 0).all()


def test_double_quant_with_constant_absmax():
    """Every block has absmax 1: absmax - offset is all zero, so the 8-bit quantizer sees all-zero blocks."""
    w = _weight((12, 64), torch.float32, seed=6) * 0.1
    w[:, 0] = torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0)  # one +-1 per block of 64 (one block per row)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert float(qs.offset) == 1.0 and (qs.state2.absmax == 0).all()
    _assert_bits_equal(ours.offset, qs.offset, "offset")
    _assert_bits_equal(ours.absmax2, qs.state2.absmax, "absmax2")
    _assert_bits_equal(ours.data, packed, "packed data")
    _assert_bits_equal(ours.absmax_fp32(), torch.ones(12), "decoded absmax")
    _assert_bits_equal(ours.dequantize(), bnb_oracle.dequantize(packed, qs), "dequantize")


def test_absmax_fp32_matches_bitsandbytes_decode():
    w = _weight((64, 300), torch.bfloat16, seed=7)
    packed, qs = F.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, blocksize=32)
    ref = F.dequantize_blockwise(qs.absmax, qs.state2)
    ref += qs.offset
    _assert_bits_equal(ours.absmax_fp32(), ref, "decoded absmax")


# ------------------------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU tensors, compiled on CUDA)

TRITON_BACKENDS = [db for db in DEVICE_BACKENDS if db[1] == "triton"]
TRITON_CASES = [((7, 9), 64), ((5, 100), 64), ((19, 70), 32), ((64, 40), 32), ((3, 300), 256)]


@pytest.mark.gpu_check
@pytest.mark.skipif(not TRITON_BACKENDS, reason="no Triton backend here (neither CUDA nor the interpreter)")
@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", TRITON_CASES)
def test_triton_dequantize_matches_bitsandbytes(device, backend, shape, blocksize, double_quant, monkeypatch):
    from fused_lora.kernels import nf4 as nf4_kernels

    calls = []
    launch = nf4_kernels.nf4_dequantize
    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", lambda *a, **k: calls.append(1) or launch(*a, **k))

    w = _weight(shape, torch.bfloat16, seed=11)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w.to(device), blocksize=blocksize, double_quant=double_quant)
    for out_dtype in DTYPES:
        ref = bnb_oracle.dequantize(packed, qs, out_dtype)
        with use_backend(backend):
            got = ours.dequantize(out_dtype).cpu()
        _assert_bits_equal(got, ref, f"triton -> {out_dtype}")
    assert len(calls) == len(DTYPES), "the Triton kernel did not run"
    # a strided output: W^T written through a transposed view, no copy
    buf = torch.full((shape[1], shape[0]), float("nan"), device=device)
    with use_backend(backend):
        ours.dequantize(torch.float32, out=buf.t())
    _assert_bits_equal(buf.t().cpu(), bnb_oracle.dequantize(packed, qs, torch.float32), "transposed out")


@pytest.mark.gpu_check
@pytest.mark.skipif(not TRITON_BACKENDS, reason="no Triton backend here (neither CUDA nor the interpreter)")
@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
def test_triton_dequantize_int64_indexing(device, backend):
    """The 64-bit index path (weights of 2**31+ elements) computes the same values as the 32-bit one."""
    from fused_lora.kernels.nf4 import nf4_dequantize

    w = _weight((19, 70), torch.float32, seed=12)
    packed, qs = F.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w.to(device), blocksize=32)
    got = nf4_dequantize(ours.data, ours.code, ours.qabsmax, ours.shape, 32, torch.float32, absmax2=ours.absmax2,
                         code2=ours.code2, offset=ours.offset, index_64=True)
    _assert_bits_equal(got.cpu(), bnb_oracle.dequantize(packed, qs, torch.float32), "int64 indexing")


def test_triton_backend_is_not_used_under_torch(monkeypatch):
    import fused_lora.kernels.nf4 as nf4_kernels

    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", lambda *a, **k: pytest.fail("kernel launched"))
    with use_backend("torch"):
        quantize_nf4(_weight((4, 64), torch.float32, seed=13)).dequantize()


_PTX_CHECK = r"""
import re
from benchmarks import aot
launcher = aot._launcher_by_name("_nf4_dequant_kernel")
for capture in aot._capture_nf4():
    for target in (80, 90):
        ptx = aot.compile_capture(capture, dict(capture.args), launcher.configs["half"][0], target).asm["ptx"]
        print(capture.variant + "/" + capture.dtype, target, len(re.findall(r"\bfma\.rn\.f32", ptx)),
              len(re.findall(r"\bmul\.rn\.f32", ptx)), len(re.findall(r"\badd\.rn\.f32", ptx)),
              len(re.findall(r"\bcvt\.rn\.bf16(?:x2)?\.f32", ptx)))
"""


@pytest.mark.aot
def test_compiled_kernel_keeps_the_nested_roundings_separate():
    """The interpreter cannot show FMA contraction: compile the dequant kernel for sm_80 / sm_90 (no GPU needed) and
    check that the nested absmax decode is a rounded multiply then a rounded add (no fma), and that the bf16 output
    conversion rounds to nearest even."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/aot.py: run from the root
    proc = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == 6, proc.stdout  # nested bf16, plain bf16, nested fp32 x (sm_80, sm_90)
    for variant, target, fma, mul, add, cvt in rows:
        assert int(fma) == 0, f"{variant} sm_{target}: {fma} fma.rn.f32 in the PTX"
        if variant.endswith("bfloat16"):
            assert int(cvt) > 0, f"{variant} sm_{target}: no round-to-nearest bf16 conversion"
        if variant.startswith("nested"):
            assert int(add) > 0 and int(mul) >= 2 * int(add), f"sm_{target}: mul.rn {mul}, add.rn {add}"


@pytest.mark.gpu_check
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_quantize_matches_cpu_bytes(dtype):
    """Quantizing on the GPU gives bitsandbytes' CPU bytes (double-quant statistics are computed on the CPU)."""
    w = _weight((96, 200), dtype, seed=14)
    cpu, gpu = quantize_nf4(w), quantize_nf4(w.cuda())
    assert gpu.device.type == "cuda"
    for name in ("data", "qabsmax", "absmax2", "code2", "offset", "code"):
        _assert_bits_equal(getattr(gpu, name).cpu(), getattr(cpu, name), name)


# ------------------------------------------------------------------------------------------------------------------
# NF4Weight API


def test_weight_api_nbytes_repr_and_moves():
    shape = (64, 300)
    w = quantize_nf4(_weight(shape, torch.bfloat16, seed=15), blocksize=32)
    n = shape[0] * shape[1]
    n_blocks = n // 32
    expected = n // 2 + n_blocks + 4 * -(-n_blocks // 256) + 4 * 256 + 4 + 4 * 16
    assert w.nbytes == expected
    text = repr(w)
    assert "(64, 300)" in text and "bfloat16" in text and "blocksize=32" in text and "double-quant" in text
    assert w.to("cpu") is w and w.cpu() is w
    plain = quantize_nf4(_weight(shape, torch.float32, seed=15), double_quant=False)
    assert plain.nbytes == n // 2 + 4 * (-(-n // 64)) + 4 * 16
    if HAS_CUDA:
        g = w.cuda()
        assert g.device.type == "cuda" and all(t.is_cuda for t in g._tensors().values())
        _assert_bits_equal(g.dequantize().cpu(), w.dequantize(), "cuda dequantize")


def test_weight_validation():
    w = quantize_nf4(_weight((8, 64), torch.float32, seed=16))
    with pytest.raises(ValueError, match="data must be"):
        NF4Weight(data=w.data[:-1], blocksize=64, shape=(8, 64), dtype=torch.float32, code=w.code,
                  qabsmax=w.qabsmax, absmax2=w.absmax2, code2=w.code2, offset=w.offset)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight(data=w.data, blocksize=48, shape=(8, 64), dtype=torch.float32, code=w.code, absmax=w.absmax_fp32())
    with pytest.raises(ValueError, match="qabsmax is missing"):
        NF4Weight(data=w.data, blocksize=64, shape=(8, 64), dtype=torch.float32, code=w.code, absmax=w.absmax_fp32(),
                  absmax2=w.absmax2)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(_weight((8, 64), torch.float32, seed=16), blocksize=16)
    with pytest.raises(ValueError, match="float32 / float16 / bfloat16"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(_weight((8, 64), torch.float32, seed=16).view(-1))
    with pytest.raises(ValueError, match="dequantizes to"):
        w.dequantize(torch.float64)
    assert set(BLOCKSIZES) == {32, 64, 128, 256, 512, 1024, 2048, 4096}


# ------------------------------------------------------------------------------------------------------------------
# bitsandbytes interop


def _bnb_linear(shape, dtype, double_quant=True, blocksize=64, seed=20, quant_type="nf4", quant_storage=torch.uint8):
    """A bitsandbytes Linear4bit quantized on the CPU (moving an unquantized Params4bit to a device quantizes it)."""
    lin = bnb.nn.Linear4bit(shape[1], shape[0], bias=True, compress_statistics=double_quant, quant_type=quant_type,
                            quant_storage=quant_storage)
    lin.weight = bnb.nn.Params4bit(_weight(shape, dtype, seed), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=double_quant, quant_type=quant_type,
                                   quant_storage=quant_storage, module=lin)
    lin = lin.to("cpu")
    assert lin.weight.bnb_quantized and lin.weight.quant_state.quant_type == quant_type
    return lin


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kind", ["params", "linear", "pair"])
def test_from_bnb(kind, double_quant):
    lin = _bnb_linear((32, 100), torch.bfloat16, double_quant, blocksize=64)
    param = lin.weight
    obj = {"params": param, "linear": lin, "pair": (param.data, param.quant_state)}[kind]
    ours = NF4Weight.from_bnb(obj)
    assert ours.data.data_ptr() == param.data.data_ptr()  # shared, not re-quantized
    assert ours.shape == (32, 100) and ours.dtype == torch.bfloat16 and ours.nested == double_quant
    for out_dtype in DTYPES:
        _assert_bits_equal(ours.dequantize(out_dtype), bnb_oracle.dequantize(param.data, param.quant_state, out_dtype),
                           f"from_bnb -> {out_dtype}")


def test_from_bnb_reads_arbitrary_states_without_requantizing():
    """Random codes and statistics (no weight quantizes to them): only a verbatim reader reproduces bitsandbytes."""
    shape, bs = (24, 40), 32
    n, gen = 24 * 40, torch.Generator().manual_seed(21)
    n_blocks = n // bs
    packed = torch.randint(0, 256, (n // 2, 1), generator=gen, dtype=torch.uint8)
    state2 = F.QuantState(absmax=torch.rand(1, generator=gen) + 0.5, code=F.create_dynamic_map(), blocksize=256,
                          dtype=torch.float32)
    qs = F.QuantState(absmax=torch.randint(0, 256, (n_blocks,), generator=gen, dtype=torch.uint8), shape=shape,
                      code=F.get_4bit_type("nf4", device="cpu"), blocksize=bs, quant_type="nf4",
                      dtype=torch.float16, offset=torch.rand((), generator=gen), state2=state2)
    ours = NF4Weight.from_bnb((packed, qs))
    for out_dtype in DTYPES:
        _assert_bits_equal(ours.dequantize(out_dtype), bnb_oracle.dequantize(packed, qs, out_dtype), str(out_dtype))
    # bitsandbytes' legacy transposed packing ([1, k]): same bytes; dequantize_4bit then returns W^T
    legacy = NF4Weight.from_bnb((packed.t(), qs))
    _assert_bits_equal(legacy.dequantize(torch.float32).t(), bnb_oracle.dequantize(packed.t(), qs, torch.float32),
                       "legacy")


def test_from_bnb_non_uint8_storage():
    lin = _bnb_linear((16, 64), torch.float16, blocksize=64, quant_storage=torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16
    ours = NF4Weight.from_bnb(lin)
    assert ours.data.dtype == torch.uint8
    _assert_bits_equal(ours.dequantize(), bnb_oracle.dequantize(lin.weight.data, lin.weight.quant_state), "dequantize")


def test_bnb_state_dict_to_ours():
    model = torch.nn.Sequential(_bnb_linear((48, 72), torch.bfloat16, blocksize=64))
    sd = model.state_dict()
    ours = NF4Weight.from_state_dict(sd, prefix="0.")
    param = model[0].weight
    _assert_bits_equal(ours.data, param.data, "packed data")
    _assert_bits_equal(ours.code2, sd["0.weight.nested_quant_map"], "code2")
    for out_dtype in DTYPES:
        _assert_bits_equal(ours.dequantize(out_dtype), bnb_oracle.dequantize(param.data, param.quant_state, out_dtype),
                           f"from_state_dict -> {out_dtype}")


def test_nested_map_is_read_from_the_checkpoint():
    """A checkpoint's nested map is used as stored (bitsandbytes does the same), not recomputed."""
    lin = _bnb_linear((16, 64), torch.float32, blocksize=32)
    sd = lin.state_dict()
    sd["weight.nested_quant_map"] = sd["weight.nested_quant_map"] * 0.5
    ours = NF4Weight.from_state_dict(sd)
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], {k: v for k, v in sd.items() if k.startswith("weight.")},
                                            device="cpu")
    _assert_bits_equal(ours.dequantize(), bnb_oracle.dequantize(p.data, p.quant_state), "custom nested map")
    assert not torch.equal(ours.dequantize(), bnb_oracle.dequantize(lin.weight.data, lin.weight.quant_state))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_to_state_dict_is_bitsandbytes_format(dtype, double_quant):
    """to_state_dict writes exactly the keys, order and values bitsandbytes' Linear4bit writes, and bitsandbytes'
    loader (Params4bit.from_prequantized, used by transformers) reads them back losslessly."""
    shape = (32, 130)
    lin = _bnb_linear(shape, dtype, double_quant, blocksize=64, seed=22)
    theirs = {k: v for k, v in lin.state_dict(prefix="layer.").items() if k != "layer.bias"}
    ours_w = quantize_nf4(_weight(shape, dtype, seed=22), blocksize=64, double_quant=double_quant)
    ours = ours_w.to_state_dict(prefix="layer.")
    assert list(ours) == list(theirs)
    for key in ours:
        _assert_bits_equal(ours[key], theirs[key], key)
    meta = json.loads(bytes(ours["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == list(shape)

    # bitsandbytes reads ours back (Linear4bit.load_state_dict itself ignores the quant-state keys in 0.50)
    loaded = bnb.nn.Params4bit.from_prequantized(
        ours["layer.weight"], {k[len("layer."):]: v for k, v in ours.items() if k.startswith("layer.weight.")},
        device="cpu")
    fresh = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, quant_type="nf4", compress_statistics=double_quant)
    fresh.weight = loaded
    fresh_sd = fresh.state_dict(prefix="layer.")
    assert list(fresh_sd) == list(ours)
    for key in ours:
        _assert_bits_equal(fresh_sd[key], ours[key], f"reloaded {key}")
    for out_dtype in DTYPES:
        _assert_bits_equal(bnb_oracle.dequantize(loaded.data, loaded.quant_state, out_dtype),
                           ours_w.dequantize(out_dtype), f"bitsandbytes reading ours -> {out_dtype}")

    # and our own round trip
    back = NF4Weight.from_state_dict(ours, prefix="layer.")
    for name, t in ours_w._tensors().items():
        _assert_bits_equal(getattr(back, name), t, name)
    assert (back.shape, back.dtype, back.blocksize, back.nested) == (shape, dtype, 64, double_quant)


# ------------------------------------------------------------------------------------------------------------------
# unsupported states


def test_fp4_is_refused():
    lin = _bnb_linear((16, 64), torch.float16, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        NF4Weight.from_bnb(lin)
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        NF4Weight.from_bnb((lin.weight.data, lin.weight.quant_state))
    with pytest.raises(ValueError, match="bitsandbytes__fp4"):
        NF4Weight.from_state_dict(lin.state_dict())


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_inference_repacked_weight_reads_exactly(nested, dtype):
    """bitsandbytes' CPU inference path (Linear4bit.forward in eval without grad, on AVX512-BF16 CPUs) repacks the
    weight in place: nibbles shuffled in tiles of 32 rows, absmax rounded to bf16 and transposed, double
    quantization undone. Read back, the weight is exactly what bitsandbytes computes with from then on: the same
    4-bit codes (taken from the standard layout before the repack) times the bf16-rounded absmax. The repack is
    bitsandbytes' own pure-PyTorch function, so this runs on any CPU."""
    packed, qs = F.quantize_4bit(_weight((96, 128), dtype, seed=23), quant_type="nf4", compress_statistics=nested)
    standard = NF4Weight.from_bnb((packed, qs))
    # the absmax the repack starts from, decoded as bitsandbytes' repack decodes it
    absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if nested else qs.absmax
    expected = NF4Weight(data=standard.data, absmax=absmax.to(torch.bfloat16).float(), blocksize=64,
                         shape=(96, 128), dtype=dtype, code=standard.code)
    repacked, rqs = F._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(qs))
    read = NF4Weight.from_bnb((repacked, rqs))
    assert torch.equal(read.data, standard.data)  # the codes, back in the standard layout
    assert read.dtype == dtype and not read.nested
    assert torch.equal(read.dequantize(torch.float32), expected.dequantize(torch.float32))


def test_unsupported_states_are_refused():
    # not quantized yet
    with pytest.raises(ValueError, match="not quantized yet"):
        NF4Weight.from_bnb(bnb.nn.Params4bit(torch.randn(16, 64), quant_type="nf4"))
    # not a 2-D weight
    packed, qs = F.quantize_4bit(torch.randn(3, 4, 64), quant_type="nf4")
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight.from_bnb((packed, qs))
    # a code table other than NF4's under quant_type "nf4"
    packed, qs = F.quantize_4bit(_weight((8, 64), torch.float32, seed=24), quant_type="nf4")
    qs.code = qs.code * 0.5
    with pytest.raises(ValueError, match="not the NF4 table"):
        NF4Weight.from_bnb((packed, qs))
    # not a bitsandbytes object at all
    with pytest.raises(ValueError, match="from_bnb expects"):
        NF4Weight.from_bnb(torch.randn(4, 4))
    # state dicts without the quant state, or with a key missing
    lin = _bnb_linear((16, 64), torch.float32)
    sd = lin.state_dict()
    with pytest.raises(ValueError, match="no packed quant state"):
        NF4Weight.from_state_dict({"weight": sd["weight"]})
    with pytest.raises(ValueError, match="no 'x.weight'"):
        NF4Weight.from_state_dict(sd, prefix="x.")
    del sd["weight.absmax"]
    with pytest.raises(ValueError, match="missing weight.absmax"):
        NF4Weight.from_state_dict(sd)
