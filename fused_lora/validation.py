"""The rules for LoRA hyper-parameters, in one place.

Every entry point that accepts them -- ``FusedLoraLinear``, ``apply_lora`` / ``plan_lora`` (including
``rank_pattern`` / ``alpha_pattern`` values), ``load_adapter`` (an ``adapter_config.json``) and
``fused_lora_linear`` -- checks them here, so a value is accepted or refused the same way everywhere, with a
message that names the argument (``name``) and where it came from (``where``, e.g. ``"module 'q_proj': "``).

Booleans are refused where a number is expected (``True`` is an ``int`` in Python, and PEFT writes ranks as JSON
integers): ``r=True`` is a mistake, not a rank of 1.

The dtypes: activations and dense weights may be :data:`FLOAT_DTYPES` (float64 on the torch path only);
quantized weights compute in :data:`HALF_AND_SINGLE`.
"""

from __future__ import annotations

import math
import numbers

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


def check_dropout(value, name: str = "lora_dropout", where: str = "") -> float:
    """A dropout probability: a real number in [0, 1) (p = 1 would drop everything and divide by zero). Returns it
    as a ``float``."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}{name} must be in [0, 1), got {value!r}")
    return float(value)
