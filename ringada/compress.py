"""Compression of smashed data (cut-layer activations and their gradients) for the split-learning wire.

A :class:`Codec` turns a tensor into one 1-D ``uint8`` tensor with :func:`encode` (exactly the bytes that travel;
the runtime ships it as a plain tensor, so nothing is ever unpickled on the receiving side) and :func:`decode`
turns it back into a ``float32`` tensor of the original shape. The pipeline, each stage optional, in order:

1. outliers: the ``outliers`` fraction of entries of largest magnitude travel exactly (float32 value + index)
   and are zeroed before the rest is scaled. LM hidden states carry *massive activations* (a few channels,
   often at a few tokens, 100-1000x the rest: Sun et al. 2024, the LLM.int8 outlier features); one of them
   sets the range of whatever scale it falls under and leaves every other value there a level or two.
2. rotation: an orthonormal block Walsh-Hadamard transform along the last dim (``hadamard`` = block size, a
   power of two). It spreads what is left of an outlier channel over its block, so block values look alike;
   decoding applies it again (it is its own inverse), exact up to float rounding.
3. top-k: keep the ``topk`` fraction of entries of largest magnitude (after rotation), the rest decode as 0.
   It is the SFT paper's sparsifier and destructive on LM hidden states, whose energy is spread over all
   entries: keeping 10% drops most of it. Prefer fewer bits.
4. quantization to ``bits`` per value (0: float32 values). ``scale="tensor"``: one range [min, max] over the whole
   tensor (the original scheme). ``"token"``: a symmetric range [-a, a] per token (per row of the last dim),
   ``a`` its absmax. ``"group"``: one per ``group`` consecutive channels of each token. Levels ``k`` in
   ``0..2**bits - 1`` decode as ``a * (2k / (2**bits - 1) - 1)`` (every level used; 0 is not a level).
   Rounding ``stochastic`` is unbiased (``E[decode] == value``; gradients need it), ``nearest`` halves the
   error bound (fine for activations).
5. a general-purpose lossless coder over the whole body: zlib or lzma (raw streams, standard library; zstd is
   not in the standard library of the Python this runs on).

Bias: outliers, rotation and stochastic rounding keep ``E[decode(encode(x))] == x`` (up to float rounding);
top-k does not (dropped entries decode as zeros). :class:`ErrorFeedback` adds the last residual of a stream to
its next tensor, the usual remedy for biased or coarse compressors of gradients.

Two blob versions. Version 1 is written when a codec needs nothing newer (no outliers, no rotation, and a
per-tensor range or no quantization); it is byte for byte what earlier releases wrote and read. Version 2 adds
outliers, rotation, per-token and per-group scales and the rounding mode. :func:`decode` reads both.

Blob layout, version 1 (all integers little-endian), ``HEADER_SIZE`` = 144 bytes of header, then the body::

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

Blob layout, version 2, ``HEADER_SIZE_V2`` = 178 bytes of header, then the body::

    offset size  field
         0    4  magic  b"RACZ"
         4    2  version (2)
         6    1  lossless coder (as in version 1)
         7    1  bits (as in version 1)
         8    1  source dtype (as in version 1)
         9    1  ndim (0..8)
        10    1  index encoding of the top-k selection (as in version 1)
        11    1  scale mode: 0 tensor, 1 token, 2 group
        12    1  rounding: 0 stochastic, 1 nearest (informational: decoding does not depend on it)
        13    1  reserved, 0
        14    4  hadamard block size, uint32 (0: no rotation)
        18    4  group size, uint32 (channels per scale; used by scale mode group)
        22    8  topk ratio, float64
        30    8  outlier fraction, float64
        38   64  shape, 8 x uint64 (unused dims 0)
       102    8  numel, uint64
       110    8  kept, uint64     (entries top-k keeps: kept_count(numel, topk))
       118    8  outliers, uint64 (entries sent exactly: outlier_count(numel, outlier fraction))
       126    8  lo, float64      (tensor mode: quantization offset; else 0)
       134    8  scale, float64   (tensor mode: quantization step; token/group: the base b of the scales)
       142    8  outlier_index_len, uint64: bytes of the outlier index section
       150    8  index_len, uint64: bytes of the top-k index section
       158    8  raw_len, uint64:   bytes of the whole body before lossless coding
       166    8  body_len, uint64:  bytes of the body as stored (after lossless coding)
       174    4  CRC-32 of bytes [0, 174) followed by the stored body

    body (before lossless coding) = outlier index (outlier_index_len bytes, LEB128 gaps as above)
                                  + outlier values (outliers x float32, the exact source values)
                                  + top-k index section (index_len bytes, as in version 1)
                                  + scales (token/group modes with bits > 0: one float16 per group)
                                  + value section (kept float32 values, or the packed levels, as in version 1)

Geometry. Let ``W`` be the last dim (1 for a 0-d tensor) and ``R = numel / W`` the tokens. Rotation transforms
each run of ``hadamard`` consecutive entries of a token (a trailing run shorter than a block stays as it is).
Token mode has one scale per token, group mode ``ceil(W / group)`` per token (the last one may be narrower):
``R * ceil(W / G)`` scales with ``G = W`` or ``group``, stored even for groups top-k left empty (as 0). A scale is
the float16 ratio ``r = a / b`` (``b`` the largest group absmax, so r is in [0, 1], where float16 keeps its
relative precision), rounded up so that ``r * b`` never falls below the absmax it stands for.

Decoding: outliers' positions are zeroed in the residual before rotation and overwritten with their exact
values after it, so they decode exactly.

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
VERSION = 2  # the newest blob version this build writes and reads (it reads version 1 too)
LOSSLESS = ("none", "zlib", "lzma")
SCALES = ("tensor", "token", "group")
ROUNDINGS = ("stochastic", "nearest")
MAX_BITS = 16
MAX_NDIM = 8
MAX_HADAMARD = 1 << 16
MAX_OUTLIERS = 0.5

_PREFIX = struct.Struct("<4sHBBBBBxd8QQQddQQQ")
_PREFIX_V2 = struct.Struct("<4sHBBBBBBBxIIdd8QQQQddQQQQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _PREFIX.size + _CRC.size
HEADER_SIZE_V2 = _PREFIX_V2.size + _CRC.size

_INDEX_NONE, _INDEX_GAPS, _INDEX_BITMAP = 0, 1, 2
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
# Nine 7-bit groups hold any non-negative int64; longer varints can only come from corruption.
_MAX_VARINT_BYTES = 9


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


@dataclass(frozen=True)
class Codec:
    """How smashed data is compressed (see the module docstring for each stage). The defaults send float32
    values unchanged; the per-tensor range of ``scale="tensor"`` is the original SFT quantizer."""

    topk: float = 1.0
    bits: int = 0
    lossless: str = "none"
    scale: str = "tensor"
    group: int = 64
    hadamard: int = 0
    outliers: float = 0.0
    rounding: str = "stochastic"

    def __post_init__(self):
        topk = self.topk
        if not _is_real(topk) or not (0.0 < topk <= 1.0):
            raise ValueError(
                f"compress.topk must be a number in (0, 1] (fraction of entries kept; 1.0 disables "
                f"sparsification, e.g. 0.1 keeps the largest 10%), got {topk!r}"
            )
        bits = self.bits
        if not _is_int(bits) or not (0 <= bits <= MAX_BITS):
            raise ValueError(
                f"compress.bits must be an integer in 0..{MAX_BITS} (0 sends float32 values, 1..{MAX_BITS} "
                f"quantizes each kept value to that many bits), got {bits!r}"
            )
        if self.lossless not in LOSSLESS:
            choices = ", ".join(map(repr, LOSSLESS))
            raise ValueError(f"compress.lossless must be one of {choices}, got {self.lossless!r}")
        if self.scale not in SCALES:
            raise ValueError(f"compress.scale must be one of {', '.join(map(repr, SCALES))} (one range per tensor, "
                             f"per token or per group of channels), got {self.scale!r}")
        if not _is_int(self.group) or not (1 <= self.group < 2**32):
            raise ValueError(f"compress.group must be an integer >= 1 (channels per scale, e.g. 64), got "
                             f"{self.group!r}")
        h = self.hadamard
        if not _is_int(h) or not (h == 0 or (2 <= h <= MAX_HADAMARD and h & (h - 1) == 0)):
            raise ValueError(f"compress.hadamard must be 0 (off) or a power of two in 2..{MAX_HADAMARD} (the "
                             f"rotation's block size, e.g. 64), got {h!r}")
        out = self.outliers
        if not _is_real(out) or not (0.0 <= out <= MAX_OUTLIERS):
            raise ValueError(f"compress.outliers must be a fraction in [0, {MAX_OUTLIERS}] (entries sent exactly, "
                             f"e.g. 0.005; 0 turns it off), got {out!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"compress.rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got "
                             f"{self.rounding!r}")
        # Normalized so equal settings compare and hash equal whether written as 1, 1.0 or a numpy scalar.
        object.__setattr__(self, "topk", float(topk))
        object.__setattr__(self, "bits", int(bits))
        object.__setattr__(self, "group", int(self.group))
        object.__setattr__(self, "hadamard", int(h))
        object.__setattr__(self, "outliers", float(out))

    @property
    def is_identity(self) -> bool:
        """True when encoding changes nothing but the framing (no sparsification, quantization, rotation, outlier
        channel or coding)."""
        return (self.topk == 1.0 and self.bits == 0 and self.lossless == "none" and not self.hadamard
                and not self.outliers)

    @property
    def is_lossy(self) -> bool:
        """True when a decoded tensor can differ from the input by more than float rounding."""
        return self.topk < 1.0 or self.bits > 0

    @property
    def version(self) -> int:
        """The blob version :func:`encode` writes: 1 when the codec needs nothing version 2 added."""
        per_tensor = self.bits == 0 or self.scale == "tensor"
        return 1 if per_tensor and not self.hadamard and not self.outliers else 2


@dataclass(frozen=True)
class BlobHeader:
    """The validated header of an encoded blob (version 1 blobs: no outliers, rotation or per-group scales)."""

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
    version: int = 1
    outliers: int = 0
    outlier_index_len: int = 0

    @property
    def header_size(self) -> int:
        return HEADER_SIZE if self.version == 1 else HEADER_SIZE_V2

    @property
    def width(self) -> int:
        """The last dim (the channels of a token); 1 for a 0-d tensor."""
        return self.shape[-1] if self.shape else 1

    @property
    def num_scales(self) -> int:
        """float16 scales in the body (token and group modes with bits > 0)."""
        if self.codec.bits == 0 or self.codec.scale == "tensor" or self.numel == 0:
            return 0
        return _num_groups(self.numel, self.width, _group_size(self.codec, self.width))


def kept_count(numel: int, ratio: float) -> int:
    """Entries top-k keeps: ``ceil(ratio * numel)``, at least one of a non-empty tensor, at most all.

    A 1e-6 slack absorbs float noise so that e.g. ``0.07 * 100 == 7.000000000000001`` keeps 7, not 8.
    """
    if numel == 0:
        return 0
    if ratio >= 1.0:
        return numel
    return min(numel, max(1, math.ceil(ratio * numel - 1e-6)))


def outlier_count(numel: int, fraction: float) -> int:
    """Entries the outlier channel sends exactly: none for fraction 0, else ``kept_count(numel, fraction)``."""
    return 0 if fraction <= 0.0 else kept_count(numel, fraction)


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


def quantize_range(
    values: torch.Tensor, bits: int, generator: torch.Generator | None = None, rounding: str = "stochastic"
) -> tuple[torch.Tensor, float, float]:
    """Quantize ``values`` to ``bits``-bit levels of one range [min, max] (the per-tensor scale).

    Returns ``(levels, lo, scale)`` with int64 ``levels`` in ``[0, 2**bits - 1]`` (same shape as ``values``),
    ``lo = min(values)`` and ``scale = (max - min) / (2**bits - 1)``. ``stochastic``: each value rounds up with
    probability equal to its fractional position between the two neighbouring levels, so ``E[dequantize(levels,
    lo, scale)] == values`` and every draw is within one ``scale`` of the value; ``nearest``: within half a
    ``scale``, biased. If all values are equal, ``scale`` is 0 and decoding gives them back exactly.
    ``generator`` (on ``values``' device) supplies the uniform draws.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= MAX_BITS):
        raise ValueError(f"quantization bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
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
    if rounding == "stochastic":
        u = torch.rand(v.shape, generator=generator, dtype=torch.float64, device=v.device)
    else:
        u = torch.full(v.shape, 0.5, dtype=torch.float64, device=v.device)
    # Clamping only matters when rounding pushes (v - lo) / scale a hair outside [0, top].
    if on_cpu:
        arr -= lo
        arr /= scale
        arr += u.numpy()
        np.floor(arr, out=arr)
        return torch.from_numpy(np.clip(arr, 0, top, out=arr).astype(np.int64)), lo, scale
    return torch.floor((v - lo) / scale + u).clamp_(0, top).to(torch.int64), lo, scale


def stochastic_quantize(
    values: torch.Tensor, bits: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float, float]:
    """Unbiased stochastic quantization of ``values`` to ``bits``-bit levels of one range: :func:`quantize_range`
    with stochastic rounding."""
    return quantize_range(values, bits, generator, "stochastic")


def dequantize(levels: torch.Tensor, lo: float, scale: float) -> torch.Tensor:
    """Map quantization levels back to values: ``lo + levels * scale`` as float32."""
    return (levels.to(torch.float64) * scale + lo).to(torch.float32)


# --------------------------------------------------------------------------- per-token / per-group scales


def _group_size(codec: Codec, width: int) -> int:
    return width if codec.scale == "token" else codec.group


def _num_groups(numel: int, width: int, group: int) -> int:
    return (numel // width) * -(-width // group) if numel else 0


def group_ids(flat_index: np.ndarray, width: int, group: int) -> np.ndarray:
    """The scale group of each flat index: groups of ``group`` consecutive channels within a token (a row of
    ``width``), numbered token by token. Non-decreasing when ``flat_index`` is sorted."""
    per_token = -(-width // group)
    return (flat_index // width) * per_token + (flat_index % width) // group


def group_scales(values: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, float]:
    """Symmetric per-group ranges: ``(ratios, base)`` with float16 ``ratios`` such that ``ratios * base`` (in
    float64) is >= the absmax of every group's ``values``. ``groups`` must be non-decreasing (sorted indices)."""
    absmax = np.zeros(num_groups, dtype=np.float64)
    if values.size:
        starts = np.flatnonzero(np.diff(groups, prepend=-1))
        absmax[groups[starts]] = np.maximum.reduceat(np.abs(values), starts)
    base = float(absmax.max()) if num_groups else 0.0
    if base == 0.0:
        return np.zeros(num_groups, dtype=np.float16), 0.0
    ratio = absmax / base
    ratios = ratio.astype(np.float16)
    low = ratios.astype(np.float64) < ratio  # rounded down: take the next float16 up, so no value is clipped
    ratios[low] = np.nextafter(ratios[low], np.float16(np.inf))
    return ratios, base


def quantize_groups(values: np.ndarray, ranges: np.ndarray, bits: int, rounding: str,
                    generator: torch.Generator | None = None) -> np.ndarray:
    """Levels in ``0..2**bits - 1`` of ``values`` (float64) in their symmetric ranges ``[-a, a]`` (``ranges``:
    ``a`` per value). Stochastic rounding is unbiased: ``E[dequantize_groups(levels, ranges)] == values`` for
    ``|values| <= ranges``."""
    top = (1 << bits) - 1
    inv = np.divide(1.0, ranges, out=np.zeros_like(ranges), where=ranges > 0)
    position = (values * inv + 1.0) * (top / 2)
    if rounding == "stochastic":
        position += torch.rand(values.shape, generator=generator, dtype=torch.float64).numpy()
    else:
        position += 0.5
    np.floor(position, out=position)
    return np.clip(position, 0, top, out=position).astype(np.int64)


def dequantize_groups(levels: np.ndarray, ranges: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`quantize_groups` up to rounding: ``a * (2k / (2**bits - 1) - 1)`` as float64."""
    top = (1 << bits) - 1
    return ranges * (levels * (2.0 / top) - 1.0)


def _ranges(ratios: np.ndarray, base: float, groups: np.ndarray) -> np.ndarray:
    # the one place both ends turn stored scales into ranges, so encoder and decoder agree to the bit
    return (ratios.astype(np.float64) * base)[groups]


# ------------------------------------------------------------------------------------------ rotation


def hadamard_rotate(x: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal block Walsh-Hadamard transform along the last axis of a 2-D array (float64 result): each run
    of ``block`` consecutive entries (a power of two) is multiplied by ``H / sqrt(block)``, ``H`` the Sylvester
    Hadamard matrix; a trailing run shorter than ``block`` is left as it is. It is its own inverse."""
    out = np.array(x, dtype=np.float64)
    width = out.shape[-1]
    full = width // block * block
    if block < 2 or full == 0:
        return out
    y = out[:, :full].reshape(-1, block)
    half = 1
    while half < block:  # the fast transform: log2(block) butterfly passes
        y = y.reshape(-1, block // (2 * half), 2, half)
        y = np.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), axis=2)
        half *= 2
    out[:, :full] = y.reshape(out.shape[0], full) / math.sqrt(block)
    return out


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




def _index_section(idx: np.ndarray, numel: int) -> tuple[np.ndarray, int]:
    """The top-k index section of sorted flat indices: LEB128 gaps, or a bitmap when that is smaller."""
    index = _varint_encode(np.diff(idx, prepend=-1) - 1)
    if (numel + 7) // 8 < index.size:
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        return np.packbits(mask), _INDEX_BITMAP
    return index, _INDEX_GAPS


def _gap_indices(data: np.ndarray, count: int, numel: int, what: str) -> np.ndarray:
    gaps = _varint_decode(data, count)
    # Checked in float first so the exact int64 cumsum below cannot overflow on hostile gaps.
    if float(gaps.astype(np.float64).sum()) + count > numel:
        raise ValueError(f"{what}: indices run past the end of the tensor")
    idx = np.cumsum(gaps + 1) - 1
    if idx.size and idx[-1] >= numel:
        raise ValueError(f"{what}: indices run past the end of the tensor")
    return idx


def _kept_indices(index_bytes: np.ndarray, h: BlobHeader) -> np.ndarray | None:
    """The flat indices top-k kept (None: all of them)."""
    if h.index_mode == _INDEX_NONE:
        return None
    if h.index_mode == _INDEX_GAPS:
        return _gap_indices(index_bytes, h.kept, h.numel, "index section")
    stream = np.unpackbits(index_bytes)
    if stream[h.numel :].any():
        raise ValueError("index bitmap: non-zero padding bits")
    idx = np.flatnonzero(stream[: h.numel])
    if idx.size != h.kept:
        raise ValueError(f"index bitmap marks {idx.size} entries, header says {h.kept}")
    return idx


def _check_frame(buf: np.ndarray, prefix_size: int, body_len: int) -> None:
    """Length and checksum: after this the bytes are what the sender wrote."""
    header_size = prefix_size + _CRC.size
    if buf.size - header_size != body_len:
        raise ValueError(f"blob length {buf.size} does not match header ({header_size} + {body_len} body bytes)")
    (crc,) = _CRC.unpack_from(buf, prefix_size)
    if zlib.crc32(buf[header_size:], zlib.crc32(buf[:prefix_size])) != crc:
        raise ValueError("blob checksum mismatch (corrupted in transit)")


def _check_index(index_mode: int, index_len: int, kept: int, numel: int) -> None:
    expected_index = {
        _INDEX_NONE: (0, 0),
        _INDEX_GAPS: (kept, _MAX_VARINT_BYTES * kept),
        _INDEX_BITMAP: ((numel + 7) // 8,) * 2,
    }.get(index_mode)
    if expected_index is None or (index_mode == _INDEX_NONE) != (kept == numel):
        raise ValueError(f"blob header: index encoding {index_mode} with {kept} of {numel} kept")
    if not expected_index[0] <= index_len <= expected_index[1]:
        raise ValueError(f"blob header: index section of {index_len} bytes for {kept} of {numel} kept")


def _check_shape(ndim: int, shape8, numel: int) -> tuple[int, ...]:
    if any(shape8[ndim:]):
        raise ValueError("blob header: non-zero unused shape entries")
    shape = tuple(shape8[:ndim])
    if math.prod(shape) != numel:
        raise ValueError(f"blob header: shape {shape} does not hold {numel} elements")
    return shape


def _parse_header(buf: np.ndarray) -> BlobHeader:
    if buf.size < 6:
        raise ValueError(f"blob truncated: {buf.size} bytes, the header alone is {HEADER_SIZE}")
    magic, version = struct.unpack_from("<4sH", buf)
    if magic != MAGIC:
        raise ValueError(f"not a compressed blob: magic {magic!r}, expected {MAGIC!r}")
    if version == 1:
        return _parse_header_v1(buf)
    if version == 2:
        return _parse_header_v2(buf)
    raise ValueError(f"unsupported blob version {version}, this build reads versions 1 and {VERSION}")


def _parse_header_v1(buf: np.ndarray) -> BlobHeader:
    if buf.size < HEADER_SIZE:
        raise ValueError(f"blob truncated: {buf.size} bytes, the header alone is {HEADER_SIZE}")
    (magic, version, lossless, bits, dtype_code, ndim, index_mode, ratio, *rest) = _PREFIX.unpack_from(buf)
    shape8, (numel, kept, lo, scale, index_len, raw_len, body_len) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    _check_frame(buf, _PREFIX.size, body_len)
    # From here on the bytes are what the sender wrote; these checks catch writers that disagree with us.
    if lossless >= len(LOSSLESS) or bits > MAX_BITS or dtype_code not in _CODE_DTYPES or ndim > MAX_NDIM:
        raise ValueError(f"blob header out of range: lossless={lossless} bits={bits} dtype={dtype_code} ndim={ndim}")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"blob header: topk ratio {ratio} not in (0, 1]")
    shape = _check_shape(ndim, shape8, numel)
    if kept != kept_count(numel, ratio):
        raise ValueError(f"blob header: {kept} kept, but topk {ratio} of {numel} keeps {kept_count(numel, ratio)}")
    _check_index(index_mode, index_len, kept, numel)
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


def _parse_header_v2(buf: np.ndarray) -> BlobHeader:
    if buf.size < HEADER_SIZE_V2:
        raise ValueError(f"blob truncated: {buf.size} bytes, the version 2 header alone is {HEADER_SIZE_V2}")
    (magic, version, lossless, bits, dtype_code, ndim, index_mode, scale_mode, rounding, hadamard, group, ratio,
     fraction, *rest) = _PREFIX_V2.unpack_from(buf)
    shape8 = rest[:MAX_NDIM]
    numel, kept, outliers, lo, scale, outlier_index_len, index_len, raw_len, body_len = rest[MAX_NDIM:]
    _check_frame(buf, _PREFIX_V2.size, body_len)
    if (lossless >= len(LOSSLESS) or bits > MAX_BITS or dtype_code not in _CODE_DTYPES or ndim > MAX_NDIM
            or scale_mode >= len(SCALES) or rounding >= len(ROUNDINGS)):
        raise ValueError(f"blob header out of range: lossless={lossless} bits={bits} dtype={dtype_code} ndim={ndim} "
                         f"scale mode={scale_mode} rounding={rounding}")
    try:
        codec = Codec(topk=ratio, bits=bits, lossless=LOSSLESS[lossless], scale=SCALES[scale_mode], group=group,
                      hadamard=hadamard, outliers=fraction, rounding=ROUNDINGS[rounding])
    except ValueError as e:
        raise ValueError(f"blob header: {e}") from None
    shape = _check_shape(ndim, shape8, numel)
    if kept != kept_count(numel, ratio):
        raise ValueError(f"blob header: {kept} kept, but topk {ratio} of {numel} keeps {kept_count(numel, ratio)}")
    if outliers != outlier_count(numel, fraction):
        raise ValueError(f"blob header: {outliers} outliers, but a fraction {fraction} of {numel} is "
                         f"{outlier_count(numel, fraction)}")
    _check_index(index_mode, index_len, kept, numel)
    if not (outliers <= outlier_index_len <= _MAX_VARINT_BYTES * outliers):
        raise ValueError(f"blob header: outlier index of {outlier_index_len} bytes for {outliers} outliers")
    if not (math.isfinite(lo) and math.isfinite(scale) and scale >= 0.0) or (bits == 0 and (lo or scale)) \
            or (codec.scale != "tensor" and lo):
        raise ValueError(f"blob header: bad quantization parameters lo={lo} scale={scale}")
    h = BlobHeader(codec=codec, dtype=_CODE_DTYPES[dtype_code], shape=shape, numel=numel, kept=kept, lo=lo,
                   scale=scale, index_mode=index_mode, index_len=index_len, raw_len=raw_len, body_len=body_len,
                   version=2, outliers=outliers, outlier_index_len=outlier_index_len)
    expected = outlier_index_len + 4 * outliers + index_len + 2 * h.num_scales + _values_len(kept, bits)
    if raw_len != expected:
        raise ValueError(f"blob header: body of {raw_len} bytes, expected {expected}")
    if lossless == 0 and body_len != raw_len:
        raise ValueError("blob header: uncoded body length differs from its raw length")
    return h


def read_header(data: torch.Tensor | bytes) -> BlobHeader:
    """Validate a blob's header (and checksum) and return it, e.g. to learn the sender's dtype or the sizes."""
    return _parse_header(_as_array(data))


def _frame(prefix: bytes, body: bytes) -> torch.Tensor:
    crc = zlib.crc32(body, zlib.crc32(prefix))
    out = np.empty(len(prefix) + _CRC.size + len(body), dtype=np.uint8)
    out[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    out[len(prefix) : len(prefix) + _CRC.size] = np.frombuffer(_CRC.pack(crc), dtype=np.uint8)
    out[len(prefix) + _CRC.size :] = np.frombuffer(body, dtype=np.uint8)
    return torch.from_numpy(out)


def encode(x: torch.Tensor, codec: Codec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Compress ``x`` with ``codec`` into a self-describing 1-D uint8 tensor (see the module docstring for layout).

    ``x`` is read as float32 (so a float64 tensor round-trips only to float32 precision). ``generator``, a CPU
    generator, drives the stochastic rounding; without one the global RNG is used. Quantizing or rotating a
    tensor with a non-finite entry raises ValueError (send those with bits 0 and no rotation).
    """
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec, got {type(codec).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPE_CODES:
        raise TypeError(f"can only encode float16/bfloat16/float32/float64 tensors, got {getattr(x, 'dtype', type(x))}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"can only encode tensors of at most {MAX_NDIM} dims, got shape {tuple(x.shape)}")
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    if codec.version == 1:
        return _encode_v1(x, flat, codec, generator)
    return _encode_v2(x, flat.numpy(), codec, generator)


def _encode_v1(x: torch.Tensor, flat: torch.Tensor, codec: Codec, generator) -> torch.Tensor:
    numel = flat.numel()
    kept = kept_count(numel, codec.topk)
    index = np.zeros(0, dtype=np.uint8)
    index_mode = _INDEX_NONE
    values = flat
    if kept < numel:
        idx, values = topk_sparsify(flat, codec.topk)
        index, index_mode = _index_section(idx.numpy(), numel)

    lo = scale = 0.0
    if codec.bits == 0:
        packed = values.contiguous().numpy().astype("<f4", copy=False).view(np.uint8)
    else:
        levels, lo, scale = quantize_range(values, codec.bits, generator, codec.rounding)
        packed = pack_bits(levels.numpy(), codec.bits)

    raw = index.tobytes() + packed.tobytes()
    body = _compress(raw, codec.lossless)
    shape8 = list(x.shape) + [0] * (MAX_NDIM - x.dim())
    prefix = _PREFIX.pack(
        MAGIC, 1, LOSSLESS.index(codec.lossless), codec.bits, _DTYPE_CODES[x.dtype], x.dim(), index_mode,
        codec.topk, *shape8, numel, kept, lo, scale, index.size, len(raw), len(body),
    )  # fmt: skip
    return _frame(prefix, body)


def _encode_v2(x: torch.Tensor, arr: np.ndarray, codec: Codec, generator) -> torch.Tensor:
    numel, width, bits = arr.size, (x.shape[-1] if x.dim() else 1), codec.bits
    if numel and (bits or codec.hadamard) and not np.isfinite(arr).all():
        raise ValueError("cannot quantize non-finite values (inf/nan); use compress.bits=0 to send them as float32")
    residual = arr.astype(np.float64)
    n_out = outlier_count(numel, codec.outliers)
    out_idx, out_values = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if n_out:
        out_idx = _topk_indices_np(arr, n_out)
        out_values = arr[out_idx]
        residual[out_idx] = 0.0
    if codec.hadamard and numel:
        residual = hadamard_rotate(residual.reshape(-1, width), codec.hadamard).reshape(-1)

    kept = kept_count(numel, codec.topk)
    index, index_mode, idx, values = np.zeros(0, dtype=np.uint8), _INDEX_NONE, None, residual
    if kept < numel:
        idx = _topk_indices_np(residual, kept)
        values = residual[idx]
        index, index_mode = _index_section(idx, numel)

    lo = scale = 0.0
    scales = np.zeros(0, dtype=np.float16)
    if bits == 0:
        packed = values.astype("<f4")
    elif numel == 0:
        packed = np.zeros(0, dtype=np.uint8)
    elif codec.scale == "tensor":
        levels, lo, scale = quantize_range(torch.from_numpy(values), bits, generator, codec.rounding)
        packed = pack_bits(levels.numpy(), bits)
    else:
        size = _group_size(codec, width)
        groups = group_ids(idx if idx is not None else np.arange(numel), width, size)
        scales, scale = group_scales(values, groups, _num_groups(numel, width, size))
        packed = pack_bits(quantize_groups(values, _ranges(scales, scale, groups), bits, codec.rounding, generator),
                           bits)

    outlier_index = _varint_encode(np.diff(out_idx, prepend=-1) - 1)
    raw = b"".join(a.tobytes() for a in (outlier_index, out_values.astype("<f4"), index, scales.astype("<f2"),
                                         packed))
    body = _compress(raw, codec.lossless)
    shape8 = list(x.shape) + [0] * (MAX_NDIM - x.dim())
    prefix = _PREFIX_V2.pack(
        MAGIC, 2, LOSSLESS.index(codec.lossless), bits, _DTYPE_CODES[x.dtype], x.dim(), index_mode,
        SCALES.index(codec.scale), ROUNDINGS.index(codec.rounding), codec.hadamard, codec.group, codec.topk,
        codec.outliers, *shape8, numel, kept, n_out, lo, scale, outlier_index.size, index.size, len(raw), len(body),
    )  # fmt: skip
    return _frame(prefix, body)


def decode(data: torch.Tensor | bytes) -> torch.Tensor:
    """Rebuild the float32 tensor from :func:`encode`'s blob (either version); dropped entries are zeros.

    Raises ValueError when the blob is truncated, corrupted or internally inconsistent.
    """
    buf = _as_array(data)
    h = _parse_header(buf)
    raw = _decompress(buf[h.header_size :], h.codec.lossless, h.raw_len)
    if h.version == 1:
        return _decode_v1(raw, h)
    return _decode_v2(raw, h)


def _decode_v1(raw: np.ndarray, h: BlobHeader) -> torch.Tensor:
    index_bytes, value_bytes = raw[: h.index_len], raw[h.index_len :]
    if h.codec.bits == 0:
        values = value_bytes.view("<f4").astype(np.float32)
    else:
        levels = unpack_bits(value_bytes, h.kept, h.codec.bits)
        values = (levels * h.scale + h.lo).astype(np.float32)  # dequantize(), without torch's thread pool
    idx = _kept_indices(index_bytes, h)
    if idx is None:
        out = values
    else:
        out = np.zeros(h.numel, dtype=np.float32)
        out[idx] = values
    return torch.from_numpy(out).reshape(h.shape)


def _decode_v2(raw: np.ndarray, h: BlobHeader) -> torch.Tensor:
    codec, bits = h.codec, h.codec.bits
    ends = np.cumsum([h.outlier_index_len, 4 * h.outliers, h.index_len, 2 * h.num_scales])
    outlier_index, outlier_values, index_bytes, scale_bytes = np.split(raw[: ends[-1]], ends[:-1])
    value_bytes = raw[ends[-1] :]
    if h.numel == 0:
        return torch.zeros(h.shape)
    out_idx = _gap_indices(outlier_index, h.outliers, h.numel, "outlier index")
    idx = _kept_indices(index_bytes, h)

    if bits == 0:
        values = value_bytes.view("<f4").astype(np.float64)
    else:
        levels = unpack_bits(value_bytes, h.kept, bits)
        if codec.scale == "tensor":
            values = levels * h.scale + h.lo
        else:
            scales = scale_bytes.view("<f2")
            if not (np.isfinite(scales).all() and (scales >= 0).all() and (scales <= 1).all()):
                raise ValueError("scales: a ratio outside [0, 1]")
            size = _group_size(codec, h.width)
            groups = group_ids(idx if idx is not None else np.arange(h.numel), h.width, size)
            values = dequantize_groups(levels, _ranges(scales, h.scale, groups), bits)

    if idx is None:
        dense = values
    else:
        dense = np.zeros(h.numel, dtype=np.float64)
        dense[idx] = values
    if codec.hadamard:
        dense = hadamard_rotate(dense.reshape(-1, h.width), codec.hadamard).reshape(-1)
    out = dense.astype(np.float32)
    out[out_idx] = outlier_values.view("<f4")
    return torch.from_numpy(out).reshape(h.shape)


def compressed_size(x: torch.Tensor, codec: Codec, generator: torch.Generator | None = None) -> int:
    """Bytes :func:`encode` would put on the wire for ``x`` (it encodes, so it draws from ``generator`` too)."""
    return encode(x, codec, generator).numel()


# ------------------------------------------------------------------------------------- link-level helpers


class ErrorFeedback:
    """Error feedback (the memory of EF-SGD: Seide et al. 2014, Karimireddy et al. 2019) for the compressed
    streams one end of a link sends: what compressing a stream's last tensor lost, ``target - decode(blob)``, is
    added to the stream's next tensor before it is encoded, so a biased or coarse codec delays information
    instead of dropping it. ``key`` names a stream (a message name, or a (peer, micro-batch) pair); a tensor of
    another shape than the stored residual (e.g. a smaller last batch) restarts that stream from zero.

    For activation gradients the residual of one step's batch joins the next step's batch position by position,
    so it reaches the adapters through another input's Jacobian: an approximation that pays off when the codec
    drops much (top-k, few bits) and costs little otherwise; unbiased stochastic rounding alone does not need it.

    The residuals live in this object only (float32, on the CPU). They are not checkpointed: a restarted or
    resumed run starts them from zero, so with error feedback on it continues with the same adapters but not
    bit-identically to an uninterrupted run.
    """

    def __init__(self):
        self.residuals: dict = {}

    def encode(self, key, x: torch.Tensor, codec: Codec, generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`encode` of ``x`` plus the stream's residual; the new residual is what this blob loses."""
        target = x.detach().to("cpu", torch.float32)
        residual = self.residuals.get(key)
        if residual is not None and residual.shape == target.shape:
            target = target + residual
        blob = encode(target, codec, generator)
        self.residuals[key] = target - decode(blob)
        return blob

    def reset(self) -> None:
        self.residuals.clear()


class SmashedCodec:
    """One end of a link that carries smashed tensors (star links, and ring links with pipeline.compress): what it
    sends goes through the codec of the tensor's direction, what it receives is decoded when it is a blob.

    A tensor travels as itself when its codec is the identity and when it is not finite (the codec cannot quantize
    it, and the receiver must see it to skip the step). The stochastic rounding of each blob draws from a
    generator seeded with ``hash((seed, *salt))`` (ints hash alike in every process), so a run is reproducible.
    Gradients of a named ``stream`` get :class:`ErrorFeedback` when the codecs ask for it."""

    def __init__(self, codecs: LinkCodecs, seed: int):
        self.codecs, self.seed = codecs, seed
        self.feedback = ErrorFeedback() if codecs.error_feedback else None

    def pack(self, x: torch.Tensor, gradient: bool, salt: tuple, stream=None) -> torch.Tensor:
        codec = self.codecs.gradient if gradient else self.codecs.activation
        if codec.is_identity or not bool(torch.isfinite(x).all()):
            return x
        generator = torch.Generator().manual_seed(hash((self.seed, *salt)) % 2**63)
        if gradient and stream is not None and self.feedback is not None:
            return self.feedback.encode(stream, x, codec, generator)
        return encode(x.detach(), codec, generator)

    @staticmethod
    def unpack(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A received smashed tensor: a blob decoded (on the CPU) and cast to ``dtype`` on ``device``, else ``t``."""
        return decode(t).to(device, dtype) if t.dtype == torch.uint8 else t


@dataclass(frozen=True)
class LinkCodecs:
    """The codecs of a split link: one for activations (the cut's hidden state, and the server's top hidden
    state under label privacy), one for their gradients; and whether gradients get :class:`ErrorFeedback`."""

    activation: Codec = Codec()
    gradient: Codec = Codec()
    error_feedback: bool = False

    @property
    def is_identity(self) -> bool:
        return self.activation.is_identity and self.gradient.is_identity

    @property
    def is_lossy(self) -> bool:
        return self.activation.is_lossy or self.gradient.is_lossy


def link_codecs(settings, topk: float | None = None) -> LinkCodecs:
    """The codecs the ``compress`` config section (``settings``: a ``config.CompressConfig``) describes, with keep
    ratio ``topk`` (default: ``settings.topk``; star.allocate plans one per device). Activations get ``bits`` and
    ``rounding``; gradients ``grad_bits`` (None: ``bits``) and always stochastic rounding, which keeps them
    unbiased. A direction sent as float32 (bits 0) skips the stages that only serve quantization (scales,
    rotation, outliers)."""
    keep = settings.topk if topk is None else topk
    keep = 1.0 if keep >= 1.0 - 1e-9 else keep  # what an allocation's float noise leaves of "keep everything"

    def codec(bits: int, rounding: str) -> Codec:
        quantizing = {"scale": settings.scale, "group": settings.group, "hadamard": settings.hadamard,
                      "outliers": settings.outliers, "rounding": rounding} if bits else {}
        return Codec(topk=keep, bits=bits, lossless=settings.lossless, **quantizing)

    grad_bits = settings.bits if settings.grad_bits is None else settings.grad_bits
    return LinkCodecs(activation=codec(settings.bits, settings.rounding), gradient=codec(grad_bits, "stochastic"),
                      error_feedback=bool(settings.error_feedback))
