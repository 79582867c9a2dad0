"""Contracts that matter on a GPU and need neither bitsandbytes nor PEFT (the GPU image has neither guaranteed):
fp32 kernels following ``torch.backends.cuda.matmul.allow_tf32`` (tf32 and ieee), the torch path's dropout mask on
CUDA equal to the CPU hash, NF4 quantization on the device giving the CPU bytes, NF4 dequantization bit-exact
against the format's definition (evaluated here from the bytes, without bitsandbytes), and NF4 linears in fp32 and
fp16 on both kernel paths against a float64 reference.

Most parametrizations exist only where CUDA does (on a CPU-only machine pytest reports them as an empty parameter
set); the NF4 definition test also runs on the CPU (torch path, and the kernel in the Triton interpreter). All are
marked ``gpu_check``: ``make gpu-check`` runs their CUDA parametrizations.
"""

from __future__ import annotations

import pytest
import torch

from fused_lora import use_backend
from fused_lora.dropout import Dropout
from fused_lora.nf4 import NF4_CODE_VALUES, NF4Weight, dynamic_map, quantize_nf4

from conftest import DEVICE_BACKENDS
from helpers import (
    FP32_RTOL,
    assert_close_fp32,
    assert_three_way,
    fused_fn,
    lora_reference,
    make_inputs,
    outputs_and_grads,
)

CUDA_TRITON = [db for db in DEVICE_BACKENDS if db == ("cuda", "triton")]
CUDA_BACKENDS = [db for db in DEVICE_BACKENDS if db[0] == "cuda"]
CUDA = sorted({device for device, _ in CUDA_BACKENDS})



def _reference(scaling, p, seed, dtype=None):
    def fn(x, weight, lora_A, lora_B, bias):
        keep = None
        if p > 0:
            keep = Dropout(p, seed).keep_mask(x.shape[0], x.shape[1], "cpu").to(x.device)  # the CPU hash
        return lora_reference(x, weight, lora_A, lora_B, bias, scaling, keep, p, dtype=dtype)

    return fn


def _launch_families(monkeypatch):
    """Record the configuration family of every Triton launch (which operand kind the kernels compiled for)."""
    from fused_lora.kernels._launch import Launcher

    seen = []
    launch = Launcher.__call__

    def spy(self, grid, family, cfg=None, **args):
        seen.append((self.name, family))
        return launch(self, grid, family, cfg, **args)

    monkeypatch.setattr(Launcher, "__call__", spy)
    return seen


# tf32: inputs rounded to a 10-bit mantissa (at most 2**-10 relative, truncation included) before an fp32
# accumulation. The error bound is torch's own tf32 error (cuBLAS, same rounding) doubled, or, where cuBLAS took an
# exact fp32 kernel for a small shape, 2**-9 of the largest magnitude: about five times the largest rounding error
# expected at these sizes (K <= 257 terms of O(1 / sqrt(K))), far below a wrong mask, index or scale (>= 1e-2).
TF32_RTOL = 2.0**-9


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", CUDA_TRITON)
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("M,K,N,r", [(37, 257, 100, 16), (9, 41, 341, 64), (130, 96, 80, 8)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_kernels_follow_allow_tf32(monkeypatch, device, backend, precision, M, K, N, r, p):
    """fp32 on CUDA: ``allow_tf32`` off runs the exact-fp32 ("ieee") configurations, held to fp32 rounding against
    float64; on, the tf32 tensor-core ones, held to tf32 rounding. Outputs and every gradient."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    families = _launch_families(monkeypatch)
    inp = make_inputs(M, K, N, r, torch.float32, device)
    grad = inp.pop("grad")
    out = outputs_and_grads(fused_fn(backend, 1.7, p, seed=11), inp, grad)
    assert families and {family for _, family in families} == {precision}, families
    ref = outputs_and_grads(_reference(1.7, p, seed=11), {k: v.double() for k, v in inp.items()}, grad.double())
    baseline = outputs_and_grads(_reference(1.7, p, seed=11, dtype=torch.float32), inp, grad)
    assert set(out) == set(ref) == {"y", "x", "lora_A", "lora_B", "bias"}
    for name in out:
        assert out[name].dtype == torch.float32
        if precision == "ieee":
            assert_close_fp32(out[name], ref[name], name)
        else:
            _assert_tf32_close(out[name], baseline[name], ref[name], name)


def _assert_tf32_close(out, baseline, ref, name):
    ref64 = ref.double().cpu()
    err = (out.double().cpu() - ref64).abs().max().item()
    base_err = (baseline.double().cpu() - ref64).abs().max().item()
    bound = max(2 * base_err, TF32_RTOL * ref64.abs().max().item())
    assert err <= bound, f"{name}: tf32 error {err:.3e} > {bound:.3e} (torch's tf32 error {base_err:.3e})"


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("rows,cols,row_start,seed", [(37, 100, 0, 1234), (5, 33, 1 << 30, -5), (1, 1, 7, 0)])
def test_torch_mask_on_device_equals_cpu_hash(device, rows, cols, row_start, seed):
    """The torch path's dropout mask computed on the GPU is the CPU's, bit for bit (the kernels' masks are checked
    against the CPU in tests/test_dropout.py): the same seed drops the same elements on every device."""
    d = Dropout(0.3, seed)
    cpu = d.keep_mask(rows, cols, "cpu", row_start=row_start)
    gpu = d.keep_mask(rows, cols, device, row_start=row_start)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


def _random_weight(shape, blocksize, nested, seed):
    """An NF4 weight of random bytes and statistics (no weight quantizes to them): only a decoder that follows the
    format exactly reproduces the definition."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    n = rows * cols
    n_blocks = -(-n // blocksize)
    data = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=gen)
    common = dict(data=data, blocksize=blocksize, shape=shape, dtype=torch.float32,
                  code=torch.tensor(NF4_CODE_VALUES, dtype=torch.float32))
    if not nested:
        return NF4Weight(absmax=torch.rand(n_blocks, generator=gen) * 3 + 0.01, **common)
    return NF4Weight(qabsmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=gen),
                     absmax2=torch.rand(-(-n_blocks // 256), generator=gen) * 0.1 + 1e-3, code2=dynamic_map(),
                     offset=torch.tensor(0.37), **common)


def _by_definition(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The format's definition (fused_lora/nf4.py) evaluated on the CPU from the stored tensors, one IEEE fp32
    operation at a time: element i = T(code[nibble(i)] * A[i // blocksize]), high nibble first; A the absmax, or
    nested f32(f32(code2[qabsmax[b]] * absmax2[b // nested_blocksize]) + offset)."""
    rows, cols = w.shape
    i = torch.arange(rows * cols)
    byte = w.data.cpu().reshape(-1).long()[i // 2]
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 0xF)
    if w.nested:
        b = torch.arange(w.n_blocks)
        scaled = w.code2.cpu()[w.qabsmax.cpu().long()] * w.absmax2.cpu()[b // w.nested_blocksize]
        absmax = scaled + w.offset.cpu()  # a separate rounding: eager CPU ops never fuse a multiply and an add
    else:
        absmax = w.absmax.cpu()
    values = w.code.cpu()[nibble] * absmax[i // w.blocksize]
    return values.reshape(rows, cols).to(dtype)


def _assert_bits_equal(out, ref, name):
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    bad = (out.contiguous().view(-1).view(torch.uint8) != ref.contiguous().view(-1).view(torch.uint8)).sum().item()
    assert bad == 0, f"{name}: {bad} differing bytes"


# (shape [out, in], blocksize): odd numel with one partial block, blocks crossing rows, > 256 blocks (several
# nested blocks, the last partial), the largest blocksize with a partial block.
NF4_CASES = [((7, 9), 64), ((5, 100), 64), ((64, 300), 32), ((3, 3000), 4096)]


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape,blocksize", NF4_CASES)
def test_nf4_dequantize_follows_the_format_definition(device, backend, nested, shape, blocksize):
    """NF4 dequantization (the Triton kernel, or the torch path) on every device, bit for bit against the format's
    definition evaluated on the CPU, for random bytes and statistics, in fp32, fp16 and bf16; also into a
    transposed output (kernel)."""
    w = _random_weight(shape, blocksize, nested, seed=blocksize + shape[0]).to(device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with use_backend(backend):
            got = w.dequantize(dtype)
        assert got.device.type == torch.device(device).type
        _assert_bits_equal(got.cpu(), _by_definition(w, dtype), f"{backend} on {device} -> {dtype}")
    if backend == "triton":
        buf = torch.full((shape[1], shape[0]), float("nan"), device=device)
        w.dequantize_triton(torch.float32, out=buf.t())
        _assert_bits_equal(buf.t().cpu(), _by_definition(w, torch.float32), "transposed out")


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_quantize_on_device_gives_cpu_bytes(device, dtype):
    """quantize_nf4 on the GPU writes the CPU's bytes and statistics (the double-quantization statistics are
    computed on the CPU), and they decode to the definition's values."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(48, 200, generator=gen, dtype=torch.float64)
         * torch.exp(torch.randn(48, 1, generator=gen, dtype=torch.float64))).to(dtype)
    cpu, gpu = quantize_nf4(w), quantize_nf4(w.to(device))
    assert gpu.device.type == "cuda"
    for name, t in cpu._tensors().items():
        _assert_bits_equal(getattr(gpu, name).cpu(), t, name)
    _assert_bits_equal(gpu.dequantize(dtype).cpu(), _by_definition(cpu, dtype), "dequantize")


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", CUDA_TRITON)
@pytest.mark.parametrize("kind", ["fp32-ieee", "fp32-tf32", "fp16"])
@pytest.mark.parametrize("path", ["nf4-fused", "nf4-buffer"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_nf4_linear_without_bitsandbytes(monkeypatch, device, backend, kind, path, p):
    """An NF4 base quantized by fused_lora itself, both kernel paths (W dequantized inside the GEMMs, or into a
    buffer first: chosen here by lowering NF4_FUSED_MAX_TOKENS below M), against float64 on the dequantized weight:
    fp32 to fp32 rounding (ieee) or tf32 rounding (``allow_tf32``), fp16 by the three-way rule. (bf16:
    tests/test_functional.py's every-variant test.)"""
    from fused_lora.kernels import lora

    dtype = torch.float16 if kind == "fp16" else torch.float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", kind == "fp32-tf32")
    monkeypatch.setattr(lora, "NF4_FUSED_MAX_TOKENS", 64 if path == "nf4-fused" else 16)
    families = _launch_families(monkeypatch)
    inp = make_inputs(37, 100, 72, 16, dtype, device)
    grad = inp.pop("grad")
    weight = quantize_nf4(inp.pop("weight"))
    dense = weight.dequantize_torch(dtype)

    def run(fn, leaves_dtype=None, w=weight):
        leaves = inp if leaves_dtype is None else {k: v.to(leaves_dtype) for k, v in inp.items()}
        g = grad if leaves_dtype is None else grad.to(leaves_dtype)
        return outputs_and_grads(lambda **t: fn(weight=w, **t), leaves, g)

    out = run(fused_fn(backend, 1.3, p, seed=9))
    gemms = {family for name, family in families if name in ("_lora_linear_fwd_kernel", "_lora_dgrad_kernel")}
    precision = {"fp32-ieee": "ieee", "fp32-tf32": "tf32", "fp16": "half"}[kind]
    assert gemms == ({f"{precision}-nf4"} if path == "nf4-fused" else {precision}), families
    ref = run(_reference(1.3, p, seed=9), torch.float64, dense.double())
    baseline = run(_reference(1.3, p, seed=9, dtype=dtype), w=dense)
    assert set(out) == {"y", "x", "lora_A", "lora_B", "bias"}
    for name in out:
        assert out[name].dtype == dtype, name
        if kind == "fp32-ieee":
            assert_close_fp32(out[name], ref[name], name, rtol=FP32_RTOL)
        elif kind == "fp32-tf32":
            _assert_tf32_close(out[name], baseline[name], ref[name], name)
        else:
            assert_three_way(out[name], baseline[name], ref[name], name)
