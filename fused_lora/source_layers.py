"""The modules a ``FusedLoraLinear`` can replace, and how each is built: one :class:`SourceLayer` entry per kind of
base layer in :data:`SOURCE_LAYERS` (supporting a new kind of base is one more entry). A module no entry takes is
refused with an error that says why (:func:`source_layer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .layers import FusedLoraLinear, is_plain_linear
from .nf4 import bitsandbytes_classes
from .targets import conv1d_class

__all__ = ["SOURCE_LAYERS", "QUANTIZE_MODES", "SourceLayer", "source_layer", "check_quantize"]

# The values of apply_lora's ``quantize``: what a dense nn.Linear base is converted to (None: kept dense).
QUANTIZE_MODES = ("nf4",)


def _accept(name: str, module: nn.Module) -> None:
    pass


@dataclass(frozen=True)
class SourceLayer:
    """One kind of base layer.

    ``matches(module, quantize)``: whether ``module`` is of this kind (``quantize``: apply_lora's argument);
    ``check(name, module)``: raises for a module of this kind that still cannot be adapted (naming it);
    ``build(module, r=, lora_alpha=, lora_dropout=, use_rslora=, adapter_dtype=)`` (a
    :class:`~fused_lora.hyperparams.LayerHyperparams`' fields): the ``FusedLoraLinear`` replacing it, over
    ``module``'s own weight and bias (shared, not copied) or their quantized form.
    """

    matches: Callable[[nn.Module, Optional[str]], bool]
    build: Callable[..., FusedLoraLinear]
    check: Callable[[str, nn.Module], None] = _accept


def _check_nf4_linear4bit(name: str, module: nn.Module) -> None:
    quant_type = getattr(module.weight, "quant_type", None)
    if quant_type != "nf4":
        raise TypeError(f"module {name!r} is a bitsandbytes Linear4bit with quant_type={quant_type!r}: only NF4 "
                        "4-bit bases are supported")


def _check_floating_point(name: str, module: nn.Module) -> None:
    if not module.weight.is_floating_point():
        raise TypeError(f"module {name!r} has a {module.weight.dtype} weight; LoRA needs a floating-point base")


SOURCE_LAYERS = (
    # a bitsandbytes Linear4bit: its packed NF4 weight is used as it is, whatever ``quantize`` says
    SourceLayer(matches=lambda module, quantize: "Linear4bit" in bitsandbytes_classes(module),
             build=lambda module, **lora: FusedLoraLinear.from_bnb(module, **lora),
             check=_check_nf4_linear4bit),
    # an nn.Linear kept dense: its weight Parameter is shared
    SourceLayer(matches=lambda module, quantize: quantize is None and is_plain_linear(module),
             build=lambda module, **lora: FusedLoraLinear.from_linear(module, **lora),
             check=_check_floating_point),
    # an nn.Linear quantized to NF4 (QLoRA): only the 4-bit form is kept
    SourceLayer(matches=lambda module, quantize: quantize == "nf4" and is_plain_linear(module),
             build=lambda module, **lora: FusedLoraLinear.from_linear(module, quantize="nf4", **lora),
             check=_check_floating_point),
)


def check_quantize(quantize: Optional[str]) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose None or one of {QUANTIZE_MODES}")


def source_layer(name: str, module: nn.Module, quantize: Optional[str] = None) -> SourceLayer:
    """The entry of :data:`SOURCE_LAYERS` for ``module`` (named ``name`` in its model), or the error saying why it
    cannot be adapted."""
    check_quantize(quantize)
    for kind in SOURCE_LAYERS:
        if kind.matches(module, quantize):
            kind.check(name, module)
            return kind
    raise _refusal(name, module)


def _refusal(name: str, module: nn.Module) -> Exception:
    what = f"{type(module).__module__}.{type(module).__name__}"
    if "Linear8bitLt" in bitsandbytes_classes(module):
        return TypeError(f"module {name!r} is a bitsandbytes Linear8bitLt: 8-bit bases are not supported")
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return TypeError(
            f"module {name!r} is a transformers Conv1D (weight stored [in, out], PEFT's fan_in_fan_out=True): "
            "not supported; only nn.Linear bases are"
        )
    if isinstance(module, FusedLoraLinear):
        return ValueError(
            f"module {name!r} is already a {type(module).__name__}: fused-lora keeps one adapter per layer "
            "(was apply_lora called twice on the same module?)"
        )
    if isinstance(module, nn.Linear):
        return TypeError(
            f"module {name!r} is a {what}, an nn.Linear subclass with its own forward: not supported (only nn.Linear "
            "bases are)"
        )
    return TypeError(
        f"target module {name!r} is a {what}, not an nn.Linear; only nn.Linear layers can be adapted (check "
        "target_modules)"
    )
