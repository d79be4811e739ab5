"""Dense bit packing of integer codes (2..8 bits), little-endian, with device-agnostic tensor ops.

Each row is one bit stream: code ``j`` occupies bits ``[j*bits, (j+1)*bits)``, and bit ``i`` of
the stream is bit ``i % 8`` (0 = least significant) of byte ``i // 8``. A row of ``cols`` codes
packs into ``ceil(cols*bits/8)`` bytes; unused high bits of the last byte are zero.

Eight codes fill exactly ``bits`` bytes, so rows are handled in groups of eight codes held in an
int64 (at most 56 bits for 7-bit codes; 8-bit codes are stored as they are).
"""

from __future__ import annotations

import torch

_GROUP = 8  # codes per group; a group packs into exactly `bits` bytes


def _check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an int in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def packed_size(cols: int, bits: int) -> int:
    """Return the bytes per row for ``cols`` codes of ``bits`` bits: ``ceil(cols*bits/8)``."""
    _check_bits(bits)
    return (cols * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., cols]`` in ``[0, 2**bits)`` into uint8 ``[..., ceil(cols*bits/8)]``.

    Raises ValueError for ``bits`` outside 2..8, a non-integer dtype, or a code out of range.
    The result is on ``codes``' device.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    *lead, cols = codes.shape
    nbytes = packed_size(cols, bits)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if cols == 0:
        return codes.new_zeros((*lead, 0), dtype=torch.uint8)
    groups = -(-cols // _GROUP)
    flat = codes.reshape(-1, cols).to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, groups * _GROUP - cols))
    flat = flat.reshape(-1, groups, _GROUP)
    word = flat[..., 0].clone()
    for k in range(1, _GROUP):
        word |= flat[..., k] << (k * bits)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(bits)], dim=-1)
    out = out.reshape(-1, groups * bits)[:, :nbytes].to(torch.uint8)
    return out.reshape(*lead, nbytes)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unpack uint8 ``[..., ceil(cols*bits/8)]`` from ``pack_codes`` into uint8 codes ``[..., cols]``.

    Raises ValueError for ``bits`` outside 2..8, a non-uint8 input, or a last dimension that
    does not match ``cols``. The result is on ``packed``' device.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if cols < 0:
        raise ValueError(f"cols must be >= 0, got {cols}")
    nbytes = packed_size(cols, bits)
    if packed.dim() < 1 or packed.shape[-1] != nbytes:
        raise ValueError(
            f"packed last dimension must be {nbytes} for {cols} codes of {bits} bits, "
            f"got shape {tuple(packed.shape)}"
        )
    *lead, _ = packed.shape
    if bits == 8:
        return packed.clone()
    if cols == 0:
        return packed.new_zeros((*lead, 0))
    groups = -(-cols // _GROUP)
    flat = packed.reshape(-1, nbytes).to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, groups * bits - nbytes))
    flat = flat.reshape(-1, groups, bits)
    word = flat[..., 0].clone()
    for b in range(1, bits):
        word |= flat[..., b] << (8 * b)
    mask = (1 << bits) - 1
    out = torch.stack([(word >> (k * bits)) & mask for k in range(_GROUP)], dim=-1)
    out = out.reshape(-1, groups * _GROUP)[:, :cols].to(torch.uint8)
    return out.reshape(*lead, cols)
