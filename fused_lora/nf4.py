"""NF4 weights (QLoRA / bitsandbytes 4-bit): quantize, dequantize, and read / write bitsandbytes' own format.

Format (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``; ``W`` is ``[out, in]``, ``n = out * in``)
---------------------------------------------------------------------------------------------------

* ``W`` is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (64 by default). Blocks
  follow the flat index, so they cross row boundaries when ``in % blocksize != 0``; the last block may be partial.
* Each element is stored as a 4-bit index into the 16-value NormalFloat table :data:`NF4_CODE`, scaled by its
  block's ``absmax``: ``w ~= NF4_CODE[q] * absmax[block]``.
* Two indices per byte, the HIGH nibble holding the even (first) element: ``byte[j] = q[2j] << 4 | q[2j + 1]``;
  an odd ``n`` is padded with one index for 0.0. The packed tensor is uint8 of shape ``((n + 1) // 2, 1)``.
* ``absmax`` is fp32 ``[ceil(n / blocksize)]``. With *double quantization* (``compress_statistics=True``, what
  QLoRA uses) it is stored as 8-bit codes instead: ``offset = mean(absmax)``; ``absmax - offset`` is quantized in
  blocks of 256 against bitsandbytes' signed 8-bit dynamic map (``code2``, 256 fp32 values): ``qabsmax`` uint8
  ``[n_blocks]`` and ``absmax2`` fp32 ``[ceil(n_blocks / 256)]``.

Dequantization (bit-identical to ``bitsandbytes.functional.dequantize_4bit``)
-----------------------------------------------------------------------------
Every step is a single IEEE fp32 operation, so the result is exact given the same operation order::

    A[b]   = absmax[b]                                                    (plain)
    A[b]   = f32( f32(code2[qabsmax[b]] * absmax2[b // 256]) + offset )    (nested: two roundings, no FMA)
    out[i] = T( f32(NF4_CODE[nibble(i)] * A[i // blocksize]) )            (one rounding to the output dtype T)

The torch path below evaluates exactly these operations (eager PyTorch never contracts a multiply and an add);
the Triton kernel (``fused_lora.kernels.nf4``) is compiled with FP contraction disabled for the same reason.

Quantization (byte-identical to ``quantize_4bit`` on bitsandbytes' CPU backend, the CI oracle)
----------------------------------------------------------------------------------------------
bitsandbytes quantizes in fp32 with these exact operations, reproduced here op for op:

* 4-bit step: ``absmax = max |w|`` per block. Full blocks are scaled by a reciprocal,
  ``x = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)``; the trailing partial block is *divided*,
  ``x = clamp(w / max(absmax, 1e-38), -1, 1)`` (the two differ in the last bit), and its stored absmax is the
  clamped value (1e-38 for an all-zero trailing block). The code is the number of midpoints
  ``(NF4_CODE[i] + NF4_CODE[i+1]) / 2`` strictly below ``x`` (a tie goes to the lower code).
* 8-bit step (double quantization, bitsandbytes' C++ CPU kernel): per block of 256, ``a2 = max |y|`` (an all-zero
  block stores codes 0); ``x = clamp(y * f32(1 / a2), -1, 1)``; the code is *not* the nearest code of ``x`` but the
  entry of a 65536-bin lookup table: ``LUT[trunc(fma(65535, (x + 1) * 0.5, 0.5))]`` where the fma rounds once
  and ``LUT[i]`` is the number of midpoints of ``code2`` strictly below ``f32(2i / 65535) - 1``. That rounding
  differs from nearest-code rounding for about 0.1-0.4% of the values (those close to a midpoint), so it is
  reproduced exactly. The fma is evaluated in float64, where the product and sum are exact, then rounded once to
  fp32 (an exhaustive check over every reachable ``(x + 1) * 0.5`` shows the truncated index equals the one of two
  separate fp32 roundings, so the emulation is exact either way).
* The offset is torch's fp32 ``mean`` of the absmax vector on the CPU, as bitsandbytes computes it on CPU tensors.
  Its summation order depends on the CPU thread count, so "identical" means: in the same process.

The double-quantization statistics (``n / blocksize`` values) are always computed on the CPU, so a weight quantized
on a GPU gets the same bytes as on the CPU. The 4-bit step runs on the weight's device with the same IEEE operations.
All-zero blocks dequantize to 0 but their codes may differ between implementations. NaN / inf weights cannot be
represented (bitsandbytes silently turns their whole block into NaN): ``quantize_nf4`` refuses them.
"""

from __future__ import annotations

import functools
import json
import numbers
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from ._backend import resolve_backend

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "NF4Operands",
    "NF4Weight",
    "dequantize_operands",
    "dynamic_map",
    "quantize_nf4",
]

# The NormalFloat-4 table, index = 4-bit code. Hard-coded: regenerating it from normal quantiles (scipy) differs
# in the last bits. These are the exact fp32 values bitsandbytes uses.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_CODE = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)

# Block sizes bitsandbytes' quantize_4bit / dequantize_4bit accept.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Block size of the second-level (absmax) quantization; quantize_4bit always uses 256.
NESTED_BLOCKSIZE = 256
# Source / output dtypes of the format.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LUT_BINS = 65536  # resolution of bitsandbytes' CPU 8-bit quantization lookup table


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: {name!r} is not a torch dtype")
    return dtype


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True, max_exponent_bits=7)``).

    For e = 0..6: ``2**e`` fractions, the midpoints of ``linspace(0.1, 1, 2**e + 1)`` (fp32), scaled by
    ``10**(e - 6)`` in fp32, with both signs; then 0 and 1, sorted: 256 values in [-0.993, 1].
    """
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """The 256-value fp32 map of the double quantization (a fresh tensor, on ``device``)."""
    return _dynamic_map_cpu().to(device or "cpu", copy=True)


@functools.lru_cache(maxsize=8)
def _quantize_lut(code_values: Tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU lookup table for 8-bit blockwise quantization against a sorted 256-entry ``code``:
    ``lut[i]`` = number of midpoints ``(code[j] + code[j+1]) * 0.5`` strictly below ``f32(2i / 65535) - 1``.
    (int64 [65536], on the CPU; keyed by the code's values, which fp32 -> Python float keeps exactly.)"""
    code = torch.tensor(code_values, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) * 0.5
    i2 = torch.arange(_LUT_BINS, dtype=torch.float64) * 2.0
    # f32(2i / 65535): the float64 quotient rounded to fp32 is the correctly rounded fp32 quotient (double rounding
    # is innocuous for division when 53 >= 2 * 24 + 2).
    val = (i2 / (_LUT_BINS - 1)).to(torch.float32) - 1.0
    return torch.searchsorted(midpoints, val, side="left")


def _quantize_blockwise_8bit(y: torch.Tensor, code: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` of fp32 ``y`` (1-D, CPU): ``(codes uint8, absmax fp32)``."""
    n = y.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32)
    padded[:n] = y
    blocks = padded.view(n_blocks, blocksize)  # zero padding leaves each block's max |y| unchanged
    absmax = blocks.abs().amax(dim=1)
    x = (blocks * torch.reciprocal(absmax)[:, None]).clamp_(-1.0, 1.0)
    t = (x + 1.0) * 0.5
    # trunc(fma(65535, t, 0.5)) with one fp32 rounding: t is a multiple of 2**-25 in [0, 1], so 65535 * t + 0.5
    # is exact in float64 (< 2**17 with 42 significant bits); .to(float32) rounds it to nearest even once.
    index = (t.double() * float(_LUT_BINS - 1) + 0.5).to(torch.float32)
    index = torch.nan_to_num_(index, nan=0.0).to(torch.int64)  # NaN (0 / 0 in an all-zero block) -> bin 0, as in C++
    lut = _quantize_lut(tuple(code.detach().to("cpu", torch.float32).tolist()))
    q = lut[index]
    q[absmax == 0] = 0  # all-zero block: codes 0, never divided
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    return ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(device)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
    """Quantize a 2-D ``[out, in]`` fp32 / fp16 / bf16 weight to NF4.

    The result is byte-identical to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)`` on bitsandbytes' CPU backend: packed data, absmax (or
    qabsmax / absmax2 / offset / code2). See the module docstring for the exact operations.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4 supports float32 / float16 / bfloat16 weights, got {weight.dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"blocksize must be an int (one of {BLOCKSIZES}), got {blocksize!r} "
                        f"({type(blocksize).__name__})")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    blocksize = int(blocksize)
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
    device = weight.device
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    parts_absmax, parts_scaled = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        parts_absmax.append(am)
        # full blocks: multiply by the reciprocal of the (clamped) absmax
        parts_scaled.append(torch.clamp(blocks * torch.reciprocal(am.clamp(min=1e-38))[:, None], -1, 1).reshape(-1))
    if full < n:
        tail = flat[full:]
        am = tail.abs().max().clamp(min=1e-38)  # stored clamped, as bitsandbytes does for the partial block
        parts_absmax.append(am.reshape(1))
        parts_scaled.append(torch.clamp(tail / am, -1, 1))  # the partial block is divided, not multiplied
    absmax = torch.cat(parts_absmax) if len(parts_absmax) > 1 else parts_absmax[0]
    # A NaN / inf weight makes its block's absmax non-finite (amax propagates NaN): checking the n / blocksize
    # absmax values finds every such weight without another pass over the whole weight.
    if device.type != "meta" and not bool(torch.isfinite(absmax).all()):
        bad = ~torch.isfinite(flat)
        first = int(bad.nonzero()[0])
        row, col = divmod(first, weight.shape[1])
        raise ValueError(
            f"quantize_nf4: the weight has {int(bad.sum())} non-finite value(s) (NaN / inf), the first at [{row}, "
            f"{col}] = {flat[first].item()}; NF4 cannot represent them (each would turn its whole block of "
            f"{blocksize} weights into NaN)"
        )
    scaled = torch.cat(parts_scaled) if len(parts_scaled) > 1 else parts_scaled[0]
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pad with 0.0 -> code 7
    q = torch.bucketize(scaled, _nf4_midpoints(device), right=False, out_int32=True).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    common = dict(data=packed, blocksize=blocksize, shape=tuple(weight.shape), dtype=weight.dtype,
                  code=NF4_CODE.to(device, copy=True))
    if not double_quant:
        return NF4Weight(absmax=absmax, **common)
    # Double quantization, on the CPU (n / blocksize values): bitsandbytes' CPU arithmetic whatever the device.
    absmax_cpu = absmax.cpu()
    offset = absmax_cpu.mean()
    code2 = dynamic_map()
    qabsmax, absmax2 = _quantize_blockwise_8bit(absmax_cpu - offset, code2, NESTED_BLOCKSIZE)
    return NF4Weight(qabsmax=qabsmax.to(device), absmax2=absmax2.to(device), code2=code2.to(device),
                     offset=offset.to(device), nested_blocksize=NESTED_BLOCKSIZE, **common)


class NF4Operands:
    """What the implementations (the Triton kernels and the torch path) need of an NF4 weight: tensors and ints.

    ``packed``: the codes as :attr:`NF4Weight.data` stores them (uint8 ``((n + 1) // 2, 1)``, any layout with one
    flat stride); ``code``: the fp32 ``[16]`` table; ``blocksize``; ``shape``: ``(out, in)``; the statistics as
    stored: ``qabsmax``, ``absmax2``, ``code2``, ``offset``, ``nested_blocksize`` with double quantization (None
    otherwise). ``absmax``: the fp32 per-block absmax, decoded (:func:`decode_absmax`) on first access only: a
    consumer that takes the stored statistics (the dequantize kernel decodes them itself, in one launch) never pays
    the few small operations of the decode."""

    def __init__(self, packed, code, blocksize, shape, absmax=None, qabsmax=None, absmax2=None, code2=None,
                 offset=None, nested_blocksize=NESTED_BLOCKSIZE):
        self.packed, self.code, self.blocksize, self.shape = packed, code, int(blocksize), tuple(shape)
        self.qabsmax, self.absmax2, self.code2, self.offset = qabsmax, absmax2, code2, offset
        self.nested_blocksize = int(nested_blocksize)
        self._absmax = absmax

    @property
    def nested(self) -> bool:
        return self.qabsmax is not None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight on the torch path (:func:`dequantize_operands`)."""
        return dequantize_operands(self, dtype)

    @property
    def absmax(self) -> torch.Tensor:
        if self._absmax is None:
            n_blocks = -(-self.shape[0] * self.shape[1] // self.blocksize)
            self._absmax = decode_absmax(n_blocks, None, self.qabsmax, self.absmax2, self.code2, self.offset,
                                         self.nested_blocksize)
        return self._absmax


def decode_absmax(n_blocks: int, absmax: Optional[torch.Tensor], qabsmax: Optional[torch.Tensor] = None,
                  absmax2: Optional[torch.Tensor] = None, code2: Optional[torch.Tensor] = None,
                  offset: Optional[torch.Tensor] = None, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """The fp32 per-block absmax ``[n_blocks]``: ``absmax`` itself, or for double quantization
    ``f32(f32(code2[qabsmax] * absmax2[b // nested_blocksize]) + offset)`` (two roundings, as bitsandbytes)."""
    if qabsmax is None:
        return absmax
    n_groups = absmax2.numel()
    vals = torch.zeros(n_groups * nested_blocksize, dtype=torch.float32, device=qabsmax.device)
    vals[:n_blocks] = code2[qabsmax.long()]
    scaled = (vals.view(n_groups, nested_blocksize) * absmax2[:, None]).reshape(-1)[:n_blocks]
    return scaled + offset


def dequantize_operands(w: NF4Operands, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype`` on the torch path: ``f32(code[nibble] * absmax[block])`` rounded
    once to ``dtype`` (the format's definition, bit-identical to bitsandbytes and to the Triton kernel)."""
    n = w.shape[0] * w.shape[1]
    bs = w.blocksize
    nb = w.absmax.numel()
    # byte -> (code[high nibble], code[low nibble]): one gather per byte yields both elements, in order
    byte = torch.arange(256, device=w.packed.device)
    pairs = torch.stack([w.code[byte >> 4], w.code[byte & 0xF]], dim=1)
    vals = pairs.index_select(0, w.packed.reshape(-1).long()).reshape(-1)
    if vals.numel() != nb * bs:  # odd n (one padding code) and / or a partial last block
        vals = torch.nn.functional.pad(vals[:n], (0, nb * bs - n))
    out = vals.view(nb, bs).mul_(w.absmax[:, None]).reshape(-1)[:n]
    return out.view(w.shape).to(dtype)


class _FlatMeta(NamedTuple):
    """The integers of a flattened NF4 weight (:meth:`NF4Weight.flatten`)."""

    out_features: int
    in_features: int
    blocksize: int
    nested_blocksize: int


def bitsandbytes_classes(obj) -> set:
    """Names of the bitsandbytes classes ``obj`` is an instance of (e.g. ``{"Linear4bit", "LinearNF4"}``); empty
    for anything else. Needs no import of bitsandbytes (a bitsandbytes object implies it is loaded)."""
    return {c.__name__ for c in type(obj).__mro__ if c.__module__.startswith("bitsandbytes")}


@dataclass(eq=False)
class NF4Weight:
    """An NF4-quantized ``[out, in]`` weight in bitsandbytes' layout (see the module docstring).

    Fields (all tensors on one device):

    * ``data``: uint8 ``((n + 1) // 2, 1)``, two 4-bit codes per byte, high nibble first;
    * ``absmax``: fp32 ``[n_blocks]`` -- or, with double quantization, ``None`` and
      ``qabsmax`` uint8 ``[n_blocks]``, ``absmax2`` fp32 ``[ceil(n_blocks / nested_blocksize)]``,
      ``code2`` fp32 ``[256]``, ``offset`` fp32 0-dim;
    * ``blocksize``, ``shape`` ``(out, in)``, ``dtype`` (the original weight's dtype, the default output dtype),
      ``code`` fp32 ``[16]`` (the NF4 table).

    Build one with :func:`quantize_nf4`, :meth:`from_bnb` or :meth:`from_state_dict`. The tensors may be views in
    any layout (slices or offsets into a bigger buffer, ``.t()`` of a ``[1, k]`` row, stride 0): the Triton kernels
    read ``data`` in place through its stride and make the small tables and statistics contiguous when they are
    not (tests/test_strides.py).
    """

    data: torch.Tensor
    blocksize: int
    shape: Tuple[int, int]
    dtype: torch.dtype
    code: torch.Tensor
    absmax: Optional[torch.Tensor] = None
    qabsmax: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    # The tensor fields, in the order of :meth:`flatten` (the one list of them: modules holding an NF4 weight in
    # buffers iterate it too).
    TENSOR_FIELDS = ("data", "code", "absmax", "qabsmax", "absmax2", "code2", "offset")

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.blocksize = int(self.blocksize)
        self.nested_blocksize = int(self.nested_blocksize)
        problems = []
        if len(self.shape) != 2 or min(self.shape) <= 0:
            problems.append(f"shape must be a non-empty [out, in], got {self.shape}")
        if self.blocksize not in BLOCKSIZES:
            problems.append(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.dtype not in SUPPORTED_DTYPES:
            problems.append(f"dtype must be one of float32 / float16 / bfloat16, got {self.dtype}")
        if not problems:
            n = self.shape[0] * self.shape[1]
            n_blocks = -(-n // self.blocksize)
            self._check(problems, "data", self.data, torch.uint8, ((n + 1) // 2, 1))
            self._check(problems, "code", self.code, torch.float32, (16,))
            if self.nested:
                if self.absmax is not None:
                    problems.append("give either absmax (plain) or qabsmax / absmax2 / code2 / offset (nested)")
                if self.nested_blocksize <= 0:
                    problems.append(f"nested_blocksize must be positive, got {self.nested_blocksize}")
                self._check(problems, "qabsmax", self.qabsmax, torch.uint8, (n_blocks,))
                self._check(problems, "absmax2", self.absmax2, torch.float32,
                            (-(-n_blocks // max(self.nested_blocksize, 1)),))
                self._check(problems, "code2", self.code2, torch.float32, (256,))
                self._check(problems, "offset", self.offset, torch.float32, ())
            else:
                if any(t is not None for t in (self.absmax2, self.code2, self.offset)):
                    problems.append("absmax2 / code2 / offset belong to a nested weight: qabsmax is missing")
                self._check(problems, "absmax", self.absmax, torch.float32, (n_blocks,))
            devices = {t.device for t in self._tensors().values()}
            if len(devices) > 1:
                problems.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
        if problems:
            raise ValueError("invalid NF4Weight: " + "; ".join(problems))

    @staticmethod
    def _check(problems, name, t, dtype, shape):
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} is missing")
        elif t.dtype != dtype or tuple(t.shape) != shape:
            problems.append(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    # ------------------------------------------------------------------------------------------------------------
    # properties

    @property
    def nested(self) -> bool:
        """True with double quantization (8-bit absmax)."""
        return self.qabsmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus the (possibly nested) statistics and tables."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSOR_FIELDS if isinstance(getattr(self, k), torch.Tensor)}

    # ------------------------------------------------------------------------------------------------------------
    # the custom-operator boundary: tensors and integers only

    def flatten(self) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        """``(tensors, ints)``: the tensor fields in :data:`TENSOR_FIELDS` order (None where absent) and the integers
        that :meth:`operands_from_flat` needs. The original dtype stays behind: the computation uses the
        activations' dtype."""
        meta = _FlatMeta(self.shape[0], self.shape[1], self.blocksize, self.nested_blocksize)
        return [getattr(self, k) for k in self.TENSOR_FIELDS], list(meta)

    @classmethod
    def operands_from_flat(cls, tensors: List[Optional[torch.Tensor]], ints: List[int]) -> NF4Operands:
        """The :class:`NF4Operands` of a flattened weight (double-quantized statistics are decoded on every call
        that needs them decoded: n / blocksize values, cheaper than keeping them decoded)."""
        f = dict(zip(cls.TENSOR_FIELDS, tensors))
        meta = _FlatMeta(*ints)
        return NF4Operands(f["data"], f["code"], meta.blocksize, (meta.out_features, meta.in_features),
                           absmax=f["absmax"], qabsmax=f["qabsmax"], absmax2=f["absmax2"], code2=f["code2"],
                           offset=f["offset"], nested_blocksize=meta.nested_blocksize)

    @staticmethod
    def flat_shape(ints: List[int]) -> Tuple[int, int]:
        meta = _FlatMeta(*ints)
        return meta.out_features, meta.in_features

    def operands(self) -> NF4Operands:
        """What the kernels and the torch path take (see :class:`NF4Operands`)."""
        return self.operands_from_flat(*self.flatten())

    def __repr__(self) -> str:
        stats = (f"double-quant (absmax 8-bit, nested blocksize {self.nested_blocksize})" if self.nested
                 else "absmax fp32")
        bits = 8.0 * self.nbytes / self.numel
        return (f"NF4Weight(shape={self.shape}, dtype={_dtype_name(self.dtype)}, blocksize={self.blocksize}, "
                f"{stats}, device={self.device}, {self.nbytes} bytes = {bits:.3f} bits/weight)")

    # ------------------------------------------------------------------------------------------------------------
    # devices

    def to(self, device: Union[str, torch.device, int], non_blocking: bool = False) -> "NF4Weight":
        """A copy of this weight on ``device`` (the same object when it already is there)."""
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if self.device == device:
            return self
        moved = {k: t.to(device, non_blocking=non_blocking) for k, t in self._tensors().items()}
        return NF4Weight(blocksize=self.blocksize, shape=self.shape, dtype=self.dtype,
                         nested_blocksize=self.nested_blocksize, **moved)

    def cuda(self, device: Optional[Union[int, str, torch.device]] = None, non_blocking: bool = False) -> "NF4Weight":
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device, non_blocking=non_blocking)

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    # ------------------------------------------------------------------------------------------------------------
    # dequantization

    def absmax_fp32(self) -> torch.Tensor:
        """The decoded per-block absmax, fp32 ``[n_blocks]`` (see :func:`decode_absmax`)."""
        return decode_absmax(self.n_blocks, self.absmax, self.qabsmax, self.absmax2, self.code2, self.offset,
                             self.nested_blocksize)

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default: the original dtype), bit-identical to
        ``bitsandbytes.functional.dequantize_4bit``.

        Runs the Triton kernel when the backend resolves to ``"triton"`` for this weight's device (CUDA tensors
        under ``"auto"``; CPU tensors under ``"triton"`` in the Triton interpreter), the torch code otherwise.
        ``out`` (optional) receives the result; it may be any strided ``[out, in]`` view on the Triton path
        (e.g. ``buffer.t()`` to get ``W^T`` without a copy).
        """
        dtype = dtype or self.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"NF4 dequantizes to float32 / float16 / bfloat16, got {dtype}")
        if out is not None and (tuple(out.shape) != self.shape or out.dtype != dtype or out.device != self.device):
            raise ValueError(f"out must be a {dtype} tensor of shape {self.shape} on {self.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if resolve_backend(self.device) == "triton":
            return self.dequantize_triton(dtype, out=out)
        result = self.dequantize_torch(dtype)
        if out is not None:
            return out.copy_(result)
        return result

    def dequantize_triton(self, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dequantize`` with the Triton kernel (one launch), whatever the backend setting."""
        from .kernels.nf4 import nf4_dequantize

        if self.nested:
            return nf4_dequantize(self.data, self.code, self.qabsmax, self.shape, self.blocksize, dtype,
                                  absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                                  nested_blocksize=self.nested_blocksize, out=out)
        return nf4_dequantize(self.data, self.code, self.absmax, self.shape, self.blocksize, dtype, out=out)

    def dequantize_torch(self, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize`` on the torch path, whatever the backend setting."""
        return dequantize_operands(self.operands(), dtype)

    # ------------------------------------------------------------------------------------------------------------
    # bitsandbytes interop

    @classmethod
    def from_bnb(cls, obj: Any) -> "NF4Weight":
        """Wrap an NF4 weight quantized by bitsandbytes, without re-quantizing (the tensors are shared).

        ``obj``: a ``bitsandbytes.nn.Params4bit``, a ``bitsandbytes.nn.Linear4bit`` (its ``.weight``), or a
        ``(packed tensor, QuantState)`` pair as returned by ``bitsandbytes.functional.quantize_4bit``.
        """
        if isinstance(obj, (tuple, list)):
            if len(obj) != 2:
                raise ValueError(f"from_bnb expects a (packed tensor, QuantState) pair, got {len(obj)} items")
            packed, qs = obj
        elif isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "weight", None), torch.Tensor):
            bnb_bases = bitsandbytes_classes(obj)
            if "Linear8bitLt" in bnb_bases:
                raise TypeError(f"from_bnb got a bitsandbytes {type(obj).__name__}: 8-bit (LLM.int8) bases are not "
                                "supported; fused-lora reads 4-bit NF4 weights (a Linear4bit with quant_type='nf4')")
            if "Linear4bit" not in bnb_bases and not hasattr(obj.weight, "quant_state") \
                    and getattr(obj, "quant_state", None) is None:
                raise TypeError(
                    f"from_bnb expects a bitsandbytes Linear4bit with NF4 quantization (quant_type='nf4'), got "
                    f"{type(obj).__module__}.{type(obj).__qualname__}; for a dense nn.Linear use "
                    "FusedLoraLinear.from_linear(linear, quantize='nf4') (or quantize_nf4(linear.weight))")
            packed = obj.weight.data
            qs = getattr(obj.weight, "quant_state", None)
            if qs is None:  # bitsandbytes keeps a copy on the module (e.g. after FSDP re-wrapped the parameter)
                qs = getattr(obj, "quant_state", None)
            if qs is None:
                raise ValueError(f"{type(obj).__name__}.weight is not quantized yet (no quant_state): move the "
                                 "module to a device (e.g. .to('cpu') or .cuda()) to let bitsandbytes quantize it")
        elif isinstance(obj, torch.Tensor) and hasattr(obj, "quant_state"):
            packed, qs = obj.data, obj.quant_state
            if qs is None or not getattr(obj, "bnb_quantized", True):
                raise ValueError("this Params4bit is not quantized yet: move it to a device (or call ._quantize) first")
        else:
            raise ValueError("from_bnb expects a bitsandbytes Params4bit, a Linear4bit or a (packed, QuantState) "
                             f"pair, got {type(obj).__name__}")
        return cls._from_quant_state(packed, qs)

    @classmethod
    def _from_quant_state(cls, packed: torch.Tensor, qs: Any) -> "NF4Weight":
        quant_type = getattr(qs, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"unsupported bitsandbytes quant_type {quant_type!r}: fused-lora reads NF4 weights only "
                             "(quant_type='nf4'); re-quantize the layer with quant_type='nf4'")
        shape = tuple(getattr(qs, "shape", None) or ())
        if len(shape) != 2:
            raise ValueError(f"NF4Weight holds 2-D [out, in] weights; the quant state has shape {shape}")
        if not isinstance(packed, torch.Tensor):
            raise ValueError(f"packed data must be a tensor, got {type(packed).__name__}")
        packed = packed.detach().contiguous()
        if packed.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes seen through another dtype
            packed = packed.view(-1).view(torch.uint8)
        # (k, 1) normally; (1, k) in bitsandbytes' legacy transposed form: the bytes are the same
        packed = packed.reshape(-1, 1)
        code = qs.code.detach()
        if code.dtype != torch.float32 or code.numel() != 16 or not torch.equal(code.cpu(), NF4_CODE):
            raise ValueError("the quant state's code table (quant_map) is not the NF4 table: bitsandbytes ignores it "
                             "when dequantizing, so it cannot be honoured exactly")
        if getattr(qs, "packing_format_for_cpu", False):
            return cls._from_cpu_inference_layout(packed, qs, shape)
        dtype = qs.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported quant state dtype {dtype}")
        common = dict(data=packed, blocksize=qs.blocksize, shape=shape, dtype=dtype, code=code.contiguous().reshape(16))
        if getattr(qs, "nested", False):
            s2 = qs.state2
            if s2.dtype != torch.float32:
                raise ValueError(f"nested absmax dtype {s2.dtype} is not supported (bitsandbytes writes float32)")
            offset = qs.offset
            offset = (offset.detach() if isinstance(offset, torch.Tensor) else torch.tensor(float(offset)))
            offset = offset.to(device=packed.device, dtype=torch.float32).reshape(())
            return cls(qabsmax=qs.absmax.detach().contiguous(), absmax2=s2.absmax.detach().contiguous().reshape(-1),
                       code2=s2.code.detach().contiguous().reshape(-1), offset=offset,
                       nested_blocksize=s2.blocksize, **common)
        absmax = qs.absmax.detach().contiguous()
        if absmax.dtype != torch.float32:
            absmax = absmax.float()  # bitsandbytes' dequantize does the same
        return cls(absmax=absmax.reshape(-1), **common)

    @classmethod
    def _from_cpu_inference_layout(cls, packed: torch.Tensor, qs: Any, shape: Tuple[int, ...]) -> "NF4Weight":
        """A weight bitsandbytes repacked for its AVX512-BF16 CPU inference kernel (``Linear4bit.forward`` in eval
        mode without grad does it, in place): codes shuffled in tiles of 32 rows, absmax rounded to bf16 and stored
        ``[in / blocksize, out]``, double quantization undone. The values bitsandbytes computes with from then on
        are ``code[nibble] * absmax_bf16``: read back exactly as a new plain-absmax NF4 weight in the standard
        layout (a copy, since the layout differs; bitsandbytes' own inverse re-quantizes the absmax, which is not
        exact)."""
        n, k = shape
        block_n = 32  # bitsandbytes' _convert_weight_packed_for_cpu tile height
        if packed.numel() * 2 != n * k or n % block_n or k % qs.blocksize:
            raise ValueError(f"unexpected CPU-repacked bitsandbytes layout ({packed.numel()} bytes) for shape "
                             f"{list(shape)}")
        # each 32-byte row holds a [32 rows x 2 columns] tile: low nibbles the first 32 (row, column) pairs, high
        # nibbles the next 32
        tiles = packed.reshape(-1, block_n)
        pairs = torch.cat([tiles & 0xF, tiles >> 4], dim=-1).reshape(n // block_n, k // 2, block_n, 2)
        codes = pairs.transpose(1, 2).reshape(-1)  # [out, in] in row-major order
        standard = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
        absmax = qs.absmax.detach().t().reshape(-1).float()  # bf16 -> fp32 is exact
        return cls(data=standard, absmax=absmax.contiguous(), blocksize=qs.blocksize, shape=shape,
                   dtype=getattr(qs, "original_dtype", torch.float32), code=qs.code.detach().contiguous().reshape(16))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> "NF4Weight":
        """Read a serialized bitsandbytes ``Linear4bit`` (``module.state_dict()``, or a safetensors file's tensors):
        ``{prefix}weight``, ``{prefix}weight.absmax``, ``{prefix}weight.quant_map``, with double quantization
        ``{prefix}weight.nested_absmax`` / ``{prefix}weight.nested_quant_map``, and
        ``{prefix}weight.quant_state.bitsandbytes__nf4`` (uint8 tensor of UTF-8 JSON with the non-tensor fields).
        The nested map is read from the checkpoint, not recomputed."""
        w = prefix + "weight"
        if w not in state_dict:
            raise ValueError(f"no {w!r} in the state dict (expected bitsandbytes Linear4bit keys under prefix "
                             f"{prefix!r})")
        qs_keys = [k for k in state_dict if k.startswith(w + ".quant_state.")]
        if not qs_keys:
            raise ValueError(f"{w!r} has no packed quant state ({w}.quant_state.bitsandbytes__nf4): "
                             "not a bitsandbytes 4-bit weight, or saved without its quant state")
        if len(qs_keys) > 1:
            raise ValueError(f"several quant states for {w!r}: {qs_keys}")
        kind = qs_keys[0][len(w + ".quant_state."):]
        if kind != "bitsandbytes__nf4":
            raise ValueError(f"unsupported bitsandbytes quant state {kind!r} for {w!r}: fused-lora reads NF4 "
                             "(bitsandbytes__nf4) only")
        try:
            meta = json.loads(bytes(state_dict[qs_keys[0]].detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{qs_keys[0]!r} does not hold bitsandbytes' JSON quant state: {exc}") from None
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"unsupported quant_type {meta.get('quant_type')!r} in {qs_keys[0]!r}: NF4 only")

        packed = state_dict[w]
        device = packed.device

        def need(key):  # tensors may come from elsewhere (e.g. a CPU checkpoint): keep them with the packed data
            if w + "." + key not in state_dict:
                raise ValueError(f"missing {w}.{key} in the state dict")
            return state_dict[w + "." + key].to(device)

        for key in ("blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"{qs_keys[0]!r} has no {key!r}")
        if meta["shape"] is None or len(meta["shape"]) != 2:
            raise ValueError(f"NF4Weight holds 2-D [out, in] weights; {w!r} has shape {meta['shape']}")

        # the fields _from_quant_state reads, as bitsandbytes' QuantState.from_dict would set them
        qs = SimpleNamespace(quant_type="nf4", blocksize=int(meta["blocksize"]), shape=tuple(meta["shape"]),
                             dtype=_dtype_from_name(meta["dtype"], f"{qs_keys[0]} dtype"), code=need("quant_map"),
                             absmax=need("absmax"), nested=w + ".nested_absmax" in state_dict)
        if qs.nested:
            for key in ("nested_blocksize", "nested_dtype", "nested_offset"):
                if key not in meta:
                    raise ValueError(f"{qs_keys[0]!r} has no {key!r} although {w}.nested_absmax is present")
            qs.state2 = SimpleNamespace(absmax=need("nested_absmax"), code=need("nested_quant_map"),
                                        blocksize=int(meta["nested_blocksize"]),
                                        dtype=_dtype_from_name(meta["nested_dtype"], f"{qs_keys[0]} nested_dtype"))
            qs.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
        return cls._from_quant_state(packed, qs)

    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """The keys and values bitsandbytes' ``Linear4bit.state_dict()`` writes for this weight (same order, same
        JSON bytes), readable by ``Params4bit.from_prequantized`` / transformers' bitsandbytes loader."""
        w = prefix + "weight"
        out = {w: self.data, w + ".absmax": self.qabsmax if self.nested else self.absmax, w + ".quant_map": self.code}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        if self.nested:
            out[w + ".nested_absmax"] = self.absmax2
            out[w + ".nested_quant_map"] = self.code2.clone()
            meta.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": self.offset.item()})
        out[w + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                                   dtype=torch.uint8)
        return out
