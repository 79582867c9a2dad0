"""LoRA hyper-parameters: a model's, as PEFT's ``LoraConfig`` holds them (``r``, ``lora_alpha``, ``lora_dropout``,
``use_rslora``, ``use_dora``, ``rank_pattern``, ``alpha_pattern``), plus the adapters' dtype (PEFT's
``autocast_adapter_dtype``, an argument of ``get_peft_model``, not of the config), and each layer's.

Both directions live here: :meth:`Hyperparams.for_module` resolves a module's values (``apply_lora``, and
``load_adapter`` comparing a file with existing layers); :meth:`Hyperparams.from_layers` recovers one config from
the layers (``save_adapter``). Values are checked by :mod:`fused_lora.validation`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import torch

from .layers import lora_scaling
from .targets import pattern_value, patterns_for
from .validation import check_adapter_dtype, check_alpha, check_dropout, check_rank, check_use_dora

__all__ = ["Hyperparams", "LayerHyperparams"]


@dataclass(frozen=True)
class LayerHyperparams:
    """One layer's LoRA settings: the keyword arguments of ``FusedLoraLinear.from_linear`` / ``from_bnb``."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    adapter_dtype: Optional[torch.dtype] = None  # None: PEFT's rule (fused_lora.validation.adapter_dtype_for)
    use_dora: bool = False

    @classmethod
    def of(cls, layer) -> "LayerHyperparams":
        """A ``FusedLoraLinear``'s settings."""
        return cls(layer.r, layer.lora_alpha, float(layer.lora_dropout), bool(layer.use_rslora), layer.adapter_dtype,
                   bool(layer.use_dora))

    @property
    def scaling(self) -> float:
        """The scaling these settings give (PEFT's rule, :func:`fused_lora.layers.lora_scaling`)."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def same_adapter_math(self, other: "LayerHyperparams") -> bool:
        """Equal ``r``, ``lora_alpha``, ``use_rslora`` and ``use_dora``: an adapter trained with one computes the same
        with the other (``lora_dropout`` only acts in training)."""
        return (self.r, float(self.lora_alpha), self.use_rslora, self.use_dora) == (
            other.r, float(other.lora_alpha), other.use_rslora, other.use_dora)


@dataclass
class Hyperparams:
    """A model's LoRA settings, with PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` overrides."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    adapter_dtype: Optional[torch.dtype] = None  # every layer's; None: PEFT's rule
    use_dora: bool = False

    @classmethod
    def checked(cls, r, lora_alpha, lora_dropout=0.0, use_rslora=False, rank_pattern: Optional[Mapping] = None,
                alpha_pattern: Optional[Mapping] = None, *, where: str = "", check_patterns: bool = False,
                adapter_dtype: Optional[torch.dtype] = None, use_dora: bool = False) -> "Hyperparams":
        """Validated settings; errors are prefixed by ``where``. ``check_patterns``: check every ``rank_pattern`` /
        ``alpha_pattern`` value now (an adapter file: all of its values must be valid); otherwise a pattern value
        is checked when a module resolves to it (:meth:`for_module`, whose error names the module)."""
        lora_dropout = check_dropout(lora_dropout, where=where)
        r = check_rank(r, where=where)
        if check_patterns:
            for key, value in (rank_pattern or {}).items():
                check_rank(value, f"rank_pattern[{key!r}]", where)
        check_alpha(lora_alpha, where=where)
        if check_patterns:
            for key, value in (alpha_pattern or {}).items():
                check_alpha(value, f"alpha_pattern[{key!r}]", where)
        check_use_dora(use_dora, where)
        return cls(r, lora_alpha, lora_dropout, bool(use_rslora), rank_pattern or {}, alpha_pattern or {},
                   check_adapter_dtype(adapter_dtype), use_dora)

    def for_module(self, name: str) -> LayerHyperparams:
        """The settings of the module ``name`` (PEFT's pattern lookup, :func:`fused_lora.targets.pattern_value`)."""
        where = f"module {name!r}: "
        r = check_rank(pattern_value(self.rank_pattern, name, self.r), where=where)
        lora_alpha = check_alpha(pattern_value(self.alpha_pattern, name, self.lora_alpha), where=where)
        return LayerHyperparams(r, lora_alpha, self.lora_dropout, self.use_rslora, self.adapter_dtype, self.use_dora)

    @classmethod
    def from_layers(cls, layers: Mapping[str, LayerHyperparams], where: str = "") -> "Hyperparams":
        """The one config that gives every layer its settings: ``r`` / ``lora_alpha`` the most common values (ties:
        the first layer's), the layers that differ in ``rank_pattern`` / ``alpha_pattern``. ``ValueError`` when the
        layers differ in ``lora_dropout``, ``use_rslora`` or ``use_dora`` (a ``LoraConfig`` has one of each)."""
        lora_dropout = _uniform({n: h.lora_dropout for n, h in layers.items()}, "lora_dropout", where)
        use_rslora = _uniform({n: h.use_rslora for n, h in layers.items()}, "use_rslora", where)
        use_dora = _uniform({n: h.use_dora for n, h in layers.items()}, "use_dora", where)
        ranks = {n: h.r for n, h in layers.items()}
        alphas = {n: h.lora_alpha for n, h in layers.items()}
        r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
        return cls(r, lora_alpha, lora_dropout, use_rslora, patterns_for(ranks, r), patterns_for(alphas, lora_alpha),
                   use_dora=use_dora)


def _most_common(values):
    """The most frequent value (ties: the one seen first)."""
    return Counter(values).most_common(1)[0][0]


def _uniform(values: Dict[str, object], what: str, where: str):
    distinct = sorted(set(values.values()), key=repr)
    if len(distinct) > 1:
        by_value = {v: [n for n, x in values.items() if x == v][:3] for v in distinct}
        raise ValueError(f"{where}layers differ in {what} ({by_value}); PEFT's LoraConfig has one {what}")
    return distinct[0]
