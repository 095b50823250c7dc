"""castore benchmark: figures and ratios against its peers, all measured in this run.

Data: a Debian bookworm minbase tree (debootstrap, mirror read from this machine's apt
configuration) and its gzip squashfs, both cached under /var/tmp/castore-bench. Prints a
table and writes the same rows to /var/tmp/castore-bench/results.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
CASTORE = str(BIN / "castore")
WORK = Path("/var/tmp/castore-bench")
TREE, NODEV, SQFS = WORK / "minbase", WORK / "minbase-nodev", WORK / "minbase.sqfs"
SUITE = "bookworm"
NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\n", "XDG_CACHE_HOME": str(WORK / "cache")}


@dataclass
class Row:
    what: str
    target: str
    castore: float | None = None
    peers: dict[str, float | str] = field(default_factory=dict)  # seconds, or why it failed
    ratio: float | None = None
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(argv[0]).name} exited {proc.returncode}: {' | '.join(tail)}")
    return proc.stdout


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def best_of(n: int, argv: list[str], setup: Callable[[], None] | None = None,
            env: dict[str, str] | None = None) -> float:
    """Best wall time of n runs; setup (untimed) runs before each, then a sync."""
    times = []
    for _ in range(n):
        if setup:
            setup()
        os.sync()
        t = time.perf_counter()
        run(argv, env=env)
        times.append(time.perf_counter() - t)
    return min(times)


def fresh(*paths: Path) -> Callable[[], None]:
    def setup() -> None:
        for p in paths:
            rm(p)

    return setup


def apt_mirror(suite: str = SUITE) -> str:
    """The first URI that apt uses for `suite` with component main (one-line and deb822)."""
    d = Path("/etc/apt")
    files = [d / "sources.list", *sorted((d / "sources.list.d").glob("*.list"))]
    files += sorted((d / "sources.list.d").glob("*.sources"))
    for f in (p for p in files if p.is_file()):
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for para in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in para.splitlines():
                    if ":" in line and not line.startswith(("#", " ", "\t")):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if (fields.get("enabled", "yes").lower() != "no"
                        and "deb" in fields.get("types", "").split()
                        and suite in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split()
                        and fields.get("uris")):
                    return fields["uris"].split()[0]
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                return words[1]
    raise RuntimeError(f"no 'deb ... {suite} main' source in /etc/apt; cannot run debootstrap")


def prepare_data() -> list[str]:
    notes = []
    if not (TREE / "etc" / "os-release").exists():
        mirror = apt_mirror()
        say(f"debootstrap --variant=minbase {SUITE} from {mirror} (cached for later runs)")
        tmp = WORK / "minbase.tmp"
        rm(tmp)
        run(["debootstrap", "--variant=minbase", SUITE, tmp, mirror])
        rm(TREE)
        tmp.rename(TREE)
    if not (NODEV / "etc" / "os-release").exists():  # nix and ostree refuse device nodes
        tmp = WORK / "minbase-nodev.tmp"
        rm(tmp)
        run(["cp", "-a", TREE, tmp])
        run(["find", tmp, "!", "-type", "f", "!", "-type", "d", "!", "-type", "l", "-delete"])
        rm(NODEV)
        tmp.rename(NODEV)
    if not SQFS.exists():
        say("gensquashfs of the tree (cached)")
        tmp = WORK / "minbase.sqfs.tmp"
        rm(tmp)
        run(["gensquashfs", "--pack-dir", TREE, "--compressor", "gzip", "--quiet", tmp])
        tmp.rename(SQFS)
    entries = int(run(["sh", "-c", f"find {TREE} -mindepth 1 | wc -l"]))
    special = entries - int(run(["sh", "-c", f"find {NODEV} -mindepth 1 | wc -l"]))
    size = int(run(["du", "-sb", TREE]).split()[0])
    notes.append(f"tree {TREE}: {entries} entries, {size / 1e6:.0f} MB; "
                 f"squashfs {SQFS.stat().st_size / 2**20:.1f} MiB")
    notes.append(f"nix and ostree import {NODEV}: the same tree minus its {special} device "
                 "nodes, which they cannot store")
    return notes


def bench_tree_import() -> Row:
    row = Row("import the minbase tree", "<=1.2 s, faster than nix and ostree")
    s = WORK / "stores" / "tree"
    row.castore = best_of(3, [CASTORE, "--store", s, "add", "--all-root", TREE], fresh(s))
    nix = WORK / "nixstore-tree"
    try:
        row.peers["nix-store --add"] = best_of(
            3, ["nix-store", "--store", nix, "--add", NODEV], fresh(nix), env=NIX_ENV)
    except (RuntimeError, OSError) as exc:
        row.peers["nix-store --add"] = str(exc)
    repo = WORK / "ostree-repo"

    def init_repo() -> None:
        rm(repo)
        run(["ostree", f"--repo={repo}", "init", "--mode=bare"])

    try:
        row.peers["ostree commit (bare)"] = best_of(
            3, ["ostree", f"--repo={repo}", "commit", "--branch=b", f"--tree=dir={NODEV}"], init_repo)
    except (RuntimeError, OSError) as exc:
        row.peers["ostree commit (bare)"] = str(exc)
    return judge(row, limit=1.2)


def bench_file_import() -> Row:
    row = Row("import the squashfs file", "<=0.1 s, faster than nix")
    s = WORK / "stores" / "file"
    row.castore = best_of(3, [CASTORE, "--store", s, "add", SQFS], fresh(s))
    nix = WORK / "nixstore-file"
    try:
        row.peers["nix-store --add-fixed sha256"] = best_of(
            3, ["nix-store", "--store", nix, "--add-fixed", "sha256", SQFS], fresh(nix), env=NIX_ENV)
    except (RuntimeError, OSError) as exc:
        row.peers["nix-store --add-fixed sha256"] = str(exc)
    if row.castore > 0.1:
        from castore.store import LocalStore

        rm(s)
        with LocalStore(s) as store:
            t = time.perf_counter()
            store.add_file(SQFS)
            row.notes.append(f"add_file in-process takes {time.perf_counter() - t:.3f} s; "
                             "the rest is interpreter start-up and imports")
    return judge(row, limit=0.1)


def judge(row: Row, limit: float) -> Row:
    assert row.castore is not None
    times = [v for v in row.peers.values() if isinstance(v, float)]
    row.ratio = row.castore / min(times) if times else None
    row.ok = row.castore <= limit and all(row.castore < t for t in times)
    return row


def realized(store: Path, target: str) -> bool:
    try:
        out = run([CASTORE, "--store", store, "realize", "--dry-run", "--json", target], cwd=ROOT)
    except RuntimeError:
        return False
    return all(p["action"] == "present" for p in json.loads(out)["plans"])


def bench_noop_realize() -> Row:
    from castore.config import default_store

    store = Path(os.environ.get("CASTORE_BENCH_STORE") or default_store())
    target = "recipes/app.py"
    row = Row(f"no-op realize {target}", "<=0.15 s (median of 10)")
    if not (store / "db.sqlite").exists() or not realized(store, target):
        row.notes.append(f"{target} is not realized in {store} (set CASTORE_BENCH_STORE); "
                         "timing the no-op realize of recipes/app.py:rootfs instead")
        store, target = WORK / "stores" / "realize", "recipes/app.py:rootfs"
        row.what = f"no-op realize {target}"
        say(f"realizing {target} into {store} (untimed)")
        run([CASTORE, "--store", store, "realize", target], cwd=ROOT)
    argv = [CASTORE, "--store", str(store), "realize", target]
    if shutil.which("hyperfine"):
        out = WORK / "hyperfine.json"
        cmd = " ".join(argv)
        run(["hyperfine", "-N", "--warmup", "1", "--runs", "10", "--export-json", out, cmd],
            cwd=ROOT)
        row.castore = statistics.median(json.loads(out.read_text())["results"][0]["times"])
    else:
        times = []
        for _ in range(10):
            t = time.perf_counter()
            run(argv, cwd=ROOT)
            times.append(time.perf_counter() - t)
        row.castore = statistics.median(times)
    row.ok = row.castore <= 0.15
    if not row.ok:
        row.notes += importtime([str(BIN / "python"), "-X", "importtime", "-m", "castore.cli",
                                 *argv[1:]])
    return row


def importtime(argv: list[str]) -> list[str]:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m[2]), int(m[1]), m[4]))
    rows.sort(reverse=True)
    return ["python -X importtime, top 8 cumulative imports of the no-op path:"] + [
        f"  {cum / 1000:7.1f} ms cumulative {own / 1000:6.1f} ms self  {name}"
        for cum, own, name in rows[:8]]


def bench_squashfs() -> Row:
    from castore.builders import BuildContext, TreeInput
    from castore.builders.squashfs import SQUASHFS
    from castore.store import LocalStore

    row = Row("squashfs of the tree (gzip, 2 jobs)", "<=1.1x gensquashfs --pack-dir")
    with LocalStore(WORK / "stores" / "squashfs") as store:
        tid = store.add_dir(TREE, all_root=True)
        tree = store.read_tree(tid)
        times = []
        for _ in range(2):
            scratch = WORK / "squashfs-scratch"
            rm(scratch)
            scratch.mkdir()
            with open(scratch / "build.log", "wb") as log:
                ctx = BuildContext(scratch=scratch, out=scratch / "out.sqfs",
                                   params={"compression": "gzip", "block_size": 131072},
                                   inputs={"tree": TreeInput(tid, tree)}, plan_hash="0" * 64,
                                   blob_path=store.blob_path, log=log, jobs=2)
                os.sync()
                t = time.perf_counter()
                SQUASHFS.build(ctx)
                times.append(time.perf_counter() - t)
        row.castore = min(times)
        size = (scratch / "out.sqfs").stat().st_size
    out = WORK / "direct.sqfs"
    peer = "gensquashfs --pack-dir"
    try:
        row.peers[peer] = best_of(2, ["gensquashfs", "--pack-dir", TREE, "--compressor", "gzip",
                                      "-j", "2", "--quiet", out], fresh(out))
        row.notes.append(f"sizes: castore {size / 2**20:.1f} MiB, "
                         f"direct {out.stat().st_size / 2**20:.1f} MiB")
    except (RuntimeError, OSError) as exc:
        row.peers[peer] = str(exc)
    if isinstance(row.peers[peer], float):
        row.ratio = row.castore / float(row.peers[peer])
        row.ok = row.ratio <= 1.1
    return row


def fmt(v: float | str | None) -> str:
    return "-" if v is None else f"{v:.3f} s" if isinstance(v, float) else "failed"


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    meta: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "load1": load, "cores": cores}
    if load > cores / 2:
        say(f"warning: load average {load:.1f} on {cores} cores; figures will be noisy")
    try:
        data_notes = prepare_data()
        meta["data"] = data_notes
    except (RuntimeError, OSError) as exc:
        say(f"error: cannot prepare the data: {exc}")
        return 1
    rows: list[Row] = []
    for bench in (bench_tree_import, bench_file_import, bench_noop_realize, bench_squashfs):
        say(f"running {bench.__name__}")
        try:
            rows.append(bench())
        except Exception as exc:  # one failing benchmark must not hide the others
            rows.append(Row(bench.__name__, "-", notes=[f"failed: {exc}"]))
    print("\n".join(data_notes))
    head = f"{'what':40} {'castore':>9}  {'peer':32} {'time':>9} {'ratio':>6}  {'target':38} result"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        peers = list(r.peers.items()) or [("-", None)]
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        result = {True: "PASS", False: "FAIL", None: "n/a"}[r.ok]
        print(f"{r.what:40} {fmt(r.castore):>9}  {peers[0][0]:32} {fmt(peers[0][1]):>9} "
              f"{ratio:>6}  {r.target:38} {result}")
        for name, value in peers[1:]:
            print(f"{'':40} {'':>9}  {name:32} {fmt(value):>9}")
        for name, value in r.peers.items():
            if isinstance(value, str):
                print(f"    {name} failed: {value}")
        for note in r.notes:
            print(f"    {note}")
    (WORK / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"results: {WORK / 'results.json'}")
    return 0  # a missed target is a figure to read, not a broken benchmark


if __name__ == "__main__":
    sys.exit(main())
