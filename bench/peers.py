"""Cache pulls of castore's peers (nix, ostree, curl, casync) from one nginx on 127.0.0.1.

peer_pulls(v1, v2, work) publishes the two images for each peer under work/srv (untimed), serves
work/srv with nginx and times each peer's pull command: "cold" = v1 into an empty destination,
"delta" = v2 into a destination that already holds v1 (pulled untimed, over the same HTTP).
Best of 3, each into a new directory under work/pulls; nothing is deleted before the caller removes
work (this machine's ext4 is slow to create files right after deleting many). Wire bytes and
requests: nginx's access log ($body_bytes_sent) for the best run. casync runs last: each of its
pulls creates and deletes thousands of files under $TMPDIR (default /var/tmp).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Argv = Sequence[str | Path]
Measure = Callable[[], "PeerPull"]
Log = list[list[str]]  # access log lines: method, uri, status, body bytes
NIX = ["nix", "--extra-experimental-features", "nix-command"]
DATA = Path("/var/tmp/castore-bench")


@dataclass
class PeerPull:
    seconds: float  # best-of-3 wall time of the pull command alone
    wire: int  # body bytes nginx sent for that pull
    requests: int
    note: str = ""


def run(argv: Argv, *, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(argv[0]).name} exited {proc.returncode}: {' | '.join(tail)}")
    return proc.stdout


def warm(paths: Sequence[Path]) -> None:
    """Read files (directories: every regular file below) into the page cache, untimed: this
    machine's proactive reclaim drops idle cache, and the first tool to read would pay for all."""
    for top in paths:
        files = [top] if top.is_file() else [Path(d, f) for d, _, fs in os.walk(top) for f in fs]
        for f in files:
            if f.is_file() and not f.is_symlink():
                with contextlib.suppress(OSError), open(f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def nix_env(cache: Path) -> dict[str, str]:
    """Debian's nix 2.8 as root: chroot stores, no daemon; its narinfo cache (sqlite) under `cache`."""
    return {**os.environ, "NIX_CONFIG": "build-users-group =\n", "XDG_CACHE_HOME": str(cache)}


class Nginx:
    """One nginx process (no master, one worker) serving `root`; stop() it."""

    def __init__(self, root: Path, home: Path) -> None:
        self.port, self.log, self._marks = free_port(), home / "access.log", itertools.count(1)
        home.mkdir(parents=True)
        temps = " ".join(f"{k}_temp_path {home}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (home / "nginx.conf").write_text(f"""daemon off; master_process off; worker_processes 1;
error_log {home}/error.log; pid {home}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format bytes '$request_method $uri $status $body_bytes_sent';
    access_log {self.log} bytes;
    sendfile on; keepalive_requests 1000000; {temps}
    server {{ listen 127.0.0.1:{self.port}; root {root}; location / {{ try_files $uri =404; }} }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(home / "nginx.conf"), "-p", str(home)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        err = home / "error.log"
        raise RuntimeError(f"nginx did not start: {err.read_text()[-300:] if err.exists() else ''}")

    def lines(self) -> list[str]:
        """The access log once every request made so far is in it: the one worker logs a request in
        the event handler that sends its last bytes, so a request made now is logged after them all."""
        mark = f"/.mark-{next(self._marks)}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", mark)
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = self.log.read_text().splitlines()
            if any(f" {mark} " in line for line in got):
                return [line for line in got if " /.mark-" not in line]
            time.sleep(0.01)
        raise RuntimeError("nginx did not log a request within 5 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Lab:
    v1: Path
    v2: Path
    work: Path
    srv: Path  # what nginx serves
    nginx: Nginx
    serial: itertools.count[int]

    def best(self, name: str, argv: Callable[[Path], Argv], setup: Callable[[Path], object] = Path,
             env: Callable[[Path], dict[str, str] | None] = lambda d: None, note: str = "",
             explain: Callable[[Log], str] = lambda log: "") -> PeerPull:
        """Best of 3 pulls, each into a new directory: setup (untimed), os.sync(), then the pull alone."""
        runs: list[tuple[PeerPull, Log]] = []
        for _ in range(3):
            d = self.work / "pulls" / f"{name}-{next(self.serial)}"
            d.mkdir(parents=True)
            setup(d)
            before = len(self.nginx.lines())
            warm([self.srv])
            os.sync()
            t = time.perf_counter()
            run(argv(d), env=env(d))
            seconds = time.perf_counter() - t
            log = [line.split() for line in self.nginx.lines()[before:]]
            runs.append((PeerPull(seconds, sum(int(w[3]) for w in log), len(log)), log))
        pull, log = min(runs, key=lambda r: r[0].seconds)
        wires = sorted(p.wire for p, _ in runs)
        varied = f"wire varied over the 3 runs: {wires[0]}..{wires[-1]} B" if wires[-1] > wires[0] * 1.01 else ""
        pull.note = "; ".join(n for n in (note, explain(log), varied) if n)
        return pull


def nix_peer(lab: Lab) -> dict[str, Measure]:
    stage = lab.work / "nix-publish"
    env = nix_env(stage / "xdg")
    v1, v2 = (run(["nix-store", "--store", stage / "store", "--add-fixed", "sha256", f], env=env).strip()
              for f in (lab.v1, lab.v2))
    run([*NIX, "copy", "--from", stage / "store", "--to", f"file://{lab.srv}/nix?compression=zstd", v1, v2], env=env)

    # --add-fixed makes content-addressed paths (narinfo "CA: fixed:sha256:..."), which nix takes from a
    # substituter without signatures: no --no-check-sigs or require-sigs = false needed. Each destination
    # has its own XDG_CACHE_HOME, where nix caches nix-cache-info and the narinfos it fetched.
    def pull(path: str) -> Callable[[Path], Argv]:
        return lambda d: [*NIX, "copy", "--from", f"{lab.nginx.url}/nix", "--to", d / "store", path]

    def env_of(d: Path) -> dict[str, str]:
        return nix_env(d / "xdg")

    return {"cold": lambda: lab.best("nix-cold", pull(v1), env=env_of),
            "delta": lambda: lab.best("nix-delta", pull(v2), setup=lambda d: run(pull(v1)(d), env=env_of(d)),
                                      env=env_of)}


def ostree_repo(lab: Lab) -> Path:
    """An archive repo with a summary (as published repos have), branches v1 and v2 of one file each."""
    repo = lab.srv / "ostree" / "repo"
    if repo.exists():
        if not (repo / "summary").exists():
            raise RuntimeError("publishing the ostree repo failed (see the ostree peer)")
        return repo
    repo.mkdir(parents=True)
    run(["ostree", f"--repo={repo}", "init", "--mode=archive"])
    for ref, f in (("v1", lab.v1), ("v2", lab.v2)):
        tree = lab.work / "ostree-trees" / ref
        tree.mkdir(parents=True)
        link_or_copy(f, tree / "image.sqfs")
        run(["ostree", f"--repo={repo}", "commit", f"--branch={ref}", f"--tree=dir={tree}"])
    run(["ostree", f"--repo={repo}", "summary", "-u"])
    return repo


def ostree_peer(lab: Lab, static_delta: bool = False) -> dict[str, Measure]:
    """By default `ostree pull` looks for a static delta from the commit the ref has locally (from nothing
    when cold) and, when the repo has none, fetches each missing object whole: here all of v2's file.
    static_delta: a copy of the repo (hard links) with a bsdiff delta v1 -> v2, which the pull fetches
    instead. ostree before 2023.7 (Debian 12: 2022.7) also scans the delta's target commit while the delta
    part is being applied and fetches the changed file whole as well (ostreedev/ostree#2053, fc5aef6f)."""
    repo, note = ostree_repo(lab), ""
    if static_delta:
        copy = repo.with_name("repo-delta")
        run(["cp", "-al", repo, copy])
        (copy / "config").unlink()  # a file of its own: ostree may rewrite it
        shutil.copyfile(repo / "config", copy / "config")
        t = time.perf_counter()
        run(["ostree", f"--repo={copy}", "static-delta", "generate", "--from=v1", "--to=v2"])
        note = f"delta generated in {time.perf_counter() - t:.0f} s (untimed)"
        run(["ostree", f"--repo={copy}", "summary", "-u"])
        repo = copy
    remote = f"{lab.nginx.url}/{repo.relative_to(lab.srv)}"

    def pull(ref: str) -> Callable[[Path], Argv]:
        return lambda d: ["ostree", f"--repo={d}/repo", "pull", "r", ref]

    def empty(d: Path) -> None:
        run(["ostree", f"--repo={d}/repo", "init", "--mode=bare-user"])
        run(["ostree", f"--repo={d}/repo", "remote", "add", "--no-gpg-verify", "r", remote])

    def holding_v1(d: Path) -> None:
        empty(d)
        run(pull("v1")(d))

    def loose(log: Log) -> str:  # file objects fetched whole next to a delta
        filez = sum(int(w[3]) for w in log if w[1].endswith(".filez"))
        return f"{filez} B of it loose .filez objects" if filez and any("/deltas/" in w[1] for w in log) else ""

    def delta() -> PeerPull:
        return lab.best("ostree-sd-delta" if static_delta else "ostree-delta", pull("v2"), setup=holding_v1,
                        note=note, explain=loose)

    if static_delta:
        return {"delta": delta}
    return {"cold": lambda: lab.best("ostree-cold", pull("v1"), setup=empty), "delta": delta}


def curl_peer(lab: Lab) -> dict[str, Measure]:
    link_or_copy(lab.v1, lab.srv / "v1.sqfs")
    return {"cold": lambda: lab.best("curl", lambda d: ["curl", "-sSf", "-o", d / "v1.sqfs",
                                                        f"{lab.nginx.url}/v1.sqfs"])}


def casync_peer(lab: Lab, tmpdir: str | None = None) -> dict[str, Measure]:
    """casync extract hands each chunk from its HTTP helper over through a directory of files and symlinks
    it makes and deletes in $TMPDIR (default /var/tmp): thousands per pull, slow on this machine's ext4
    after recent deletions. tmpdir: run it with TMPDIR there instead (a tmpfs), to show casync's own cost."""
    pub = lab.srv / "casync"
    if not (pub / "v2.caibx").exists():
        pub.mkdir()  # fails if an earlier attempt failed
        for ref, f in (("v1", lab.v1), ("v2", lab.v2)):
            run(["casync", "make", f"--store={pub}/default.castr", pub / f"{ref}.caibx", f])
    if tmpdir and not os.path.ismount(tmpdir):
        raise RuntimeError(f"{tmpdir} is not a mount point (a tmpfs)")
    env = {**os.environ, "TMPDIR": tmpdir} if tmpdir else None
    url, name = f"{lab.nginx.url}/casync", "casync-shm" if tmpdir else "casync"
    extract = ["casync", "extract", f"--store={url}/default.castr"]

    def cold() -> PeerPull:
        return lab.best(f"{name}-cold", lambda d: [*extract, f"{url}/v1.caibx", d / "v1.sqfs"], env=lambda d: env)

    def delta() -> PeerPull:
        return lab.best(f"{name}-delta", lambda d: [*extract, f"--seed={d}/v1.sqfs", f"{url}/v2.caibx", d / "v2.sqfs"],
                        setup=lambda d: shutil.copyfile(lab.v1, d / "v1.sqfs"), env=lambda d: env)

    return {"cold": cold, "delta": delta}


PEERS: list[tuple[str, Sequence[str], Callable[[Lab], dict[str, Measure]]]] = [
    ("nix", ("cold", "delta"), nix_peer),
    ("ostree", ("cold", "delta"), ostree_peer),
    ("ostree (static delta)", ("delta",), lambda lab: ostree_peer(lab, static_delta=True)),
    ("curl (whole file)", ("cold",), curl_peer),
    ("casync", ("cold", "delta"), casync_peer),  # last: see the module docstring
    ("casync (TMPDIR=/dev/shm)", ("cold", "delta"), lambda lab: casync_peer(lab, "/dev/shm")),
]


def why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def peer_pulls(v1: Path, v2: Path, work: Path) -> dict[str, dict[str, PeerPull | str]]:
    """{"cold": {peer: PeerPull or why it failed}, "delta": {...}}; work: a new directory, removed by the caller."""
    work = work.resolve()
    (work / "srv").mkdir()
    out: dict[str, dict[str, PeerPull | str]] = {"cold": {}, "delta": {}}
    nginx = Nginx(work / "srv", work / "nginx")
    try:
        lab = Lab(v1.resolve(), v2.resolve(), work, work / "srv", nginx, itertools.count(1))
        for name, kinds, prepare in PEERS:
            try:  # one failing peer must not hide the others
                measures = prepare(lab)
            except Exception as exc:
                for kind in kinds:
                    out[kind][name] = f"publishing failed: {why(exc)}"
                continue
            for kind, measure in measures.items():
                try:
                    out[kind][name] = measure()
                except Exception as exc:
                    out[kind][name] = why(exc)
    finally:
        nginx.stop()
    return out


def main() -> int:
    v1, v2 = DATA / "minbase.sqfs", DATA / "minbase-v2.sqfs"
    work = Path(tempfile.mkdtemp(prefix="castore-peers-", dir="/var/tmp"))
    try:
        found = peer_pulls(v1, v2, work)
    finally:
        shutil.rmtree(work)
    print(f"v1 {v1} ({v1.stat().st_size / 2**20:.1f} MiB), v2 {v2} ({v2.stat().st_size / 2**20:.1f} MiB)")
    head = f"{'pull':6} {'peer':25} {'time':>8} {'wire':>11} {'requests':>8}  note"
    print(head + "\n" + "-" * len(head))
    for kind, peers in found.items():
        for name, p in peers.items():
            if isinstance(p, str):
                print(f"{kind:6} {name:25} failed: {p}")
            else:
                print(f"{kind:6} {name:25} {p.seconds:6.3f} s {p.wire / 2**20:7.2f} MiB {p.requests:8}  {p.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
