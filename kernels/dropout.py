"""The dropout mask as a Triton function: bit-identical to ``fused_lora.dropout.Dropout.keep_mask``.

See ``fused_lora/dropout.py`` for the definition. Every kernel that needs the mask (the down-projection in forward,
the dgrad epilogue and the dA kernel in backward) calls :func:`dropout_keep` on its tile's row and column indices,
so the mask is regenerated where it is used and never stored.
"""

import triton
import triton.language as tl


@triton.jit
def mix32(h):
    """lowbias32 integer hash on uint32 (wrapping multiplies, logical shifts)."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(rows, cols, n_cols, key, threshold):
    """Boolean ``[len(rows), len(cols)]`` tile: True where element (row, col) of a ``[*, n_cols]`` input is kept.

    ``rows`` and ``cols`` are int32 index vectors (true indices, not wrapped ones); ``key`` and ``threshold`` come
    from ``Dropout.key`` / ``Dropout.threshold``. Counters wrap modulo 2**32 (int32 arithmetic).
    """
    half_cols = (n_cols + 1) // 2
    counter = rows.to(tl.int32)[:, None] * half_cols + (cols.to(tl.int32)[None, :] >> 1)
    h = mix32((counter ^ key).to(tl.uint32, bitcast=True)).to(tl.int32, bitcast=True)
    # even column: low 16 bits, odd column: high 16 bits, both read as signed 16-bit values
    draw = tl.where((cols[None, :] & 1) == 1, h >> 16, (h << 16) >> 16)
    return draw >= threshold
