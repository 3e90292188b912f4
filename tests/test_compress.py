import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from ringada import compress as Z
from ringada.compress import (Codec, ErrorFeedback, LinkCodecs, SmashedCodec, compressed_size, decode, dequantize,
                              encode, link_codecs, stochastic_quantize, topk_sparsify)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def same_bits(a, b):
    """Bit-for-bit equality of float32 tensors (torch.equal treats NaN != NaN and -0.0 == 0.0)."""
    same_type = a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    return same_type and torch.equal(a.view(torch.int32), b.view(torch.int32))


def structured():
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, -3.4028235e38, 3.4028235e38])
    return {
        "arange": torch.arange(60, dtype=torch.float32).reshape(3, 4, 5),
        "zeros": torch.zeros(4, 16),
        "constant": torch.full((2, 3, 2, 2), -2.5),
        "special": special,
        "repeating": torch.tensor([1.5, 1.5, -7.0, 0.25] * 50).reshape(2, 2, 5, 10),
    }


ROUND_TRIP_TENSORS = {
    "0d": torch.tensor(3.25),
    "empty": torch.zeros(0),
    "empty_3d": torch.zeros(3, 0, 2),
    "1d": torch.randn(7, generator=seeded(1)),
    "4d": torch.randn(2, 3, 4, 5, generator=seeded(2)),
    "8d": torch.randn(1, 2, 1, 2, 1, 2, 1, 3, generator=seeded(3)),
    "noncontiguous": torch.randn(6, 5, generator=seeded(4)).t(),
    **structured(),
}


@pytest.mark.parametrize("lossless", ["none", "zlib", "lzma"])
@pytest.mark.parametrize("name", list(ROUND_TRIP_TENSORS))
def test_lossless_codecs_round_trip_bit_exactly(lossless, name):
    x = ROUND_TRIP_TENSORS[name]
    codec = Codec(lossless=lossless)
    assert codec.is_identity == (lossless == "none")
    blob = encode(x, codec)
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    y = decode(blob)
    assert same_bits(y, x.contiguous())
    assert same_bits(decode(blob.numpy().tobytes()), y)  # bytes are accepted too


def test_half_precision_inputs_decode_to_their_float32_value_and_record_the_dtype():
    x = torch.randn(3, 5, generator=seeded(5))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        blob = encode(x.to(dtype), Codec(lossless="zlib"))
        assert same_bits(decode(blob), x.to(dtype).float())
        assert Z.read_header(blob).dtype == dtype


def test_encode_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="8 dims"):
        encode(torch.zeros([1] * 9), Codec())
    with pytest.raises(TypeError):
        encode(torch.arange(4), Codec())
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([1.0, math.nan]), Codec(bits=4))


def test_encode_leaves_input_alone_and_is_reproducible_with_a_seeded_generator():
    x = torch.randn(40, dtype=torch.float64, generator=seeded(6))
    before = x.clone()
    codec = Codec(topk=0.5, bits=3, lossless="zlib")
    assert torch.equal(encode(x, codec, seeded(7)), encode(x, codec, seeded(7)))
    assert torch.equal(x, before)


# --- stochastic quantization -----------------------------------------------------------------------------------


def test_stochastic_quantize_is_unbiased():
    draws, bits = 2000, 2
    v = torch.randn(64, generator=seeded(10))
    g = seeded(11)
    total = torch.zeros(64, dtype=torch.float64)
    for _ in range(draws):
        levels, lo, scale = stochastic_quantize(v, bits, g)
        total += dequantize(levels, lo, scale).double()
    mean = total / draws
    # One draw is v rounded down or up one step with Bernoulli(f) probability, f the fractional position, so its
    # variance is scale^2 f (1 - f) <= scale^2 / 4 and the mean of `draws` draws has standard error at most
    # scale / (2 sqrt(draws)). Four standard errors: a Gaussian tail of 6e-5 per value, < 0.5% over 64 values
    # (and the seeds are fixed); the float32 rounding of dequantize adds < 1e-6.
    _, lo, scale = stochastic_quantize(v, bits, seeded(0))
    tolerance = 4 * scale / (2 * math.sqrt(draws)) + 1e-6
    error = (mean - v.double()).abs()
    assert error.max() < tolerance
    # The tolerance is tight enough to catch a biased rounder: round-to-nearest misses it on these values.
    nearest = torch.round((v.double() - lo) / scale) * scale + lo
    assert (nearest - v.double()).abs().max() > 5 * tolerance


@pytest.mark.parametrize("bits", range(1, 17))
def test_each_quantized_draw_is_a_neighbouring_level(bits):
    v = torch.randn(500, generator=seeded(bits)) * 3 + 1
    levels, lo, scale = stochastic_quantize(v, bits, seeded(100 + bits))
    assert levels.dtype == torch.int64 and levels.shape == v.shape
    assert int(levels.min()) >= 0 and int(levels.max()) <= 2**bits - 1
    assert lo == float(v.min()) and scale == pytest.approx((float(v.max()) - lo) / (2**bits - 1))
    position = (v.double() - lo) / scale
    assert bool(((levels == position.floor()) | (levels == position.ceil())).all())
    assert (dequantize(levels, lo, scale) - v).abs().max() <= scale * (1 + 1e-6)
    # The extremes sit exactly on levels 0 and 2**bits - 1.
    assert int(levels[v.argmin()]) == 0 and int(levels[v.argmax()]) == 2**bits - 1


def test_stochastic_quantize_degenerate_inputs():
    levels, lo, scale = stochastic_quantize(torch.full((5,), 0.3), 4, seeded())
    assert scale == 0.0 and not levels.any() and torch.equal(dequantize(levels, lo, scale), torch.full((5,), 0.3))
    levels, lo, scale = stochastic_quantize(torch.zeros(0, 3), 4, seeded())
    assert levels.shape == (0, 3) and (lo, scale) == (0.0, 0.0)
    for bits in (0, 17):
        with pytest.raises(ValueError, match=str(bits)):
            stochastic_quantize(torch.ones(3), bits)


def test_quantized_encode_decodes_within_one_step():
    x = torch.randn(4, 33, generator=seeded(12))
    for bits in range(1, 17):
        blob = encode(x, Codec(bits=bits, lossless="zlib"), seeded(bits))
        header = Z.read_header(blob)
        assert header.scale == pytest.approx((float(x.max()) - float(x.min())) / (2**bits - 1))
        assert (decode(blob) - x).abs().max() <= header.scale * (1 + 1e-6)
    constant = torch.full((3, 3), 7.125)
    assert torch.equal(decode(encode(constant, Codec(bits=3))), constant)


# --- top-k -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.001, 0.1, 0.25, 0.7, 1.0])
def test_topk_keeps_the_largest_entries_in_place(ratio):
    x = torch.randn(10, 100, generator=seeded(20))
    n = x.numel()
    k = math.ceil(Fraction(str(ratio)) * n)
    idx, values = topk_sparsify(x, ratio)
    assert idx.dtype == torch.int64 and idx.numel() == k == Z.kept_count(n, ratio)
    assert bool((idx[1:] > idx[:-1]).all())
    flat = x.reshape(-1)
    assert torch.equal(values, flat[idx])
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[idx] = False
    if dropped.any():
        assert flat[idx].abs().min() >= flat[dropped].abs().max()
    expected = torch.where(dropped, torch.zeros_like(flat), flat).reshape(x.shape)
    for lossless in ("none", "zlib"):
        assert same_bits(decode(encode(x, Codec(topk=ratio, lossless=lossless))), expected)


def test_kept_count_is_ceil_of_ratio_times_numel_without_float_noise():
    assert 0.07 * 100 > 7 and 0.14 * 100 > 14  # float products that a bare ceil would round up to 8 and 15
    assert [Z.kept_count(100, 0.07), Z.kept_count(100, 0.14), Z.kept_count(589824, 0.1)] == [7, 14, 58983]
    assert [Z.kept_count(5, 0.01), Z.kept_count(1, 0.5), Z.kept_count(0, 0.5), Z.kept_count(9, 1.0)] == [1, 1, 0, 9]


def test_topk_ties_prefer_lower_indices_and_nan_counts_as_largest():
    x = torch.tensor([0.5, -1.0, 1.0, 0.25, -1.0, 1.0, math.nan, 0.0])
    idx, values = topk_sparsify(x, 0.5)  # nan, then three of the four tied 1.0s
    assert idx.tolist() == [1, 2, 4, 6]
    x = torch.tensor([2.0, -2.0, 2.0, 2.0])
    assert topk_sparsify(x, 0.5)[0].tolist() == [0, 1]


def test_torch_topk_path_matches_numpy_path():
    # Non-CPU tensors go through torch; exercise that code on CPU, with many ties, against the numpy path.
    x = torch.randint(-5, 6, (3000,), generator=seeded(21)).float()
    for k in (1, 17, 600, 2999):
        assert torch.equal(Z._topk_indices_torch(x, k), torch.from_numpy(Z._topk_indices_np(x.numpy(), k)))


def test_sparse_index_encodings_round_trip():
    # Few entries far apart: the gaps need multi-byte varints.
    x = torch.zeros(300_000)
    x[[3, 131_072, 299_999]] = torch.tensor([5.0, -6.0, 7.0])
    blob = encode(x, Codec(topk=1e-5))
    header = Z.read_header(blob)
    assert header.kept == 3 and header.index_mode == Z._INDEX_GAPS and header.index_len == 1 + 3 + 3
    assert torch.equal(decode(blob), x)
    # Half kept: a bitmap (numel / 8 bytes) beats one byte per kept entry.
    x = torch.randn(1001, generator=seeded(22))
    blob = encode(x, Codec(topk=0.5, lossless="lzma"))
    header = Z.read_header(blob)
    assert header.index_mode == Z._INDEX_BITMAP and header.index_len == 126
    idx, _ = topk_sparsify(x, 0.5)
    expected = torch.zeros(1001)
    expected[idx] = x[idx]
    assert torch.equal(decode(blob), expected)


@pytest.mark.parametrize("codec", [
    Codec(topk=0.1), Codec(topk=0.3, bits=4, lossless="zlib"), Codec(bits=2, lossless="lzma"),
    Codec(bits=3, scale="group", group=4, hadamard=8, outliers=0.01, lossless="zlib"),
    Codec(topk=0.5, bits=2, scale="token", rounding="nearest"),
])
def test_zero_size_and_scalar_tensors_with_lossy_codecs(codec):
    for x in (torch.zeros(0), torch.zeros(2, 0, 5), torch.tensor(-1.5)):
        y = decode(encode(x, codec, seeded()))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.equal(y, x)  # a single value is always kept and, alone, quantizes exactly


# --- sizes -------------------------------------------------------------------------------------------------------


def varint_bytes(gaps):
    bit_length = np.floor(np.log2(np.maximum(gaps, 1))).astype(np.int64) + 1
    return int(np.maximum(1, -(-bit_length // 7)).sum())


def test_activation_sized_tensor_compresses_by_more_than_90_percent():
    x = torch.randn(8, 128, 576, generator=seeded(30))
    raw_bytes = x.numel() * 4
    codec = Codec(topk=0.1, bits=4, lossless="zlib")
    size = compressed_size(x, codec, seeded(31))
    assert size == encode(x, codec, seeded(31)).numel()
    assert size <= 0.1 * raw_bytes

    # Before lossless coding the size follows the layout exactly: header + index varints + packed levels.
    kept = math.ceil(0.1 * x.numel())
    idx, _ = topk_sparsify(x, 0.1)
    index_bytes = varint_bytes(np.diff(idx.numpy(), prepend=-1) - 1)
    uncoded = compressed_size(x, Codec(topk=0.1, bits=4), seeded(31))
    assert uncoded == Z.HEADER_SIZE + index_bytes + math.ceil(kept * 4 / 8)
    # Random top-10% gaps average 9 and essentially never reach 128: about one index byte per kept value.
    assert kept <= index_bytes <= 1.01 * kept
    assert size < uncoded


@pytest.mark.parametrize("codec", [
    Codec(), Codec(lossless="lzma"), Codec(topk=0.2, bits=7), Codec(topk=0.05, lossless="zlib"),
])
def test_compressed_size_matches_encode(codec):
    x = torch.randn(5, 6, 7, generator=seeded(32))
    assert compressed_size(x, codec, seeded(33)) == encode(x, codec, seeded(33)).numel()


def test_identity_size_is_header_plus_raw_floats():
    x = torch.randn(3, 11, generator=seeded(34))
    assert compressed_size(x, Codec()) == Z.HEADER_SIZE + 4 * x.numel()


# --- bit packing -------------------------------------------------------------------------------------------------


def reference_pack(levels, bits):
    stream = "".join(format(int(v), f"0{bits}b") for v in levels)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_packing_round_trips_for_every_width(bits):
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    for n in (0, 1, 7, 1001):
        levels = rng.integers(0, top + 1, n)
        levels[: min(n, 2)] = [top, 0][: min(n, 2)]
        packed = Z.pack_bits(levels, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
        assert np.array_equal(Z.unpack_bits(packed, n, bits), levels)
        if n <= 7:
            assert packed.tobytes() == reference_pack(levels, bits)  # MSB-first, tightly packed


def test_unpack_rejects_wrong_length_and_dirty_padding():
    with pytest.raises(ValueError, match="bytes"):
        Z.unpack_bits(np.zeros(3, np.uint8), 5, 3)
    with pytest.raises(ValueError, match="padding"):
        Z.unpack_bits(np.array([0, 1], np.uint8), 5, 3)  # 15 bits used, the 16th set


# --- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"topk": 0}, ["compress.topk", "0", "(0, 1]"]),
    ({"topk": 1.5}, ["compress.topk", "1.5", "(0, 1]"]),
    ({"topk": math.nan}, ["compress.topk", "nan"]),
    ({"bits": 17}, ["compress.bits", "17", "0..16"]),
    ({"bits": -1}, ["compress.bits", "-1", "0..16"]),
    ({"bits": 4.0}, ["compress.bits", "4.0"]),
    ({"lossless": "gzip"}, ["compress.lossless", "'gzip'", "'zlib'", "'lzma'", "'none'"]),
])
def test_codec_validation_names_field_and_value(kwargs, words):
    with pytest.raises(ValueError) as err:
        Codec(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_codec_normalizes_topk_and_reports_identity():
    assert Codec(topk=1) == Codec() and Codec().is_identity
    assert Codec(topk=np.float32(0.5), bits=np.int64(4)) == Codec(topk=0.5, bits=4)
    assert not Codec(topk=0.5).is_identity and not Codec(bits=8).is_identity and not Codec(lossless="zlib").is_identity


# --- corrupt blobs -----------------------------------------------------------------------------------------------


def reforge(blob, body=None, **changes):
    """Rewrite header fields (and optionally the body) of a blob, then make length and checksum consistent again."""
    names = ["magic", "version", "lossless", "bits", "dtype", "ndim", "index_mode", "ratio",
             *[f"shape{i}" for i in range(8)], "numel", "kept", "lo", "scale", "index_len", "raw_len", "body_len"]
    data = blob.numpy().tobytes()
    fields = dict(zip(names, Z._PREFIX.unpack_from(data)))
    body = data[Z.HEADER_SIZE :] if body is None else body
    fields["body_len"] = len(body)
    fields.update(changes)
    prefix = Z._PREFIX.pack(*fields.values())
    return prefix + Z._CRC.pack(zlib.crc32(body, zlib.crc32(prefix))) + body


@pytest.fixture(scope="module")
def blob():
    return encode(torch.randn(4, 50, generator=seeded(40)), Codec(topk=0.3, bits=5, lossless="zlib"), seeded(41))


def test_reforge_without_changes_still_decodes(blob):
    assert torch.equal(decode(reforge(blob)), decode(blob))


def test_truncated_or_extended_blobs_are_rejected(blob):
    data = blob.numpy().tobytes()
    for cut in (0, 1, 4, Z.HEADER_SIZE - 1, Z.HEADER_SIZE, len(data) - 1):
        with pytest.raises(ValueError):
            decode(data[:cut])
    with pytest.raises(ValueError, match="length"):
        decode(data + b"\0")


def test_every_flipped_byte_is_rejected(blob):
    data = bytearray(blob.numpy().tobytes())
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):
            decode(torch.tensor(bad, dtype=torch.uint8))


@pytest.mark.parametrize("changes, match", [
    ({"magic": b"NOPE"}, "magic"),
    ({"version": 3}, "version"),
    ({"lossless": 7}, "out of range"),
    ({"bits": 17}, "out of range"),
    ({"ndim": 9}, "out of range"),
    ({"ratio": 0.0}, "ratio"),
    ({"ratio": 1.5}, "ratio"),
    ({"shape3": 2}, "unused shape"),
    ({"numel": 201}, "shape"),
    ({"kept": 59}, "kept"),
    ({"index_mode": 0}, "index encoding"),
    ({"index_len": 5}, "index section"),
    ({"raw_len": 1}, "body of"),
    ({"scale": math.inf}, "quantization"),
])
def test_inconsistent_headers_are_rejected_even_with_a_valid_checksum(blob, changes, match):
    with pytest.raises(ValueError, match=match):
        decode(reforge(blob, **changes))


def test_corrupt_bodies_with_valid_checksums_are_rejected(blob):
    with pytest.raises(ValueError, match="zlib"):
        decode(reforge(blob, body=b"\xff" * 40))
    header = Z.read_header(blob)
    short = zlib.compressobj(6, zlib.DEFLATED, -15)
    with pytest.raises(ValueError, match="zlib"):
        decode(reforge(blob, body=short.compress(b"\0" * (header.raw_len - 1)) + short.flush()))

    x = torch.arange(1.0, 101.0)
    plain = encode(x, Codec(topk=0.03))  # kept 3 of 100: gaps 97, 0, 0 as 3 varint bytes, then 3 float32
    assert Z.read_header(plain).index_mode == Z._INDEX_GAPS
    values = plain.numpy().tobytes()[Z.HEADER_SIZE + 3 :]
    moved = torch.zeros(100)
    moved[90:93] = torch.tensor([98.0, 99.0, 100.0])
    assert torch.equal(decode(reforge(plain, body=bytes([90, 0, 0]) + values)), moved)  # the forging itself works
    with pytest.raises(ValueError, match="past the end"):
        decode(reforge(plain, body=bytes([98, 0, 0]) + values))
    with pytest.raises(ValueError, match="varints"):
        decode(reforge(plain, body=bytes([0x80, 0, 0]) + values))


def test_decode_rejects_non_blob_inputs(blob):
    with pytest.raises(TypeError):
        decode(blob.float())
    with pytest.raises(ValueError):
        decode(blob.reshape(1, -1))
    with pytest.raises(TypeError):
        decode([1, 2, 3])


# --- version 2: outliers, rotation, per-token and per-group scales -------------------------------------------------


def massive(seed=50):
    """An activation-like [4, 128, 576] tensor: Gaussian, two LLM.int8-style outlier features (x20 in every
    token) and massive activations (x1000, three channels of each sequence's first token; Sun et al. 2024)."""
    x = torch.randn(4, 128, 576, generator=seeded(seed))
    x[:, :, [10, 200]] *= 20
    x[:, 0, [3, 77, 300]] *= 1000
    return x


def relative_error(codec, x, seed=51):
    return float((decode(encode(x, codec, seeded(seed))) - x).norm() / x.norm())


def test_new_stages_write_version_2_and_the_original_scheme_stays_version_1():
    x = torch.randn(3, 64, generator=seeded(52))
    for codec in (Codec(), Codec(topk=0.2, bits=4, rounding="nearest"), Codec(scale="group", lossless="zlib")):
        assert codec.version == 1 and Z.read_header(encode(x, codec, seeded())).version == 1
    for codec in (Codec(bits=4, scale="token"), Codec(hadamard=16), Codec(outliers=0.01),
                  Codec(topk=0.5, bits=5, scale="group", group=16, hadamard=32, outliers=0.02, rounding="nearest",
                        lossless="lzma")):
        header = Z.read_header(encode(x, codec, seeded()))
        assert codec.version == 2 and header.version == 2 and header.codec == codec  # the header records it all


@pytest.mark.parametrize("block", [2, 4, 64, 128])
def test_hadamard_rotation_is_orthonormal_and_its_own_inverse(block):
    from scipy.linalg import hadamard

    x = torch.randn(6, 128 + 5, generator=seeded(block), dtype=torch.float64).numpy()
    y = Z.hadamard_rotate(x, block)
    full = 133 // block * block
    blocks = x[:, :full].reshape(6, -1, block)
    np.testing.assert_allclose(y[:, :full].reshape(6, -1, block), blocks @ hadamard(block) / math.sqrt(block),
                               rtol=0, atol=1e-12)
    assert np.array_equal(y[:, full:], x[:, full:])  # a trailing run shorter than a block is left alone
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-13)
    np.testing.assert_allclose(Z.hadamard_rotate(y, block), x, rtol=0, atol=1e-12)


def test_unquantized_version_2_stages_round_trip_to_float_rounding():
    x = massive()[:2, :16]
    for codec in (Codec(hadamard=64, lossless="zlib"), Codec(outliers=0.05), Codec(hadamard=8, outliers=0.001)):
        y = decode(encode(x, codec))
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6 * float(x.abs().max()))


def test_outliers_are_sent_exactly_and_removed_before_scaling():
    x = massive()[:, :8]
    codec = Codec(bits=2, scale="group", hadamard=64, outliers=0.001)
    blob = encode(x, codec, seeded(53))
    header = Z.read_header(blob)
    assert header.outliers == math.ceil(0.001 * x.numel()) == 19  # 4 x 3 massive entries + the largest others
    idx, _ = topk_sparsify(x, 0.001)
    y = decode(blob)
    assert same_bits(y.reshape(-1)[idx], x.reshape(-1)[idx])
    assert {3, 77, 300} <= set((idx % 576).tolist())
    # with the massive entries out of the way, 2 bits per value leave the rest within a few units
    others = torch.ones(x.numel(), dtype=torch.bool)
    others[idx] = False
    assert float((y - x).reshape(-1)[others].abs().max()) < 0.25 * float(x.reshape(-1)[others].abs().max())


@pytest.mark.parametrize("codec", [
    Codec(bits=16, scale="group"), Codec(bits=16, scale="token", hadamard=64), Codec(bits=16, hadamard=32),
    Codec(bits=16, scale="group", group=32, hadamard=64, outliers=0.001, rounding="nearest", lossless="zlib"),
])
def test_sixteen_bits_are_close(codec):
    x = torch.randn(2, 16, 576, generator=seeded(63))
    assert relative_error(codec, x) < 1e-4


def test_each_group_draw_is_a_neighbouring_level_of_its_own_range():
    x = torch.randn(5, 100, generator=seeded(54)) * torch.logspace(-3, 3, 100)  # channels of very unequal size
    bits, group = 3, 16
    y = decode(encode(x, Codec(bits=bits, scale="group", group=group), seeded(55)))
    padded = torch.nn.functional.pad(x.abs(), (0, 12)).reshape(5, -1, group)  # 100 channels = 6 groups + 4
    absmax = padded.amax(-1).repeat_interleave(group, -1)[:, :100]
    step = 2 * absmax / (2**bits - 1)
    assert bool(((y - x).abs() <= step * (1 + 2**-10) + 1e-30).all())  # float16 ratios round up by < 2^-11
    # every group sets its own range: the small channels keep their precision next to the large ones
    assert float(((y - x).abs() / x.abs().clamp_min(1e-30))[:, :16].median()) < 1.0


def test_group_quantization_is_unbiased_and_nearest_is_not():
    draws, bits = 4000, 2
    v = torch.randn(64, generator=seeded(56)).double().numpy()
    groups = Z.group_ids(np.arange(64), 64, 16)
    ratios, base = Z.group_scales(v, groups, 4)
    ranges = Z._ranges(ratios, base, groups)
    tiled = np.tile(v, draws)
    levels = Z.quantize_groups(tiled, np.tile(ranges, draws), bits, "stochastic", seeded(57))
    mean = Z.dequantize_groups(levels, np.tile(ranges, draws), bits).reshape(draws, 64).mean(0)
    step = 2 * ranges / (2**bits - 1)
    tolerance = 4 * step / (2 * math.sqrt(draws))  # as in test_stochastic_quantize_is_unbiased
    assert bool((np.abs(mean - v) < tolerance).all())
    nearest = Z.dequantize_groups(Z.quantize_groups(v, ranges, bits, "nearest"), ranges, bits)
    assert np.abs(nearest - v).max() > 5 * tolerance.max()
    assert bool((np.abs(nearest - v) <= step / 2 + 1e-12).all())


def test_the_whole_version_2_pipeline_is_unbiased():
    """Outliers, rotation and stochastic group rounding together: E[decode(encode(x))] == x."""
    draws = 300
    x = torch.randn(2, 32, generator=seeded(58))
    x[0, 5] = 40.0
    codec = Codec(bits=2, scale="group", group=8, hadamard=16, outliers=0.02)
    g = seeded(59)
    mean = sum(decode(encode(x, codec, g)).double() for _ in range(draws)) / draws
    # the rotated residual's largest group range bounds every level step; an inverse rotation is orthonormal, so
    # a decoded entry's variance is at most step^2 / 4 as for one level
    residual = x.clone().reshape(-1)
    residual[topk_sparsify(x, 0.02)[0]] = 0
    rotated = torch.from_numpy(Z.hadamard_rotate(residual.reshape(2, 32).double().numpy(), 16))
    step = 2 * float(rotated.abs().max()) / 3
    assert float((mean - x.double()).abs().max()) < 4.5 * step / (2 * math.sqrt(draws))


def test_per_group_scales_and_rotation_tame_massive_activations():
    """The failure of the original scheme on LM hidden states, and what fixes it (int4, one draw each)."""
    x = massive()
    old = relative_error(Codec(bits=4), x)
    group = relative_error(Codec(bits=4, scale="group", group=64), x)
    rotated = relative_error(Codec(bits=4, scale="group", group=64, hadamard=64), x)
    recipe = relative_error(Codec(bits=4, scale="group", group=64, hadamard=64, outliers=0.001), x)
    assert old > 5  # one range of +-3000 over N(0, 1) values: the noise is larger than the signal
    assert group < old / 10 and rotated < old / 100 and recipe < rotated < 0.1


def test_version_2_sizes_follow_the_layout():
    x = massive()[:, :16]
    numel, width = x.numel(), 576
    tokens = numel // width
    for codec in (Codec(bits=4, scale="group", group=64), Codec(bits=3, scale="token", hadamard=64),
                  Codec(bits=5, scale="group", group=100, outliers=0.002)):
        blob = encode(x, codec, seeded(60))
        assert compressed_size(x, codec, seeded(60)) == blob.numel()
        scales = tokens * (math.ceil(width / codec.group) if codec.scale == "group" else 1)
        outliers = Z.outlier_count(numel, codec.outliers)
        outlier_index = 0
        if outliers:
            idx, _ = topk_sparsify(x, codec.outliers)
            outlier_index = varint_bytes(np.diff(idx.numpy(), prepend=-1) - 1)
        assert blob.numel() == (Z.HEADER_SIZE_V2 + outlier_index + 4 * outliers + 2 * scales
                                + math.ceil(numel * codec.bits / 8))
    # sparse: scales are stored for every group, the index as in version 1
    codec = Codec(topk=0.1, bits=4, scale="group")
    header = Z.read_header(encode(x, codec, seeded(61)))
    assert header.num_scales == tokens * 9 and header.kept == math.ceil(0.1 * numel)
    assert header.raw_len == header.index_len + 2 * tokens * 9 + math.ceil(header.kept * 4 / 8)
    for codec in (codec, Codec(bits=3, scale="group", hadamard=64, outliers=0.001, lossless="zlib")):
        assert compressed_size(x, codec, seeded(62)) == encode(x, codec, seeded(62)).numel()


def test_error_feedback_carries_what_compression_dropped_into_the_next_tensor():
    codec = Codec(topk=0.1, bits=2, scale="group", group=8)
    inputs = [torch.randn(4, 32, generator=seeded(70 + t)) for t in range(6)]
    ef = ErrorFeedback()
    decoded, targets = [], []
    for t, x in enumerate(inputs):
        target = x + ef.residuals["grad"] if t else x
        blob = ef.encode("grad", x, codec, seeded(80 + t))
        assert torch.equal(blob, encode(target, codec, seeded(80 + t)))  # it encodes input + last residual
        decoded.append(decode(blob))
        targets.append(target)
        torch.testing.assert_close(ef.residuals["grad"], target - decoded[-1])
    # telescoping: what arrived in total is what was sent in total, less the one residual still held back
    torch.testing.assert_close(sum(decoded), sum(inputs) - ef.residuals["grad"], rtol=0, atol=1e-5)
    plain = sum(decode(encode(x, codec, seeded(80 + t))) for t, x in enumerate(inputs))
    assert float((sum(decoded) - sum(inputs)).norm()) < float((plain - sum(inputs)).norm())
    # streams are independent, and a tensor of another shape restarts its stream
    ef.encode("other", torch.ones(3), codec, seeded())
    assert ef.residuals["other"].shape == (3,) and ef.residuals["grad"].shape == (4, 32)
    blob = ef.encode("grad", torch.ones(2, 2), Codec(bits=8), seeded(90))
    assert torch.equal(blob, encode(torch.ones(2, 2), Codec(bits=8), seeded(90)))


def test_link_codecs_give_each_direction_its_settings():
    from ringada.config import CompressConfig

    c = link_codecs(CompressConfig(bits=4, rounding="nearest", hadamard=64, outliers=0.001, lossless="zlib"))
    assert c.activation == Codec(bits=4, scale="group", group=64, hadamard=64, outliers=0.001, rounding="nearest",
                                 lossless="zlib")
    assert c.gradient == Codec(bits=4, scale="group", group=64, hadamard=64, outliers=0.001, rounding="stochastic",
                               lossless="zlib")  # grad_bits null: as bits; gradients always round stochastically
    c = link_codecs(CompressConfig(bits=8, grad_bits=0, scale="token", hadamard=64, error_feedback=False), topk=0.5)
    assert c.gradient == Codec(topk=0.5) and c.activation.bits == 8 and c.activation.scale == "token"
    assert link_codecs(CompressConfig()).is_identity and not link_codecs(CompressConfig()).is_lossy
    assert link_codecs(CompressConfig(topk=0.2), topk=1 - 1e-12).is_identity  # an allocation's "keep all"
    assert link_codecs(CompressConfig(grad_bits=4, error_feedback=True)).error_feedback


def test_a_smashed_codec_packs_each_direction_and_leaves_what_it_cannot_quantize():
    codecs = LinkCodecs(activation=Codec(bits=8, scale="token"), gradient=Codec(bits=2, scale="group", group=4),
                        error_feedback=True)
    end = SmashedCodec(codecs, seed=7)
    x = torch.randn(2, 3, 8, generator=seeded(95))
    act = end.pack(x, gradient=False, salt=(0, 1, 1, 5))
    assert Z.read_header(act).codec == codecs.activation
    g = torch.Generator().manual_seed(hash((7, 0, 1, 1, 5)) % 2**63)
    assert torch.equal(act, encode(x, codecs.activation, g))  # seeded by (seed, *salt): reproducible anywhere
    grad = end.pack(x, gradient=True, salt=(0, 1, 2, 5), stream="gradient")
    assert Z.read_header(grad).codec == codecs.gradient and "gradient" in end.feedback.residuals
    end.pack(x, gradient=True, salt=(0, 1, 2, -1))  # no stream (an evaluation): no error feedback
    assert list(end.feedback.residuals) == ["gradient"]
    nan = torch.tensor([1.0, math.nan])
    assert end.pack(nan, gradient=False, salt=(0,)) is nan
    assert SmashedCodec(LinkCodecs(), seed=0).pack(x, gradient=True, salt=(0,)) is x  # identity codecs
    back = SmashedCodec.unpack(act, torch.device("cpu"), torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert SmashedCodec.unpack(x, torch.device("cpu"), torch.bfloat16) is x  # sent as it was


@pytest.mark.parametrize("kwargs, words", [
    ({"scale": "channel"}, ["compress.scale", "'channel'", "'token'", "'group'"]),
    ({"group": 0}, ["compress.group", "0", ">= 1"]),
    ({"hadamard": 48}, ["compress.hadamard", "48", "power of two"]),
    ({"hadamard": 1}, ["compress.hadamard", "1", "power of two"]),
    ({"outliers": 0.6}, ["compress.outliers", "0.6", "[0, 0.5]"]),
    ({"outliers": -0.01}, ["compress.outliers", "-0.01"]),
    ({"rounding": "up"}, ["compress.rounding", "'up'", "'nearest'"]),
])
def test_codec_validation_of_the_new_stages(kwargs, words):
    with pytest.raises(ValueError) as err:
        Codec(**kwargs)
    for word in words:
        assert word in str(err.value)


V2_FIELDS = ["magic", "version", "lossless", "bits", "dtype", "ndim", "index_mode", "scale_mode", "rounding",
             "hadamard", "group", "ratio", "fraction", *[f"shape{i}" for i in range(8)], "numel", "kept", "outliers",
             "lo", "scale", "outlier_index_len", "index_len", "raw_len", "body_len"]


def reforge_v2(blob, body=None, **changes):
    data = blob.numpy().tobytes()
    fields = dict(zip(V2_FIELDS, Z._PREFIX_V2.unpack_from(data)))
    body = data[Z.HEADER_SIZE_V2 :] if body is None else body
    fields["body_len"] = len(body)
    fields.update(changes)
    prefix = Z._PREFIX_V2.pack(*fields.values())
    return prefix + Z._CRC.pack(zlib.crc32(body, zlib.crc32(prefix))) + body


@pytest.fixture(scope="module")
def blob_v2():
    x = torch.randn(4, 64, generator=seeded(91))
    return encode(x, Codec(topk=0.5, bits=3, scale="group", group=16, hadamard=8, outliers=0.02), seeded(92))


def test_version_2_blobs_reject_every_flipped_byte_and_truncation(blob_v2):
    assert torch.equal(decode(reforge_v2(blob_v2)), decode(blob_v2))
    data = blob_v2.numpy().tobytes()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):
            decode(bytes(bad))
    for cut in (6, Z.HEADER_SIZE, Z.HEADER_SIZE_V2 - 1, len(data) - 1):
        with pytest.raises(ValueError):
            decode(data[:cut])


@pytest.mark.parametrize("changes, match", [
    ({"scale_mode": 3}, "out of range"),
    ({"rounding": 2}, "out of range"),
    ({"hadamard": 12}, "compress.hadamard"),
    ({"group": 0}, "compress.group"),
    ({"fraction": 0.9}, "compress.outliers"),
    ({"outliers": 5}, "outliers"),
    ({"outlier_index_len": 100}, "outlier index"),
    ({"raw_len": 3}, "body of"),
    ({"lo": 1.0}, "quantization"),
    ({"kept": 3}, "kept"),
])
def test_inconsistent_version_2_headers_are_rejected(blob_v2, changes, match):
    with pytest.raises(ValueError, match=match):
        decode(reforge_v2(blob_v2, **changes))


def test_version_2_scales_outside_their_range_are_rejected():
    blob = encode(torch.randn(2, 16, generator=seeded(93)), Codec(bits=4, scale="token"), seeded(94))
    body = bytearray(blob.numpy().tobytes()[Z.HEADER_SIZE_V2 :])
    body[:2] = np.float16(2.0).tobytes()  # no outliers or index: the scales lead the body
    with pytest.raises(ValueError, match="ratio"):
        decode(reforge_v2(blob, body=bytes(body)))
