"""A small `tf.train.Example` codec on the protobuf wire format: no TensorFlow, no protobuf.

The messages involved:
  Example{features=1} -> Features{map<string, Feature> feature=1} -> Feature{bytes_list=1 |
  float_list=2 | int64_list=3}, each list a `repeated value=1`.
A map entry is a message {key=1, value=2}. A numeric list may be packed (all values in one
length-delimited field) or not (one field per value); protobuf parsers must accept both, even
mixed in one list, so `parse_example` does, and `encode_example` writes either.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# Feature's oneof field numbers.
BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3

FeatureValue = list[bytes] | np.ndarray
"""A decoded feature: a list of bytes, a float32 array or an int64 array."""


class DecodeError(ValueError):
    """The bytes are not a well-formed `tf.train.Example` (truncated or corrupt)."""


# -- decoding ---------------------------------------------------------------------------------
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError(f"truncated varint at byte {pos} of {len(buf)}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError(f"varint longer than 10 bytes ending at byte {pos}")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yields (field number, wire type, value): an int for varints, else a memoryview."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DecodeError(f"invalid field number 0 at byte {start}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield field, wire, value
            continue
        if wire == _LEN:
            size, pos = _varint(buf, pos)
        elif wire == _I64:
            size = 8
        elif wire == _I32:
            size = 4
        else:
            raise DecodeError(f"unsupported wire type {wire} for field {field} at byte {start}")
        if pos + size > len(buf):
            raise DecodeError(
                f"field {field} at byte {start} needs {size} bytes but only {len(buf) - pos} "
                "remain (truncated message)"
            )
        yield field, wire, buf[pos : pos + size]
        pos += size


def _packed_varints(chunk: memoryview) -> np.ndarray:
    """Decodes a packed run of varints as int64, vectorized (lists can hold thousands)."""
    b = np.frombuffer(chunk, np.uint8)
    if b.size == 0:
        return np.empty(0, np.int64)
    last = np.flatnonzero(b < 0x80)
    if last.size == 0 or last[-1] != b.size - 1:
        raise DecodeError("truncated varint in a packed int64 list")
    starts = np.concatenate([[0], last[:-1] + 1])
    pos = np.arange(b.size) - np.repeat(starts, last - starts + 1)
    if pos.max() > 9:
        raise DecodeError("varint longer than 10 bytes in a packed int64 list")
    # Each byte contributes 7 disjoint bits, so OR-ing the shifted groups sums them; the 10th
    # byte's excess bits fall off the top, leaving the two's complement of negative values.
    parts = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts).view(np.int64)


def _float_values(field_bytes: memoryview, wire: int) -> np.ndarray:
    if wire not in (_LEN, _I32) or len(field_bytes) % 4:
        raise DecodeError(f"float_list value of wire type {wire} and {len(field_bytes)} bytes")
    return np.frombuffer(field_bytes, "<f4")


def _int_values(value: Any, wire: int) -> np.ndarray:
    if wire == _LEN:
        return _packed_varints(value)
    if wire == _VARINT:
        return np.array([value], np.uint64).view(np.int64)
    raise DecodeError(f"int64_list value of wire type {wire}")


def _feature(buf: memoryview) -> FeatureValue:
    kind, parts = None, []
    for field, wire, value in _fields(buf):
        if field not in (BYTES_LIST, FLOAT_LIST, INT64_LIST) or wire != _LEN:
            continue  # Unknown fields are skipped, as protobuf does.
        if field != kind:  # A oneof keeps the last kind set.
            kind, parts = field, []
        for f, w, v in _fields(value):
            if f != 1:
                continue
            if field == BYTES_LIST:
                if w != _LEN:
                    raise DecodeError(f"bytes_list value of wire type {w}")
                parts.append(bytes(v))
            elif field == FLOAT_LIST:
                parts.append(_float_values(v, w))
            else:
                parts.append(_int_values(v, w))
    if kind == FLOAT_LIST:
        return np.concatenate(parts).astype(np.float32) if parts else np.empty(0, np.float32)
    if kind == INT64_LIST:
        return np.concatenate(parts) if parts else np.empty(0, np.int64)
    return parts  # A bytes list, or an empty Feature.


def _map_entry(buf: memoryview) -> tuple[str, FeatureValue]:
    key, feature = b"", []
    for field, wire, value in _fields(buf):
        if field == 1 and wire == _LEN:
            key = bytes(value)
        elif field == 2 and wire == _LEN:
            feature = _feature(value)
    try:
        return key.decode("utf-8"), feature
    except UnicodeDecodeError as e:
        raise DecodeError(f"feature name {key!r} is not UTF-8") from e


def parse_example(serialized: bytes) -> dict[str, FeatureValue]:
    """Decodes a serialized `tf.train.Example`.

    Args:
      serialized: the proto's bytes.

    Returns:
      {feature name: values}: a list of bytes for a bytes_list, float32[n] for a float_list,
      int64[n] for an int64_list.

    Raises:
      DecodeError: the bytes are truncated or not a well-formed Example.
    """
    out: dict[str, FeatureValue] = {}
    for field, wire, features in _fields(memoryview(serialized)):
        if field == 1 and wire == _LEN:
            for f, w, entry in _fields(features):
                if f == 1 and w == _LEN:
                    key, value = _map_entry(entry)
                    out[key] = value
    return out


# -- encoding ---------------------------------------------------------------------------------
def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # Negative int64s are written as 10-byte two's complement.
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint_bytes(field << 3 | _LEN) + _varint_bytes(len(payload)) + payload


def _kind_and_values(value: Any) -> tuple[int, list]:
    """Which list a Python or numpy value becomes, and its flat values."""
    if isinstance(value, bytes | str):
        value = [value]
    # Lists of bytes are taken as they are: numpy would drop trailing NUL bytes.
    if isinstance(value, list | tuple) and value and all(isinstance(v, bytes | str) for v in value):
        return BYTES_LIST, [v.encode() if isinstance(v, str) else v for v in value]
    arr = np.asarray(value)
    if arr.dtype.kind in "SU":
        return BYTES_LIST, [v.encode() if isinstance(v, str) else v for v in arr.ravel().tolist()]
    if arr.dtype.kind in "iub":
        return INT64_LIST, [int(v) for v in arr.ravel().tolist()]
    if arr.dtype.kind == "f":
        return FLOAT_LIST, arr.ravel().astype("<f4")
    raise TypeError(f"cannot encode a value of dtype {arr.dtype} as a tf.train.Feature")


def _encode_feature(value: Any, packed: bool) -> bytes:
    kind, values = _kind_and_values(value)
    if kind == BYTES_LIST:
        body = b"".join(_len_field(1, v) for v in values)
    elif kind == FLOAT_LIST and packed:
        body = _len_field(1, values.tobytes()) if len(values) else b""
    elif kind == FLOAT_LIST:
        body = b"".join(_varint_bytes(1 << 3 | _I32) + v.tobytes() for v in values)
    elif packed:
        raw = b"".join(_varint_bytes(v) for v in values)
        body = _len_field(1, raw) if values else b""
    else:
        body = b"".join(_varint_bytes(1 << 3 | _VARINT) + _varint_bytes(v) for v in values)
    return _len_field(kind, body)


def encode_example(features: Mapping[str, Any], *, packed: bool = True) -> bytes:
    """Serializes {name: values} as a `tf.train.Example`.

    Args:
      features: bytes or str values (or lists/arrays of them) become a bytes_list (str as
        UTF-8); floats a float_list (float32); ints and bools an int64_list. Scalars are lists
        of one value; arrays are flattened; an empty list becomes an empty float_list.
      packed: write numeric lists packed (as proto3 does) or one field per value.

    Returns:
      The serialized proto.

    Example:
      >>> parse_example(encode_example({"label": 3}))["label"].tolist()
      [3]
    """
    entries = b"".join(
        _len_field(1, _len_field(1, name.encode()) + _len_field(2, _encode_feature(v, packed)))
        for name, v in features.items()
    )
    return _len_field(1, entries)
