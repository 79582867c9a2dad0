"""Putting ``FusedLoraLinear`` layers into a model: planning and applying LoRA, trainability, parameter counts, and
the model-level settings ``save_adapter`` needs.

Public API::

    apply_lora(model, target_modules, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False, quantize=None,
               modules_to_save=None, *, exclude_modules=None, rank_pattern=None, alpha_pattern=None,
               adapter_dtype=None, use_dora=False) -> model
    lora_layers(model) -> iterator of (name, FusedLoraLinear)
    trainable_parameters_summary(model) -> (trainable, total, percent)
    print_trainable_parameters(model)

Module selection follows PEFT's ``LoraConfig`` rules exactly (see :mod:`fused_lora.targets`). Differences from PEFT
(documented choices):

* ``modules_to_save`` modules are trained **in place** (their parameters are set trainable), not copied into a
  ``ModulesToSaveWrapper``. Consequences: the original values are not kept in memory; ``print_trainable_parameters``
  counts them once (PEFT's "all params" also counts the copy); a module whose parameters are shared with a module
  outside ``modules_to_save`` (e.g. an ``lm_head`` tied to the input embedding) is refused, because training it in
  place would also change the other module, which PEFT's copy does not.
* Adapters are created as PEFT's ``get_peft_model`` creates them by default (``autocast_adapter_dtype=True``): in
  fp32 over layers computing in fp16 / bf16, in the layer's dtype otherwise; ``adapter_dtype`` chooses another
  (e.g. ``torch.bfloat16`` for all-bf16 training, PEFT's ``autocast_adapter_dtype=False``). Unlike PEFT, fp32
  adapters do not make a fp32 copy of the activations (``fused_lora.functional.FusedLoraFunction``).
* One adapter per layer (no named / multiple adapters); ``task_type`` only matters when saving (see
  ``fused_lora.adapters.save_adapter``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .source_layers import SourceLayer, source_layer, check_quantize
from .hyperparams import Hyperparams, LayerHyperparams
from .layers import FusedLoraLinear
from .targets import (
    ALL_LINEAR,
    TargetModules,
    all_linear_names,
    bypassed_linears,
    check_modules_to_save_not_shared,
    check_regexes,
    name_matches,
    normalize_names,
    resolve_modules_to_save,
    under_modules_to_save,
)

__all__ = [
    "LoraModelMeta",
    "LoraPlan",
    "PlannedLayer",
    "apply_lora",
    "execute_plan",
    "get_meta",
    "lora_layers",
    "plan_lora",
    "print_trainable_parameters",
    "record_shared_weights",
    "set_trainability",
    "trainable_parameters_summary",
    "unwrap_model",
]


# --------------------------------------------------------------------------------------------------------------------
# Bookkeeping stored on the model: what save_adapter needs beyond the layers themselves.
# --------------------------------------------------------------------------------------------------------------------

META_ATTR = "_fused_lora_meta"


@dataclass
class LoraModelMeta:
    """Model-level LoRA settings that are not visible from the layers (stored as ``model._fused_lora_meta``).

    ``modules_to_save``: the entries as given (PEFT config semantics); ``modules_to_save_names``: the module names they
    resolved to; ``task_type`` / ``base_model_name_or_path``: carried from a PEFT config or an adapter file so that
    ``save_adapter`` writes them back.
    """

    modules_to_save: List[str] = field(default_factory=list)
    modules_to_save_names: List[str] = field(default_factory=list)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None

    def add_modules_to_save(self, entries: Sequence[str], names: Sequence[str]) -> None:
        """Record more ``modules_to_save`` entries and the module names they resolved to (each once)."""
        self.modules_to_save += [m for m in entries if m not in self.modules_to_save]
        self.modules_to_save_names += [n for n in names if n not in self.modules_to_save_names]


def get_meta(model: nn.Module, create: bool = True) -> LoraModelMeta:
    """The model's :class:`LoraModelMeta`. When absent: a new empty one, stored on the model unless
    ``create=False``."""
    meta = getattr(model, META_ATTR, None)
    if not isinstance(meta, LoraModelMeta):
        meta = LoraModelMeta()
        if create:
            setattr(model, META_ATTR, meta)
    return meta


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, FusedLoraLinear]]:
    """``(name, layer)`` for every fused-lora layer in ``model``, in ``named_modules()`` order."""
    for name, module in model.named_modules():
        if isinstance(module, FusedLoraLinear):
            yield name, module


# --------------------------------------------------------------------------------------------------------------------
# Plan, then apply (so that errors leave the model unchanged)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PlannedLayer:
    """A module :func:`execute_plan` replaces: its kind of base and the settings of its LoRA layer."""

    name: str
    module: nn.Module
    kind: SourceLayer
    hyperparams: LayerHyperparams


@dataclass
class LoraPlan:
    """What :func:`apply_lora` will do, computed without touching the model (so that errors leave it unchanged)."""

    targets: List[PlannedLayer]
    modules_to_save: List[str]
    modules_to_save_names: List[str]


def plan_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quantize: Optional[str] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    exclude_modules: Optional[TargetModules] = None,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    use_dora: bool = False,
) -> LoraPlan:
    """Select and validate the modules :func:`apply_lora` replaces (same arguments); the model is not modified."""
    check_quantize(quantize)
    hyperparams = Hyperparams.checked(r, lora_alpha, lora_dropout, use_rslora, rank_pattern, alpha_pattern,
                                      adapter_dtype=adapter_dtype, use_dora=use_dora)
    targets_spec = normalize_names(target_modules, "target_modules", allow_none=False)
    exclude_spec = normalize_names(exclude_modules, "exclude_modules")
    mts_spec = normalize_names(modules_to_save, "modules_to_save")
    mts = [mts_spec] if isinstance(mts_spec, str) else list(mts_spec or ())
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is not None and not isinstance(patterns, Mapping):
            raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(patterns).__name__}")
    check_regexes(targets_spec, exclude_spec, mts, rank_pattern, alpha_pattern)

    if isinstance(targets_spec, str) and targets_spec.lower() == ALL_LINEAR:
        targets_spec = tuple(sorted(all_linear_names(model)))

    mts_names = resolve_modules_to_save(model, mts) if mts else []
    bypassed = bypassed_linears(model)
    targets: List[PlannedLayer] = []
    for key, module in list(model.named_modules()):
        if not key or not name_matches(targets_spec, key):
            continue
        if exclude_spec is not None and name_matches(exclude_spec, key):
            continue
        if mts and under_modules_to_save(mts, key):
            continue
        kind = source_layer(key, module, quantize)  # raises for anything that cannot be adapted
        if key in bypassed:
            never_runs, why = bypassed[key]
            if never_runs:
                raise ValueError(f"target module {key!r}: {why} (check target_modules)")
            warnings.warn(f"target module {key!r}: {why}", stacklevel=3)
        targets.append(PlannedLayer(key, module, kind, hyperparams.for_module(key)))

    if not targets:
        linear = sorted(n for n, m in model.named_modules() if n and isinstance(m, nn.Linear))
        shown = ", ".join(linear[:12]) + (", ..." if len(linear) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
            f"(after exclude_modules / modules_to_save); its nn.Linear modules are: [{shown}]"
        )
    if mts_names:
        check_modules_to_save_not_shared(model, mts_names)
    return LoraPlan(targets, mts, mts_names)


def execute_plan(model: nn.Module, plan: LoraPlan) -> nn.Module:
    """Replace the planned modules, freeze everything else, unfreeze A, B and the ``modules_to_save``.

    Each new layer's base weight and bias are the replaced module's own Parameters (shared, not copied) and frozen
    -- or, with ``quantize="nf4"``, the weight quantized to NF4 and the dense one dropped; a bitsandbytes
    ``Linear4bit`` keeps its 4-bit weight as it is. A, B are freshly initialised as PEFT does (A kaiming, B = 0), in
    the planned adapter dtype (and for DoRA the magnitude, the rows' norms of W)."""
    for target in plan.targets:
        layer = target.kind.build(target.module, **dataclasses.asdict(target.hyperparams))
        layer.train(target.module.training)
        model.set_submodule(target.name, layer)

    record_shared_weights(model, [t.name for t in plan.targets])
    get_meta(model).add_modules_to_save(plan.modules_to_save, plan.modules_to_save_names)
    set_trainability(model)
    return model


def apply_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quantize: Optional[str] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    *,
    exclude_modules: Optional[TargetModules] = None,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` by ``FusedLoraLinear`` layers, in place.

    Selection (``target_modules``, ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``"all-linear"``) follows
    PEFT's ``LoraConfig`` exactly; see :mod:`fused_lora.targets`. Each new layer shares the replaced linear's
    ``weight`` and ``bias`` Parameters (no copy) and gets PEFT's initialisation (A kaiming-uniform, B = 0: the model's
    outputs are unchanged). Afterwards only the LoRA A, B matrices (and DoRA magnitudes) and the parameters of the
    ``modules_to_save`` modules are trainable; every other parameter is frozen. ``modules_to_save`` modules are
    trained in place (not copied as PEFT's ``ModulesToSaveWrapper`` does) and are saved in full by ``save_adapter``.

    ``quantize``: ``None`` keeps dense bases dense; ``"nf4"`` quantizes every selected ``nn.Linear`` to NF4
    (bitsandbytes' format, blocksize 64, double quantization: QLoRA) and drops its dense weight. bitsandbytes
    ``Linear4bit`` (NF4) modules are adapted as they are, whatever ``quantize`` says (FusedLoraLinear.from_bnb).

    ``adapter_dtype``: the dtype of every new A and B. None (default) follows PEFT's ``get_peft_model``
    (``autocast_adapter_dtype=True``): fp32 adapters where a layer computes in fp16 / bf16 (its weight's dtype, or a
    4-bit base's compute dtype), the layer's dtype otherwise. fp32 adapters train in fp32 (their gradients are fp32)
    while the activations stay in half precision.

    ``use_dora``: DoRA layers (PEFT's ``use_dora=True``; QDoRA over 4-bit bases): each also trains a magnitude
    vector ``lora_magnitude_vector`` ``[out]`` (in the adapter dtype), initialised to the rows' norms of its base
    weight, so that the model's outputs are unchanged (see :class:`~fused_lora.layers.FusedLoraLinear`).

    Raises (before modifying anything): ``ValueError`` when nothing matches (listing the model's linear layers);
    ``TypeError`` naming the type when a selected module is not an ``nn.Linear``; ``ValueError`` for bad ``r``,
    ``lora_alpha``, ``lora_dropout``, ``adapter_dtype``, ``use_dora`` (:mod:`fused_lora.validation`; a bad
    ``rank_pattern`` / ``alpha_pattern`` value names the module it applies to), for ``modules_to_save`` entries that
    match nothing or whose weights are tied to a module outside them, and naming the argument for a pattern that is
    not a valid regular expression (``target_modules`` / ``exclude_modules`` strings, ``modules_to_save`` entries,
    ``rank_pattern`` / ``alpha_pattern`` keys). Returns ``model``.
    """
    plan = plan_lora(model, target_modules, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     use_rslora=use_rslora, quantize=quantize, modules_to_save=modules_to_save,
                     exclude_modules=exclude_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     adapter_dtype=adapter_dtype, use_dora=use_dora)
    return execute_plan(model, plan)


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last + 1)`` byte addresses spanned by ``t``'s elements."""
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def record_shared_weights(model: nn.Module, names: Sequence[str]) -> None:
    """Find the dense LoRA layers among ``names`` whose base weight overlaps another tensor of the model in memory
    (tied embeddings, two layers on one weight, a fused weight and a view of it): record the other holders on the
    layer (its merge() refuses, since merging in place would change them) and warn, as PEFT does. Disjoint views of
    one buffer (q, k, v slices of a fused weight) do not count. NF4 bases are skipped: their merge() writes new
    buffers, leaving whatever shares the old ones unchanged."""
    # state-dict names, every holder listed (a tied weight appears under each of its names)
    tensors = model.state_dict(keep_vars=True).items()
    spans = [(key, t, _byte_range(t)) for key, t in tensors
             if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0]
    for name in names:
        layer = model.get_submodule(name)
        if layer.quantized or layer.weight.device.type == "meta":
            continue
        weight = layer.weight
        lo, hi = _byte_range(weight)
        others = [key for key, t, (t_lo, t_hi) in spans if key != f"{name}.base.weight" and t.device == weight.device
                  and t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                  and t_lo < hi and lo < t_hi]
        if others:
            layer.weight_shared_with = tuple(dict.fromkeys(layer.weight_shared_with + tuple(others)))
            warnings.warn(f"{name}: the base weight is shared with {', '.join(others)} (tied weights); training is "
                          "unaffected, but merge() is refused for this layer (merge_and_unload writes a new tensor)",
                          stacklevel=3)


def set_trainability(model: nn.Module, adapters_trainable: bool = True) -> None:
    """Freeze every parameter except the LoRA A, B (and DoRA magnitudes) and the ``modules_to_save`` modules
    recorded on ``model``, which get ``requires_grad=adapters_trainable``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(adapters_trainable)
        layer.lora_B.requires_grad_(adapters_trainable)
        if layer.use_dora:
            layer.lora_magnitude_vector.requires_grad_(adapters_trainable)
    for name in get_meta(model).modules_to_save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(adapters_trainable)


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts (PEFT's get_nb_trainable_parameters)
# --------------------------------------------------------------------------------------------------------------------


def _parameter_count(param: torch.Tensor) -> int:
    """Number of weights a parameter represents, with PEFT's rules: DeepSpeed ZeRO-3 placeholders report
    ``ds_numel``; bitsandbytes ``Params4bit`` pack two 4-bit values per byte of their storage dtype."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":
        if hasattr(param, "element_size"):
            nbytes = param.element_size()
        elif not hasattr(param, "quant_storage"):
            nbytes = 1
        else:
            nbytes = param.quant_storage.itemsize
        count = count * 2 * nbytes
    return count


def trainable_parameters_summary(model: nn.Module) -> Tuple[int, int, float]:
    """``(trainable, total, 100 * trainable / total)``, counted as PEFT's ``get_nb_trainable_parameters`` does
    (each shared Parameter once). ``modules_to_save`` are counted once (they are trained in place, PEFT counts the
    original and its trainable copy)."""
    trainable = total = 0
    for _, param in model.named_parameters():
        count = _parameter_count(param)
        total += count
        if param.requires_grad:
            trainable += count
    for _, layer in lora_layers(model):
        # an NF4 base lives in buffers, not Parameters: count its out x in weights, as PEFT counts a bitsandbytes
        # Params4bit
        if layer.quantized:
            total += layer.in_features * layer.out_features
    return trainable, total, (100.0 * trainable / total if total else 0.0)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total, percent = trainable_parameters_summary(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
