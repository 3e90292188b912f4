"""Compression of smashed data (cut-layer activations and their gradients) for the split-learning wire.

The pipeline follows the SFT recipe: top-k sparsification, then unbiased stochastic quantization of the kept
values, then an optional general-purpose lossless coder. :func:`encode` turns a tensor into one 1-D ``uint8``
tensor (exactly the bytes that travel; the runtime ships it as a plain tensor, so nothing is ever unpickled on
the receiving side) and :func:`decode` turns it back into a ``float32`` tensor of the original shape.

Bias: only the quantizer is unbiased (``E[decode] == values`` for the kept entries). Top-k is the usual biased
operator: dropped entries decode as zeros. Anything wanting an unbiased estimate of the full tensor has to add
error feedback on top; this module deliberately does not keep state between calls.

Blob layout (all integers little-endian), ``HEADER_SIZE`` = 144 bytes of header, then the body::

    offset size  field
         0    4  magic  b"RACZ"
         4    2  version (1)
         6    1  lossless coder: 0 none, 1 zlib (raw DEFLATE, level 6), 2 lzma (raw LZMA2, preset 6)
         7    1  bits per kept value: 0 = float32 values, 1..16 = quantization levels
         8    1  source dtype: 1 float32, 2 float16, 3 bfloat16, 4 float64 (decode always yields float32)
         9    1  ndim (0..8)
        10    1  index encoding: 0 none (everything kept), 1 LEB128 gaps, 2 bitmap
        11    1  reserved, 0
        12    8  topk ratio, float64
        20   64  shape, 8 x uint64 (unused dims 0)
        84    8  numel, uint64
        92    8  kept, uint64
       100    8  lo, float64     (quantization offset; 0 when bits == 0)
       108    8  scale, float64  (quantization step; 0 when bits == 0 or all kept values are equal)
       116    8  index_len, uint64: bytes of the index section before lossless coding
       124    8  raw_len, uint64:   bytes of the whole body before lossless coding
       132    8  body_len, uint64:  bytes of the body as stored (after lossless coding)
       140    4  CRC-32 of bytes [0, 140) followed by the stored body

    body (before lossless coding) = index section (index_len bytes) + value section

Index section. The kept flat indices are sorted ascending and stored as gaps ``idx[0]`` then
``idx[i] - idx[i-1] - 1``, each as an unsigned LEB128 varint (7 bits per byte, high bit = more bytes follow).
Gaps of a top-10% selection are almost all < 128, so this costs about one byte per kept value, like a uint8
delta stream, but a single long run of dropped entries only costs a few extra bytes instead of widening every
entry to uint16/uint32. When a bitmap of ``ceil(numel / 8)`` bytes (bit i, MSB first, set when entry i is kept)
is smaller, which happens above roughly one kept entry in eight, the bitmap is stored instead. Nothing is stored
when every entry is kept.

Value section. ``bits == 0``: ``kept`` float32 values. Otherwise the levels as one MSB-first bit stream of exactly
``bits`` bits per value, zero-padded to a whole byte, i.e. ``ceil(kept * bits / 8)`` bytes; a value decodes as
``lo + level * scale``.

The lossless coders use raw streams (no zlib/xz container) because the header already records the lengths and
the CRC covers integrity; that saves 6 (zlib) to ~60 (xz) bytes per message.
"""

from __future__ import annotations

import lzma
import math
import numbers
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"RACZ"
VERSION = 1
LOSSLESS = ("none", "zlib", "lzma")
MAX_BITS = 16
MAX_NDIM = 8

_PREFIX = struct.Struct("<4sHBBBBBxd8QQQddQQQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _PREFIX.size + _CRC.size

_INDEX_NONE, _INDEX_GAPS, _INDEX_BITMAP = 0, 1, 2
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
# Nine 7-bit groups hold any non-negative int64; longer varints can only come from corruption.
_MAX_VARINT_BYTES = 9


@dataclass(frozen=True)
class Codec:
    """How smashed data is compressed: keep ratio, bits per kept value, lossless coder."""

    topk: float = 1.0
    bits: int = 0
    lossless: str = "none"

    def __post_init__(self):
        topk = self.topk
        if isinstance(topk, bool) or not isinstance(topk, numbers.Real) or not (0.0 < topk <= 1.0):
            raise ValueError(
                f"compress.topk must be a number in (0, 1] (fraction of entries kept; 1.0 disables "
                f"sparsification, e.g. 0.1 keeps the largest 10%), got {topk!r}"
            )
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not (0 <= bits <= MAX_BITS):
            raise ValueError(
                f"compress.bits must be an integer in 0..{MAX_BITS} (0 sends float32 values, 1..{MAX_BITS} "
                f"quantizes each kept value to that many bits), got {bits!r}"
            )
        if self.lossless not in LOSSLESS:
            choices = ", ".join(map(repr, LOSSLESS))
            raise ValueError(f"compress.lossless must be one of {choices}, got {self.lossless!r}")
        # Normalized so equal settings compare and hash equal whether written as 1, 1.0 or a numpy scalar.
        object.__setattr__(self, "topk", float(topk))
        object.__setattr__(self, "bits", int(bits))

    @property
    def is_identity(self) -> bool:
        """True when encoding changes nothing but the framing (no sparsification, quantization or coding)."""
        return self.topk == 1.0 and self.bits == 0 and self.lossless == "none"


@dataclass(frozen=True)
class BlobHeader:
    """The validated header of an encoded blob."""

    codec: Codec
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    kept: int
    lo: float
    scale: float
    index_mode: int
    index_len: int
    raw_len: int
    body_len: int


def kept_count(numel: int, ratio: float) -> int:
    """Entries top-k keeps: ``ceil(ratio * numel)``, at least one of a non-empty tensor, at most all.

    A 1e-6 slack absorbs float noise so that e.g. ``0.07 * 100 == 7.000000000000001`` keeps 7, not 8.
    """
    if numel == 0:
        return 0
    if ratio >= 1.0:
        return numel
    return min(numel, max(1, math.ceil(ratio * numel - 1e-6)))


def topk_sparsify(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``kept_count(x.numel(), ratio)`` entries of largest magnitude.

    Returns ``(indices, values)``: flat int64 indices into ``x.reshape(-1)`` sorted ascending, and the entries at
    those positions. Among entries tied at the threshold magnitude the lowest indices win, so the selection is
    a pure function of ``x`` (``torch.topk`` alone makes no promise about ties). NaN counts as the largest
    magnitude, so non-finite values are never silently dropped in favour of finite ones.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
    flat = x.detach().reshape(-1)
    n = flat.numel()
    k = kept_count(n, ratio)
    if k == n:
        return torch.arange(n, device=flat.device), flat.clone()
    if flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES:
        arr = flat.numpy()
        idx = _topk_indices_np(arr, k)
        return torch.from_numpy(idx), torch.from_numpy(arr[idx])
    idx = _topk_indices_torch(flat, k)
    return idx, flat[idx]


# On CPU the work is done in numpy: single-threaded, so it neither fights the training step for cores nor
# suffers from torch's intra-op thread pool on small, shared machines (np.partition is also O(n), topk is not).
def _topk_indices_np(flat: np.ndarray, k: int) -> np.ndarray:
    key = np.abs(flat)
    if key.dtype.kind == "f":
        key[np.isnan(key)] = np.inf
    threshold = np.partition(key, key.size - k)[key.size - k]
    keep = key > threshold
    need = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(key == threshold)[:need]] = True
    return np.flatnonzero(keep)


def _topk_indices_torch(flat: torch.Tensor, k: int) -> torch.Tensor:
    key = flat.abs()
    if key.is_floating_point():
        key = torch.where(torch.isnan(key), torch.full_like(key, math.inf), key)
    threshold = torch.topk(key, k, sorted=False).values.min()
    keep = key > threshold
    need = k - int(keep.sum())
    keep[torch.nonzero(key == threshold).squeeze(1)[:need]] = True
    return torch.nonzero(keep).squeeze(1)


def stochastic_quantize(
    values: torch.Tensor, bits: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float, float]:
    """Unbiased stochastic quantization of ``values`` to ``bits``-bit levels.

    Returns ``(levels, lo, scale)`` with int64 ``levels`` in ``[0, 2**bits - 1]`` (same shape as ``values``),
    ``lo = min(values)`` and ``scale = (max - min) / (2**bits - 1)``. Each value rounds up with probability equal
    to its fractional position between the two neighbouring levels, so ``E[dequantize(levels, lo, scale)] ==
    values`` and every draw is within one ``scale`` of the value. If all values are equal, ``scale`` is 0 and
    decoding gives them back exactly. ``generator`` (on ``values``' device) supplies the uniform draws.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= MAX_BITS):
        raise ValueError(f"quantization bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if values.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.int64, device=values.device), 0.0, 0.0
    # float64 keeps (v - lo) / scale exact enough that 16-bit levels stay unbiased. On CPU numpy does the
    # arithmetic for the same reason as in topk_sparsify; copy=True because it then works in place.
    on_cpu = values.device.type == "cpu" and values.dtype in _NUMPY_DTYPES
    if on_cpu:
        arr = values.detach().numpy().astype(np.float64)
        v = torch.from_numpy(arr)
    else:
        v, arr = values.detach().to(torch.float64, copy=True), None
    finite = bool(np.isfinite(arr).all()) if on_cpu else bool(torch.isfinite(v).all())
    if not finite:
        raise ValueError("cannot quantize non-finite values (inf/nan); use compress.bits=0 to send them as float32")
    lo, hi = (float(arr.min()), float(arr.max())) if on_cpu else (float(v.min()), float(v.max()))
    if hi == lo:
        return torch.zeros(v.shape, dtype=torch.int64, device=v.device), lo, 0.0
    top = (1 << bits) - 1
    scale = (hi - lo) / top
    u = torch.rand(v.shape, generator=generator, dtype=torch.float64, device=v.device)
    # Clamping only matters when rounding pushes (v - lo) / scale a hair outside [0, top].
    if on_cpu:
        arr -= lo
        arr /= scale
        arr += u.numpy()
        np.floor(arr, out=arr)
        return torch.from_numpy(np.clip(arr, 0, top, out=arr).astype(np.int64)), lo, scale
    return torch.floor((v - lo) / scale + u).clamp_(0, top).to(torch.int64), lo, scale


def dequantize(levels: torch.Tensor, lo: float, scale: float) -> torch.Tensor:
    """Map quantization levels back to values: ``lo + levels * scale`` as float32."""
    return (levels.to(torch.float64) * scale + lo).to(torch.float32)


def pack_bits(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits into an MSB-first bit stream, ``ceil(n * bits / 8)`` uint8 bytes."""
    levels = np.asarray(levels).reshape(-1)
    if bits == 8:
        return levels.astype(np.uint8)
    if bits == 16:
        # A big-endian uint16 array is exactly the MSB-first 16-bit stream.
        return levels.astype(">u2").view(np.uint8)
    n = levels.size
    if 8 % bits == 0:
        # 1, 2 and 4 bits: shift-and-or whole columns, several times faster than going through unpackbits.
        per = 8 // bits
        padded = np.zeros(-(-n // per) * per, dtype=np.uint8)
        padded[:n] = levels
        cols = padded.reshape(-1, per)
        out = np.zeros(cols.shape[0], dtype=np.uint8)
        for j in range(per):
            out |= cols[:, j] << np.uint8(8 - bits * (j + 1))
        return out
    width = 8 if bits < 8 else 16
    as_bytes = levels.astype(np.uint8) if width == 8 else levels.astype(">u2").view(np.uint8)
    bit_matrix = np.unpackbits(as_bytes.reshape(n, width // 8), axis=1)[:, width - bits :]
    return np.packbits(bit_matrix.reshape(-1))


def unpack_bits(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int64 values; raises ValueError on a wrong length or dirty padding."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    expected = -(-count * bits // 8)
    if data.size != expected:
        raise ValueError(f"packed values: expected {expected} bytes for {count} x {bits} bits, got {data.size}")
    if bits == 8:
        return data.astype(np.int64)
    if bits == 16:
        return data.view(">u2").astype(np.int64)
    stream = np.unpackbits(data)
    if stream[count * bits :].any():
        raise ValueError("packed values: non-zero padding bits")
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        cols = np.empty((data.size, per), dtype=np.uint8)
        for j in range(per):
            cols[:, j] = (data >> np.uint8(8 - bits * (j + 1))) & mask
        return cols.reshape(-1)[:count].astype(np.int64)
    width = 8 if bits < 8 else 16
    matrix = np.zeros((count, width), dtype=np.uint8)
    matrix[:, width - bits :] = stream[: count * bits].reshape(count, bits)
    packed = np.packbits(matrix, axis=1)
    return (packed[:, 0] if width == 8 else packed.view(">u2")[:, 0]).astype(np.int64)


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of a non-negative int64 array, vectorized over byte positions (at most 9 passes)."""
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    nbytes = np.ones(n, dtype=np.int64)
    for shift in range(7, 63, 7):
        more = values >= (1 << shift)
        if not more.any():
            break
        nbytes += more
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        chunk = (values[sel] >> (7 * j)) & 0x7F
        chunk |= (nbytes[sel] - 1 > j).astype(np.int64) << 7
        out[starts[sel] + j] = chunk
    return out


def _varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`_varint_encode`; requires exactly ``count`` complete varints."""
    if count == 0:
        if data.size:
            raise ValueError("index section: bytes present but nothing kept")
        return np.zeros(0, dtype=np.int64)
    last = data < 0x80
    ends = np.flatnonzero(last)
    if ends.size != count or not last[-1]:
        raise ValueError(f"index section: expected {count} varints, found {ends.size} (or a truncated one)")
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise ValueError("index section: varint longer than 9 bytes")
    starts = ends - lengths + 1
    position = np.arange(data.size) - np.repeat(starts, lengths)
    groups = (data & 0x7F).astype(np.int64) << (7 * position)
    return np.add.reduceat(groups, starts)


def _compress(raw: bytes, lossless: str) -> bytes:
    if lossless == "zlib":
        coder = zlib.compressobj(6, zlib.DEFLATED, -15)
        return coder.compress(raw) + coder.flush()
    if lossless == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return raw


def _decompress(body: np.ndarray, lossless: str, raw_len: int) -> np.ndarray:
    if lossless == "none":
        return body
    # max_length bounds memory: a corrupt stream cannot inflate past what the header promised (+1 to notice).
    try:
        if lossless == "zlib":
            coder = zlib.decompressobj(-15)
            raw = coder.decompress(body, raw_len + 1)
            complete = coder.eof and not coder.unconsumed_tail and not coder.unused_data
        else:
            coder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            raw = coder.decompress(body, raw_len + 1)
            complete = coder.eof and not coder.unused_data
    except (zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"corrupt {lossless} body: {e}") from e
    if not complete or len(raw) != raw_len:
        raise ValueError(f"corrupt {lossless} body: inflates to {len(raw)} bytes, header says {raw_len}")
    return np.frombuffer(raw, dtype=np.uint8)


def _as_array(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"an encoded blob is a uint8 tensor, got dtype {data.dtype}")
        if data.dim() != 1:
            raise ValueError(f"an encoded blob is a 1-D tensor, got shape {tuple(data.shape)}")
        return data.detach().cpu().contiguous().numpy()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    raise TypeError(f"an encoded blob is a uint8 tensor or bytes, got {type(data).__name__}")


def _values_len(kept: int, bits: int) -> int:
    return kept * 4 if bits == 0 else -(-kept * bits // 8)


def _parse_header(buf: np.ndarray) -> BlobHeader:
    if buf.size < HEADER_SIZE:
        raise ValueError(f"blob truncated: {buf.size} bytes, the header alone is {HEADER_SIZE}")
    (magic, version, lossless, bits, dtype_code, ndim, index_mode, ratio, *rest) = _PREFIX.unpack_from(buf)
    shape8, (numel, kept, lo, scale, index_len, raw_len, body_len) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    if magic != MAGIC:
        raise ValueError(f"not a compressed blob: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"unsupported blob version {version}, this build reads version {VERSION}")
    if buf.size - HEADER_SIZE != body_len:
        raise ValueError(f"blob length {buf.size} does not match header ({HEADER_SIZE} + {body_len} body bytes)")
    (crc,) = _CRC.unpack_from(buf, _PREFIX.size)
    if zlib.crc32(buf[HEADER_SIZE:], zlib.crc32(buf[: _PREFIX.size])) != crc:
        raise ValueError("blob checksum mismatch (corrupted in transit)")
    # From here on the bytes are what the sender wrote; these checks catch writers that disagree with us.
    if lossless >= len(LOSSLESS) or bits > MAX_BITS or dtype_code not in _CODE_DTYPES or ndim > MAX_NDIM:
        raise ValueError(f"blob header out of range: lossless={lossless} bits={bits} dtype={dtype_code} ndim={ndim}")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"blob header: topk ratio {ratio} not in (0, 1]")
    if any(shape8[ndim:]):
        raise ValueError("blob header: non-zero unused shape entries")
    shape = tuple(shape8[:ndim])
    if math.prod(shape) != numel:
        raise ValueError(f"blob header: shape {shape} does not hold {numel} elements")
    if kept != kept_count(numel, ratio):
        raise ValueError(f"blob header: {kept} kept, but topk {ratio} of {numel} keeps {kept_count(numel, ratio)}")
    expected_index = {
        _INDEX_NONE: (0, 0),
        _INDEX_GAPS: (kept, _MAX_VARINT_BYTES * kept),
        _INDEX_BITMAP: ((numel + 7) // 8,) * 2,
    }.get(index_mode)
    if expected_index is None or (index_mode == _INDEX_NONE) != (kept == numel):
        raise ValueError(f"blob header: index encoding {index_mode} with {kept} of {numel} kept")
    if not expected_index[0] <= index_len <= expected_index[1]:
        raise ValueError(f"blob header: index section of {index_len} bytes for {kept} of {numel} kept")
    if raw_len != index_len + _values_len(kept, bits):
        raise ValueError(f"blob header: body of {raw_len} bytes, expected {index_len + _values_len(kept, bits)}")
    if lossless == 0 and body_len != raw_len:
        raise ValueError("blob header: uncoded body length differs from its raw length")
    if not (math.isfinite(lo) and math.isfinite(scale) and scale >= 0.0) or (bits == 0 and (lo or scale)):
        raise ValueError(f"blob header: bad quantization parameters lo={lo} scale={scale}")
    return BlobHeader(
        codec=Codec(topk=ratio, bits=bits, lossless=LOSSLESS[lossless]),
        dtype=_CODE_DTYPES[dtype_code],
        shape=shape,
        numel=numel,
        kept=kept,
        lo=lo,
        scale=scale,
        index_mode=index_mode,
        index_len=index_len,
        raw_len=raw_len,
        body_len=body_len,
    )


def read_header(data: torch.Tensor | bytes) -> BlobHeader:
    """Validate a blob's header (and checksum) and return it, e.g. to learn the sender's dtype or the sizes."""
    return _parse_header(_as_array(data))


def encode(x: torch.Tensor, codec: Codec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Compress ``x`` with ``codec`` into a self-describing 1-D uint8 tensor (see the module docstring for layout).

    ``x`` is read as float32 (so a float64 tensor round-trips only to float32 precision). ``generator``, a CPU
    generator, drives the stochastic rounding when ``codec.bits > 0``; without one the global RNG is used.
    """
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec, got {type(codec).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPE_CODES:
        raise TypeError(f"can only encode float16/bfloat16/float32/float64 tensors, got {getattr(x, 'dtype', type(x))}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"can only encode tensors of at most {MAX_NDIM} dims, got shape {tuple(x.shape)}")
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    numel = flat.numel()
    kept = kept_count(numel, codec.topk)

    index = np.zeros(0, dtype=np.uint8)
    index_mode = _INDEX_NONE
    values = flat
    if kept < numel:
        idx, values = topk_sparsify(flat, codec.topk)
        idx = idx.numpy()
        index = _varint_encode(np.diff(idx, prepend=-1) - 1)
        index_mode = _INDEX_GAPS
        if (numel + 7) // 8 < index.size:
            mask = np.zeros(numel, dtype=bool)
            mask[idx] = True
            index, index_mode = np.packbits(mask), _INDEX_BITMAP

    lo = scale = 0.0
    if codec.bits == 0:
        packed = values.contiguous().numpy().astype("<f4", copy=False).view(np.uint8)
    else:
        levels, lo, scale = stochastic_quantize(values, codec.bits, generator)
        packed = pack_bits(levels.numpy(), codec.bits)

    raw = index.tobytes() + packed.tobytes()
    body = _compress(raw, codec.lossless)
    shape8 = list(x.shape) + [0] * (MAX_NDIM - x.dim())
    prefix = _PREFIX.pack(
        MAGIC, VERSION, LOSSLESS.index(codec.lossless), codec.bits, _DTYPE_CODES[x.dtype], x.dim(), index_mode,
        codec.topk, *shape8, numel, kept, lo, scale, index.size, len(raw), len(body),
    )  # fmt: skip
    crc = zlib.crc32(body, zlib.crc32(prefix))
    out = np.empty(HEADER_SIZE + len(body), dtype=np.uint8)
    out[: _PREFIX.size] = np.frombuffer(prefix, dtype=np.uint8)
    out[_PREFIX.size : HEADER_SIZE] = np.frombuffer(_CRC.pack(crc), dtype=np.uint8)
    out[HEADER_SIZE:] = np.frombuffer(body, dtype=np.uint8)
    return torch.from_numpy(out)


def decode(data: torch.Tensor | bytes) -> torch.Tensor:
    """Rebuild the float32 tensor from :func:`encode`'s blob; dropped entries are zeros.

    Raises ValueError when the blob is truncated, corrupted or internally inconsistent.
    """
    buf = _as_array(data)
    h = _parse_header(buf)
    raw = _decompress(buf[HEADER_SIZE:], h.codec.lossless, h.raw_len)
    index_bytes, value_bytes = raw[: h.index_len], raw[h.index_len :]

    if h.codec.bits == 0:
        values = value_bytes.view("<f4").astype(np.float32)
    else:
        levels = unpack_bits(value_bytes, h.kept, h.codec.bits)
        values = (levels * h.scale + h.lo).astype(np.float32)  # dequantize(), without torch's thread pool

    if h.index_mode == _INDEX_NONE:
        out = values
    else:
        if h.index_mode == _INDEX_GAPS:
            gaps = _varint_decode(index_bytes, h.kept)
            # Checked in float first so the exact int64 cumsum below cannot overflow on hostile gaps.
            if float(gaps.astype(np.float64).sum()) + h.kept > h.numel:
                raise ValueError("index section: indices run past the end of the tensor")
            idx = np.cumsum(gaps + 1) - 1
            if idx.size and idx[-1] >= h.numel:
                raise ValueError("index section: indices run past the end of the tensor")
        else:
            stream = np.unpackbits(index_bytes)
            if stream[h.numel :].any():
                raise ValueError("index bitmap: non-zero padding bits")
            idx = np.flatnonzero(stream[: h.numel])
            if idx.size != h.kept:
                raise ValueError(f"index bitmap marks {idx.size} entries, header says {h.kept}")
        out = np.zeros(h.numel, dtype=np.float32)
        out[idx] = values
    return torch.from_numpy(out).reshape(h.shape)


def compressed_size(x: torch.Tensor, codec: Codec, generator: torch.Generator | None = None) -> int:
    """Bytes :func:`encode` would put on the wire for ``x`` (it encodes, so it draws from ``generator`` too)."""
    return encode(x, codec, generator).numel()
