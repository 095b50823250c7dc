from __future__ import annotations

import pytest

from castore import canonical
from castore.errors import EncodingError
from tests.conftest import golden


def test_keys_sorted_and_smallest_ints() -> None:
    data = canonical.encode({"b": 1, "a": [0, 127, 128, -1, 2**40], "c": b"\x00", "d": None, "e": True})
    golden("canonical-sample.bin", data)
    assert canonical.decode(data) == {"a": [0, 127, 128, -1, 2**40], "b": 1, "c": b"\x00", "d": None, "e": True}
    # the shortest headers: fixmap of 5, fixstr key "a", fixarray of 5, positive fixint 0
    assert data[:5] == bytes([0x85, 0xA1, ord("a"), 0x95, 0x00])


def test_insertion_order_does_not_matter() -> None:
    assert canonical.encode({"x": 1, "y": {"b": 2, "a": 1}}) == canonical.encode({"y": {"a": 1, "b": 2}, "x": 1})


@pytest.mark.parametrize("bad", [{"f": 1.5}, {1: "int key"}, {"s": {1, 2}}])
def test_refuses_what_has_no_single_form(bad: object) -> None:
    with pytest.raises(EncodingError):
        canonical.encode(bad)


def test_decode_refuses_non_canonical_bytes() -> None:
    unsorted = bytes([0x82, 0xA1, ord("b"), 0x01, 0xA1, ord("a"), 0x02])
    with pytest.raises(EncodingError, match="canonical"):
        canonical.decode(unsorted)
    long_int = bytes([0xCD, 0x00, 0x01])  # uint16 holding 1: not the shortest form
    with pytest.raises(EncodingError, match="canonical"):
        canonical.decode(long_int)
    with pytest.raises(EncodingError, match=r"is not valid msgpack: a byte that starts no msgpack value$"):
        canonical.decode(b"\xc1")
