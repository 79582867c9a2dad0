"""Triton kernels of fused-lora, installed as ``fused_lora.kernels`` (never as a top-level ``kernels``).

``lora_forward`` / ``lora_backward`` launch the fused LoRA kernels (``lora.py``; dense or NF4 base weights) and
mirror ``fused_lora.torch_ops``. ``nf4_dequantize`` and the tile decoder ``nf4_decode_tile`` (``nf4.py``) handle
bitsandbytes' NF4 format. ``INTERPRETING`` records whether the kernels were built for the Triton interpreter
(``TRITON_INTERPRET=1`` when triton decorated them), in which case they run on CPU tensors.
"""

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .lora import lora_backward, lora_forward  # noqa: E402
from .nf4 import nf4_decode_tile, nf4_dequantize  # noqa: E402

__all__ = ["INTERPRETING", "lora_forward", "lora_backward", "nf4_decode_tile", "nf4_dequantize"]
