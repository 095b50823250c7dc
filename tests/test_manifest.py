from __future__ import annotations

import random
import re

import pytest

from castore import canonical
from castore.errors import EncodingError, UnsafeArchive
from castore.manifest import Entry, Image, Layer, Tree, normalize_path, object_record, path_key
from tests.conftest import golden
from tests.helpers import returns_within

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


@pytest.mark.parametrize("links", [
    [("a", "a")],                            # a tar entry that hard-links itself
    [("a", "b"), ("b", "a")],                # a cycle
    [("c", "a"), ("a", "b"), ("b", "a")],    # a chain into a cycle
])
def test_hard_link_cycles_are_refused(links: list[tuple[str, str]]) -> None:
    entries = [Entry(path, "hardlink", 0, target=target) for path, target in links]
    with returns_within(5), pytest.raises(UnsafeArchive, match=r"hard link '[abc]' -> '[ab]' leads back"):
        Tree.build(entries)
    with pytest.raises(UnsafeArchive, match="not an earlier file"):
        Tree((Entry("a", "hardlink", 0, target="a"),))


def _entry(base: dict[str, object] | None = None, **fields: object) -> dict[str, object]:
    rec: dict[str, object] = {"path": "a", "type": "fifo", "mode": 0o644, "uid": 0, "gid": 0, **(base or {})}
    rec.update(fields)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()
_FILE = {"type": "file", "blob": B1, "size": 6}
_DEV = {"type": "char", "major": 5, "minor": 1}
_LINK = {"type": "symlink", "target": "b"}


@pytest.mark.parametrize("rec, complaint", [
    (_entry(uid="root"), "uid 'root'"),
    (_entry(gid=-1), "gid -1"),
    (_entry(uid=2**63), "uid 9223372036854775808"),
    (_entry(uid=2**32), "uid 4294967296"),
    (_entry(uid=True), "uid True"),
    (_entry(mode="rw"), "mode 'rw'"),
    (_entry(mode=0o40755), "mode 16877"),
    (_entry(path=5), "path 5"),
    (_entry(type=5), "unknown entry type 5"),
    (_entry(type=["fifo"]), "unknown entry type"),
    (_entry(gid=_DROP), "lacks field 'gid'"),
    (_entry(blob=B1), "unexpected field 'blob'"),
    (_entry(_DEV, major="x"), "major 'x'"),
    (_entry(_DEV, minor=2**40), "minor 1099511627776"),
    (_entry(_DEV, major=_DROP), "lacks field 'major'"),
    (_entry(_LINK, target=7), "target"),
    (_entry(_LINK, target=""), "target"),
    (_entry(_LINK, target="a\0b"), "target"),
    (_entry(_FILE, size=-1), "size -1"),
    (_entry(_FILE, size="6"), "size '6'"),
    (_entry(_FILE, size=False), "size False"),
    (_entry(_FILE, blob=5), "blob id"),
    (_entry(_FILE, blob="x" * 64), "blob id"),
])
def test_decode_refuses_ill_typed_entries(rec: dict[str, object], complaint: str) -> None:
    data = canonical.encode({"format": 1, "kind": "tree", "entries": [rec]})
    with pytest.raises(EncodingError, match=re.escape(complaint)):
        Tree.decode(data)


@pytest.mark.parametrize("rec, complaint", [
    ({"format": 1, "kind": "tree"}, "lacks field 'entries'"),
    ({"format": 1, "kind": "tree", "entries": None}, "not a list"),
    ({"format": 1, "kind": "tree", "entries": 5}, "not a list"),
    ({"format": 1, "kind": "tree", "entries": [5]}, "not a map"),
    ({"format": 1, "kind": "tree", "entries": [], "extra": 1}, "unexpected field 'extra'"),
    ({"format": True, "kind": "tree", "entries": []}, "format True"),
])
def test_decode_refuses_malformed_tree_records(rec: dict[str, object], complaint: str) -> None:
    with pytest.raises(EncodingError, match=re.escape(complaint)):
        Tree.decode(canonical.encode(rec))


def _image(**fields: object) -> bytes:
    rec: dict[str, object] = {"format": 1, "kind": "image", "arch": "x86_64", "kernel": B1,
                              "layers": [{"blob": B2, "format": "squashfs"}], "cmdline": "console=ttyS0",
                              "overlay_size": 1 << 30, "vcpus": 1, "mem_mib": 128}
    rec.update(fields)
    return canonical.encode({k: v for k, v in rec.items() if v is not _DROP})


@pytest.mark.parametrize("data, complaint", [
    (_image(vcpus=-3), "vcpus -3"),
    (_image(vcpus=0), "vcpus 0"),
    (_image(vcpus=True), "vcpus True"),
    (_image(mem_mib="lots"), "mem_mib 'lots'"),
    (_image(mem_mib=0), "mem_mib 0"),
    (_image(overlay_size=-1), "overlay_size -1"),
    (_image(cmdline=["x"]), "cmdline ['x']"),
    (_image(arch=5), "arch 5"),
    (_image(kernel=5), "full ids"),
    (_image(layers=5), "not a list of maps"),
    (_image(layers=[{"blob": B2, "format": "ntfs"}]), "format 'ntfs'"),
    (_image(layers=[{"blob": B2}]), "lacks field 'format'"),
    (_image(layers=[]), "at least one"),
    (_image(mem_mib=_DROP), "lacks field 'mem_mib'"),
    (_image(extra=1), "unexpected field 'extra'"),
])
def test_image_decode_refuses_ill_typed_fields(data: bytes, complaint: str) -> None:
    with pytest.raises(EncodingError, match=re.escape(complaint)):
        Image.decode(data)
    assert Image.decode(_image()).vcpus == 1  # the well-formed one decodes


def test_errors_quote_hostile_values_briefly() -> None:
    data = canonical.encode({"format": 1, "kind": "tree", "entries": [_entry(uid="x" * 1_000_000)]})
    with pytest.raises(EncodingError, match="uid 'xxx") as err:
        Tree.decode(data)
    assert len(err.value.message) < 200
