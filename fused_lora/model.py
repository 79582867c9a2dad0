"""Model-level LoRA: put ``FusedLoraLinear`` layers into a model, convert PEFT models, merge and unload.

Public API::

    apply_lora(model, target_modules, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False, quantize=None,
               modules_to_save=None, *, exclude_modules=None, rank_pattern=None, alpha_pattern=None) -> model
    lora_layers(model) -> iterator of (name, FusedLoraLinear)
    trainable_parameters_summary(model) -> (trainable, total, percent)
    print_trainable_parameters(model)
    from_peft(peft_model) -> the unwrapped base model, with FusedLoraLinear layers
    merge_and_unload(model) -> model with plain nn.Linear layers

Module selection follows PEFT's ``LoraConfig`` rules exactly (``peft.tuners.tuners_utils.check_target_module_exists``):

* ``target_modules`` as a list / set / tuple of strings: a module named ``key`` is selected when ``key`` equals an
  entry or ends with ``"." + entry`` (a suffix at a dot boundary; entries are plain strings, not regexes);
* ``target_modules`` as a single string: a regular expression that must match the *whole* module name
  (``re.fullmatch``);
* ``"all-linear"`` (any case): every ``nn.Linear`` (and transformers ``Conv1D``, which is then rejected as
  unsupported) except the output layer: for a transformers ``PreTrainedModel``, the module returned by
  ``get_output_embeddings()`` (the ``lm_head``) is excluded, as PEFT does; so are the linears whose parent
  bypasses them (``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``:
  :func:`bypassed_linears`). Named explicitly, the first is refused and the others warn;
* ``exclude_modules``: same list / regex rules, removes modules from the selection;
* ``modules_to_save`` entries select the modules whose name *ends with* the entry (a plain string suffix, not at a
  dot boundary: PEFT's ``_set_trainable`` rule); modules at or under an entry are never adapted (PEFT's rule:
  ``re.match(r"(^|.*\\.){entry}($|\\..*)", name)``);
* ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``; the first pattern (in dict order) for which
  ``re.match(r"(.*\\.)?(pattern)$", name)`` succeeds gives the module's ``r`` / ``lora_alpha``; others use ``r`` /
  ``lora_alpha``.

Differences from PEFT (documented choices):

* ``modules_to_save`` modules are trained **in place** (their parameters are set trainable), not copied into a
  ``ModulesToSaveWrapper``. Consequences: the original values are not kept in memory; ``print_trainable_parameters``
  counts them once (PEFT's "all params" also counts the copy); a module whose parameters are shared with a module
  outside ``modules_to_save`` (e.g. an ``lm_head`` tied to the input embedding) is refused, because training it in
  place would also change the other module, which PEFT's copy does not.
* Adapters are created in the base weight's dtype (``FusedLoraLinear`` computes in one dtype). PEFT upcasts fp16 /
  bf16 adapters to fp32 by default (``autocast_adapter_dtype=True``).
* One adapter per layer (no named / multiple adapters); ``task_type`` only matters when saving (see
  ``fused_lora.adapters.save_adapter``); for ``"all-linear"`` the rule is PEFT's rule with ``task_type=None``.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layers import FusedLoraLinear, is_plain_linear
from .nf4 import bitsandbytes_classes

__all__ = [
    "apply_lora",
    "from_peft",
    "lora_layers",
    "merge_and_unload",
    "print_trainable_parameters",
    "trainable_parameters_summary",
]

ALL_LINEAR = "all-linear"
QUANTIZE_MODES = ("nf4",)

# The layer classes lora_layers() reports. The NF4 FusedLoraLinear joins this tuple when it lands (unless it
# subclasses FusedLoraLinear).
LORA_LAYER_TYPES: Tuple[type, ...] = (FusedLoraLinear,)

TargetModules = Union[str, Sequence[str]]


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


def get_meta(model: nn.Module) -> LoraModelMeta:
    """The model's :class:`LoraModelMeta` (created empty when absent)."""
    meta = getattr(model, META_ATTR, None)
    if not isinstance(meta, LoraModelMeta):
        meta = LoraModelMeta()
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


# --------------------------------------------------------------------------------------------------------------------
# PEFT's name-matching rules
# --------------------------------------------------------------------------------------------------------------------


def _normalize_names(value, what: str, allow_none: bool = True) -> Union[None, str, Tuple[str, ...]]:
    """A regex string, or a tuple of plain names (from a list / set / tuple of str)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{what} is required: a list of module-name suffixes, a regex string, or 'all-linear'")
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must not be an empty string")
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"{what} entries must be non-empty strings, got {bad!r}")
        if not names and not allow_none:
            raise ValueError(f"{what} is empty: no module would be adapted")
        return names
    raise TypeError(f"{what} must be a string (regex) or a list/set/tuple of strings, got {type(value).__name__}")


def name_matches(spec: Union[str, Tuple[str, ...]], key: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` rule: a string is a full-match regex; a list matches an equal
    name or a suffix at a dot boundary."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + entry) for entry in spec)


def under_modules_to_save(modules_to_save: Sequence[str], key: str) -> bool:
    """PEFT never adapts a module at or under a ``modules_to_save`` entry (entries are used as regex fragments)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def pattern_value(patterns: Optional[Mapping[str, object]], key: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the first pattern
    ``p`` (dict order) with ``re.match(rf"(.*\\.)?({p})$", key)`` gives the value; otherwise ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def check_regexes(target_modules=None, exclude_modules=None, modules_to_save=(), rank_pattern=None,
                  alpha_pattern=None, where: str = "") -> None:
    """``ValueError`` naming the argument (prefixed by ``where``) for a pattern that is not a valid regular
    expression, as each is used: ``target_modules`` / ``exclude_modules`` strings (full-match regexes),
    ``modules_to_save`` entries and ``rank_pattern`` / ``alpha_pattern`` keys (regex fragments, PEFT's rules)."""
    checks = [(what, spec, spec) for what, spec in (("target_modules", target_modules),
                                                      ("exclude_modules", exclude_modules)) if isinstance(spec, str)]
    checks += [("modules_to_save entry", m, rf"(^|.*\.){m}($|\..*)") for m in modules_to_save or ()]
    for what, patterns in (("rank_pattern key", rank_pattern), ("alpha_pattern key", alpha_pattern)):
        checks += [(what, p, rf"(.*\.)?({p})$") for p in (patterns or {}) if isinstance(p, str)]
    for what, shown, regex in checks:
        try:
            re.compile(regex)
        except re.error as exc:
            sep = "=" if what in ("target_modules", "exclude_modules") else " "
            raise ValueError(f"{where}{what}{sep}{shown!r} is not a valid regular expression ({exc})") from None


def resolve_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> List[str]:
    """Names of the modules selected by ``modules_to_save`` (PEFT's rule: the module name ends with the entry, a
    plain string suffix). Every entry must select at least one module."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    selected, unmatched = [], []
    for entry in modules_to_save:
        hits = [n for n in names if n.endswith(entry)]
        if not hits:
            unmatched.append(entry)
        selected.extend(h for h in hits if h not in selected)
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of {type(model).__name__}")
    # a module inside another selected module is covered by its parent
    return [n for n in selected if not any(n.startswith(p + ".") for p in selected if p != n)]


def _check_modules_to_save_not_shared(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse a ``modules_to_save`` module whose parameters are also reachable outside it (tied weights)."""
    owned = {}
    for prefix in names:
        for pname, p in model.get_submodule(prefix).named_parameters(remove_duplicate=False):
            owned[id(p)] = f"{prefix}.{pname}"
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owned and not any(pname == n or pname.startswith(n + ".") for n in names):
            raise ValueError(
                f"modules_to_save: parameter {owned[id(p)]} is shared with {pname} (tied weights). fused-lora trains "
                "modules_to_save in place, which would also change the tied module, whereas PEFT trains a copy; untie "
                "the weights first (e.g. tie_word_embeddings=False with a cloned lm_head) or do not save this module"
            )


def _output_embedding_names(model: nn.Module) -> set:
    """PEFT's ``all-linear`` exclusion: the output embedding layer of a transformers ``PreTrainedModel``."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return set()
    output_emb = model.get_output_embeddings()
    if output_emb is None:
        return set()
    return {n for n, m in model.named_modules() if m is output_emb}


def _conv1d_class():
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def all_linear_names(model: nn.Module) -> set:
    """Module names ``target_modules="all-linear"`` selects: PEFT's rule (``nn.Linear`` and ``Conv1D`` modules,
    existing LoRA layers, minus the output embedding of a ``PreTrainedModel``), minus the linears whose parent
    bypasses them (:func:`bypassed_linears`), where an adapter would not (always) run."""
    classes = tuple(c for c in (nn.Linear, _conv1d_class()) + LORA_LAYER_TYPES if c is not None)
    names = {n for n, m in model.named_modules() if n and isinstance(m, classes)}
    return names - _output_embedding_names(model) - set(bypassed_linears(model))


def bypassed_linears(model: nn.Module) -> Dict[str, Tuple[bool, str]]:
    """``{name: (never_runs, why)}`` for the linear modules whose parent reads their weight instead of calling them:
    ``nn.MultiheadAttention.out_proj`` always (an adapter there never runs), ``nn.TransformerEncoderLayer``'s
    ``linear1`` / ``linear2`` in its inference fast path (eval mode without grad)."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            out[prefix + "out_proj"] = (True, "nn.MultiheadAttention uses out_proj.weight directly and never calls "
                                              "out_proj, so an adapter there would never run")
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                out[prefix + child] = (False, "nn.TransformerEncoderLayer's inference fast path (eval mode without "
                                              "grad) uses its weight directly, skipping the adapter; call "
                                              "torch.backends.mha.set_fastpath_enabled(False) for inference")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Per-module construction (the lead extends this for 4-bit bases)
# --------------------------------------------------------------------------------------------------------------------


def _lora_kind(name: str, module: nn.Module, quantize: Optional[str]) -> str:
    """Which LoRA layer ``module`` becomes, or a clear error for what is not supported.

    Returns ``"linear"`` (``FusedLoraLinear.from_linear``), ``"nf4"`` (a dense linear quantized to NF4:
    ``from_linear(..., quantize="nf4")``) or ``"bnb4bit"`` (a bitsandbytes ``Linear4bit``, read as it is:
    ``FusedLoraLinear.from_bnb``)."""
    bnb_classes = bitsandbytes_classes(module)
    if "Linear4bit" in bnb_classes:
        quant_type = getattr(module.weight, "quant_type", None)
        if quant_type != "nf4":
            raise TypeError(f"module {name!r} is a bitsandbytes Linear4bit with quant_type={quant_type!r}: only NF4 "
                            "4-bit bases are supported")
        return "bnb4bit"
    if "Linear8bitLt" in bnb_classes:
        raise TypeError(f"module {name!r} is a bitsandbytes Linear8bitLt: 8-bit bases are not supported")
    if is_plain_linear(module):
        if not module.weight.is_floating_point():
            raise TypeError(f"module {name!r} has a {module.weight.dtype} weight; LoRA needs a floating-point base")
        return "linear" if quantize is None else "nf4"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        raise TypeError(
            f"module {name!r} is a transformers Conv1D (weight stored [in, out], PEFT's fan_in_fan_out=True): "
            "not supported; only nn.Linear bases are"
        )
    if isinstance(module, LORA_LAYER_TYPES):
        raise ValueError(
            f"module {name!r} is already a {type(module).__name__}: fused-lora keeps one adapter per layer "
            "(was apply_lora called twice on the same module?)"
        )
    if isinstance(module, nn.Linear):
        raise TypeError(
            f"module {name!r} is a {type(module).__module__}.{type(module).__name__}, an nn.Linear subclass with its "
            "own forward: not supported (only nn.Linear bases are)"
        )
    raise TypeError(
        f"target module {name!r} is a {type(module).__module__}.{type(module).__name__}, not an nn.Linear; "
        "only nn.Linear layers can be adapted (check target_modules)"
    )


def _make_lora_layer(
    module: nn.Module,
    *,
    name: str,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    use_rslora: bool,
    quantize: Optional[str] = None,
) -> nn.Module:
    """The LoRA layer replacing ``module`` (named ``name`` in the model). Its base weight and bias are ``module``'s
    own Parameters (shared, not copied) and frozen -- or, with ``quantize="nf4"``, the weight quantized to NF4 and
    the dense one dropped; a bitsandbytes ``Linear4bit`` keeps its 4-bit weight as it is. A, B are freshly
    initialised as PEFT does (A kaiming, B = 0)."""
    kind = _lora_kind(name, module, quantize)
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    if kind == "linear":
        return FusedLoraLinear.from_linear(module, **lora)
    if kind == "nf4":
        return FusedLoraLinear.from_linear(module, quantize="nf4", **lora)
    if kind == "bnb4bit":
        return FusedLoraLinear.from_bnb(module, **lora)
    raise AssertionError(f"unhandled LoRA layer kind {kind!r}")  # pragma: no cover


def _check_rank_alpha(name: Optional[str], r, lora_alpha) -> None:
    where = f"module {name!r}: " if name else ""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}LoRA rank r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"{where}lora_alpha must be a finite number, got {lora_alpha!r}")


@dataclass
class _Target:
    name: str
    module: nn.Module
    r: int
    lora_alpha: float


@dataclass
class LoraPlan:
    """What :func:`apply_lora` will do, computed without touching the model (so that errors leave it unchanged)."""

    targets: List[_Target]
    modules_to_save: List[str]
    modules_to_save_names: List[str]
    lora_dropout: float
    use_rslora: bool
    quantize: Optional[str]


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
) -> LoraPlan:
    """Select and validate the modules :func:`apply_lora` replaces (same arguments); the model is not modified."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose None or one of {QUANTIZE_MODES}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    _check_rank_alpha(None, r, lora_alpha)
    targets_spec = _normalize_names(target_modules, "target_modules", allow_none=False)
    exclude_spec = _normalize_names(exclude_modules, "exclude_modules")
    mts_spec = _normalize_names(modules_to_save, "modules_to_save")
    mts = [mts_spec] if isinstance(mts_spec, str) else list(mts_spec or ())
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is not None and not isinstance(patterns, Mapping):
            raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(patterns).__name__}")
    check_regexes(targets_spec, exclude_spec, mts, rank_pattern, alpha_pattern)

    if isinstance(targets_spec, str) and targets_spec.lower() == ALL_LINEAR:
        targets_spec = tuple(sorted(all_linear_names(model)))

    mts_names = resolve_modules_to_save(model, mts) if mts else []
    bypassed = bypassed_linears(model)
    targets: List[_Target] = []
    for key, module in list(model.named_modules()):
        if not key or not name_matches(targets_spec, key):
            continue
        if exclude_spec is not None and name_matches(exclude_spec, key):
            continue
        if mts and under_modules_to_save(mts, key):
            continue
        _lora_kind(key, module, quantize)  # raises for anything that cannot be adapted
        if key in bypassed:
            never_runs, why = bypassed[key]
            if never_runs:
                raise ValueError(f"target module {key!r}: {why} (check target_modules)")
            warnings.warn(f"target module {key!r}: {why}", stacklevel=3)
        module_r = pattern_value(rank_pattern, key, r)
        module_alpha = pattern_value(alpha_pattern, key, lora_alpha)
        _check_rank_alpha(key, module_r, module_alpha)
        targets.append(_Target(key, module, module_r, module_alpha))

    if not targets:
        linear = sorted(n for n, m in model.named_modules() if n and isinstance(m, nn.Linear))
        shown = ", ".join(linear[:12]) + (", ..." if len(linear) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
            f"(after exclude_modules / modules_to_save); its nn.Linear modules are: [{shown}]"
        )
    if mts_names:
        _check_modules_to_save_not_shared(model, mts_names)
    return LoraPlan(targets, mts, mts_names, float(lora_dropout), bool(use_rslora), quantize)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def execute_plan(model: nn.Module, plan: LoraPlan) -> nn.Module:
    """Replace the planned modules, freeze everything else, unfreeze A, B and the ``modules_to_save``."""
    for target in plan.targets:
        layer = _make_lora_layer(
            target.module, name=target.name, r=target.r, lora_alpha=target.lora_alpha,
            lora_dropout=plan.lora_dropout, use_rslora=plan.use_rslora, quantize=plan.quantize,
        )
        layer.train(target.module.training)
        _set_submodule(model, target.name, layer)

    _record_shared_weights(model, [t.name for t in plan.targets])
    meta = get_meta(model)
    meta.modules_to_save += [m for m in plan.modules_to_save if m not in meta.modules_to_save]
    meta.modules_to_save_names += [n for n in plan.modules_to_save_names if n not in meta.modules_to_save_names]
    _set_trainability(model, meta)
    return model


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last + 1)`` byte addresses spanned by ``t``'s elements."""
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _record_shared_weights(model: nn.Module, names: Sequence[str]) -> None:
    """Find the dense LoRA layers among ``names`` whose base weight overlaps another tensor of the model in memory
    (tied embeddings, two layers on one weight, a fused weight and a view of it): record the other holders on the
    layer (its merge() refuses, since merging in place would change them) and warn, as PEFT does. Disjoint views of
    one buffer (q, k, v slices of a fused weight) do not count."""
    spans = [(key, t, _byte_range(t)) for key, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                                    model.named_buffers(remove_duplicate=False))
             if t.device.type != "meta" and t.numel() > 0]
    for name in names:
        layer = model.get_submodule(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, FusedLoraLinear) or weight is None or weight.device.type == "meta":
            continue
        lo, hi = _byte_range(weight)
        others = [key for key, t, (t_lo, t_hi) in spans if key != f"{name}.weight" and t.device == weight.device
                  and t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                  and t_lo < hi and lo < t_hi]
        if others:
            layer.weight_shared_with = tuple(dict.fromkeys(layer.weight_shared_with + tuple(others)))
            warnings.warn(f"{name}: the base weight is shared with {', '.join(others)} (tied weights); training is "
                          "unaffected, but merge() is refused for this layer (merge_and_unload writes a new tensor)",
                          stacklevel=3)


def _set_trainability(model: nn.Module, meta: LoraModelMeta, adapters_trainable: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(adapters_trainable)
        layer.lora_B.requires_grad_(adapters_trainable)
    for name in meta.modules_to_save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(adapters_trainable)


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
) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` by ``FusedLoraLinear`` layers, in place.

    Selection (``target_modules``, ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``"all-linear"``) follows
    PEFT's ``LoraConfig`` exactly; see the module docstring. Each new layer shares the replaced linear's ``weight`` and
    ``bias`` Parameters (no copy) and gets PEFT's initialisation (A kaiming-uniform, B = 0: the model's outputs are
    unchanged). Afterwards only the LoRA A, B matrices and the parameters of the ``modules_to_save`` modules are
    trainable; every other parameter is frozen. ``modules_to_save`` modules are trained in place (not copied as PEFT's
    ``ModulesToSaveWrapper`` does) and are saved in full by ``save_adapter``.

    ``quantize``: ``None`` keeps dense bases dense; ``"nf4"`` quantizes every selected ``nn.Linear`` to NF4
    (bitsandbytes' format, blocksize 64, double quantization: QLoRA) and drops its dense weight. bitsandbytes
    ``Linear4bit`` (NF4) modules are adapted as they are, whatever ``quantize`` says (FusedLoraLinear.from_bnb).

    Raises (before modifying anything): ``ValueError`` when nothing matches (listing the model's linear layers);
    ``TypeError`` naming the type when a selected module is not an ``nn.Linear``; ``ValueError`` for bad ``r``,
    ``lora_alpha``, ``lora_dropout``, for ``modules_to_save`` entries that match nothing or whose weights are tied to a
    module outside them, and naming the argument for a pattern that is not a valid regular expression
    (``target_modules`` / ``exclude_modules`` strings, ``modules_to_save`` entries, ``rank_pattern`` /
    ``alpha_pattern`` keys). Returns ``model``.
    """
    plan = plan_lora(model, target_modules, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     use_rslora=use_rslora, quantize=quantize, modules_to_save=modules_to_save,
                     exclude_modules=exclude_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return execute_plan(model, plan)


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, FusedLoraLinear]]:
    """``(name, layer)`` for every fused-lora layer in ``model``, in ``named_modules()`` order."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYER_TYPES):
            yield name, module


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
        # a quantized base (NF4) lives in buffers, not Parameters: count its out x in weights, as PEFT counts a
        # bitsandbytes Params4bit
        if getattr(layer, "quantized", False) and getattr(layer, "weight", None) is None:
            total += layer.in_features * layer.out_features
    return trainable, total, (100.0 * trainable / total if total else 0.0)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total, percent = trainable_parameters_summary(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


# --------------------------------------------------------------------------------------------------------------------
# PEFT -> fused-lora
# --------------------------------------------------------------------------------------------------------------------


def _fork_rng_for(tensor: torch.Tensor):
    """Leave the caller's random streams untouched while a new layer draws its (discarded) initial A."""
    devices = [tensor.device.index or 0] if tensor.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _convert_peft_lora_layer(name: str, module: nn.Module, adapter: str) -> nn.Module:
    """The fused-lora layer equivalent to one PEFT LoRA layer (base weight/bias shared, A/B copied). PEFT's
    ``lora.Linear`` over an ``nn.Linear`` becomes a dense FusedLoraLinear; its ``lora.Linear4bit`` over a
    bitsandbytes NF4 ``Linear4bit`` becomes a FusedLoraLinearNF4 reading the packed weight as it is."""
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
    """Convert a PEFT LoRA model (one adapter, dense ``nn.Linear`` bases) to fused-lora, in place.

    Every PEFT ``lora.Linear`` is replaced by a ``FusedLoraLinear`` that shares the base layer's ``weight`` and
    ``bias`` Parameters and holds a copy of the adapter's A and B (same ``requires_grad`` as PEFT's), with the layer's
    ``r``, ``lora_alpha``, dropout probability, ``use_rslora`` and ``scaling``. A ``ModulesToSaveWrapper`` is replaced
    by its trained copy (trainable as in PEFT; recorded so that ``save_adapter`` saves it). The PEFT wrapper must not
    be used afterwards. Returns the unwrapped model (``peft_model.base_model.model`` for a ``PeftModel``), whose
    outputs equal the PEFT model's.

    Errors (raised before anything is modified), naming the module: several adapters, DoRA or another LoRA variant,
    merged or disabled layers, ``fan_in_fan_out=True`` bases, ``lora_bias``, trained base biases, non-Linear LoRA
    layers (Embedding, Conv, MultiheadAttention, target_parameters), other PEFT methods, trainable-token wrappers;
    ``NotImplementedError`` for bitsandbytes 4-bit bases (until the NF4 ``FusedLoraLinear`` lands).
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
    if not any(isinstance(new, LORA_LAYER_TYPES) for _, new in replacements):
        raise ValueError(f"no PEFT LoRA layer found in {type(peft_model).__name__}")

    for name, new in replacements:
        _set_submodule(root, name, new)
    _record_shared_weights(root, [name for name, new in replacements if isinstance(new, LORA_LAYER_TYPES)])
    meta = get_meta(root)
    meta.modules_to_save = list(getattr(config, "modules_to_save", None) or [])
    meta.modules_to_save_names = saved
    task_type = getattr(config, "task_type", None)
    meta.task_type = None if task_type is None else str(getattr(task_type, "value", task_type))
    meta.base_model_name_or_path = getattr(config, "base_model_name_or_path", None)
    return root


# --------------------------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------------------------


def _merged_replacement(name: str, layer: nn.Module) -> nn.Module:
    """The plain module replacing a LoRA layer in :func:`merge_and_unload`.

    ``weight + scaling * B @ A`` computed in fp32 (in float64 for a float64 layer) and rounded once to the weight's
    dtype, in a new tensor (the old weight may be shared, e.g. tied); the bias Parameter is reused. An NF4 base is
    dequantized (bit-exactly, to fp32) and the merged weight is kept dense in the layer's compute dtype: no
    re-quantization error (use ``layer.merge()`` to stay 4-bit)."""
    if not isinstance(layer, FusedLoraLinear):  # pragma: no cover - until more layer types exist
        raise TypeError(f"{name!r}: cannot merge a {type(layer).__name__}")
    if layer.quantized:
        base = layer.base_weight(torch.float32)
        out_dtype, requires_grad = layer.compute_dtype, False
    else:
        base = layer.weight.detach()
        out_dtype, requires_grad = base.dtype, layer.weight.requires_grad
    if layer.merged:
        merged = base.to(out_dtype, copy=True)
    else:
        compute = torch.promote_types(base.dtype, torch.float32)
        merged = (base.to(compute) + layer.delta_weight(compute)).to(out_dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(merged, requires_grad=requires_grad)
    if layer.bias is not None:
        linear.bias = layer.bias
    linear.train(layer.training)
    return linear


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every fused-lora layer by a plain ``nn.Linear`` whose weight is ``W + scaling * B @ A`` (computed in
    fp32, rounded once to W's dtype); the bias is kept. The adapters are dropped. Returns ``model``.

    The merged weight is a new tensor: a base weight shared with another module (tied) is left unchanged.
    ``modules_to_save`` modules (trained in place) stay as they are."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"merge_and_unload: {type(model).__name__} has no fused-lora layers")
    for name, layer in layers:
        _set_submodule(model, name, _merged_replacement(name, layer))
    return model
