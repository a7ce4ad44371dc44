"""Our brush RLE against label_studio_sdk.converter.brush: byte-identical encoding and
decoding of what the SDK (and Label Studio's front end) writes, over random masks, odd
sizes, long runs and real CamVid masks."""

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter import brush

from s4al_backend import rle

ODD_SIZES = [(1, 1), (1, 2), (2, 1), (1, 97), (97, 1), (3, 5), (7, 13), (31, 17), (61, 83)]


def sdk_encode(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(mask.astype(np.uint8) * 255 if mask.dtype == bool else mask)


def sdk_decode(data: list[int], height: int, width: int) -> np.ndarray:
    return brush.decode_rle(bytes(data)).reshape(height, width, 4)[:, :, 3] > 0


def random_masks(rng, height, width):
    yield rng.random((height, width)) < 0.5  # noise
    yield rng.random((height, width)) < 0.03  # sparse
    yield np.zeros((height, width), bool)
    yield np.ones((height, width), bool)
    blob = np.zeros((height, width), bool)
    blob[height // 4 : 3 * height // 4 + 1, width // 3 :] = True
    yield blob
    # runs of random lengths (1..300 px), covering every length field size
    lengths = rng.integers(1, 300, size=height * width)
    runs = np.repeat(np.arange(lengths.size) % 2 == 0, lengths)[: height * width]
    yield runs.reshape(height, width)


@pytest.mark.parametrize("size", ODD_SIZES + [(64, 64), (120, 160), (257, 255)])
def test_encode_matches_sdk_on_random_masks(size):
    rng = np.random.default_rng(sum(size))
    for mask in random_masks(rng, *size):
        assert rle.encode(mask) == sdk_encode(mask)


@pytest.mark.parametrize("size", ODD_SIZES + [(64, 64), (120, 160)])
def test_decode_inverts_encode_and_matches_sdk_decoder(size):
    rng = np.random.default_rng(1000 + sum(size))
    for mask in random_masks(rng, *size):
        data = sdk_encode(mask)
        ours = rle.decode(data, *size)
        assert ours.dtype == bool and ours.shape == size
        np.testing.assert_array_equal(ours, mask)
        np.testing.assert_array_equal(ours, sdk_decode(data, *size))


def test_uint8_values_kept():
    rng = np.random.default_rng(5)
    mask = rng.integers(0, 256, size=(23, 41)).astype(np.uint8)
    mask[5:15] = 7
    assert rle.encode(mask) == brush.mask2rle(mask)
    values = rle.decode_values(rle.encode(mask))
    np.testing.assert_array_equal(values, np.repeat(mask.ravel(), 4))


@pytest.mark.parametrize("pixels", [16383, 16384, 16385, 32768, 32769, 70000])
def test_long_runs_split_like_the_sdk(pixels):
    # one run of `pixels` px is 4 x pixels values: around the 65536-value chunk boundary
    mask = np.zeros((1, pixels + 3), bool)
    mask[0, 2 : 2 + pixels] = True
    data = rle.encode(mask)
    assert data == sdk_encode(mask)
    np.testing.assert_array_equal(rle.decode(data, 1, pixels + 3), mask)


def test_byte_aligned_stream_gets_a_zero_byte_like_the_sdk():
    # 53 header bits + tokens of 14 (1-2 px runs) or 15 bits (3-4 px): 2 x 14 + 15 ends
    # on a byte boundary, where the SDK pads a whole zero byte
    mask = np.array([[True, False, True, True, True]])
    data = rle.encode(mask)
    assert data == sdk_encode(mask)
    assert len(data) == (53 + 14 + 14 + 15) // 8 + 1 and data[-1] == 0
    np.testing.assert_array_equal(rle.decode(data, 1, 5), mask)


def test_real_camvid_masks(camvid_root):
    paths = sorted((camvid_root / "trainannot").glob("*.png"))[:4]
    assert paths
    for path in paths:
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        height, width = labels.shape
        for value in np.unique(labels):
            mask = labels == value
            data = rle.encode(mask)
            assert data == sdk_encode(mask), (path.name, value)
            np.testing.assert_array_equal(rle.decode(data, height, width), mask)


# Label Studio's front end writes streams the SDK never writes: literal tokens, other
# word and length-field sizes. A plain bit-string writer of the format builds them here.
def write_stream(tokens, num, word=8, sizes=(3, 4, 8, 16)):
    bits = f"{num:032b}{word - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes)
    for repeat, size_index, words in tokens:
        n = len(words) if not repeat else words[1]
        bits += "1" if repeat else "0"
        bits += f"{size_index:02b}" + format(n - 1, f"0{sizes[size_index]}b")
        values = [words[0]] if repeat else words
        bits += "".join(format(v, f"0{word}b") for v in values)
    bits += "0" * (8 - len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_decode_literal_tokens_and_other_sizes_like_the_sdk():
    # 2x3 mask, RGBA (255, 0, 0, a): literal words per pixel as a canvas would produce
    rgba = np.array([[255, 0, 0, 255], [0, 0, 0, 0], [255, 0, 0, 255]] * 2, dtype=np.uint8)
    flat = rgba.ravel().tolist()
    tokens = [(False, 1, flat[:4]), (True, 0, (0, 4)), (False, 2, flat[8:])]
    data = write_stream(tokens, len(flat), sizes=(2, 4, 5, 9))
    np.testing.assert_array_equal(rle.decode_values(data), brush.decode_rle(bytes(data)))
    mask = rle.decode(data, 2, 3)
    np.testing.assert_array_equal(mask, [[True, False, True], [True, False, True]])


def test_decode_wider_words():
    data = write_stream([(True, 3, (300, 10)), (False, 0, [7])], 11, word=12)
    values = rle.decode_values(data)
    assert values.dtype == np.uint16
    assert values.tolist() == [300] * 10 + [7]


def test_decode_refuses_wrong_size_and_broken_streams():
    mask = np.ones((4, 5), bool)
    data = rle.encode(mask)
    with pytest.raises(rle.RLEError, match="holds 80 values, expected 100"):
        rle.decode(data, 5, 5)
    with pytest.raises(rle.RLEError):
        rle.decode(data[:5], 4, 5)  # shorter than the header
    noisy = rle.encode(np.random.default_rng(0).random((8, 8)) < 0.5)
    with pytest.raises(rle.RLEError, match="ends"):
        rle.decode(noisy[: len(noisy) // 2], 8, 8)
    with pytest.raises(rle.RLEError, match="0..255"):
        rle.decode([1, 2, 300, 4, 5, 6, 7, 8], 1, 1)
    with pytest.raises(rle.RLEError):
        rle.decode([[1, 2], [3, 4]], 1, 1)


def test_header_count_checked_before_decoding():
    # a header announcing 2^31 values for a 2x2 mask: refused from the header alone
    data = write_stream([(True, 3, (255, 60000))], 2**31)
    with pytest.raises(rle.RLEError, match="holds 2147483648 values, expected 16"):
        rle.decode(data, 2, 2)


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError):
        rle.encode(np.zeros((2, 2, 2), bool))
    with pytest.raises(TypeError):
        rle.encode(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        rle.encode(np.zeros((0, 3), bool))


def test_accepts_bytes_and_arrays():
    mask = np.eye(6, dtype=bool)
    data = rle.encode(mask)
    for form in (bytes(data), np.asarray(data, dtype=np.int64), np.asarray(data, np.uint8)):
        np.testing.assert_array_equal(rle.decode(form, 6, 6), mask)


def test_decode_refuses_trailing_bytes():
    mask = np.random.default_rng(3).random((9, 11)) < 0.5
    data = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(data, 9, 11), mask)
    for extra in ([0], [0, 0, 0, 0], [255] * 3):
        with pytest.raises(rle.RLEError, match=r"goes on for \d+ byte\(s\) after its last value"):
            rle.decode(data + extra, 9, 11)


def test_decode_memory_is_a_small_multiple_of_the_stream():
    import tracemalloc

    mask = np.random.default_rng(4).random((512, 512)) < 0.5  # a run every pixel or two
    data = np.asarray(rle.encode(mask), dtype=np.uint8)
    tracemalloc.start()
    try:
        decoded = rle.decode(data, 512, 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(decoded, mask)
    assert peak < 100 * data.size, f"{peak / data.size:.0f} bytes per RLE byte"


# A reference decoder: the format read bit by bit as the module docstring defines it, and
# refusing what decode_values refuses (a stream shorter than its header, one that ends
# before its last value, one that goes on for more than 8 bits after it; a stream
# announcing no values is not read further).
def reference_decode(data: list[int]) -> list[int]:
    bits = "".join(f"{byte:08b}" for byte in data)
    pos = 0

    def read(n):
        nonlocal pos
        if pos + n > len(bits):
            raise rle.RLEError("ends early")
        pos += n
        return int(bits[pos - n : pos], 2)

    if len(data) < 7:
        raise rle.RLEError("no header")
    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    values = []
    while len(values) < num:
        repeat = read(1)
        n = read(sizes[read(2)]) + 1
        values += [read(word)] * n if repeat else [read(word) for _ in range(n)]
    if num and len(bits) - pos > 8:
        raise rle.RLEError("goes on")
    return values[:num]


def random_tokens(rng, word, sizes, n_tokens):
    """Repeat and literal tokens in every field, of random lengths the field can hold."""
    tokens = []
    for _ in range(n_tokens):
        index = int(rng.integers(4))
        most = 2 ** sizes[index]
        if rng.random() < 0.5:
            n = int(rng.integers(1, min(most, 500) + 1))
            tokens.append((True, index, (int(rng.integers(2**word)), n)))
        else:
            n = int(rng.integers(1, min(most, 40) + 1))
            tokens.append((False, index, [int(v) for v in rng.integers(0, 2**word, n)]))
    return tokens


def random_grammar(rng):
    if rng.random() < 0.3:
        return 8, (3, 4, 8, 16)  # the SDK's and the front end's
    return int(rng.integers(1, 33)), tuple(int(s) for s in rng.integers(1, 17, 4))


def values_count(tokens):
    return sum(words[1] if repeat else len(words) for repeat, _, words in tokens)


def assert_decodes_like_the_reference(data):
    try:
        expected = reference_decode(data)
    except rle.RLEError:
        with pytest.raises(rle.RLEError):
            rle.decode_values(data)
        return
    values = rle.decode_values(data)
    assert values.tolist() == expected


@pytest.mark.parametrize("seed", range(4))
def test_decode_matches_a_bit_by_bit_reference_on_random_streams(seed):
    rng = np.random.default_rng(seed)
    for _ in range(80):
        word, sizes = random_grammar(rng)
        tokens = random_tokens(rng, word, sizes, int(rng.integers(1, 80)))
        data = write_stream(tokens, values_count(tokens), word, sizes)
        values = rle.decode_values(data)
        assert values.tolist() == reference_decode(data)
        assert values.dtype == (np.uint8 if word <= 8 else np.uint16 if word <= 16
                                else np.uint32)


@pytest.mark.parametrize("seed", range(4))
def test_decode_refuses_what_the_reference_refuses(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        word, sizes = random_grammar(rng)
        tokens = random_tokens(rng, word, sizes, int(rng.integers(1, 40)))
        num = values_count(tokens)
        data = write_stream(tokens, num, word, sizes)
        broken = [data[:-1], data[:-2], data[:7], data[:8], data + [0], data + [255] * 3,
                  write_stream(tokens, num + 1, word, sizes),  # announces too many
                  write_stream(tokens, num - 1, word, sizes),  # too few: ends mid-token
                  write_stream(tokens, num + 60, word, sizes),
                  [int(b) for b in rng.integers(0, 256, int(rng.integers(0, 24)))]]
        for stream in broken:
            assert_decodes_like_the_reference(stream)


def test_decode_tokens_the_step_table_cannot_size():
    # literal tokens whose count field (16 bits) ends past the 13-bit window of the chain's
    # step table, alone, in runs and between others, over more tokens than one chase step
    rng = np.random.default_rng(7)
    literal = [(False, 3, [int(v)]) for v in rng.integers(0, 256, 50)]
    mixed = random_tokens(rng, 8, (16, 16, 16, 16), 50)
    for tokens, sizes in [(literal, (16, 16, 16, 16)), (mixed, (16, 16, 16, 16)),
                          (literal[:1] + [(True, 0, (9, 4))] * 30, (16, 3, 3, 3))]:
        data = write_stream(tokens, values_count(tokens), 8, sizes)
        assert rle.decode_values(data).tolist() == reference_decode(data)


def test_decode_with_int64_tables(monkeypatch):
    # streams of 2^27 bytes or more use int64 step tables: force them on small ones
    monkeypatch.setattr(rle, "_INT32_BITS", 0)
    rng = np.random.default_rng(8)
    for _ in range(30):
        word, sizes = random_grammar(rng)
        tokens = random_tokens(rng, word, sizes, int(rng.integers(1, 40)))
        data = write_stream(tokens, values_count(tokens), word, sizes)
        assert_decodes_like_the_reference(data)
        assert_decodes_like_the_reference(data + [0])
    mask = rng.random((37, 41)) < 0.5
    np.testing.assert_array_equal(rle.decode(rle.encode(mask), 37, 41), mask)


def test_decode_refuses_lists_that_are_not_bytes():
    data = rle.encode(np.eye(3, dtype=bool))
    for bad in ([True] * len(data), [float(v) for v in data], data[:-1] + [256],
                data[:-1] + [-1], [data], data[:-1] + ["1"]):
        with pytest.raises(rle.RLEError):
            rle.decode(bad, 3, 3)
    as_numpy = [np.int64(v) for v in data]
    np.testing.assert_array_equal(rle.decode(as_numpy, 3, 3), np.eye(3, dtype=bool))
