from __future__ import annotations

import random

import pytest

from castore.errors import EncodingError, UnsafeArchive
from castore.manifest import Entry, Image, Layer, Tree, normalize_path, object_record, path_key
from tests.conftest import golden

B1 = "1" * 64
B2 = "2" * 64


def sample_tree() -> Tree:
    return Tree.build([
        Entry("bin/busybox", "file", 0o755, blob=B1, size=10),
        Entry("bin/sh", "symlink", 0o777, target="busybox"),
        Entry("dev/console", "char", 0o600, major=5, minor=1),
        Entry("etc/hostname", "file", 0o644, 0, 0, blob=B2, size=3),
        Entry("etc/alias", "hardlink", 0, target="etc/hostname"),
        Entry("run/fifo", "fifo", 0o644),
    ])


def test_tree_golden_bytes_and_roundtrip() -> None:
    t = sample_tree()
    data = t.encode()
    golden("tree.bin", data)
    assert Tree.decode(data) == t
    assert t.refs() == [B1, B2]
    # parents created, sorted by components, hard link made to follow its target
    assert [e.path for e in t][:3] == ["bin", "bin/busybox", "bin/sh"]
    assert t.get("etc/alias") is not None and t.get("etc/alias").type == "file"  # type: ignore[union-attr]
    assert t.get("etc/hostname").type == "hardlink"  # type: ignore[union-attr]


def test_image_golden_bytes() -> None:
    img = Image(kernel=B1, layers=(Layer(B2),), cmdline="console=ttyS0", overlay_size=1 << 30, vcpus=1, mem_mib=128)
    golden("image.bin", img.encode())
    assert Image.decode(img.encode()) == img
    assert img.refs() == [B1, B2]
    golden("object-record.bin", object_record("image", 123, [B2, B1]))


@pytest.mark.parametrize("path", ["../x", "a/../../b", "a\0b"])
def test_normalize_refuses_escapes(path: str) -> None:
    with pytest.raises(UnsafeArchive):
        normalize_path(path)


def test_normalize() -> None:
    assert normalize_path("/usr//bin/./x/") == "usr/bin/x"


def test_entries_below_a_symlink_are_refused() -> None:
    with pytest.raises(UnsafeArchive, match="not a dir"):
        Tree.build([Entry("etc", "symlink", 0o777, target="/tmp"), Entry("etc/passwd", "file", 0o644, blob=B1, size=1)])


def test_unsorted_or_duplicate_records_are_refused() -> None:
    a = Entry("a", "dir", 0o755)
    b = Entry("b", "dir", 0o755)
    with pytest.raises(EncodingError, match="sorted"):
        Tree((b, a))
    with pytest.raises(EncodingError, match="sorted"):
        Tree((a, a))
    with pytest.raises(EncodingError, match="parent"):
        Tree((Entry("x/y", "dir", 0o755),))
    with pytest.raises(EncodingError):
        Tree((Entry("f", "file", 0o644),))  # no blob
    with pytest.raises(EncodingError):
        Tree((Entry("f", "dir", 0o40755),))  # type bits in the mode


def test_path_key_orders_component_by_component() -> None:
    rng = random.Random(5)
    alphabet = ["a", "b", "-", ".", " ", "\x01", "\xe9", "ab", "a-b", "a.b"]
    paths = {"/".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    paths = {p for p in paths if p == normalize_path(p)}
    by_components = sorted(paths, key=lambda p: tuple(c.encode() for c in p.split("/")))
    assert sorted(paths, key=path_key) == by_components
    assert path_key("a/b") < path_key("a-b") < path_key("a.b/c")  # a directory's entries come first
