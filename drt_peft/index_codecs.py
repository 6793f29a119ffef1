"""Lossless encodings of ψ (sorted flat indices) for checkpoints; the smallest one is stored.

- ``int32``: 4 bytes per index;
- ``varint``: gaps between consecutive indices (minus one) in LEB128, 7 bits per byte — at 1%
  density the mean gap is ~100, so about 1.3 bytes per index;
- ``bitmap``: one bit per weight entry, best above ~25% density.
"""

from __future__ import annotations

import numpy as np

CODECS = ("int32", "varint", "bitmap")


def _varint_encode(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.uint64)
    nbytes = np.ones(values.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += values >= np.uint64(1) << np.uint64(7 * k)
    starts = np.cumsum(nbytes) - nbytes
    position = np.arange(int(nbytes.sum()), dtype=np.int64) - np.repeat(starts, nbytes)
    payload = (np.repeat(values, nbytes) >> (np.uint64(7) * position.astype(np.uint64))) & np.uint64(0x7F)
    more = position < np.repeat(nbytes, nbytes) - 1
    return (payload | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)


def _varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    ends = np.flatnonzero((data & 0x80) == 0)
    if ends.size != count or (count and ends[-1] != data.size - 1):
        raise ValueError(f"varint data holds {ends.size} complete values, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if count and lengths.max() > 10:
        raise ValueError("varint value longer than 10 bytes")
    position = np.arange(data.size, dtype=np.int64) - np.repeat(starts, lengths)
    parts = (data.astype(np.uint64) & np.uint64(0x7F)) << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(parts, starts) if count else np.zeros(0, dtype=np.uint64)


def encode(indices: np.ndarray, numel: int, codec: str) -> np.ndarray:
    """Bytes (uint8 array) of sorted unique ``indices`` < ``numel`` under ``codec``."""
    if codec == "int32":
        if numel > 2**31:
            raise ValueError("int32 index encoding needs fewer than 2**31 weight entries")
        return indices.astype("<i4").view(np.uint8)
    if codec == "varint":
        gaps = np.diff(indices.astype(np.int64), prepend=np.int64(-1)) - 1
        return _varint_encode(gaps)
    if codec == "bitmap":
        mask = np.zeros(numel, dtype=bool)
        mask[indices] = True
        return np.packbits(mask, bitorder="little")
    raise ValueError(f"unknown index codec {codec!r}; known: {list(CODECS)}")


def encoded_size(indices: np.ndarray, numel: int, codec: str) -> int:
    """Byte length of :func:`encode` without building the bitmap."""
    if codec == "bitmap":
        return (numel + 7) // 8
    if codec == "int32":
        return 4 * indices.size
    return int(encode(indices, numel, codec).size)


def encode_smallest(indices: np.ndarray, numel: int) -> tuple[str, np.ndarray]:
    """``(codec, bytes)`` of the smallest lossless encoding (ties: the earlier in :data:`CODECS`)."""
    usable = [c for c in CODECS if not (c == "int32" and numel > 2**31)]
    best = min(usable, key=lambda c: encoded_size(indices, numel, c))
    return best, encode(indices, numel, best)


def decode(data: np.ndarray, codec: str, count: int, numel: int) -> np.ndarray:
    """Inverse of :func:`encode`; validates ``count``, order and range, raising ``ValueError`` if broken."""
    data = np.asarray(data, dtype=np.uint8)
    if codec == "int32":
        if data.size != 4 * count:
            raise ValueError(f"int32 indices: {data.size} bytes for {count} indices")
        indices = data.view("<i4").astype(np.int64)
    elif codec == "varint":
        indices = np.cumsum(_varint_decode(data, count).astype(np.int64) + 1) - 1
    elif codec == "bitmap":
        if data.size != (numel + 7) // 8:
            raise ValueError(f"bitmap of {data.size} bytes for a weight of {numel} entries")
        indices = np.flatnonzero(np.unpackbits(data, bitorder="little", count=numel))
        if indices.size != count:
            raise ValueError(f"bitmap marks {indices.size} entries, expected {count}")
    else:
        raise ValueError(f"unknown index codec {codec!r}; known: {list(CODECS)}")
    if count and (indices[0] < 0 or indices[-1] >= numel or (np.diff(indices) <= 0).any()):
        raise ValueError("indices are out of range or not strictly increasing")
    return indices
