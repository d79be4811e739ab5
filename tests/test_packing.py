"""Tests for neuqi.quant.packing: dense little-endian bit packing of 2..8-bit codes."""

import math

import pytest
import torch

from neuqi.quant.packing import pack_codes, packed_size, unpack_codes


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack bit by bit in pure Python, straight from the bit-stream definition."""
    rows, cols = codes.shape
    out = torch.zeros(rows, math.ceil(cols * bits / 8), dtype=torch.uint8)
    for r in range(rows):
        for j in range(cols):
            for i in range(bits):
                if (int(codes[r, j]) >> i) & 1:
                    pos = j * bits + i
                    out[r, pos // 8] |= 1 << (pos % 8)
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 3, 7, 8, 9, 13, 31, 64, 101])
def test_round_trip_and_size(bits: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=gen, dtype=torch.int64)
    codes = codes.to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, math.ceil(cols * bits / 8))
    assert packed.shape[1] == packed_size(cols, bits)
    out = unpack_codes(packed, bits, cols)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_matches_bitstream_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 11), generator=gen).to(torch.uint8)
    assert torch.equal(pack_codes(codes, bits), _reference_pack(codes, bits))


def test_known_bytes() -> None:
    # 4 bits: code 0 in the low nibble.
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    # 2 bits: codes 1,2,3,0 -> 0b00_11_10_01.
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0x39]]
    # 3 bits, crossing a byte: 5 | 3<<3 | 7<<6 = 0x1DD -> bytes 0xDD, 0x01.
    assert pack_codes(torch.tensor([[5, 3, 7]], dtype=torch.uint8), 3).tolist() == [[0xDD, 0x01]]
    # 8 bits: bytes as they are.
    assert pack_codes(torch.tensor([[7, 255]], dtype=torch.uint8), 8).tolist() == [[7, 255]]
    # Unused high bits of the last byte are zero: one 3-bit 7 -> 0x07.
    assert pack_codes(torch.tensor([[7]], dtype=torch.uint8), 3).tolist() == [[0x07]]


def test_all_max_codes_fill_bits() -> None:
    # 8 codes of value 2**bits - 1 fill exactly `bits` bytes with 0xFF.
    for bits in range(2, 9):
        codes = torch.full((2, 8), (1 << bits) - 1, dtype=torch.uint8)
        assert pack_codes(codes, bits).tolist() == [[0xFF] * bits] * 2


def test_leading_dims_and_empty() -> None:
    codes = torch.randint(0, 8, (2, 3, 10)).to(torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.shape == (2, 3, 4)
    assert torch.equal(unpack_codes(packed, 3, 10), codes)
    empty = torch.zeros((4, 0), dtype=torch.uint8)
    assert pack_codes(empty, 3).shape == (4, 0)
    assert unpack_codes(torch.zeros((4, 0), dtype=torch.uint8), 3, 0).shape == (4, 0)
    assert pack_codes(torch.zeros((0, 5), dtype=torch.uint8), 5).shape == (0, 4)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bad_bits(bits: int) -> None:
    codes = torch.zeros((1, 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(codes, bits, 4)


def test_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([[1, 8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([[-1, 0]], dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.tensor([[1.0, 2.0]]), 4)


def test_unpack_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="last dimension must be 2"):
        unpack_codes(torch.zeros((1, 3), dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros((1, 2), dtype=torch.int32), 4, 4)
