"""Canonical msgpack: the one encoding every hashed record goes through.

Grammar (a restriction of msgpack, so any msgpack reader can read it)::

    value  := nil | bool | int | str | bin | array | map
    int    := the shortest msgpack encoding of the integer (fixint first)
    str    := UTF-8 text, shortest str header
    bin    := raw bytes, shortest bin header
    array  := shortest array header, then its values in order
    map    := shortest map header, then key/value pairs with str keys,
              sorted by the UTF-8 bytes of the key, no duplicates

Floats, ext types and non-str map keys are refused. ``decode`` refuses bytes
that are not exactly what ``encode`` would produce for the decoded value, so a
record has one byte form and therefore one hash. This is the only module that
imports msgpack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from castore.errors import EncodingError

Value = Any  # None | bool | int | str | bytes | list[Value] | dict[str, Value]


def _normalize(value: Value, where: str) -> Value:
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, float):
        raise EncodingError(f"floats are not allowed in canonical records (at {where})")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise EncodingError(f"map keys must be str, got {type(key).__name__} at {where}")
        # Code point order is UTF-8 byte order, so sorting the str keys sorts their bytes.
        return {key: _normalize(value[key], f"{where}.{key}") for key in sorted(value)}
    if isinstance(value, Sequence):
        return [_normalize(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise EncodingError(f"cannot encode {type(value).__name__} canonically (at {where})")


_PLAIN = frozenset({type(None), bool, int, str, bytes})


class _Unusual(Exception):
    pass


def _fast(value: Value) -> Value:
    """_normalize for plain dicts, lists and scalars, without building a path per element;
    anything else (floats, bad keys, other types) goes to _normalize for its precise error."""
    kind = type(value)
    if kind is list or kind is tuple:
        return [v if type(v) in _PLAIN else _fast(v) for v in value]
    if kind is dict:
        if not all(type(k) is str for k in value):
            raise _Unusual
        return {k: value[k] if type(value[k]) in _PLAIN else _fast(value[k]) for k in sorted(value)}
    if kind in _PLAIN:
        return value
    raise _Unusual


def encode(value: Value) -> bytes:
    try:
        plain = _fast(value)
    except _Unusual:
        plain = _normalize(value, "$")
    data: bytes = msgpack.packb(plain, use_bin_type=True)
    return data


# msgpack's errors that have no text of their own
_SILENT = {"FormatError": "a byte that starts no msgpack value", "StackError": "nested too deeply"}


def decode(data: bytes, what: str = "record") -> Value:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        why = str(exc) or _SILENT.get(type(exc).__name__, type(exc).__name__)
        raise EncodingError(f"{what} is not valid msgpack: {why}") from exc
    except TypeError as exc:
        raise EncodingError(f"{what} has a non-str map key") from exc
    if encode(value) != data:
        raise EncodingError(f"{what} is not in canonical form")
    return value
