"""Accelerating a PEFT model in place: ``from_peft``, ``restore_peft``, ``fusion_summary``.

PEFT's LoRA layers stay what they are -- the same modules, parameter objects and names, adapter dicts, PeftModel
wrapper -- so everything downstream (``save_pretrained``, Trainer checkpoints and resume, ``disable_adapter``,
``merge_and_unload``, ``add_adapter`` / ``set_adapter``, optimizer state keyed by parameter name) is PEFT's own code,
unchanged. Only the *computation* of a layer's forward changes: ``from_peft`` gives each ``lora.Linear`` (over an
``nn.Linear`` or a transformers ``Conv1D``) and each ``lora.bnb.Linear4bit`` (over a bitsandbytes NF4 ``Linear4bit``)
a subclass whose ``forward`` computes, for the one active adapter ``a``::

    y = base(x) + scaling[a] * lora_B[a](lora_A[a](lora_dropout[a](x)))

as one call of :func:`fused_lora.fused_lora_linear`, reading PEFT's parameters where they are (no copies; fp32
adapters on a half-precision base stay fp32, and their gradients land there). A DoRA adapter (``use_dora=True``,
dense, Conv1D and bitsandbytes NF4 bases: QDoRA) is the same call with ``magnitude=lora_magnitude_vector[a].weight``
and the cached ``||W_i||^2`` of the frozen base weight (:class:`fused_lora.dora.WeightNormCache`, one per layer),
computing PEFT's DoRA (``DoraLinearVariant.forward``): with ``c = m / ||W + s B A||_row`` (detached),
``y = c * (x W^T + s x A^T B^T) + b`` in eval mode or without dropout, and
``y = x W^T + b + (c - 1) * (D(x) W^T) + c * s * D(x) A^T B^T`` in training with dropout D (PEFT switches on the
LoRA layer's ``training`` flag; ``fused_lora.dora`` derives both). Anything that call does not compute goes to
PEFT's own forward, for that layer or that call -- the same numbers, never an error -- and is counted:

* per layer (the state of the layer): a LoRA variant other than DoRA (aLoRA, ...), ``lora_bias``, a dropout module
  other than ``nn.Dropout`` / ``nn.Identity``, a base other than ``nn.Linear`` / ``Conv1D`` / NF4 ``Linear4bit``
  (FP4), hooks on the base, adapter or dropout modules (accelerate offloading, DeepSpeed ZeRO-3: the parameters are
  only complete inside those hooks), adapters whose shapes do not match; for DoRA also hooks on the magnitude
  module, a magnitude of another shape or device than the adapters' (``ephemeral_gpu_offload`` keeps it on the CPU),
  a base weight that requires grad (the fused DoRA keeps W frozen), a ``fan_in_fan_out`` of the DoRA module that
  does not fit the base, and PEFT's DoRA cache (``peft.tuners.lora.dora.ENABLE_DORA_CACHING``) in eval mode, whose
  norm may be stale;
* per call: several adapters active at once, ``adapter_names`` (mixed-adapter batches), extra forward arguments,
  an input dtype the base layer itself would refuse, ``disable_input_dtype_casting``, global module hooks,
  torch.func transforms and forward-mode AD.

Precision: PEFT's numbers within the rounding of the output's dtype. Half-precision x with fp32 adapters: A / B
are rounded to x's dtype where they enter a product (PEFT copies x to fp32 instead). x is never narrowed to the
adapters' dtype (PEFT casts x to it; narrower adapters are widened instead), and an NF4 layer computes in the wider
of bitsandbytes' compute dtype and x's (see ``_nf4_math_dtype``).

Disabled adapters, merged layers and layers without an active adapter run PEFT's forward too (it is only the base
layer then): that is not a fallback. Layers of other PEFT classes (Embedding, Conv, 8-bit, MultiheadAttention, ...)
are left alone. :func:`fusion_summary` tells which layers are fused, which are left to PEFT and why, and how many calls
fell back; ``from_peft`` warns when anything is left to PEFT, and each kind of per-call fallback warns once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import nn
from torch.nn.modules import module as nn_module

from .dora import WeightNormCache
from .functional import fused_lora_linear
from .layers import is_plain_linear
from .nf4 import NF4Weight, bitsandbytes_classes
from .validation import HALF_AND_SINGLE, quantized_math_dtype

__all__ = ["FusionSummary", "from_peft", "fusion_summary", "restore_peft"]

# PEFT's layer classes fused-lora accelerates: the name of the fused subclass -> (module, class name) of PEFT's.
_PEFT_CLASSES = {
    "FusedLinear": ("peft.tuners.lora.layer", "Linear"),
    "FusedLinear4bit": ("peft.tuners.lora.bnb", "Linear4bit"),
}
_FALLBACKS_ATTR = "_fused_lora_fallbacks"  # on a fused layer: {reason: number of calls PEFT's forward computed}
_NAME_ATTR = "_fused_lora_name"  # on a fused layer: its name in the model given to from_peft (for messages)
_DORA_ATTR = "_fused_lora_dora"  # on a fused DoRA layer: its WeightNormCache
_warned_reasons: set = set()


# ----------------------------------------------------------------------------------------------------------------
# The fused subclasses
# ----------------------------------------------------------------------------------------------------------------


class _FusedForward:
    """The ``forward`` of a fused PEFT layer; mixed in ahead of PEFT's class, whose forward is the fallback."""

    def forward(self, x, *args, **kwargs):
        adapter, kind, reason = _fused_call_plan(self, x, args, kwargs)
        if adapter is None:
            if reason is not None:
                _record_fallback(self, reason)
            return super().forward(x, *args, **kwargs)
        return _fused_forward(self, adapter, kind, x)

    # PEFT's merge / unmerge write the base weight through ``.data``, which keeps its version counter (and an
    # unmerged weight may land at the address of the original): the cached ||W_i||^2 of DoRA is dropped here.
    def merge(self, *args, **kwargs):
        try:
            return super().merge(*args, **kwargs)
        finally:
            _forget_weight_norms(self)

    def unmerge(self, *args, **kwargs):
        try:
            return super().unmerge(*args, **kwargs)
        finally:
            _forget_weight_norms(self)


def _peft_class(fused_name: str) -> Optional[type]:
    """PEFT's class behind a fused subclass name; None when it cannot be imported (e.g. bitsandbytes missing)."""
    import importlib

    module_name, class_name = _PEFT_CLASSES[fused_name]
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


def _fused_class(fused_name: str) -> type:
    """The fused subclass of a PEFT layer class, made once. It lives in this module's namespace under its name, so
    that pickle (``torch.save`` of a whole model) finds it, also in a fresh process (see ``__getattr__``)."""
    cls = globals().get(fused_name)
    if cls is None:
        base = _peft_class(fused_name)
        if base is None:
            raise AttributeError(f"{__name__}.{fused_name}: PEFT's {'.'.join(_PEFT_CLASSES[fused_name])} is not "
                                 "importable here")
        cls = type(fused_name, (_FusedForward, base), {"__module__": __name__, "__qualname__": fused_name,
                                                          "__doc__": f"PEFT's {base.__name__}, computed by fused-lora"})
        globals()[fused_name] = cls
    return cls


def __getattr__(name: str):  # PEP 562: unpickling a fused layer in a process that has not called from_peft yet
    if name in _PEFT_CLASSES:
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_name_for(module: nn.Module) -> Optional[str]:
    """The fused subclass name for a PEFT layer of exactly one of the accelerated classes, else None (subclasses
    of them may compute differently)."""
    cls = type(module)
    for fused_name, (module_name, class_name) in _PEFT_CLASSES.items():
        if cls.__module__ == module_name and cls.__name__ == class_name:
            return fused_name
    return None


def _is_fused(module: nn.Module) -> bool:
    return isinstance(module, _FusedForward)


# ----------------------------------------------------------------------------------------------------------------
# What a call computes
# ----------------------------------------------------------------------------------------------------------------


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_module_hooks() -> bool:
    """Hooks registered for every module call (``nn.modules.module.register_module_forward_hook``, ...): the fused
    path makes no submodule calls for them to see."""
    return bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_backward_pre_hooks or nn_module._global_backward_hooks)


def _base_kind(base: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """``("dense" | "conv1d" | "nf4", None)`` for a base the fused path computes, else ``(None, reason)``."""
    if is_plain_linear(base):
        return "dense", None
    cls = type(base)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "conv1d", None  # GPT-2 style: weight [in, out], forward = bias + x @ weight
    bnb = bitsandbytes_classes(base)
    if "Linear4bit" in bnb:
        qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if qs is None:
            return None, "bitsandbytes Linear4bit not quantized yet"
        if qs.quant_type != "nf4":
            return None, f"bitsandbytes quant_type={qs.quant_type!r} (fused-lora reads NF4)"
        return "nf4", None
    if bnb:
        return None, f"bitsandbytes {cls.__name__} base (fused-lora reads NF4 Linear4bit)"
    return None, f"{cls.__module__}.{cls.__qualname__} base (fused-lora computes nn.Linear, Conv1D and NF4 bases)"


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` is a DoRA adapter of PEFT's own linear DoRA variant (``use_dora=True``)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    cls = type(variant)
    return (getattr(layer, "use_dora", {}).get(adapter, False) and cls.__name__ == "DoraLinearVariant"
            and cls.__module__ == "peft.tuners.lora.variants")


def _variant_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why a LoRA variant of ``adapter`` is left to PEFT (None: plain LoRA or PEFT's linear DoRA)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None and not getattr(layer, "use_dora", {}).get(adapter, False):
        return None
    if _is_dora(layer, adapter):
        return None
    name = type(variant).__name__ if variant is not None else "DoRA"
    return f"LoRA variant {name.replace('LinearVariant', '') or name} (PEFT computes variants)"


def _dora_reason(layer: nn.Module, adapter: str, kind: str) -> Optional[str]:
    """Why the fused path cannot compute this DoRA adapter exactly as PEFT's ``DoraLinearVariant.forward`` does
    (None: it can), for a layer that passed :func:`_layer_kind`'s LoRA checks with base kind ``kind``."""
    from peft.tuners.lora import dora as peft_dora

    module = layer.lora_magnitude_vector[adapter]
    if type(module) is not peft_dora.DoraLinearLayer:
        return f"DoRA magnitude module {type(module).__qualname__} (fused-lora computes PEFT's DoraLinearLayer)"
    if _has_hooks(module):
        return "hooks on the base, adapter or dropout modules (e.g. accelerate offloading, DeepSpeed ZeRO-3)"
    if bool(module.fan_in_fan_out) != (kind == "conv1d"):
        # PEFT's DoRA transposes the base weight by the DoRA module's own flag
        return f"DoRA fan_in_fan_out={module.fan_in_fan_out} over a {type(layer.get_base_layer()).__name__}"
    m, A = module.weight, layer.lora_A[adapter].weight
    if not isinstance(m, torch.Tensor) or not m.is_floating_point() or tuple(m.shape) != (layer.out_features,):
        return (f"DoRA magnitude {getattr(m, 'dtype', type(m).__name__)} {list(getattr(m, 'shape', []))} does not "
                f"fit {layer.out_features} output features")
    if m.device != A.device:
        return (f"DoRA magnitude on {m.device}, adapters on {A.device} (ephemeral_gpu_offload: PEFT computes "
                "across devices)")
    if kind != "nf4" and layer.get_base_layer().weight.requires_grad:
        return "base weight requires grad (fused DoRA keeps W frozen: no gradient through W)"
    if peft_dora.ENABLE_DORA_CACHING and not module.training:
        # PEFT then reuses the weight norm of the first eval call until train(): its numbers, stale or not
        return "PEFT's DoRA cache in eval mode (peft.tuners.lora.dora.ENABLE_DORA_CACHING)"
    return None


def _layer_kind(layer: nn.Module, adapter: str) -> Tuple[Optional[str], Optional[str]]:
    """``(base kind, None)`` when the fused path can compute ``adapter`` on this layer as it is now (the kind of
    :func:`_base_kind`), else ``(None, why not)``."""
    reason = _variant_reason(layer, adapter)
    if reason is not None:
        return None, reason
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if getattr(layer, "lora_bias", {}).get(adapter, False) or lora_B.bias is not None or lora_A.bias is not None:
        return None, "lora_bias=True"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return None, f"dropout module {type(dropout).__name__}"
    base = layer.get_base_layer()
    kind, reason = _base_kind(base)
    if reason is not None:
        return None, reason
    if kind != "nf4" and getattr(layer, "fan_in_fan_out", False) != (kind == "conv1d"):
        return None, f"fan_in_fan_out={layer.fan_in_fan_out} over a {type(base).__name__}"
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)):
        return None, "hooks on the base, adapter or dropout modules (e.g. accelerate offloading, DeepSpeed ZeRO-3)"
    in_features, out_features = layer.in_features, layer.out_features
    A, B = lora_A.weight, lora_B.weight
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out_features \
            or A.shape[0] != B.shape[1]:
        return None, (f"adapter shapes lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the "
                f"[{out_features}, {in_features}] base (sharded or replaced parameters)")
    if not A.is_floating_point() or A.dtype != B.dtype:
        return None, f"adapter dtypes lora_A {A.dtype} / lora_B {B.dtype}"
    if _is_dora(layer, adapter):
        reason = _dora_reason(layer, adapter, kind)
        if reason is not None:
            return None, reason
    return kind, None


def _active_adapter(layer: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """``(adapter, None)`` when exactly one adapter of this layer is active and unmerged, ``(None, None)`` when PEFT's
    forward is just the base layer (adapters disabled, merged, none active here), ``(None, reason)`` otherwise."""
    if layer.disable_adapters or layer.merged:
        return None, None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return None, None
    if len(active) > 1:
        return None, f"several adapters active at once ({', '.join(active)})"
    return active[0], None


def _fused_call_plan(layer: nn.Module, x, args, kwargs) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """``(adapter, base kind, None)``: compute this call fused; ``(None, None, reason)``: PEFT's forward computes
    it, a fallback; ``(None, None, None)``: PEFT's forward computes it and it is only the base layer."""
    if kwargs.get("adapter_names") is not None:
        return None, None, "adapter_names (mixed-adapter batch)"
    extra = [k for k, v in kwargs.items() if v is not None and k != "adapter_names"]
    if args or extra:
        return None, None, f"extra forward arguments ({', '.join(extra) or f'{len(args)} positional'})"
    adapter, reason = _active_adapter(layer)
    if adapter is None:
        return None, None, reason
    kind, reason = _layer_kind(layer, adapter)
    if reason is not None:
        return None, None, reason
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None, None, f"input of type {getattr(x, 'dtype', type(x).__name__)}"
    if _global_module_hooks():
        return None, None, "global module hooks (register_module_forward_hook, ...)"
    if not getattr(layer, "cast_input_dtype_enabled", True) and layer.lora_A[adapter].weight.dtype != x.dtype:
        # PEFT then multiplies x with adapters of another dtype as they are (and nn.Linear refuses)
        return None, None, "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    if not torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active():
            return None, None, "a torch.func transform"
        if _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(x).tangent is not None:
            return None, None, "forward-mode AD"
    base = layer.get_base_layer()
    if kind == "nf4":
        if _nf4_math_dtype(base, x) not in HALF_AND_SINGLE:
            return None, None, f"an NF4 base with x of dtype {x.dtype}"
    elif x.dtype != base.weight.dtype and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)):
        # nn.Linear refuses this mix; PEFT's forward raises its own error
        return None, None, f"x of dtype {x.dtype} on a {base.weight.dtype} base"
    return adapter, kind, None


def _nf4_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes its product in: its ``compute_dtype``, else (it infers it from
    the first input) x's."""
    return getattr(base, "compute_dtype", None) or x.dtype


def _nf4_math_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the fused call computes an NF4 layer in (:func:`fused_lora.validation.quantized_math_dtype`)."""
    return quantized_math_dtype(_nf4_compute_dtype(base, x), x.dtype)


def _sync_bitsandbytes_state(base: nn.Module, x: torch.Tensor) -> None:
    """The state bitsandbytes' ``Linear4bit.forward`` sets on its calls, which the fused path makes instead: the
    compute dtype taken from the first input when unset, and the bias Parameter's data cast to the compute dtype
    (so that its dtype, its gradient's and the saved files' are PEFT's)."""
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = getattr(base, "compute_dtype", None)
    if base.bias is not None and dtype is not None and base.bias.dtype != dtype:
        base.bias.data = base.bias.data.to(dtype)


def _nf4_view(layer: nn.Module, base: nn.Module) -> NF4Weight:
    """The bitsandbytes weight read as an :class:`NF4Weight` (views, no copy), cached on the layer until the
    Params4bit, its storage or its quant state change (PEFT's merge writes a new one; ``.to()`` moves it;
    bitsandbytes' CPU inference repacks it in place, and that layout is read as a copy: its training forward
    after the repack loses the input gradient, which the fused path keeps)."""
    weight = base.weight
    qs = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    key = (id(weight), weight.data_ptr(), weight.device, id(qs))
    cached = layer.__dict__.get("_fused_lora_nf4")
    if cached is None or cached[0] != key:
        cached = (key, NF4Weight.from_bnb(base))
        layer.__dict__["_fused_lora_nf4"] = cached
    return cached[1]


def _dora_norms(layer: nn.Module) -> WeightNormCache:
    """A fused DoRA layer's cached ``||W_i||^2`` of its frozen base weight (a Conv1D's ``[out, in]`` view is a new
    view of the same weight every call, which the cache recognises; pickled and deep-copied as empty)."""
    norms = layer.__dict__.get(_DORA_ATTR)
    if norms is None:
        norms = layer.__dict__[_DORA_ATTR] = WeightNormCache()
    return norms


def _forget_weight_norms(layer: nn.Module) -> None:
    layer.__dict__.pop(_DORA_ATTR, None)


def _fused_forward(layer: nn.Module, adapter: str, kind: str, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + scaling * B(A(dropout(x)))`` for one adapter -- or PEFT's DoRA of it -- in one fused call on
    PEFT's own parameters; ``kind``: the base's (:func:`_base_kind`)."""
    base = layer.get_base_layer()
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    scaling = float(layer.scaling[adapter])
    training = dropout.training
    dora = _is_dora(layer, adapter)
    if dora:
        # PEFT's DoRA takes its dropout form only when the LoRA layer itself is in training mode (in eval it neither
        # drops nor recomputes the base product, whatever the dropout module's flag)
        training = layer.training and dropout.training
        magnitude = layer.lora_magnitude_vector[adapter].weight
        norms = None if torch.compiler.is_compiling() else _dora_norms(layer)  # compiled: the graph computes it
    if kind == "nf4":  # as bitsandbytes: x and bias cast to the math dtype, the output back to x's dtype
        _sync_bitsandbytes_state(base, x)
        dtype = _nf4_math_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(dtype)
        weight = _nf4_view(layer, base)
        extra = {} if not dora else dict(
            magnitude=magnitude, weight_norm_sq=None if norms is None else norms.get(weight, dtype))
        y = fused_lora_linear(x.to(dtype), weight, A, B, scaling, bias=bias, dropout_p=p, training=training,
                              **extra)
        return y.to(x.dtype)
    weight = base.weight.t() if kind == "conv1d" else base.weight
    extra = {} if not dora else dict(magnitude=magnitude, weight_norm_sq=None if norms is None else norms.get(weight))
    return fused_lora_linear(x, weight, A, B, scaling, bias=base.bias, dropout_p=p, training=training, **extra)


def _record_fallback(layer: nn.Module, reason: str) -> None:
    counts = layer.__dict__.setdefault(_FALLBACKS_ATTR, {})
    counts[reason] = counts.get(reason, 0) + 1
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(
            f"fused-lora: PEFT's own forward computes {layer.__dict__.get(_NAME_ATTR, 'a layer')} for this call "
            f"({reason}); later calls for this reason are counted, not warned about: see "
            "fused_lora.fusion_summary(model)",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FusionSummary:
    """Which PEFT LoRA layers of a model fused-lora computes (:func:`fusion_summary`).

    ``fused``: the layers whose active adapter the fused path computes as they are now. ``left_to_peft``: layer ->
    why PEFT's own forward computes it. ``fallback_calls``: fused layer -> {reason: calls PEFT's forward computed
    instead} (adapter_names batches, several active adapters, ...). Print it for a table."""

    fused: List[str] = field(default_factory=list)
    left_to_peft: Dict[str, str] = field(default_factory=dict)
    fallback_calls: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def all_fused(self) -> bool:
        """True when every LoRA layer is fused and no call fell back."""
        return not self.left_to_peft and not self.fallback_calls

    def __str__(self) -> str:
        total = len(self.fused) + len(self.left_to_peft)
        lines = [f"fused-lora: {len(self.fused)} of {total} PEFT LoRA layers fused"]
        by_reason: Dict[str, List[str]] = {}
        for name, reason in self.left_to_peft.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
            lines.append(f"  left to PEFT: {reason}: {shown}")
        calls: Dict[str, int] = {}
        for counts in self.fallback_calls.values():
            for reason, n in counts.items():
                calls[reason] = calls.get(reason, 0) + n
        for reason, n in calls.items():
            lines.append(f"  calls PEFT computed: {reason}: {n}")
        return "\n".join(lines)


def _lora_layers(model: nn.Module):
    """PEFT's LoRA layers that their parent calls: those nested inside another LoRA layer (the ``out_proj`` PEFT
    wraps inside its ``lora.MultiheadAttention``, which merges it instead of calling it) are the outer layer's
    business."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and not any(name.startswith(outer + ".") or not outer for outer, _ in layers):
            layers.append((name, m))
    return layers


def _static_reason(layer: nn.Module) -> Optional[str]:
    """Why PEFT's forward computes this layer as it is now (whatever the input), or None when it is fused."""
    if not _is_fused(layer):
        if _fused_name_for(layer) is not None:
            return "not accelerated (added after from_peft, or restored): call fused_lora.from_peft(model) again"
        return f"{type(layer).__module__}.{type(layer).__qualname__} layers are not fused (PEFT computes them)"
    adapter, reason = _active_adapter(layer)
    if adapter is None:
        return reason  # None: base layer only (disabled, merged, no active adapter here)
    return _layer_kind(layer, adapter)[1]


def fusion_summary(model: nn.Module) -> FusionSummary:
    """A :class:`FusionSummary` of ``model`` as it is now: the fused layers, those left to PEFT and why, and the
    calls PEFT's forward computed instead since ``from_peft``."""
    summary = FusionSummary()
    for name, layer in _lora_layers(model):
        reason = _static_reason(layer)
        if reason is None:
            summary.fused.append(name)
        else:
            summary.left_to_peft[name] = reason
        counts = layer.__dict__.get(_FALLBACKS_ATTR)
        if counts:
            summary.fallback_calls[name] = dict(counts)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def from_peft(model: nn.Module) -> nn.Module:
    """Accelerate a PEFT LoRA model in place and return it (the same object: a ``PeftModel``, a ``LoraModel``, or
    a model with adapters injected by ``peft.inject_adapter_in_model``).

    Each PEFT ``lora.Linear`` (over ``nn.Linear`` or transformers' ``Conv1D``) and ``lora.bnb.Linear4bit`` (over an
    NF4 ``Linear4bit``) computes its active adapter -- LoRA or DoRA -- through :func:`fused_lora.fused_lora_linear`,
    reading PEFT's own parameters; what that does not compute runs PEFT's forward (module docstring). Nothing else
    changes: module tree, parameters and their names, adapters, dtypes, files. Calling it again accelerates layers
    added since (``add_adapter`` with new target modules); :func:`restore_peft` undoes it. Warns when a layer is
    left to PEFT; :func:`fusion_summary` tells which and why.
    """
    layers = _lora_layers(model)
    for name, layer in layers:
        fused_name = _fused_name_for(layer)
        if fused_name is not None:
            layer.__class__ = _fused_class(fused_name)
        if _is_fused(layer):
            layer.__dict__[_NAME_ATTR] = name
            layer.__dict__.setdefault(_FALLBACKS_ATTR, {})
    summary = fusion_summary(model)
    if not layers:
        warnings.warn(f"fused-lora: from_peft found no PEFT LoRA layer in {type(model).__name__}; nothing to "
                      "accelerate", stacklevel=2)
    elif summary.left_to_peft:
        warnings.warn(f"{summary}\n(fused_lora.fusion_summary(model) gives this summary later)", stacklevel=2)
    return model


def restore_peft(model: nn.Module) -> nn.Module:
    """Give every layer :func:`from_peft` accelerated PEFT's own forward back (their class is PEFT's again);
    returns ``model``."""
    for _, layer in _lora_layers(model):
        if _is_fused(layer):
            layer.__class__ = next(c for c in type(layer).__mro__[1:] if c is not _FusedForward
                                   and not issubclass(c, _FusedForward))
            for attr in (_FALLBACKS_ATTR, _NAME_ATTR, "_fused_lora_nf4", _DORA_ATTR):
                layer.__dict__.pop(attr, None)
    return model
