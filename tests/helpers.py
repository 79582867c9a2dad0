"""Independent references and the tolerance rules shared by the tests."""

from __future__ import annotations

from typing import Dict, Optional

import torch

# Relative tolerance of fp32 results against the float64 reference, as a fraction of the compared tensor's largest
# magnitude. Justification: a length-L fp32 dot product (L <= 400 here, reductions over M <= 80 rows) has a
# worst-case relative rounding error of about L * 2**-24 ~ 2.4e-5 of sum |a_i b_i|, typically sqrt(L) * 2**-24
# ~ 1.2e-6. 2e-5 of the largest value sits between the two: it fails on any real error (a wrong mask, index or
# scale is off by >= 1e-2) and does not fail on summation order.
FP32_RTOL = 2e-5

# One unit in the last place (at 1.0) of each half-precision format: the atol of the three-way check, i.e. one
# rounding of the largest element, for elements where the same-dtype torch baseline happens to be exact.
HALF_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_inputs(M, K, N, r, dtype, device, bias=True, lead=None, seed=0):
    """Fresh random inputs (never zeros). Scales keep every term O(1): W, A ~ 1/sqrt(K), B ~ 1/sqrt(r)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = rnd(*(lead or (M,)), K)
    return dict(
        x=x,
        weight=rnd(N, K, scale=K**-0.5),
        lora_A=rnd(r, K, scale=K**-0.5),
        lora_B=rnd(N, r, scale=r**-0.5),
        bias=rnd(N) if bias else None,
        grad=rnd(*x.shape[:-1], N),
    )


def fused_fn(backend, scaling, p, seed):
    """``fn(x, weight, lora_A, lora_B, bias)``: ``fused_lora_linear`` on ``backend`` with this scaling, dropout
    probability and seed."""
    from fused_lora import fused_lora_linear, use_backend

    def fn(x, weight, lora_A, lora_B, bias):
        with use_backend(backend):
            return fused_lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=p, seed=seed)

    return fn


def lora_reference(x, weight, lora_A, lora_B, bias, scaling, keep: Optional[torch.Tensor], p: float, dtype=None):
    """The textbook LoRA linear, ``x W^T + s ((x * keep / (1 - p)) A^T) B^T + b``, in ``dtype`` (default float64),
    written independently of fused_lora (only the mask comes from outside)."""
    dtype = dtype or torch.float64
    xd = x.to(dtype)
    lora_in = xd if keep is None else xd * keep.reshape(xd.shape).to(dtype) / (1.0 - p)
    y = xd @ weight.to(dtype).t() + ((lora_in @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t()) * scaling
    return y if bias is None else y + bias.to(dtype)


def outputs_and_grads(fn, inputs: Dict[str, torch.Tensor], grad: torch.Tensor, requires=("x", "lora_A", "lora_B", "bias")):
    """Run ``fn(**leaves)`` with fresh leaves requiring grad for the names in ``requires``; return
    ``{"y": output, "<name>": gradient, ...}`` (all detached)."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        leaf = t.detach().clone()
        leaf.requires_grad_(name in requires)
        leaves[name] = leaf
    y = fn(**leaves)
    y.backward(grad.to(y.dtype))
    out = {"y": y.detach()}
    for name in requires:
        if leaves.get(name) is not None:
            out[name] = leaves[name].grad.detach()
    return out


def assert_close_fp32(out: torch.Tensor, ref: torch.Tensor, name: str = "", rtol: float = FP32_RTOL):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    scale = ref64.abs().max().item()
    err = (out64 - ref64).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.1e} x max|ref| ({scale:.3e})"


def assert_three_way(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, name: str = "",
                     eps: Optional[float] = None):
    """flash-attention's half-precision rule: ``|out - ref| <= 2 |baseline - ref| + atol`` element-wise, where
    ``baseline`` is the plain PyTorch computation in the same dtype and ``ref`` is float64. It adapts to the
    rounding the dtype forces instead of hiding errors behind a large fixed atol. ``atol = eps * max|ref|``, ``eps``
    by default one ulp at 1.0 of ``out``'s half-precision dtype (:data:`HALF_EPS`); a caller comparing other dtypes
    passes its own, with its justification."""
    assert out.shape == ref.shape == baseline.shape, name
    assert out.dtype == baseline.dtype, f"{name}: {out.dtype} vs baseline {baseline.dtype}"
    out64, base64, ref64 = out.double().cpu(), baseline.double().cpu(), ref.double().cpu()
    atol = (HALF_EPS[out.dtype] if eps is None else eps) * ref64.abs().max().item()
    excess = (out64 - ref64).abs() - (2 * (base64 - ref64).abs() + atol)
    worst = excess.max().item()
    assert worst <= 0, (
        f"{name}: error exceeds 2x the same-dtype torch error + {atol:.2e} by {worst:.3e} "
        f"(max |out-ref| {(out64 - ref64).abs().max().item():.3e}, max |baseline-ref| "
        f"{(base64 - ref64).abs().max().item():.3e})"
    )


def ulp_at(t: torch.Tensor) -> torch.Tensor:
    """float64 tensor: one unit in the last place of each element of the half-precision (bf16 / fp16) tensor ``t``
    at its own magnitude (the subnormal spacing below the smallest normal)."""
    info = torch.finfo(t.dtype)
    mag = t.double().abs().cpu().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_rounding_flips_only(out: torch.Tensor, other: torch.Tensor, name: str = ""):
    """``out`` and ``other`` (same half dtype) come from two computations that round to that dtype at the same
    points (the intermediates, e.g. xa and gb, and each result) and accumulate in fp32, in different summation
    orders. Their fp32 values then differ by the fp32 summation-order error, which can move a value across a
    rounding boundary ("flip" it). Allowed per element:

    * one unit in the last place of the element's own magnitude: its final rounding flipped;
    * ``eps`` (2**-7 for bf16) of the largest magnitude: a flipped intermediate (one ulp, <= eps of its value)
      propagates through its term of a later product, e.g. dA = s gb^T (m x) moves by <= s eps |gb_ij| |x_ik|,
      about eps times the largest output for inputs with O(1) terms. Where cancellation made an element much
      smaller than its terms this is many of its own ulps (seen: 7 ulps of a dA element 0.4 whose largest is 50).
      The fp32 summation-order difference itself (<= ``FP32_RTOL`` of the largest) is far below it.

    Flips are rare, about (fp32 difference) / (half ulp) ~ 2**-16 x (sum of |terms|) / |value| per rounding
    (measured: under 0.2% of elements differ), so at most 1% of the elements (and at least one) may differ at
    all: a different rounding point, which changes most elements, fails."""
    assert out.shape == other.shape and out.dtype == other.dtype, name
    a, b = out.double().cpu(), other.double().cpu()
    diff = (a - b).abs()
    scale = b.abs().max().item() if b.numel() else 0.0
    bound = ulp_at(torch.maximum(out.abs().cpu(), other.abs().cpu())) + torch.finfo(out.dtype).eps * scale
    worst = (diff - bound).max().item() if diff.numel() else 0.0
    assert worst <= 0, f"{name}: an element differs by more than rounding flips explain (by {worst:.3e} beyond)"
    unequal = int((diff > 0).sum())
    assert unequal <= max(1, out.numel() // 100), f"{name}: {unequal} of {out.numel()} elements differ"


def adamw_losses(model, ids, steps: int = 3, after_first_step=None, lr: float = 1e-2):
    """The losses of ``steps`` AdamW steps of a causal LM on ``input_ids = labels = ids`` (the trainable parameters
    only); ``after_first_step()`` runs once, after the first step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0 and after_first_step is not None:
            after_first_step()
    return losses
