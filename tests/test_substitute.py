"""realize substitutes from caches only what a trusted, unrevoked key signed for that very plan."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from castore import canonical
from tests.conftest import castore, castore_json
from tests.helpers import cache_server

TARGET = "tests/recipes/small.py:rootfs"


def _keys(tmp_path: Path, name: str) -> tuple[Path, str]:
    secret = tmp_path / f"{name}.secret"
    public = castore("key", "generate", name, "--out", str(secret)).stdout.strip()
    return secret, public


def _published(tmp_path: Path, secret: Path | None) -> tuple[Path, dict[str, Any]]:
    a, cache = tmp_path / "a", tmp_path / "cache"
    res = castore_json("realize", TARGET, store=a)
    env = {"CASTORE_SECRET_KEY_FILES": str(secret) if secret else "", "CASTORE_CONFIG": os.devnull}
    castore("push", res["id"], "--to", str(cache), store=a, env=env)
    return cache, res


def _realize_b(tmp_path: Path, cache: Path | str, trusted: str, revoked: str = "") -> Any:
    env = {"CASTORE_SUBSTITUTERS": str(cache), "CASTORE_TRUSTED_PUBLIC_KEYS": trusted,
           "CASTORE_REVOKED_KEYS": revoked, "CASTORE_CONFIG": os.devnull}
    proc = castore("realize", TARGET, "--json", store=tmp_path / "b", env=env)
    import json

    return json.loads(proc.stdout), proc.stderr


def test_signed_realisation_is_substituted_and_nothing_is_built(tmp_path: Path) -> None:
    secret, public = _keys(tmp_path, "lab-1")
    cache, res = _published(tmp_path, secret)
    out, _ = _realize_b(tmp_path, cache, public)
    assert out["id"] == res["id"] and out["built"] == [] and out["substituted"] == ["rootfs"]
    assert castore_json("verify", store=tmp_path / "b")["ok"]
    shown = castore_json("show", out["id"], store=tmp_path / "b")
    assert shown["plans"][0]["record"]["builder"] == "squashfs"  # the plan came along
    log = castore("log", out["id"], store=tmp_path / "b", check=False)
    assert log.returncode == 1 and "was substituted from" in log.stderr and "not built here" in log.stderr


def test_a_substituted_realisation_is_passed_on_with_its_signatures_not_signed_again(tmp_path: Path) -> None:
    """Lab 2 substituted lab 1's build: its push carries lab-1's signature and adds none of its own
    (as Nix signs only what it builds), with or without a key of its own."""
    from castore.cache.layout import RealisationRecord, realisation_path
    from castore.cache.transport import DirTransport

    secret_1, public_1 = _keys(tmp_path, "lab-1")
    secret_2, public_2 = _keys(tmp_path, "lab-2")
    cache, res = _published(tmp_path, secret_1)
    out, _ = _realize_b(tmp_path, cache, public_1)
    assert out["substituted"] == ["rootfs"]
    shown = castore_json("show", out["id"], store=tmp_path / "b")
    assert shown["plans"][0]["substituted_from"] == f"file://{cache}"
    for secrets in (str(secret_2), ""):
        cache_2 = tmp_path / f"cache-2{'-keyless' if not secrets else ''}"
        env = {"CASTORE_SECRET_KEY_FILES": secrets, "CASTORE_CONFIG": os.devnull,
               "CASTORE_TRUSTED_PUBLIC_KEYS": public_1}  # what the mirror trusts, as when it substituted
        castore("push", out["id"], "--to", str(cache_2), store=tmp_path / "b", env=env)
        plan = shown["plans"][0]["plan"]
        rec = RealisationRecord.decode(plan, DirTransport(cache_2).get(realisation_path(plan)) or b"")
        assert [name for name, _ in rec.signatures] == ["lab-1"]
    shutil.rmtree(tmp_path / "b")
    out, err = _realize_b(tmp_path, tmp_path / "cache-2", public_2)  # lab-2 never vouched for it
    assert out["substituted"] == [] and "no signature from a trusted key" in err
    out, _ = _realize_b(tmp_path, tmp_path / "cache-2", public_1)
    assert out["id"] == res["id"] and out["built"] == []
    built = castore_json("show", res["id"], store=tmp_path / "a")
    assert built["plans"][0]["substituted_from"] is None
    # a key revoked since is not passed on: nothing vouches for the realisation any more
    env = {"CASTORE_SUBSTITUTERS": str(cache), "CASTORE_TRUSTED_PUBLIC_KEYS": public_1, "CASTORE_CONFIG": os.devnull}
    assert castore_json("realize", TARGET, store=tmp_path / "c", env=env)["substituted"] == ["rootfs"]
    env = {"CASTORE_SECRET_KEY_FILES": str(secret_2), "CASTORE_CONFIG": os.devnull,
           "CASTORE_TRUSTED_PUBLIC_KEYS": public_1, "CASTORE_REVOKED_KEYS": "lab-1"}
    proc = castore("push", out["id"], "--to", str(tmp_path / "cache-3"), store=tmp_path / "c", env=env)
    assert "not pushed" in proc.stderr and not list((tmp_path / "cache-3" / "realisations").glob("*"))


def test_a_store_from_before_substitutions_were_recorded_signs_only_what_it_built(tmp_path: Path) -> None:
    """A realisation without a build log was substituted: after the upgrade, push does not sign it."""
    import sqlite3

    secret_1, public_1 = _keys(tmp_path, "lab-1")
    secret_2, _ = _keys(tmp_path, "lab-2")
    cache, res = _published(tmp_path, secret_1)
    out, _ = _realize_b(tmp_path, cache, public_1)
    plan = castore_json("show", out["id"], store=tmp_path / "b")["plans"][0]["plan"]
    (tmp_path / "b" / "logs" / f"{plan}.log").write_text("# squashfs rootfs\n\nerror: a build that failed first\n")
    for store in ("a", "b"):  # what a store of castore before schema 3 holds
        db = sqlite3.connect(tmp_path / store / "db.sqlite")
        db.execute("DROP TABLE substitutions")
        db.execute("PRAGMA user_version = 2")
        db.commit()
        db.close()
    env = {"CASTORE_SECRET_KEY_FILES": str(secret_2), "CASTORE_CONFIG": os.devnull}
    proc = castore("push", out["id"], "--to", str(tmp_path / "from-b"), store=tmp_path / "b", env=env)
    assert "not pushed" in proc.stderr and not list((tmp_path / "from-b" / "realisations").glob("*"))
    assert "before castore recorded" in castore_json("show", out["id"], store=tmp_path / "b")["plans"][0][
        "substituted_from"]
    castore("push", res["id"], "--to", str(tmp_path / "from-a"), store=tmp_path / "a", env=env)
    assert len(list((tmp_path / "from-a" / "realisations").glob("*"))) == 1  # built there: signed


def test_unsigned_untrusted_and_revoked_realisations_are_not_used(tmp_path: Path) -> None:
    secret, public = _keys(tmp_path, "lab-1")
    _, stranger = _keys(tmp_path, "other-1")
    cache, _ = _published(tmp_path, secret)
    for trusted, revoked, why in ((stranger, "", "signed by lab-1 (not trusted)"),
                                  (public, "lab-1", "signed by lab-1 (revoked)"), (public, public, "(revoked)")):
        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        out, err = _realize_b(tmp_path, cache, trusted, revoked)
        assert out["substituted"] == [] and out["built"] == ["layer", "rootfs"]
        assert "no signature from a trusted key" in err and why in err
    shutil.rmtree(tmp_path / "b")
    (tmp_path / "u").mkdir()
    unsigned_cache, _ = _published(tmp_path / "u", None)
    out, _ = _realize_b(tmp_path, unsigned_cache, public)
    assert out["substituted"] == [] and out["built"] == ["layer", "rootfs"]


def test_a_realisation_signed_for_another_plan_is_refused(tmp_path: Path) -> None:
    secret, public = _keys(tmp_path, "lab-1")
    cache, _ = _published(tmp_path, secret)
    realisations = sorted((cache / "realisations").iterdir())
    assert len(realisations) == 1
    # serve the rootfs plan's realisation under the hash of the layer plan (a "replay" attack)
    dry = castore_json("realize", TARGET, "--dry-run", store=tmp_path / "fresh")
    layer_plan = dry["plans"][0]["plan"]
    shutil.copy(realisations[0], cache / "realisations" / layer_plan)
    realisations[0].unlink()
    out, err = _realize_b(tmp_path, cache, public)
    assert out["substituted"] == [] and "another plan" in err


def test_a_malformed_realisation_is_noted_and_the_plan_built(tmp_path: Path) -> None:
    """A substituter serving a realisation whose object is not an id: a note, then a local build."""
    secret, public = _keys(tmp_path, "lab-1")
    cache, res = _published(tmp_path, secret)
    [path] = (cache / "realisations").iterdir()
    rec = canonical.decode(path.read_bytes())
    assert isinstance(rec, dict)
    path.write_bytes(canonical.encode({**rec, "object": 5}))
    with cache_server(cache) as (url, _):
        out, err = _realize_b(tmp_path, url, public)
    assert out["id"] == res["id"] and out["substituted"] == [] and out["built"] == ["layer", "rootfs"]
    assert "cannot substitute plan" in err and "names 5, not an object id" in err and "Traceback" not in err


def test_a_realisation_whose_object_the_cache_records_as_another_kind_is_not_used(tmp_path: Path) -> None:
    """The layer plan makes a tree; a cache records that tree as a blob (so its files would never be
    fetched, and an honest cache could not fix the store later): noted, and built instead."""
    from castore.cache.layout import ObjectRecord, object_path

    secret, public = _keys(tmp_path, "lab-1")
    a, cache = tmp_path / "a", tmp_path / "cache"
    layer = castore_json("realize", "tests/recipes/small.py:layer", store=a)["id"]
    env = {"CASTORE_SECRET_KEY_FILES": str(secret), "CASTORE_CONFIG": os.devnull}
    castore("push", layer, "--to", str(cache), store=a, env=env)
    record = cache / object_path(layer)
    rec = ObjectRecord.decode(layer, record.read_bytes())
    record.write_bytes(ObjectRecord(layer, "blob", rec.size, (), rec.chunks).encode())
    env = {"CASTORE_SUBSTITUTERS": str(cache), "CASTORE_TRUSTED_PUBLIC_KEYS": public,
           "CASTORE_CONFIG": os.devnull}
    proc = castore("realize", "tests/recipes/small.py:layer", "--json", store=tmp_path / "b", env=env)
    import json

    out = json.loads(proc.stdout)
    assert out["id"] == layer and out["substituted"] == [] and out["built"] == ["layer"]
    assert "as a blob, but it was asked for as a tree" in proc.stderr
    assert castore_json("show", layer, store=tmp_path / "b")["kind"] == "tree"


def test_a_substituter_that_cannot_be_asked_is_asked_once(tmp_path: Path) -> None:
    from tests.helpers import free_port

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: each ask costs its retries
    proc = castore("realize", "tests/recipes/small.py:rootfs", "--json", store=tmp_path / "s",
                   env={"CASTORE_SUBSTITUTERS": down})
    assert proc.stderr.count("not asked again in this run") == 1  # two plans, one ask
    assert "Traceback" not in proc.stderr


def test_a_dry_run_says_what_would_be_substituted(tmp_path: Path) -> None:
    secret, public = _keys(tmp_path, "lab-1")
    cache, res = _published(tmp_path, secret)
    env = {"CASTORE_SUBSTITUTERS": str(cache), "CASTORE_TRUSTED_PUBLIC_KEYS": public,
           "CASTORE_CONFIG": os.devnull}
    dry = castore_json("realize", TARGET, "--dry-run", store=tmp_path / "b", env=env)
    assert [p["action"] for p in dry["plans"]] == ["not needed", "substitute"]  # the layer is not needed
    assert castore_json("ls", store=tmp_path / "b") == []  # nothing fetched
    text = castore("realize", TARGET, "--dry-run", store=tmp_path / "b", env=env).stdout
    assert "1 of 2 steps would run" in text and "substitute" in text
    out = castore_json("realize", TARGET, store=tmp_path / "b", env=env)
    assert out["substituted"] == ["rootfs"] and out["built"] == [] and out["id"] == res["id"]


def test_realisations_pushed_by_two_labs_at_once_keep_both_signatures(tmp_path: Path) -> None:
    """Two pushes may read the realisation before either writes it: the cache merges what it is given."""
    from castore.cache.layout import RealisationRecord
    from castore.cache.server import CacheApp, add_token
    from castore.cache.transport import DirTransport
    from castore.cache.trust import read_secret_key, signed
    from tests.test_cache_server import asgi

    secret_1, public_1 = _keys(tmp_path, "lab-1")
    secret_2, public_2 = _keys(tmp_path, "lab-2")
    cache, _ = _published(tmp_path, secret_1)
    path = next((cache / "realisations").iterdir())
    first = RealisationRecord.decode(path.name, path.read_bytes())
    # lab-2's push read the realisation before lab-1's was written: it signs an unsigned one
    late = signed(RealisationRecord(first.plan, first.object, first.record), [read_secret_key(secret_2)])
    DirTransport(cache).put(f"realisations/{path.name}", late.encode())
    both = RealisationRecord.decode(path.name, path.read_bytes())
    assert sorted(name for name, _ in both.signatures) == ["lab-1", "lab-2"]
    out, _ = _realize_b(tmp_path, cache, public_2)  # each lab's key alone is enough
    assert out["substituted"] == ["rootfs"]
    # the same through castore serve
    path.write_bytes(first.encode())
    token = add_token(cache, ["write"], "ci")
    answer = asgi(CacheApp(cache), "PUT", f"/realisations/{path.name}", late.encode(), token)
    assert answer.status_code in (200, 201, 204), answer.text
    both = RealisationRecord.decode(path.name, path.read_bytes())
    assert sorted(name for name, _ in both.signatures) == ["lab-1", "lab-2"] and public_1
