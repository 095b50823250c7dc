"""castore benchmark: figures and ratios against its peers, all measured in this run.

Data: a Debian bookworm minbase tree (debootstrap, mirror read from this machine's apt
configuration) and its gzip squashfs, cached under /var/tmp/castore-bench. Prints a table and
writes the same rows to /var/tmp/castore-bench/results.json.

Every timed import writes into a new directory under runs/, removed at the end of the run:
ext4 without a journal (this machine's root) skips inodes freed in the last 60 s (360 s while
their inode table block is dirty; `recently_deleted`), so creating thousands of files right
after deleting thousands costs seconds of system time, for castore and its peers alike. The
time of the clean-up is recorded, and the next run's imports start at least INODE_AGE after it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
CASTORE = str(BIN / "castore")
WORK = Path("/var/tmp/castore-bench")
RUNS = WORK / "runs"
TREE, NODEV, SQFS = WORK / "minbase", WORK / "minbase-nodev", WORK / "minbase.sqfs"
SUITE = "bookworm"
INODE_AGE = 360.0  # recently_deleted: inodes whose table block was dirty stay skipped this long
# Debian's nix 2.8 as root without a daemon: a chroot store (--store DIR), no nixbld group
NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\n", "XDG_CACHE_HOME": f"{WORK}/cache"}
Argv = Sequence[str | Path]
_serial = iter(range(1, 1 << 30))
BEST_CPU: dict[str, float] = {}  # name -> CPU seconds (user+sys) of its best run


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


def run(argv: Argv, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(argv[0]).name} exited {proc.returncode}: {' | '.join(tail)}")
    return proc.stdout


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def new_dir(name: str) -> Path:
    """A path under runs/ that has never existed in this run."""
    return RUNS / f"{name}-{next(_serial)}"


def best_of(n: int, argv: Callable[[Path], Argv], name: str,
            setup: Callable[[Path], object] = Path, env: dict[str, str] | None = None) -> float:
    """Best wall time of n runs, each into a new directory; setup (untimed), then sync, first."""
    times = []
    for _ in range(n):
        d = new_dir(name)
        setup(d)
        os.sync()
        t, c = time.perf_counter(), child_cpu()
        run(argv(d), env=env)
        times.append((time.perf_counter() - t, child_cpu() - c))
    BEST_CPU[name] = min(times)[1]
    return min(times)[0]


def peer(row: Row, name: str, measure: Callable[[], float]) -> None:
    try:
        row.peers[name] = measure()
    except (RuntimeError, OSError) as exc:
        row.peers[name] = str(exc)


def apt_mirror(suite: str = SUITE) -> str:
    """The first URI apt uses for `suite` with component main (one-line and deb822 files)."""
    d = Path("/etc/apt/sources.list.d")
    files = [d.parent / "sources.list", *sorted(d.glob("*.list")), *sorted(d.glob("*.sources"))]
    for f in (p for p in files if p.is_file()):
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for para in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in para.splitlines():
                    if ":" in line and not line.startswith(("#", " ", "\t")):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if (fields.get("enabled", ["yes"]) != ["no"] and "deb" in fields.get("types", [])
                        and suite in fields.get("suites", [])
                        and "main" in fields.get("components", []) and fields.get("uris")):
                    return fields["uris"][0]
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                return words[1]
    raise RuntimeError(f"no 'deb ... {suite} main' source in /etc/apt; cannot run debootstrap")


def cached(dest: Path, make: Callable[[Path], object]) -> None:
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        rm(tmp)
        make(tmp)
        tmp.rename(dest)


def prepare_data() -> list[str]:
    def debootstrap(d: Path) -> None:
        mirror = apt_mirror()
        say(f"debootstrap --variant=minbase {SUITE} {d} {mirror} (cached for later runs)")
        run(["debootstrap", "--variant=minbase", SUITE, d, mirror])

    def nodev(d: Path) -> None:  # nix and ostree refuse device nodes
        run(["cp", "-a", TREE, d])
        run(["find", d, "!", "-type", "f", "!", "-type", "d", "!", "-type", "l", "-delete"])

    cached(TREE, debootstrap)
    cached(NODEV, nodev)
    cached(SQFS, lambda d: run(["gensquashfs", "--pack-dir", TREE, "--compressor", "gzip", d]))
    count = [sum(1 for _ in t.rglob("*")) for t in (TREE, NODEV)]
    size = sum(p.lstat().st_size for p in TREE.rglob("*") if p.is_file() and not p.is_symlink())
    return [f"data: {TREE} ({count[0]} entries, {size / 1e6:.0f} MB of files), its squashfs "
            f"{SQFS.stat().st_size / 2**20:.1f} MiB; nix and ostree import {NODEV}, the same "
            f"tree without its {count[0] - count[1]} device nodes, which they cannot store"]


def judge(row: Row, limit: float) -> Row:
    assert row.castore is not None
    times = [v for v in row.peers.values() if isinstance(v, float)]
    row.ratio = row.castore / min(times) if times else None
    row.ok = row.castore <= limit and all(row.castore < t for t in times)
    return row


def bench_tree_import() -> Row:
    row = Row("import the minbase tree", "<=1.2 s, faster than nix and ostree")
    row.castore = best_of(3, lambda s: [CASTORE, "--store", s, "add", "--all-root", TREE], "cs")
    peer(row, "nix-store --add", lambda: best_of(
        3, lambda s: ["nix-store", "--store", s, "--add", NODEV], "nix", env=NIX_ENV))
    peer(row, "ostree commit (bare)", lambda: best_of(
        3, lambda r: ["ostree", f"--repo={r}", "commit", "--branch=b", f"--tree=dir={NODEV}"],
        "ostree", setup=lambda r: run(["ostree", f"--repo={r}", "init", "--mode=bare"])))
    row.notes.append(cpu_note("cs", "nix", "ostree"))
    row.notes.append(durability([
        ("castore", lambda d: [CASTORE, "--store", d, "add", "--all-root", TREE], None),
        ("nix", lambda d: ["nix-store", "--store", d, "--add", NODEV], NIX_ENV),
    ]))
    return judge(row, limit=1.2)


def durability(tools: list[tuple[str, Callable[[Path], Argv], dict[str, str] | None]]) -> str:
    """How many fsync-family calls each tool makes for the same import (one untimed run under strace):
    what is synced is what survives a power cut."""
    found = []
    for name, argv, env in tools:
        out = new_dir(f"strace-{name}")
        trace = out.with_suffix(".strace")
        try:
            run(["strace", "-f", "-c", "-o", trace, "-e", "trace=fsync,fdatasync,syncfs,sync",
                 *map(str, argv(out))], env=env)
        except (RuntimeError, OSError) as exc:
            found.append(f"{name}: strace failed ({exc})")
            continue
        calls = {line.split()[-1]: int(line.split()[-2]) for line in trace.read_text().splitlines()
                 if line.split() and line.split()[-1] in ("fsync", "fdatasync", "syncfs", "sync")}
        found.append(f"{name} " + (", ".join(f"{n} {c}" for n, c in sorted(calls.items())) or "none"))
    return "durability, sync calls per import: " + "; ".join(found)


def cpu_note(*names: str) -> str:
    return "CPU s (user+sys) of the best runs: " + ", ".join(
        f"{n} {BEST_CPU[n]:.2f}" for n in names if n in BEST_CPU)


def bench_file_import() -> Row:
    row = Row("import the squashfs file", "<=0.1 s, faster than nix")
    row.castore = best_of(3, lambda s: [CASTORE, "--store", s, "add", SQFS], "cs-file")
    peer(row, "nix-store --add-fixed sha256", lambda: best_of(
        3, lambda s: ["nix-store", "--store", s, "--add-fixed", "sha256", SQFS], "nix-file",
        env=NIX_ENV))
    cp = best_of(3, lambda d: ["cp", SQFS, d / "copy"], "cp-file", setup=lambda d: d.mkdir())
    row.notes.append(f"for scale, cp of the same file (no hash, no fsync): {cp:.3f} s")

    def staged_copy(d: Path) -> None:  # untimed: a file on the store's filesystem to move in
        d.mkdir()
        shutil.copyfile(SQFS, d / "rootfs.img")

    move = best_of(3, lambda d: [CASTORE, "--store", d / "store", "add", "--move", d / "rootfs.img"],
                   "cs-move", setup=staged_copy)
    row.notes.append(f"castore add --move (rename in, hash, fsync; no copy): {move:.3f} s")
    row.notes.append(cpu_note("cs-file", "nix-file"))
    if row.castore > 0.1:
        from castore.store import LocalStore

        t0 = time.perf_counter()
        with LocalStore(new_dir("cs-file")) as store:
            t1 = time.perf_counter()
            store.add_file(SQFS)
            t2 = time.perf_counter()
        row.notes.append(f"in-process: opening a new store {t1 - t0:.3f} s, add_file {t2 - t1:.3f}"
                         " s; the rest is interpreter start-up and imports")
    return judge(row, limit=0.1)


def realized(store: Path, target: str) -> bool:
    try:
        out = run([CASTORE, "--store", store, "realize", "--dry-run", "--json", target], cwd=ROOT)
        return all(p["action"] == "present" for p in json.loads(out)["plans"])
    except (RuntimeError, ValueError, KeyError):
        return False


def bench_noop_realize() -> Row:
    from castore.config import default_store

    store = Path(os.environ.get("CASTORE_BENCH_STORE") or default_store())
    target = "recipes/app.py"
    row = Row(f"no-op realize {target}", "<=0.15 s (median of 10)")
    if not (store / "db.sqlite").exists() or not realized(store, target):
        store, target = WORK / "stores" / "realize", "recipes/app.py:rootfs"
        row.notes.append(f"recipes/app.py is not realized in the default store (set "
                         f"CASTORE_BENCH_STORE); timed {target} in {store} instead")
        row.what = f"no-op realize {target}"
        say(f"realizing {target} into {store} (untimed)")
        run([CASTORE, "--store", store, "realize", target], cwd=ROOT)
    argv = [CASTORE, "--store", str(store), "realize", target]
    times = []
    for _ in range(11):  # the first is a warm-up
        t = time.perf_counter()
        run(argv, cwd=ROOT)
        times.append(time.perf_counter() - t)
    row.castore = statistics.median(times[1:])
    row.ok = row.castore <= 0.15
    if not row.ok:
        proc = subprocess.run([BIN / "python", "-X", "importtime", "-m", "castore.cli", *argv[1:]],
                              cwd=ROOT, capture_output=True, text=True)
        found = re.findall(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", proc.stderr)
        top = sorted(((int(c), int(s), n) for s, c, n in found), reverse=True)[:8]
        row.notes.append("python -X importtime of the no-op, top 8 cumulative:")
        row.notes += [f"  {c / 1e3:6.1f} ms cumulative {s / 1e3:6.1f} ms self  {n}"
                      for c, s, n in top]
    return row


def bench_squashfs() -> Row:
    from castore.builders import BuildContext, TreeInput
    from castore.builders.squashfs import BUILD
    from castore.store import LocalStore

    row = Row("squashfs of the tree (gzip, 2 jobs)", "<=1.1x gensquashfs --pack-dir")
    name = "gensquashfs --pack-dir"
    ours: list[tuple[float, float]] = []  # (wall, cpu) per round, rounds interleaved
    theirs: list[tuple[float, float]] = []
    with LocalStore(new_dir("cs-squashfs")) as store:
        tid = store.add_dir(TREE, all_root=True)
        tree = store.read_tree(tid)
        for _ in range(3):
            scratch = new_dir("squashfs-build")
            scratch.mkdir(parents=True)
            with open(scratch / "build.log", "wb") as log:
                ctx = BuildContext(scratch=scratch, out=scratch / "out.sqfs",
                                   params={"compression": "gzip", "block_size": 131072},
                                   inputs={"tree": TreeInput(tid, tree)}, plan_hash="0" * 64,
                                   blob_path=store.blob_path, log=log, jobs=2)
                os.sync()
                t, c = time.perf_counter(), child_cpu()
                BUILD["squashfs"](ctx)
                ours.append((time.perf_counter() - t, child_cpu() - c))
            if not isinstance(row.peers.get(name), str):
                c = child_cpu()
                try:
                    wall = best_of(1, lambda o: ["gensquashfs", "--pack-dir", TREE, "--compressor",
                                                 "gzip", "-j", "2", o], "direct")
                    theirs.append((wall, child_cpu() - c))
                except (RuntimeError, OSError) as exc:
                    row.peers[name] = str(exc)
    row.castore = min(w for w, _ in ours)
    if theirs and name not in row.peers:
        row.peers[name] = min(w for w, _ in theirs)
        row.ratio = row.castore / min(w for w, _ in theirs)
        row.ok = row.ratio <= 1.1
        for who, rounds in (("castore", ours), ("direct", theirs)):
            row.notes.append(f"{who} rounds (wall s, CPU s): "
                             + ", ".join(f"({w:.1f}, {c:.1f})" for w, c in rounds))
    return row


def fmt(v: float | str | None) -> str:
    return "-" if v is None else f"{v:.3f} s" if isinstance(v, float) else "failed"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    meta: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "load1": load, "cores": cores}
    if load > cores / 2:
        say(f"warning: load average {load:.1f} on {cores} cores; figures will be noisy")
    stamp = WORK / "cleaned-at"
    if RUNS.exists():  # a run that did not finish: clean up now, then wait below
        rm(RUNS)
        os.sync()
        stamp.write_text(str(time.time()))
    RUNS.mkdir(parents=True)
    cleaned = float(stamp.read_text()) if stamp.exists() else 0.0
    try:
        data_notes = prepare_data()
    except (RuntimeError, OSError) as exc:
        say(f"error: cannot prepare the data: {exc}")
        return 1
    meta["data"] = data_notes
    rows: dict[str, Row] = {}
    order = (bench_noop_realize, bench_squashfs, bench_tree_import, bench_file_import)
    for bench in order:
        if bench is bench_tree_import and (wait := cleaned + INODE_AGE - time.time()) > 0:
            say(f"waiting {wait:.0f} s for the inodes freed by the clean-up to age")
            time.sleep(wait)
        say(f"running {bench.__name__}")
        try:
            rows[bench.__name__] = bench()
        except Exception as exc:  # one failing benchmark must not hide the others
            rows[bench.__name__] = Row(bench.__name__, "-", notes=[f"failed: {exc}"])
    shown = [rows[b.__name__] for b in (order[2], order[3], order[0], order[1])]
    print("\n".join(data_notes))
    head = f"{'what':36} {'castore':>9}  {'peer':29} {'time':>9} {'ratio':>6}  {'target':36} result"
    print(head + "\n" + "-" * len(head))
    for r in shown:
        peers: list[tuple[str, float | str | None]] = [*r.peers.items()] or [("-", None)]
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        result = {True: "PASS", False: "FAIL", None: "n/a"}[r.ok]
        print(f"{r.what:36} {fmt(r.castore):>9}  {peers[0][0]:29} {fmt(peers[0][1]):>9} "
              f"{ratio:>6}  {r.target:36} {result}")
        print("".join(f"{'':48}{n:29} {fmt(v):>9}\n" for n, v in peers[1:]), end="")
        print("".join(f"    {n} failed: {v}\n" for n, v in peers if isinstance(v, str)), end="")
        print("".join(f"    {n}\n" for n in r.notes), end="")
    (WORK / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in shown]}, indent=2) + "\n")
    print(f"results: {WORK / 'results.json'}; a missed target does not fail the run")
    rm(RUNS)  # see the module docstring: the next run waits for these inodes to age
    os.sync()
    stamp.write_text(str(time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
