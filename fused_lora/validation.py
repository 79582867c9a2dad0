"""The rules for LoRA hyper-parameters, in one place.

Every entry point that accepts them -- ``FusedLoraLinear``, ``apply_lora`` / ``plan_lora`` (including
``rank_pattern`` / ``alpha_pattern`` values), ``load_adapter`` (an ``adapter_config.json``) and
``fused_lora_linear`` -- checks them here, so a value is accepted or refused the same way everywhere, with a
message that names the argument (``name``) and where it came from (``where``, e.g. ``"module 'q_proj': "``).

Booleans are refused where a number is expected (``True`` is an ``int`` in Python, and PEFT writes ranks as JSON
integers): ``r=True`` is a mistake, not a rank of 1.

The dtypes: activations and dense weights may be :data:`FLOAT_DTYPES` (float64 on the torch path only);
quantized weights compute in :data:`HALF_AND_SINGLE`. The adapters (A and B, one dtype) may be in another dtype than
the math they enter (fp32 over bf16, as PEFT keeps them): :func:`adapter_dtype_for` is the rule a new layer's follow.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rank(value, name: str = "r", where: str = "") -> int:
    """A LoRA rank: a positive integer. Returns it as an ``int``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}{name}={value!r} must be a positive integer (the LoRA rank)")
    return int(value)


def check_alpha(value, name: str = "lora_alpha", where: str = "") -> float:
    """``lora_alpha`` (or a scaling): a finite real number. Returns it unchanged (an int alpha stays an int, as
    PEFT writes it back)."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{where}{name}={value!r} must be a finite number")
    return value


def check_compute_dtype(dtype: torch.dtype, allowed=FLOAT_DTYPES, name: str = "compute_dtype") -> torch.dtype:
    """A dtype the math can run in (``allowed``)."""
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {dtype}")
    return dtype


def check_adapter_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """An ``adapter_dtype`` argument: None (PEFT's default, :func:`adapter_dtype_for`) or one of
    :data:`FLOAT_DTYPES`."""
    return None if dtype is None else check_compute_dtype(dtype, name="adapter_dtype")


def adapter_dtype_for(compute_dtype: torch.dtype, adapter_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of a new layer's LoRA A and B over math in ``compute_dtype``: ``adapter_dtype`` when given (any of
    :data:`FLOAT_DTYPES`, e.g. ``torch.bfloat16`` for all-bf16 training), else PEFT's default
    (``autocast_adapter_dtype=True``): float32 adapters over float16 / bfloat16 math -- the optimizer then updates
    fp32 weights, whose small steps a half-precision weight would round away -- and the compute dtype itself
    otherwise (float32, float64)."""
    if adapter_dtype is None:
        return torch.float32 if compute_dtype in (torch.float16, torch.bfloat16) else compute_dtype
    return check_adapter_dtype(adapter_dtype)


def quantized_math_dtype(compute_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer over a quantized (NF4) base computes in: the wider of its ``compute_dtype`` and the input's
    (float64 inputs: the compute dtype, as bitsandbytes casts them).

    bitsandbytes' ``Linear4bit`` computes in ``compute_dtype`` whatever x's dtype, and PEFT adds the LoRA branch
    computed in the adapters' dtype from x itself: with fp32 activations on a bf16-compute base
    (``prepare_model_for_kbit_training`` without autocast) and fp32 adapters, the adapter's term is fp32-accurate
    there. One bf16 computation of the sum would round a young adapter's term away (it is far below one bf16 ulp of
    the output); computing in x's dtype keeps it, and the base product is then more accurate, not less. Under
    autocast x arrives in the autocast dtype and nothing widens."""
    if x_dtype not in HALF_AND_SINGLE:
        return compute_dtype
    return torch.promote_types(compute_dtype, x_dtype)


def check_use_dora(value, where: str = "") -> bool:
    """``use_dora``: True or False, not a truthy value (a JSON string "false" must not mean True; as ``r=True`` is
    refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}use_dora={value!r} must be True or False")
    return value


def check_dropout(value, name: str = "lora_dropout", where: str = "") -> float:
    """A dropout probability: a real number in [0, 1) (p = 1 would drop everything and divide by zero). Returns it
    as a ``float``."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}{name} must be in [0, 1), got {value!r}")
    return float(value)
