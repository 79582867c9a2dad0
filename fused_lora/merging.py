"""``merge_and_unload(model)``: fold every adapter into its base weight and put plain ``nn.Linear`` layers back."""

from __future__ import annotations

from torch import nn

from .conversion import lora_layers
from .layers import FusedLoraLinear

__all__ = ["merge_and_unload"]


def _merged_replacement(layer: FusedLoraLinear) -> nn.Linear:
    """The plain module replacing a LoRA layer.

    ``weight + layer.delta_weight()`` -- LoRA: ``scaling * B @ A`` computed in fp32 (in float64 for a float64
    layer); DoRA: PEFT's merged weight ``(m / n)[:, None] * (W + scaling * B @ A)``, computed in float64 -- rounded
    once to the weight's dtype, in a new tensor (the old weight may be shared, e.g. tied); the bias Parameter is
    reused. An NF4 base is dequantized (bit-exactly, to fp32) and the merged weight is kept dense in the layer's
    compute dtype: no re-quantization error (use ``layer.merge()`` to stay 4-bit). A layer already merged
    (``layer.merge()``) keeps the weight it holds."""
    if layer.quantized:
        out_dtype, requires_grad = layer.compute_dtype, False
    else:
        out_dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
    delta = None if layer.merged else layer.delta_weight()
    merged = layer.base.dense_with(delta, out_dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(merged, requires_grad=requires_grad)
    if layer.bias is not None:
        linear.bias = layer.bias
    linear.train(layer.training)
    return linear


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every fused-lora layer by a plain ``nn.Linear`` whose weight is ``W + scaling * B @ A`` (computed in
    fp32, rounded once to W's dtype; DoRA layers: PEFT's merged DoRA weight, see :func:`_merged_replacement`); the
    bias is kept. The adapters (and DoRA magnitudes) are dropped. Returns ``model``.

    The merged weight is a new tensor: a base weight shared with another module (tied) is left unchanged.
    ``modules_to_save`` modules (trained in place) stay as they are."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"merge_and_unload: {type(model).__name__} has no fused-lora layers")
    for name, layer in layers:
        model.set_submodule(name, _merged_replacement(layer))
    return model
