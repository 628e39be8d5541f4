"""Packed top-k keys: one int64 per (value, feature) that sorts by value, then by the lower feature.

For a non-negative fp32 value (a ReLU output), its bit pattern read as an int32 orders like the
value. ``key = bits << 32 | (2^31 - 1 - index)`` therefore sorts descending by value and, among
equal values, ascending by feature index: a plain integer top-k over keys is an exact top-k with
ties to the lower index, whatever order the candidates arrive in. -1 is below every real key
(a real zero has key >= 0) and marks an empty slot. The torch encoder, the Triton encoders (whose
in-kernel packing, `flashsae.kernels.triton_common.pack_key`, takes its constants from here) and
the feature-parallel merge all use this one format; indices must be < 2^31. NaN packs as +0.0 (a
NaN pre-activation counts as -inf, a zero after the ReLU), as in the Triton encoders. Importing this
module never imports triton.
"""
from __future__ import annotations

import torch

INDEX_MASK = (1 << 31) - 1
LOW32 = (1 << 32) - 1
EMPTY_KEY = -1
# fp32 +inf's bit pattern; sign-clear patterns above it are NaN.
INF_BITS = 0x7F800000


def pack_keys(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(vals of any float dtype, idx int64 broadcastable to vals' shape) -> int64 keys of vals' shape.

    The key holds relu(vals): the bit patterns are clamped at 0, so -0.0, negative values and NaN
    pack as +0.0 (the order needs +0.0's pattern), as in the Triton encoders. The clamp, the shift
    and the OR work in place on the one new int64 tensor: packing holds 8 new bytes per value.
    """
    keys = vals.to(torch.float32).view(torch.int32).to(torch.int64)
    keys.clamp_(min=0)
    keys.masked_fill_(keys > INF_BITS, 0)
    keys <<= 32
    keys |= INDEX_MASK - idx
    return keys


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (fp32 values, int64 indices)."""
    index = INDEX_MASK - (keys & LOW32)
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    return values, index
