"""PEFT -> fused-lora: ``from_peft(peft_model)`` replaces PEFT's LoRA layers by ``FusedLoraLinear`` layers with the
same base weights and adapters, in place."""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
from torch import nn

from .conversion import get_meta, record_shared_weights
from .layers import FusedLoraLinear, is_plain_linear
from .nf4 import bitsandbytes_classes

__all__ = ["from_peft"]


def _fork_rng_for(tensor: torch.Tensor):
    """Leave the caller's random streams untouched while a new layer draws its (discarded) initial A."""
    devices = [tensor.device.index or 0] if tensor.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _convert_peft_lora_layer(name: str, module: nn.Module, adapter: str) -> nn.Module:
    """The fused-lora layer equivalent to one PEFT LoRA layer (base weight/bias shared, A/B copied). PEFT's
    ``lora.Linear`` over an ``nn.Linear`` becomes a dense FusedLoraLinear; its ``lora.Linear4bit`` over a
    bitsandbytes NF4 ``Linear4bit`` becomes a FusedLoraLinear over an NF4 base reading the packed weight as it is."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    base = module.get_base_layer()
    quantized = "Linear4bit" in bitsandbytes_classes(base)
    if quantized:
        from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

        if not isinstance(module, PeftLoraLinear4bit):
            raise TypeError(f"PEFT layer {name!r} is a {type(module).__name__} over a bitsandbytes Linear4bit")
    elif not isinstance(module, PeftLoraLinear):
        raise TypeError(
            f"PEFT layer {name!r} is a {type(module).__module__}.{type(module).__name__} over a "
            f"{type(base).__name__}: only lora.Linear over nn.Linear converts to FusedLoraLinear"
        )
    if getattr(module, "fan_in_fan_out", False):
        raise TypeError(f"PEFT layer {name!r} uses fan_in_fan_out=True (a [in, out] Conv1D-style base): not supported")
    if not quantized and not is_plain_linear(base):
        raise TypeError(
            f"PEFT layer {name!r} has a {type(base).__module__}.{type(base).__name__} base: only nn.Linear is supported"
        )
    if module.merged:
        raise ValueError(
            f"PEFT layer {name!r} is merged (adapters {module.merged_adapters} folded into the base weight): "
            "call unmerge_adapter() first"
        )
    if module.disable_adapters:
        raise ValueError(f"PEFT layer {name!r} has its adapters disabled: enable them before converting")
    adapters = list(module.lora_A.keys())
    if adapters != [adapter]:
        raise ValueError(f"PEFT layer {name!r} holds adapters {adapters}; exactly one ({adapter!r}) is supported")
    if adapter not in module.active_adapters:
        raise ValueError(f"PEFT layer {name!r}: adapter {adapter!r} is not active (active: {module.active_adapters})")
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None or getattr(module, "use_dora", {}).get(adapter, False):
        what = type(variant).__name__ if variant is not None else "DoRA"
        raise ValueError(f"PEFT layer {name!r} uses a LoRA variant ({what}, e.g. DoRA): not supported")
    if getattr(module, "lora_bias", {}).get(adapter, False) or module.lora_B[adapter].bias is not None:
        raise ValueError(f"PEFT layer {name!r} has lora_bias=True (a bias on lora_B): not supported")
    if getattr(module, "lora_magnitude_vector", None) is not None and adapter in module.lora_magnitude_vector:
        raise ValueError(f"PEFT layer {name!r} has a DoRA magnitude vector: not supported")
    dropout = module.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout):
        p = float(dropout.p)
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        raise TypeError(f"PEFT layer {name!r}: unknown LoRA dropout module {type(dropout).__name__}")
    r, alpha = module.r[adapter], module.lora_alpha[adapter]
    use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if tuple(A.shape) != (r, base.in_features) or tuple(B.shape) != (base.out_features, r):
        raise ValueError(f"PEFT layer {name!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match r={r}")

    with _fork_rng_for(base.weight):
        if quantized:
            layer = FusedLoraLinear.from_bnb(base, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=use_rslora,
                                             compute_dtype=_bnb_compute_dtype(base, A.dtype))
        else:
            layer = FusedLoraLinear.from_linear(base, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=use_rslora)
    if A.dtype != layer.compute_dtype or B.dtype != layer.compute_dtype:
        warnings.warn(
            f"{name}: PEFT keeps this adapter in {A.dtype} but the layer computes in {layer.compute_dtype}; "
            f"FusedLoraLinear computes in one dtype, so A and B are rounded to {layer.compute_dtype}",
            stacklevel=3,
        )
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.lora_A.requires_grad_(A.requires_grad)
    layer.lora_B.requires_grad_(B.requires_grad)
    layer.scaling = float(module.scaling[adapter])  # PEFT's value, also if set_scale() changed it
    layer.train(module.training)
    return layer


def _bnb_compute_dtype(base: nn.Module, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype a bitsandbytes Linear4bit computes in: its ``compute_dtype``, else (bitsandbytes infers it from
    the input) the adapter's dtype."""
    return getattr(base, "compute_dtype", None) or adapter_dtype


def _peft_root_and_config(peft_model: nn.Module):
    """(the wrapped transformers/torch model, the single adapter's name, its config)."""
    import peft
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(peft_model, peft.PeftModel):
        configs = dict(peft_model.peft_config)
        tuner = peft_model.base_model
        if not isinstance(tuner, BaseTuner):
            raise TypeError(f"PeftModel wraps a {type(tuner).__name__}, not a LoRA tuner")
        root = tuner.model
    elif isinstance(peft_model, BaseTuner):
        configs, root = dict(peft_model.peft_config), peft_model.model
    else:  # a model with adapters injected by peft.inject_adapter_in_model
        configs, root = dict(getattr(peft_model, "peft_config", {}) or {}), peft_model
    if len(configs) > 1:
        raise ValueError(
            f"the PEFT model holds {len(configs)} adapters {sorted(configs)}; fused-lora converts exactly one "
            "(delete the others with delete_adapter)"
        )
    if configs:
        (adapter, config), = configs.items()
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        if peft_type != "LORA":
            raise ValueError(f"adapter {adapter!r} has peft_type={peft_type!r}; only LORA converts")
        # use_dora, fan_in_fan_out, lora_bias are checked per layer (the errors name the module)
        if getattr(config, "bias", "none") != "none":
            raise ValueError(f"adapter {adapter!r}: bias={config.bias!r} (trained base biases) is not supported")
        for attr in ("layer_replication", "trainable_token_indices", "target_parameters"):
            if getattr(config, attr, None):
                raise ValueError(f"adapter {adapter!r}: {attr}={getattr(config, attr)!r} is not supported")
    else:
        adapter, config = None, None
    return root, adapter, config


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Convert a PEFT LoRA model (one adapter) to fused-lora, in place.

    Every PEFT ``lora.Linear`` over an ``nn.Linear`` is replaced by a ``FusedLoraLinear`` that shares the base
    layer's ``weight`` and ``bias`` Parameters; every ``lora.Linear4bit`` over a bitsandbytes NF4 ``Linear4bit``
    (QLoRA) by a ``FusedLoraLinear`` over an NF4 base that reads the packed weight as it is (shared, not
    re-quantized) and shares the bias. Each holds a copy of the adapter's A and B (same ``requires_grad`` as PEFT's),
    with the layer's ``r``, ``lora_alpha``, dropout probability, ``use_rslora`` and ``scaling``. A
    ``ModulesToSaveWrapper`` is replaced by its trained copy (trainable as in PEFT; recorded so that ``save_adapter``
    saves it). The PEFT wrapper must not be used afterwards. Returns the unwrapped model
    (``peft_model.base_model.model`` for a ``PeftModel``), whose outputs equal the PEFT model's.

    Errors (raised before anything is modified), naming the module: several adapters, DoRA or another LoRA variant,
    merged or disabled layers, ``fan_in_fan_out=True`` bases, ``lora_bias``, trained base biases, non-Linear LoRA
    layers (Embedding, Conv, MultiheadAttention, target_parameters), bitsandbytes 8-bit bases (``TypeError``) and
    4-bit bases other than NF4 (``ValueError``), other PEFT methods, trainable-token wrappers.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # PEFT < 0.15
        AuxiliaryTrainingWrapper = ModulesToSaveWrapper

    root, adapter, config = _peft_root_and_config(peft_model)
    replacements: List[Tuple[str, nn.Module]] = []
    saved: List[str] = []
    done: List[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(p + ".") for p in done):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            if adapter is None or active != [adapter]:
                raise ValueError(
                    f"modules_to_save wrapper {name!r}: active adapters {module.active_adapters}, expected [{adapter!r}]"
                )
            replacements.append((name, module.modules_to_save[adapter]))
            saved.append(name)
            done.append(name)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(f"{name!r} is a PEFT {type(module).__name__} (e.g. trainable tokens): not supported")
        elif isinstance(module, LoraLayer):
            if adapter is None:
                adapter = next(iter(module.lora_A.keys()), None) or "default"
            replacements.append((name, _convert_peft_lora_layer(name, module, adapter)))
            done.append(name)
        elif isinstance(module, BaseTunerLayer):
            raise ValueError(f"{name!r} is a PEFT {type(module).__name__}: only LoRA layers convert")
    lora_names = [name for name, new in replacements if isinstance(new, FusedLoraLinear)]
    if not lora_names:
        raise ValueError(f"no PEFT LoRA layer found in {type(peft_model).__name__}")

    for name, new in replacements:
        root.set_submodule(name, new)
    record_shared_weights(root, lora_names)
    meta = get_meta(root)
    meta.modules_to_save = list(getattr(config, "modules_to_save", None) or [])
    meta.modules_to_save_names = saved
    task_type = getattr(config, "task_type", None)
    meta.task_type = None if task_type is None else str(getattr(task_type, "value", task_type))
    meta.base_model_name_or_path = getattr(config, "base_model_name_or_path", None)
    return root
