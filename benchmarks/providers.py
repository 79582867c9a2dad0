"""The implementations a benchmark compares, each built with identical weights for one problem."""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from fused_lora import FusedLoraLinear


class NaiveLora(nn.Module):
    """The textbook LoRA module: ``x @ W^T + b + dropout(x) @ A^T @ B^T * s`` in eager PyTorch ops."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base = base
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **factory))
        self.dropout = nn.Dropout(lora_dropout)
        self.scaling = lora_alpha / r

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def _frozen_linear(K, N, dtype, device, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=True, dtype=dtype, device=device)
    return base.requires_grad_(False)


@torch.no_grad()
def _set_adapters(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """The same adapter values for every provider (A uniform like kaiming, B non-zero: the LoRA branch does
    real work)."""
    g = torch.Generator().manual_seed(1)
    r, K = lora_A.shape
    lora_A.copy_((torch.rand(r, K, generator=g) * 2 - 1) / math.sqrt(K))
    lora_B.copy_(torch.randn(lora_B.shape[0], r, generator=g) / math.sqrt(r))


@torch.no_grad()
def _set_magnitude(magnitude: torch.Tensor, K: int, N: int, r: int, dtype) -> None:
    """The same DoRA magnitude for every DoRA provider: ``||W + s B A||_row`` of the dense base weight and the
    adapters of :func:`_set_adapters` (what the magnitude is at creation when B has these values), times a factor
    in [0.9, 1.1] per feature, so that ``c = m / n`` differs from 1 and every DoRA term does work. Computed on the
    CPU from the CPU weight (the same values on every device and for the NF4 providers)."""
    W = _frozen_linear(K, N, dtype, "cpu").weight.float()
    A, B = torch.empty(r, K), torch.empty(N, r)
    _set_adapters(A, B)
    scaling = 2.0  # lora_alpha / r, lora_alpha = 2 r in every provider
    norm = torch.linalg.norm(W + scaling * B @ A, dim=1)
    factor = 0.9 + 0.2 * torch.rand(N, generator=torch.Generator().manual_seed(2))
    magnitude.copy_(norm * factor)


def build_base(K, N, r, p, dtype, device):
    return _frozen_linear(K, N, dtype, device)


def build_fused(K, N, r, p, dtype, device):
    # adapters in the activations' dtype, as the "peft" provider's lora.Linear built directly has them
    layer = FusedLoraLinear.from_linear(_frozen_linear(K, N, dtype, device), r=r, lora_alpha=2 * r, lora_dropout=p,
                                        adapter_dtype=dtype)
    _set_adapters(layer.lora_A, layer.lora_B)
    return layer


def build_peft(K, N, r, p, dtype, device):
    import peft
    from peft.tuners.lora import Linear as PeftLinear

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p)
    layer = PeftLinear(_frozen_linear(K, N, dtype, device), "default", cfg, r=r, lora_alpha=2 * r, lora_dropout=p)
    _set_adapters(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return layer


def build_fused_dora(K, N, r, p, dtype, device):
    """``FusedLoraLinear(use_dora=True)``: PEFT's DoRA in one fused call (the weight norm from the cached
    ``||W_i||^2`` and one thin product, the column scale as the GEMM's epilogue)."""
    layer = FusedLoraLinear.from_linear(_frozen_linear(K, N, dtype, device), r=r, lora_alpha=2 * r, lora_dropout=p,
                                        adapter_dtype=dtype, use_dora=True)
    _set_adapters(layer.lora_A, layer.lora_B)
    _set_magnitude(layer.lora_magnitude_vector, K, N, r, dtype)
    return layer


def build_peft_dora(K, N, r, p, dtype, device):
    """PEFT's own DoRA layer (``lora.Linear`` with ``use_dora=True``: ``B @ A`` materialized for the norm every
    call, and with dropout the base product taken a second time on ``dropout(x)``)."""
    import peft
    from peft.tuners.lora import Linear as PeftLinear

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=True)
    layer = PeftLinear(_frozen_linear(K, N, dtype, device), "default", cfg, r=r, lora_alpha=2 * r, lora_dropout=p)
    _set_adapters(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    _set_magnitude(layer.lora_magnitude_vector["default"].weight, K, N, r, dtype)
    return layer


def build_fused_dora_in_peft(K, N, r, p, dtype, device):
    """``peft-dora`` accelerated by ``fused_lora.from_peft`` (what a PEFT DoRA user gets from the one-line switch)."""
    import fused_lora

    return fused_lora.from_peft(build_peft_dora(K, N, r, p, dtype, device))


def build_fused_in_peft(K, N, r, p, dtype, device):
    """PEFT's own layer accelerated by ``fused_lora.from_peft``: the "peft" provider computed by fused-lora (what
    a PEFT user gets from the one-line switch, including the per-call dispatch)."""
    import fused_lora

    return fused_lora.from_peft(build_peft(K, N, r, p, dtype, device))


def build_naive(K, N, r, p, dtype, device):
    layer = NaiveLora(_frozen_linear(K, N, dtype, device), r, 2 * r, p)
    _set_adapters(layer.lora_A, layer.lora_B)
    return layer


def build_naive_compiled(K, N, r, p, dtype, device):
    return torch.compile(build_naive(K, N, r, p, dtype, device))


def _bnb_linear4bit(K, N, dtype, device):
    """The frozen base as a bitsandbytes NF4 Linear4bit (double quantization: QLoRA's setting), same weights."""
    import bitsandbytes as bnb

    dense = _frozen_linear(K, N, dtype, "cpu")
    lin = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, module=lin)
    lin.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return lin.to(device)  # moving an unquantized Params4bit to a device quantizes it


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def build_fused_nf4(K, N, r, p, dtype, device):
    """``FusedLoraLinear`` on an NF4 base: read from a bitsandbytes ``Linear4bit`` where bitsandbytes imports, else
    quantized by fused_lora's own ``quantize_nf4`` (the same bytes: tests/test_nf4_format.py), e.g. on a GPU image
    without bitsandbytes."""
    if _bnb_available():
        layer = FusedLoraLinear.from_bnb(_bnb_linear4bit(K, N, dtype, device), r=r, lora_alpha=2 * r,
                                         lora_dropout=p, compute_dtype=dtype, adapter_dtype=dtype)
    else:
        layer = FusedLoraLinear.from_linear(_frozen_linear(K, N, dtype, device), r=r, lora_alpha=2 * r,
                                            lora_dropout=p, quantize="nf4", compute_dtype=dtype, adapter_dtype=dtype)
    _set_adapters(layer.lora_A, layer.lora_B)
    return layer


class _DequantizeLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantized from NF4 in forward and again in backward (W frozen: only ``dx``), as
    bitsandbytes' ``MatMul4Bit`` does: nothing of W's size is kept between the two passes."""

    @staticmethod
    def forward(ctx, x, bias, weight, dtype):
        ctx.weight, ctx.dtype = weight, dtype
        return F.linear(x, weight.dequantize_torch(dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        dx = grad @ ctx.weight.dequantize_torch(ctx.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class DequantizeNF4Lora(nn.Module):
    """QLoRA computed the way PEFT on a bitsandbytes ``Linear4bit`` computes it -- dequantize W, a dense matmul, the
    eager LoRA branch ``dropout(x) @ A^T @ B^T * s`` -- with fused_lora's torch dequantization
    (``NF4Weight.dequantize_torch``, a few PyTorch ops) of the same NF4 bytes in place of bitsandbytes' CUDA kernel.
    The baseline of ``fused-nf4`` where bitsandbytes is absent (``make gpu-check``)."""

    def __init__(self, nf4_weight, bias, r: int, lora_alpha: float, lora_dropout: float, dtype: torch.dtype):
        super().__init__()
        self.nf4_weight, self.dtype = nf4_weight, dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        N, K = nf4_weight.shape
        factory = {"dtype": dtype, "device": nf4_weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, K, **factory))
        self.lora_B = nn.Parameter(torch.empty(N, r, **factory))
        self.dropout = nn.Dropout(lora_dropout)
        self.scaling = lora_alpha / r

    def forward(self, x):
        base = _DequantizeLinear.apply(x, self.bias, self.nf4_weight, self.dtype)
        return base + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def build_nf4_dequantize(K, N, r, p, dtype, device):
    fused = build_fused_nf4(K, N, r, p, dtype, device)  # the same NF4 bytes and bias as "fused-nf4"
    layer = DequantizeNF4Lora(fused.nf4_weight, fused.bias, r, 2 * r, p, dtype)
    _set_adapters(layer.lora_A, layer.lora_B)
    return layer


def build_fused_dora_nf4(K, N, r, p, dtype, device):
    """QDoRA: ``FusedLoraLinear(use_dora=True)`` on the NF4 base of ``fused-nf4`` (``||W_i||^2`` of the
    dequantized weight cached)."""
    if _bnb_available():
        layer = FusedLoraLinear.from_bnb(_bnb_linear4bit(K, N, dtype, device), r=r, lora_alpha=2 * r,
                                         lora_dropout=p, compute_dtype=dtype, adapter_dtype=dtype, use_dora=True)
    else:
        layer = FusedLoraLinear.from_linear(_frozen_linear(K, N, dtype, device), r=r, lora_alpha=2 * r,
                                            lora_dropout=p, quantize="nf4", compute_dtype=dtype, adapter_dtype=dtype,
                                            use_dora=True)
    _set_adapters(layer.lora_A, layer.lora_B)
    _set_magnitude(layer.lora_magnitude_vector, K, N, r, dtype)
    return layer


def build_peft_nf4(K, N, r, p, dtype, device):
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p)
    layer = PeftLinear4bit(_bnb_linear4bit(K, N, dtype, device), "default", config=cfg, r=r, lora_alpha=2 * r,
                           lora_dropout=p)
    layer.lora_A["default"].to(dtype)
    layer.lora_B["default"].to(dtype)
    _set_adapters(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return layer


def build_peft_dora_nf4(K, N, r, p, dtype, device):
    """PEFT's QDoRA: ``lora.bnb.Linear4bit`` with ``use_dora=True`` (W dequantized by bitsandbytes for the norm
    every call)."""
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=True)
    layer = PeftLinear4bit(_bnb_linear4bit(K, N, dtype, device), "default", config=cfg, r=r, lora_alpha=2 * r,
                           lora_dropout=p)
    for module in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]):
        module.to(dtype)
    _set_adapters(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    _set_magnitude(layer.lora_magnitude_vector["default"].weight, K, N, r, dtype)
    return layer


PROVIDERS: Dict[str, Callable] = {
    "fused": build_fused,
    "peft": build_peft,
    "fused-in-peft": build_fused_in_peft,
    "naive": build_naive,
    "naive+compile": build_naive_compiled,
    "base": build_base,
    "fused-nf4": build_fused_nf4,
    "peft-nf4": build_peft_nf4,
    "nf4-dequant": build_nf4_dequantize,
    "fused-dora": build_fused_dora,
    "peft-dora": build_peft_dora,
    "fused-dora-in-peft": build_fused_dora_in_peft,
    "fused-dora-nf4": build_fused_dora_nf4,
    "peft-dora-nf4": build_peft_dora_nf4,
}


@functools.lru_cache(maxsize=None)
def available(provider: str) -> bool:
    """Whether a provider's dependencies import here (peft; bitsandbytes for ``peft-nf4`` and ``peft-dora-nf4``)."""
    try:
        if provider.startswith("peft") or provider.endswith("-peft"):
            import peft  # noqa: F401
        if provider.startswith("peft") and provider.endswith("-nf4"):
            import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return provider in PROVIDERS


def parameter_storages(module: nn.Module) -> set:
    """Storage pointers of a module's parameters and buffers (excluded from saved-activation accounting)."""
    ptrs = set()
    for t in list(module.parameters()) + list(module.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
    return ptrs
