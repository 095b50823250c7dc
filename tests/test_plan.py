from __future__ import annotations

import pytest

from castore.errors import EncodingError
from castore.plan import Plan, Source, hash_graph, plan_record, walk
from tests.conftest import golden


def describe(plan: Plan) -> tuple[int, dict[str, str]]:
    return 1, {"gensquashfs": "gensquashfs (fstools) 1.2.0"} if plan.builder == "squashfs" else {}


def graph() -> Plan:
    src = Source("/somewhere/init.sh", "a" * 64, 10)
    t = Plan("tree", "tree", params={"ops": [{"op": "file", "path": "sbin/init", "input": "in0"}]},
             inputs={"in0": src}, name="t", origin="x.py:1")
    return Plan("squashfs", "blob", params={"compression": "zstd"}, inputs={"tree": t}, name="r", origin="x.py:2")


def test_plan_record_golden_and_hash_stable() -> None:
    order, hashes = hash_graph(graph(), describe)
    assert [p.builder for p in order] == ["tree", "squashfs"]
    h, data = hashes[id(order[-1])]
    golden("plan-squashfs.bin", data)
    again = graph()
    assert hash_graph(again, describe)[1][id(again)][0] == h
    assert len(h) == 64


def test_what_changes_the_hash() -> None:
    base = hash_graph(graph(), describe)
    h0 = base[1][id(base[0][-1])][0]

    def root_hash(p: Plan, d=describe) -> str:  # type: ignore[no-untyped-def]
        o, hs = hash_graph(p, d)
        return hs[id(o[-1])][0]

    # same plan made again, different names and origins: same hash
    g = graph()
    g.name, g.origin = "other", "elsewhere.py:99"
    assert root_hash(g) == h0
    # a parameter, an input's content, the builder version or a tool version: new hash
    g = graph()
    g.params["compression"] = "xz"
    assert root_hash(g) != h0
    g = graph()
    tree = next(g.plan_inputs())
    tree.inputs["in0"] = Source("/somewhere/init.sh", "b" * 64, 10)
    assert root_hash(g) != h0
    assert root_hash(graph(), lambda p: (2, describe(p)[1])) != h0
    assert root_hash(graph(), lambda p: (1, {"gensquashfs": "1.3.0"} if p.builder == "squashfs" else {})) != h0


def test_source_paths_are_not_hashed() -> None:
    a = Plan("source", "blob", inputs={"file": Source("/a/x", "c" * 64, 1)})
    b = Plan("source", "blob", inputs={"file": Source("/b/y", "c" * 64, 1)})
    assert plan_record(a, 1, {}, {}) == plan_record(b, 1, {}, {})


def test_shared_inputs_walked_once() -> None:
    shared = Plan("fetch", "blob", params={"url": "file:///x"})
    u1 = Plan("unpack", "tree", inputs={"archive": shared})
    u2 = Plan("tree_get", "blob", params={"path": "a"}, inputs={"tree": u1})
    root = Plan("image", "image", inputs={"kernel": shared, "layer0": u2}, params={"layers": 1})
    order = walk(root)
    assert len(order) == 4 and order[0] is shared and order[-1] is root


def test_unencodable_parameters_are_a_castore_error() -> None:
    """The backstop behind the recipe checks: msgpack's own errors never escape as tracebacks."""
    with pytest.raises(EncodingError, match=r"not valid UTF-8 text: '\\udc80'"):
        Plan("tree", "tree", params={"ops": [{"content": "x\udc80"}]}, name="t")
    with pytest.raises(EncodingError, match="out of range"):
        Plan("tree", "tree", params={"ops": [{"uid": 2**64}]}, name="t")
