"""Label Studio's brush RLE, vectorised with numpy.

The format (the thi-ng ``rle-pack`` bit stream that Label Studio's brush tool uses) is a
run-length code over the RGBA bytes of a mask, every pixel repeated 4 times:

    header: 32 bits value count | 5 bits word size - 1 | 4 x 4 bits run-length field sizes - 1
    then tokens until ``count`` values are out:
      1 bit  repeat flag
      2 bits index of the length field size (into the header's four sizes)
      n bits run length - 1
      repeat flag 1: one word, repeated ``length`` times; 0: ``length`` literal words

``encode`` writes exactly the bytes ``label_studio_sdk.converter.brush.mask2rle`` writes
(word size 8, field sizes 3/4/8/16, every run a repeat token, runs longer than 65536 split
into 65536-value chunks, and always at least one zero bit of padding, so a stream whose
length is a multiple of 8 bits gets a whole zero byte). ``decode`` reads any valid stream,
including literal tokens and other field sizes written by Label Studio's front end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RLEError", "decode", "decode_values", "encode", "encode_values"]

_HEADER_BITS = 32 + 5 + 4 * 4
# word size 8 -> 7 (5 bits); field sizes 3, 4, 8, 16 -> 2, 3, 7, 15 (4 bits each)
_HEADER_TAIL = (7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15
_CHUNK = 1 << 16
_PREFIX = np.array(
    [0, 1 << 13, (1 << 14) | (1 << 12), (1 << 18) | (2 << 16), (1 << 26) | (3 << 24)],
    dtype=np.uint64,
)
_U8, _U32, _LOW32 = np.uint64(8), np.uint64(32), np.uint64(0xFFFFFFFF)
_WIDTH = np.array([14, 14, 15, 19, 27], dtype=np.int64)



class RLEError(ValueError):
    """An RLE stream that is malformed or does not match the expected mask size."""


def encode(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask as Label Studio brush RLE.

    ``mask``: bool (True -> 255, False -> 0) or uint8 (values as given), H x W. Returns the
    list of byte values Label Studio stores in ``value.rle``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == bool:
        pixels = mask.reshape(-1).view(np.uint8) * np.uint8(255)
    elif mask.dtype == np.uint8:
        pixels = mask.reshape(-1)
    else:
        raise TypeError(f"mask must be bool or uint8, got {mask.dtype}")
    return _encode_pixels(pixels, repeat=4)


def encode_values(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 array as is (no RGBA repetition): ``brush.encode_rle``'s output."""
    values = np.asarray(values)
    if values.dtype != np.uint8:
        raise TypeError(f"values must be uint8, got {values.dtype}")
    return _encode_pixels(values.reshape(-1), repeat=1)


def _encode_pixels(pixels: np.ndarray, repeat: int) -> list[int]:
    n_values = pixels.size * repeat
    if pixels.size == 0:
        raise ValueError("cannot encode an empty mask")
    if n_values >= 1 << 32:
        raise ValueError("mask too large for Label Studio's RLE (2^32 values)")
    # runs over pixels; every run over the repeated values is `repeat` times longer
    change = np.flatnonzero(pixels[1:] != pixels[:-1])
    ends = np.empty(change.size + 1, dtype=np.int64)
    ends[:-1] = change + 1
    ends[-1] = pixels.size
    lengths = np.diff(ends, prepend=0) * repeat
    values = pixels[ends - 1].astype(np.uint64)

    # runs longer than 256 use the 16-bit length field; longer than 65536: 65536-value chunks
    n_chunks = np.where(lengths > 256, (lengths + _CHUNK - 1) // _CHUNK, 1)
    if n_chunks.max() > 1:
        first = np.cumsum(n_chunks) - n_chunks
        run_of = np.repeat(np.arange(lengths.size), n_chunks)
        k = np.arange(run_of.size) - first[run_of]
        tok_len = np.where(
            k < n_chunks[run_of] - 1, _CHUNK, lengths[run_of] - _CHUNK * (n_chunks[run_of] - 1)
        )
        values = values[run_of]
        # kind 0: single value ("0 00 000"), 1: 2-8, 2: 9-16, 3: 17-256, 4: 16-bit field;
        # every chunk of a long run, even a short last one, uses the 16-bit field
        kind = _kind(tok_len)
        kind[lengths[run_of] > 256] = 4
    else:
        tok_len = lengths
        kind = _kind(tok_len)

    # each token as (bits, width): flag | field index | length - 1 | 8-bit value
    bits = _PREFIX[kind] | ((tok_len - 1).astype(np.uint64) << _U8) | values
    width = _WIDTH[kind]

    total_bits = _HEADER_BITS + int(width.sum())
    n_bytes = total_bits // 8 + 1  # the SDK always pads with 1..8 zero bits
    n_words = (n_bytes + 3) // 4 + 1

    # place each token (<= 27 bits) into 32-bit words: it touches its word and maybe the
    # next; tokens never share a bit, so summing the parts is the same as OR-ing them
    offset = _HEADER_BITS + np.cumsum(width) - width
    word = offset >> 5
    tail = (64 - (offset & 31) - width).astype(np.uint64)  # token's place in a 64-bit window
    window = bits << tail
    hi = np.bincount(word, weights=window >> _U32, minlength=n_words)
    lo = np.bincount(word + 1, weights=window & _LOW32, minlength=n_words)
    hi += lo
    result = hi.astype(np.uint64).astype(">u4").view(np.uint8)
    header = (n_values << 21) | _HEADER_TAIL  # 53 bits, left-aligned in 7 bytes (56 bits)
    header_bytes = (header << 3).to_bytes(7, "big")
    result[:6] = np.frombuffer(header_bytes[:6], dtype=np.uint8)
    result[6] |= header_bytes[6]
    return result[:n_bytes].tolist()


def _kind(tok_len: np.ndarray) -> np.ndarray:
    """Token kind by length: 0 for 1, 1 for 2-8, 2 for 9-16, 3 for 17-256, 4 above."""
    kind = (tok_len > 1).view(np.int8) + (tok_len > 8).view(np.int8)
    kind += (tok_len > 16).view(np.int8)
    kind += (tok_len > 256).view(np.int8)
    return kind


class _Stream:
    """A bit stream and its token grammar (word size, the four run-length field sizes)."""

    def __init__(self, data: np.ndarray, word: int, sizes: np.ndarray):
        self.data = data
        self.n_bits = data.size * 8
        self.word = word
        self.sizes = sizes
        # a 64-bit window starting at every byte (8 bytes of memory per byte of RLE)
        padded = np.zeros(data.size + 8, dtype=np.uint64)
        padded[: data.size] = data
        self.u64 = np.zeros(data.size, dtype=np.uint64)
        for k in range(8):
            self.u64 |= padded[k : k + data.size] << np.uint64(56 - 8 * k)

    def tokens(self, pos: np.ndarray):
        """Every position read as a token start: (value count, repeat flag, field size,
        length in bits)."""
        win = _windows(self.u64, pos)
        field = self.sizes[(win >> np.uint64(29)).astype(np.int64) & 3]
        count = ((win >> (np.uint64(29) - field.astype(np.uint64))).astype(np.int64)
                 & ((1 << field) - 1)) + 1
        repeat = (win >> np.uint64(31)).astype(bool)
        return count, repeat, field, 3 + field + self.word * np.where(repeat, 1, count)

    def lengths(self) -> np.ndarray:
        """The length in bits of a token starting at every bit position (int32: 4 bytes
        per bit, where reading every position as uint64 windows took ~50)."""
        out = np.empty(self.n_bits, dtype=np.int32)
        sizes = self.sizes.astype(np.uint32)
        one, word = np.uint32(1), np.uint32(self.word)
        for offset in range(8):  # the positions 8k + offset, from their bytes' windows
            win = ((self.u64 << np.uint64(offset)) >> np.uint64(32)).astype(np.uint32)
            field = sizes[(win >> np.uint32(29)) & np.uint32(3)]
            count = ((win >> (np.uint32(29) - field)) & ((one << field) - one)) + one
            repeat = (win >> np.uint32(31)).astype(bool)
            out[offset::8] = np.uint32(3) + field + word * np.where(repeat, one, count)
        return out


def decode_values(rle: Sequence[int] | bytes | np.ndarray, expected: int | None = None
                  ) -> np.ndarray:
    """Decode an RLE stream to its flat value array (uint8 for word sizes <= 8). With
    ``expected``, a stream whose header announces another value count is refused before
    anything is decoded. A stream that goes on past its last value (more than the 1-8
    bits of zero padding writers add) is refused too."""
    data = _as_bytes(rle)
    if data.size < 7:
        raise RLEError(f"RLE too short for its header ({data.size} bytes)")
    head = int.from_bytes(data[:7].tobytes(), "big") >> 3
    num = head >> 21
    if expected is not None and num != expected:
        raise RLEError(f"RLE holds {num} values, expected {expected}")
    word = ((head >> 16) & 0x1F) + 1
    sizes = np.array([((head >> s) & 0xF) + 1 for s in (12, 8, 4, 0)], dtype=np.int64)
    dtype = np.uint8 if word <= 8 else np.uint16 if word <= 16 else np.uint32
    if num == 0:
        return np.zeros(0, dtype=dtype)
    stream = _Stream(data, word, sizes)
    if stream.n_bits <= _HEADER_BITS:
        raise RLEError("RLE holds no tokens")
    t = _token_starts(stream)
    count, repeat, field, length = stream.tokens(t)
    produced = np.cumsum(count)
    n_tokens = int(np.searchsorted(produced, num)) + 1
    if n_tokens > t.size:
        raise RLEError(f"RLE ends after {int(produced[-1])} of its {num} values")
    end = int(t[n_tokens - 1] + length[n_tokens - 1])
    if end > stream.n_bits:
        raise RLEError("RLE ends inside its last token")
    if stream.n_bits - end > 8:
        raise RLEError(f"RLE goes on for {(stream.n_bits - end) // 8} byte(s) after its "
                       f"last value")
    return _values(stream, t[:n_tokens], count[:n_tokens], repeat[:n_tokens],
                   field[:n_tokens], dtype)[:num]


def _values(stream: _Stream, t, t_count, t_repeat, t_field, dtype) -> np.ndarray:
    """The values of the tokens at ``t``: a repeat token is one segment of ``count``
    values, a literal token ``count`` segments of one value each."""
    word = stream.word
    value_at = t + 3 + t_field  # bit position of the first word
    seg_n = np.where(t_repeat, 1, t_count)
    if t_repeat.all():  # the SDK's streams: one word per token
        return np.repeat((_windows(stream.u64, value_at) >> np.uint64(32 - word))
                         .astype(dtype), t_count)
    seg_first = np.cumsum(seg_n) - seg_n
    tok_of = np.repeat(np.arange(t.size), seg_n)
    k = np.arange(tok_of.size) - seg_first[tok_of]
    seg_pos = value_at[tok_of] + k * word
    seg_len = np.where(t_repeat[tok_of], t_count[tok_of], 1)
    seg_val = _windows(stream.u64, seg_pos) >> np.uint64(32 - word)
    return np.repeat(seg_val.astype(dtype), seg_len)


def _token_starts(stream: _Stream) -> np.ndarray:
    """Bit positions of the stream's tokens, first to last. Every bit position's token
    length is computed at once (numpy); following the chain from the first token is the
    only sequential part."""
    step = memoryview(stream.lengths())
    starts = []
    append = starts.append
    idx, last = _HEADER_BITS, stream.n_bits
    while idx < last:
        append(idx)
        idx += step[idx]
    return np.asarray(starts, dtype=np.int64)


def decode(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to a bool mask H x W (alpha channel > 0, as Label
    Studio's own converters read it). Raises ``RLEError`` if the stream does not hold
    exactly ``height * width * 4`` values."""
    expected = int(height) * int(width) * 4
    try:
        values = decode_values(rle, expected)
    except RLEError as exc:
        raise RLEError(f"{exc} (a {width}x{height} mask)") from None
    return values.reshape(int(height), int(width), 4)[:, :, 3] > 0


def _as_bytes(rle) -> np.ndarray:
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    arr = np.asarray(rle)
    if arr.ndim != 1:
        raise RLEError("RLE must be a flat list of byte values")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
        raise RLEError("RLE must be a list of integers 0..255")
    return arr.astype(np.uint8)


def _windows(u64: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The 32 bits starting at each bit position, as uint64 values < 2^32."""
    shift = (positions & 7).astype(np.uint64)
    return (u64[positions >> 3] << shift) >> np.uint64(32)
