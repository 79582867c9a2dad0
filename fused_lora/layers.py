"""``FusedLoraLinear``: a drop-in LoRA linear layer running the fused kernels."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fused_lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_lora_args(r, lora_dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class FusedLoraLinear(nn.Module):
    """``y = x W^T + (lora_alpha / r) * B(A(dropout(x))) + bias`` with a frozen ``W`` and trainable ``A``, ``B``.

    Parameters (PEFT's layout): ``weight`` ``[out, in]`` and ``bias`` ``[out]`` frozen; ``lora_A`` ``[r, in]``
    initialised with ``kaiming_uniform_(a=sqrt(5))`` and ``lora_B`` ``[out, r]`` with zeros, so a new adapter
    starts as the identity update. Dropout applies to the LoRA branch's input in training mode only.

    ``merge()`` folds ``scaling * B @ A`` into ``weight`` (a plain linear forward, for inference); ``unmerge()``
    subtracts it again. A merged layer does not train its adapter: unmerge before training.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_lora_args(r, lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, factory)
        self._reset_base_parameters()

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, factory) -> None:
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self.reset_lora_parameters()

    def _reset_base_parameters(self) -> None:
        # nn.Linear's initialisation, for layers built from scratch (from_linear keeps the given weights).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> "FusedLoraLinear":
        """Wrap an existing ``nn.Linear``: its ``weight`` and ``bias`` Parameters are shared (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_lora_args(r, lora_dropout)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, factory)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return fused_lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, bias=self.bias,
            dropout_p=self.lora_dropout, training=self.training,
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (the update merge() adds), ``[out, in]``."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """``weight += scaling * B @ A`` (computed in fp32, rounded once to the weight's dtype)."""
        if self.merged:
            warnings.warn("FusedLoraLinear.merge(): already merged, nothing to do", stacklevel=2)
            return
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``weight -= scaling * B @ A`` (restores the weight up to the rounding of the two updates)."""
        if not self.merged:
            warnings.warn("FusedLoraLinear.unmerge(): not merged, nothing to do", stacklevel=2)
            return
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, bias={self.bias is not None}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )
