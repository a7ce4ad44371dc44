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

import contextlib
import functools
import itertools
import operator
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
# positions from here on need int64 tables (the sentinel must fit above them)
_INT32_BITS = 1 << 30
# tokens per start the chain's C-speed chase keeps (fewer Python ints; numpy fills in)
_CHASE = 4


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
        self.n_bits = data.size * 8
        self.word = word
        self.sizes = sizes
        self.head_field = np.tile(sizes, 2).astype(np.uint32)  # by flag and field index
        self.field_of = tuple(self.head_field.tolist())
        self.padded = np.zeros(data.size + 8, dtype=np.uint8)
        self.padded[: data.size] = data
        self.raw = memoryview(self.padded)
        # a big-endian 64-bit window starting at every byte (8 bytes of memory per byte of
        # RLE): a view with overlapping 8-byte items one byte apart, copied once
        self.u64 = np.ndarray((data.size,), dtype=">u8", buffer=self.padded,
                              strides=(1,)).astype(np.uint64)

    def tokens(self, pos: np.ndarray):
        """Every position read as a token start: (value count, repeat flag, field size,
        first word)."""
        bits = self.u64[pos >> 3] << (pos & 7).astype(np.uint64)  # the token's first bit on top
        win = (bits >> np.uint64(32)).astype(np.uint32)
        head = win >> np.uint32(29)  # repeat flag and field index
        field = self.head_field[head]
        # the count field, just below the 3 header bits, as the top ``field`` bits
        count = ((win << np.uint32(3)) >> (np.uint32(32) - field)).astype(np.int64) + 1
        # the first word follows: at most 7 + 3 + 16 + 32 bits into the 64
        first = (bits << (np.uint64(3) + field)) >> np.uint64(64 - self.word)
        return count, head >= 4, field, first

    def length_at(self, pos: int) -> int:
        """The length in bits of the token at ``pos``: ``tokens`` for one token, in plain
        Python (a numpy call per token would cost several times more)."""
        byte = pos >> 3
        win = (int.from_bytes(self.raw[byte : byte + 4], "big") << (pos & 7)) & 0xFFFFFFFF
        field = self.field_of[win >> 29]
        count = 1 if win >> 31 else ((win >> (29 - field)) & ((1 << field) - 1)) + 1
        return 3 + field + self.word * count

    def next_starts(self) -> tuple[np.ndarray, int]:
        """For every bit position p, where the next token would start if one started at p
        (int32: 4 bytes per bit), and the sentinel ``hard``: p's entry is ``hard`` or more
        where the table below cannot size the token (``length_at`` can)."""
        dtype = np.int32 if self.n_bits < _INT32_BITS else np.int64
        table, hard = _step_table(self.word, tuple(self.sizes.tolist()), dtype)
        # each byte with the first 5 bits of the next one indexes the table's rows
        window = (self.padded[:-8].astype(np.uint16) << 5) | (self.padded[1:-7] >> 3)
        out = np.take(table, window, axis=0)
        out += np.arange(0, self.n_bits, 8, dtype=dtype)[:, None]
        return out.reshape(-1), hard


@functools.lru_cache(maxsize=8)
def _step_table(word: int, sizes: tuple[int, ...], dtype: type) -> tuple[np.ndarray, int]:
    """Where the next token starts, counted from the first bit of a byte, for a token
    starting at bit ``column`` (0-7) of it, for every 13-bit window (row: the byte and the
    first 5 bits of the next). 13 bits always hold the 3 header bits, so a repeat token's
    length (3 + field + word) is known; a literal's (3 + field + word * count) only if its
    count field ends inside the window too. Those that do not get ``hard`` (a value past
    any stream this table serves). Built once per grammar: 8192 x 8 entries."""
    hard = int(np.iinfo(dtype).max) // 2 + 1
    window = np.arange(1 << 13, dtype=np.int64)[:, None]
    column = np.arange(8)
    repeat = (window >> (12 - column)) & 1 == 1
    field = np.asarray(sizes, dtype=np.int64)[(window >> (10 - column)) & 3]
    count_end = column + 3 + field  # the bit after the count field
    count = ((window >> np.maximum(13 - count_end, 0)) & ((1 << field) - 1)) + 1
    length = 3 + field + word * np.where(repeat, 1, count)
    table = np.where(repeat | (count_end <= 13), column + length, hard).astype(dtype)
    table.flags.writeable = False
    return table, hard


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
    stream = _Stream(data, word, sizes)  # 7 bytes or more: the first token starts inside
    t = _token_starts(stream)
    count, repeat, field, first = stream.tokens(t)
    produced = np.cumsum(count)
    n_tokens = int(np.searchsorted(produced, num)) + 1
    if n_tokens > t.size:
        raise RLEError(f"RLE ends after {int(produced[-1])} of its {num} values")
    last = int(t[n_tokens - 1])
    end = last + stream.length_at(last)
    if end > stream.n_bits:
        raise RLEError("RLE ends inside its last token")
    if stream.n_bits - end > 8:
        raise RLEError(f"RLE goes on for {(stream.n_bits - end) // 8} byte(s) after its "
                       f"last value")
    return _values(stream, t[:n_tokens], count[:n_tokens], repeat[:n_tokens],
                   field[:n_tokens], first[:n_tokens], dtype)[:num]


def _values(stream: _Stream, t, t_count, t_repeat, t_field, t_first, dtype) -> np.ndarray:
    """The values of the tokens at ``t``: a repeat token is one segment of ``count``
    values, a literal token ``count`` segments of one value each."""
    if t_repeat.all():  # the SDK's streams: one word per token, its first
        return np.repeat(t_first.astype(dtype), t_count)
    value_at = t + 3 + t_field  # bit position of the first word
    seg_n = np.where(t_repeat, 1, t_count)
    seg_first = np.cumsum(seg_n) - seg_n
    tok_of = np.repeat(np.arange(t.size), seg_n)
    k = np.arange(tok_of.size) - seg_first[tok_of]
    seg_pos = value_at[tok_of] + k * stream.word
    seg_len = np.where(t_repeat[tok_of], t_count[tok_of], 1)
    seg_val = _windows(stream.u64, seg_pos) >> np.uint32(32 - stream.word)
    return np.repeat(seg_val.astype(dtype), seg_len)


def _token_starts(stream: _Stream) -> np.ndarray:
    """Bit positions of the stream's tokens, first to last.

    A token's length depends on its own header, so token k+1 starts where token k ends: the
    chain is sequential. (Parsing from many points at once and joining the parses up does
    not work here: the code does not resynchronise, and on a noisy mask about half of the
    parses started at other bits never meet the true one, hundreds of tokens on.) So every
    bit position's next start is computed at once with numpy (``next_starts``) and the
    chain is followed at C speed: ``ahead`` looks each start of ``piece`` up ``_CHASE``
    times over, and ``piece.extend(ahead)`` appends the result, which the list's iterator
    reaches in turn (it runs on over items appended behind it). Every lookup is exact, so
    every start found is a token start. A lookup past the table ends the chase: the
    stream's end, or a sentinel for a token the table cannot size; the tokens from the
    last start found are then stepped one by one (``length_at`` sizing those) and the
    chase resumes. ``_fill_in`` adds the starts it skipped over."""
    nxt, hard = stream.next_starts()
    table = memoryview(nxt)
    pieces = []
    start = _HEADER_BITS
    while start < stream.n_bits:
        piece = [start]
        ahead = iter(piece)
        for _ in range(_CHASE):  # (getitem and repeat: no argument tuple built per call)
            ahead = map(operator.getitem, itertools.repeat(table), ahead)
        with contextlib.suppress(IndexError):
            piece.extend(ahead)
        if piece[-1] >= stream.n_bits:  # the end, reached by a whole chase step
            piece.pop()
        start = piece.pop()
        # token by token past the one that stopped the chase (one of the next _CHASE), and
        # on while the table cannot size them: a restart costs more than a step
        for steps in itertools.count(1):
            piece.append(start)
            after = table[start]
            sized = after < hard
            start = after if sized else start + stream.length_at(start)
            if start >= stream.n_bits or (sized and steps >= _CHASE):
                break
        pieces.append(piece)
    return _fill_in(nxt, pieces, stream.n_bits)


def _fill_in(nxt: np.ndarray, pieces: list[list[int]], n_bits: int) -> np.ndarray:
    """All token starts, from the chase's: after each, the next ``_CHASE - 1`` starts
    (``nxt``), as long as they come before the chase's next one (the chase's own steps of
    one token leave none)."""
    chased = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64,
                         count=sum(map(len, pieces)))
    upper = np.append(chased[1:], n_bits)
    columns, keep = [chased], [np.ones(chased.size, dtype=bool)]
    for _ in range(1, _CHASE):
        # clip: a start at the end or a sentinel reads garbage, but is not kept, nor after it
        columns.append(np.take(nxt, columns[-1], mode="clip"))
        keep.append(keep[-1] & (columns[-1] < upper))
    return np.stack(columns, axis=1)[np.stack(keep, axis=1)]


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
    if isinstance(rle, list) and rle and not isinstance(rle[0], (bool, np.bool_)):
        # Label Studio's JSON list: bytes() reads it ~20x faster than numpy and refuses
        # what the checks below refuse (nesting, non-integers, values outside 0..255),
        # which then say why; a list of bools, which bytes() takes, is left to them too
        with contextlib.suppress(TypeError, ValueError):
            return np.frombuffer(bytes(rle), dtype=np.uint8)
    arr = np.asarray(rle)
    if arr.ndim != 1:
        raise RLEError("RLE must be a flat list of byte values")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
        raise RLEError("RLE must be a list of integers 0..255")
    return arr.astype(np.uint8)


def _windows(u64: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The 32 bits starting at each bit position (uint32)."""
    shift = (positions & 7).astype(np.uint64)
    return ((u64[positions >> 3] << shift) >> np.uint64(32)).astype(np.uint32)
