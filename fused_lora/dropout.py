"""Dropout masks that are never stored: a pure function of (seed, element index, p).

The LoRA branch sees ``D(x) = x * keep / (1 - p)``. Instead of saving ``keep`` (1 byte per element of x) or the
masked input (another copy of x), the mask is recomputed whenever it is needed -- forward, backward, activation
checkpointing -- from a counter-based hash. The Triton kernels (``fused_lora.kernels.dropout``) and this module
compute the same bits, so both backends drop exactly the same elements for the same seed.

Definition, for a 2-D input ``[M, K]`` (leading dimensions flattened row-major into M):

* ``key = mix32((seed mod 2**32) ^ mix32(seed >> 32 mod 2**32))`` -- the seed folded to 32 bits and scrambled;
* each pair of columns shares one 32-bit draw: ``counter(m, k) = (m * ceil(K / 2) + k // 2) mod 2**32`` and
  ``h = mix32(counter ^ key)`` with ``mix32`` the "lowbias32" integer hash (xorshift-multiply, full avalanche);
* column ``k`` uses the low 16 bits of ``h`` when k is even and the high 16 bits when k is odd, read as a signed
  16-bit integer ``v`` (uniform on [-32768, 32767]);
* the element is kept iff ``v >= round(p * 65536) - 32768``; kept values are scaled by ``1 / (1 - p)`` (as
  ``torch.nn.Dropout`` and PEFT do).

The keep probability is therefore ``1 - round(p * 65536) / 65536``, within 2**-17 of ``1 - p``.
Sharing one draw between two elements halves the hashing work, which dominates the torch path's dropout cost on
CPUs (a 32-bit hash in int32 wrapping arithmetic costs about a tenth of ``torch.rand`` there).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Optional

import torch

if sys.byteorder != "little":  # the torch path reads the 16-bit halves through a dtype view
    raise ImportError("fused_lora.dropout assumes a little-endian host")

MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF


def _as_int32(value: int) -> int:
    """The signed 32-bit integer with the same bits as ``value mod 2**32``."""
    value &= _MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


def mix32(value: int) -> int:
    """lowbias32 on a Python int (unsigned 32-bit arithmetic); the scalar reference for the tensor versions."""
    value &= _MASK32
    value ^= value >> 16
    value = (value * MIX_MUL_1) & _MASK32
    value ^= value >> 15
    value = (value * MIX_MUL_2) & _MASK32
    value ^= value >> 16
    return value


def _mix32_(h: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (wrapping multiply; logical shifts = arithmetic shift + mask).
    ``scratch``: an int32 buffer of h's size to reuse (fresh large allocations cost page faults on CPU)."""
    t = torch.bitwise_right_shift(h, 16, out=scratch) if scratch is not None else torch.bitwise_right_shift(h, 16)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))
    h.mul_(MIX_MUL_1)
    torch.bitwise_right_shift(h, 15, out=t)
    h.bitwise_xor_(t.bitwise_and_(0x1FFFF))
    h.mul_(_as_int32(MIX_MUL_2))
    torch.bitwise_right_shift(h, 16, out=t)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))
    return h


def seed_tensor(seed=None) -> torch.Tensor:
    """The dropout seed as a 0-dim int64 CPU tensor (how it travels through the custom operators).

    ``None`` draws a fresh seed from torch's default (CPU) generator, so ``torch.manual_seed`` controls the masks
    and activation checkpointing, which replays the RNG state, regenerates the same mask. An int is stored modulo
    2**64 (as the int64 with the same bits), which leaves the mask unchanged: only ``seed mod 2**64`` matters.
    """
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    bits = int(seed) % (1 << 64)
    return torch.tensor(bits - (1 << 64) if bits >= (1 << 63) else bits, dtype=torch.int64)


# Rows hashed per chunk: keeps the int32 scratch buffers small (cache-resident) and every chunk's counter
# range below 2**31 elements, whatever the input size.
_CHUNK_DRAWS = 1 << 18


@functools.lru_cache(maxsize=8)
def _draw_offsets(length: int, device: torch.device) -> torch.Tensor:
    """``0 .. length - 1`` as int32 on ``device``, made once and only ever read: every chunk's counters are these
    plus the chunk's first counter (the torch path asks for a mask per block of rows, and a fresh ``arange`` each
    time would cost a large share of the hashing)."""
    return torch.arange(length, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class Dropout:
    """The dropout applied to the LoRA branch of one call: probability ``p`` and the ``seed`` of its mask."""

    p: float
    seed: int

    def __post_init__(self):
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"Dropout needs 0 < p < 1, got p={self.p!r} (p = 0 means no Dropout object at all)")

    @property
    def key(self) -> int:
        """The 32-bit key mixed into every counter, as a signed int32 (what the kernels receive)."""
        seed = self.seed % (1 << 64)
        return _as_int32(mix32((seed & _MASK32) ^ mix32(seed >> 32)))

    @property
    def threshold(self) -> int:
        """Keep an element iff its signed 16-bit draw is >= this value."""
        return round(self.p * 65536) - 32768

    @property
    def scale(self) -> float:
        """The factor applied to kept elements, ``1 / (1 - p)``."""
        return 1.0 / (1.0 - self.p)

    def keep_mask(self, rows: int, cols: int, device, row_start: int = 0, dtype: torch.dtype = torch.bool,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[rows, cols]`` mask of the kept elements of rows ``row_start .. row_start + rows`` of a ``[*, cols]``
        input: True / 1 where kept. ``dtype`` other than bool gives a 0/1 multiplier in that dtype, which costs
        less to apply than a bool mask (same-dtype element-wise ops vectorize; mixed ones do not). ``out``: a
        contiguous ``[rows, cols]`` tensor to write into (a reused buffer; ``dtype`` and ``device`` are then
        its own)."""
        if out is None:
            out = torch.empty((rows, cols), dtype=dtype, device=device)
        elif out.shape != (rows, cols) or not out.is_contiguous():
            raise ValueError(f"keep_mask: out must be a contiguous [{rows}, {cols}] tensor, got {tuple(out.shape)}")
        if rows == 0 or cols == 0:
            return out
        half = (cols + 1) // 2
        chunk_rows = max(1, _CHUNK_DRAWS // half)
        # Chunks of rows, hashed in two int32 buffers reused across chunks (cache-sized) from the shared offsets.
        n_max = min(rows, chunk_rows) * half
        counters = _draw_offsets(max(_CHUNK_DRAWS, half), out.device)
        h_buf = torch.empty(n_max, dtype=torch.int32, device=out.device)
        scratch = torch.empty_like(h_buf)
        key, threshold = self.key, self.threshold
        for r0 in range(0, rows, chunk_rows):
            n_rows = min(chunk_rows, rows - r0)
            n = n_rows * half
            # counter(m, k) = m * half + k // 2 (mod 2**32), for m = row_start + r0 + local row
            h = torch.add(counters[:n], _as_int32((row_start + r0) * half), out=h_buf[:n])
            h.bitwise_xor_(key)
            _mix32_(h, scratch[:n])
            halves = h.view(torch.int16).view(n_rows, 2 * half)[:, :cols]
            torch.ge(halves, threshold, out=out[r0 : r0 + n_rows])
        return out
