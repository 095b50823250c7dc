"""Cache pulls of castore's peers (nix, casync, ostree, curl) from one nginx on 127.0.0.1.

peer_pulls(v1, v2, work) publishes the two images for each peer under work/srv (untimed), serves
work/srv with nginx and times each peer's pull command: "cold" = v1 into an empty destination,
"delta" = v2 into a destination that already holds v1 (pulled untimed, over the same HTTP).
Best of 3, each into a new directory under work/pulls (nothing is deleted before the caller
removes work: this machine's ext4 is slow to reuse freshly freed inodes). Wire bytes and
requests come from nginx's access log ($body_bytes_sent), for the best run.
"""

from __future__ import annotations

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
NIX = ["nix", "--extra-experimental-features", "nix-command"]


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
    """Debian's nix 2.8 as root, chroot stores, no daemon; its narinfo cache (sqlite) in `cache`."""
    return {**os.environ, "NIX_CONFIG": "build-users-group =\n", "XDG_CACHE_HOME": str(cache)}


class Nginx:
    """One nginx process (no master, one worker) serving `root`, logging method, URI, status, body bytes."""

    def __init__(self, root: Path, home: Path) -> None:
        self.port, self.log, self._marks = free_port(), home / "access.log", itertools.count(1)
        home.mkdir(parents=True)
        temps = " ".join(f"{k}_temp_path {home}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (home / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1;
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
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        err = home / "error.log"
        self.stop()
        raise RuntimeError(f"nginx did not start: {err.read_text()[-300:] if err.exists() else ''}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[str]:
        """The log once every request made so far is in it: the one worker logs a request in the
        same event handler as its last write, so a request made now is logged after them all."""
        token = f"/.mark-{next(self._marks)}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", token)
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = self.log.read_text().splitlines() if self.log.exists() else []
            if any(f" {token} " in line for line in got):
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
    nginx: Nginx
    serial: itertools.count[int]

    @property
    def srv(self) -> Path:
        return self.work / "srv"

    def fresh(self, name: str) -> Path:
        d = self.work / "pulls" / f"{name}-{next(self.serial)}"
        d.mkdir(parents=True)
        return d

    def best(self, name: str, argv: Callable[[Path], Argv], setup: Callable[[Path], object] = Path,
             env: Callable[[Path], dict[str, str] | None] = lambda d: None,
             explain: Callable[[list[list[str]]], str] = lambda log: "") -> PeerPull:
        """Best of 3 pulls, each into a new directory: setup (untimed), os.sync(), then the pull alone."""
        runs: list[tuple[PeerPull, list[list[str]]]] = []
        for _ in range(3):
            d = self.fresh(name)
            setup(d)
            before = len(self.nginx.lines())
            os.sync()
            t = time.perf_counter()
            run(argv(d), env=env(d))
            seconds = time.perf_counter() - t
            log = [line.split() for line in self.nginx.lines()[before:]]
            runs.append((PeerPull(seconds, sum(int(w[3]) for w in log), len(log)), log))
        pull, log = min(runs, key=lambda r: r[0].seconds)
        wires = sorted(p.wire for p, _ in runs)
        varied = f"wire varied over the 3 runs: {wires[0]}..{wires[-1]} B" if wires[0] != wires[-1] else ""
        pull.note = "; ".join(n for n in (explain(log), varied) if n)
        return pull


def nix_peer(lab: Lab) -> dict[str, Measure]:
    stage = lab.work / "nix-publish"
    env = nix_env(stage / "xdg")
    v1, v2 = (run(["nix-store", "--store", stage / "store", "--add-fixed", "sha256", f], env=env).strip()
              for f in (lab.v1, lab.v2))
    run([*NIX, "copy", "--from", stage / "store", "--to", f"file://{lab.srv}/nix?compression=zstd", v1, v2], env=env)

    # --add-fixed makes content-addressed paths (narinfo CA: fixed:sha256:...), which nix accepts from
    # a substituter without signatures: no --no-check-sigs / require-sigs = false needed. Each
    # destination has its own XDG_CACHE_HOME: nix caches nix-cache-info and narinfos there.
    def pull(path: str) -> Callable[[Path], Argv]:
        return lambda d: [*NIX, "copy", "--from", f"{lab.nginx.url}/nix", "--to", d / "store", path]

    def env_of(d: Path) -> dict[str, str]:
        return nix_env(d / "xdg")

    return {"cold": lambda: lab.best("nix-cold", pull(v1), env=env_of),
            "delta": lambda: lab.best("nix-delta", pull(v2), setup=lambda d: run(pull(v1)(d), env=env_of(d)),
                                      env=env_of)}


def casync_peer(lab: Lab) -> dict[str, Measure]:
    pub = lab.srv / "casync"
    pub.mkdir(parents=True)
    for ref, f in (("v1", lab.v1), ("v2", lab.v2)):
        run(["casync", "make", f"--store={pub}/default.castr", pub / f"{ref}.caibx", f])
    url = f"{lab.nginx.url}/casync"
    store = f"--store={url}/default.castr"
    return {"cold": lambda: lab.best("casync-cold", lambda d: ["casync", "extract", store, f"{url}/v1.caibx",
                                                               d / "v1.sqfs"]),
            "delta": lambda: lab.best("casync-delta", lambda d: ["casync", "extract", store, f"--seed={d}/v1.sqfs",
                                                                 f"{url}/v2.caibx", d / "v2.sqfs"],
                                      setup=lambda d: shutil.copyfile(lab.v1, d / "v1.sqfs"))}


def ostree_repo(lab: Lab) -> Path:
    """An archive repo (with a summary, as published repos have) with branches v1 and v2: one file each."""
    repo = lab.srv / "ostree" / "repo"
    if not repo.exists():
        repo.mkdir(parents=True)
        run(["ostree", f"--repo={repo}", "init", "--mode=archive"])
        for ref, f in (("v1", lab.v1), ("v2", lab.v2)):
            tree = lab.work / "ostree-trees" / ref
            tree.mkdir(parents=True)
            link_or_copy(f, tree / "image.sqfs")
            run(["ostree", f"--repo={repo}", "commit", f"--branch={ref}", f"--tree=dir={tree}"])
        run(["ostree", f"--repo={repo}", "summary", "-u"])
    return repo


def ostree_pulls(lab: Lab, name: str, repo: Path, kinds: Sequence[str]) -> dict[str, Measure]:
    """By default `ostree pull` asks for a static delta from the commit the ref has locally (from nothing,
    when cold) and, when the repo has none, fetches the missing objects one by one: here the whole file."""
    remote = f"{lab.nginx.url}/{repo.relative_to(lab.srv)}"

    def pull(ref: str) -> Callable[[Path], Argv]:
        return lambda d: ["ostree", f"--repo={d}/repo", "pull", "r", ref]

    def empty(d: Path) -> None:
        run(["ostree", f"--repo={d}/repo", "init", "--mode=bare-user"])
        run(["ostree", f"--repo={d}/repo", "remote", "add", "--no-gpg-verify", "r", remote])

    def holding_v1(d: Path) -> None:
        empty(d)
        run(pull("v1")(d))

    def loose(log: list[list[str]]) -> str:  # file objects fetched one by one next to a delta
        filez = sum(int(w[3]) for w in log if w[1].endswith(".filez"))
        return f"{filez} B of it loose .filez objects" if filez and any("/deltas/" in w[1] for w in log) else ""

    found = {"cold": lambda: lab.best(f"{name}-cold", pull("v1"), setup=empty),
             "delta": lambda: lab.best(f"{name}-delta", pull("v2"), setup=holding_v1, explain=loose)}
    return {k: found[k] for k in kinds}


def ostree_delta_peer(lab: Lab) -> dict[str, Measure]:
    """A copy of the repo (hard links) with a static delta v1 -> v2 (bsdiff): what `ostree pull r v2`
    fetches instead of objects. ostree before 2023.7 (Debian 12 has 2022.7) also scans the delta's target
    commit while the delta part is being applied and fetches the changed file as a loose object too
    (ostreedev/ostree#2053, fixed by fc5aef6f): the wire then holds both."""
    repo = ostree_repo(lab)
    copy = repo.with_name("repo-delta")
    run(["cp", "-al", repo, copy])
    (copy / "config").unlink()  # not shared with the plain repo: ostree may rewrite it
    shutil.copyfile(repo / "config", copy / "config")
    t = time.perf_counter()
    run(["ostree", f"--repo={copy}", "static-delta", "generate", "--from=v1", "--to=v2"])
    made = time.perf_counter() - t
    run(["ostree", f"--repo={copy}", "summary", "-u"])
    measure = ostree_pulls(lab, "ostree-sd", copy, ["delta"])["delta"]

    def noted() -> PeerPull:
        p = measure()
        p.note = "; ".join(n for n in (f"delta generated in {made:.0f} s (untimed)", p.note) if n)
        return p

    return {"delta": noted}


def curl_peer(lab: Lab) -> dict[str, Measure]:
    link_or_copy(lab.v1, lab.srv / "v1.sqfs")
    return {"cold": lambda: lab.best("curl", lambda d: ["curl", "-sSf", "-o", d / "v1.sqfs",
                                                        f"{lab.nginx.url}/v1.sqfs"])}


PEERS: list[tuple[str, Sequence[str], Callable[[Lab], dict[str, Measure]]]] = [
    ("nix", ("cold", "delta"), nix_peer),
    ("casync", ("cold", "delta"), casync_peer),
    ("ostree", ("cold", "delta"), lambda lab: ostree_pulls(lab, "ostree", ostree_repo(lab), ["cold", "delta"])),
    ("ostree (static delta)", ("delta",), ostree_delta_peer),
    ("curl (whole file)", ("cold",), curl_peer),
]


def why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def peer_pulls(v1: Path, v2: Path, work: Path) -> dict[str, dict[str, PeerPull | str]]:
    """{"cold": {peer: PeerPull or why it failed}, "delta": {...}}; work: a fresh directory, removed by the caller."""
    work = work.resolve()
    (work / "srv").mkdir()
    out: dict[str, dict[str, PeerPull | str]] = {"cold": {}, "delta": {}}
    nginx = Nginx(work / "srv", work / "nginx")
    try:
        lab = Lab(v1.resolve(), v2.resolve(), work, nginx, itertools.count(1))
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
    data = Path("/var/tmp/castore-bench")
    v1, v2 = data / "minbase.sqfs", data / "minbase-v2.sqfs"
    work = Path(tempfile.mkdtemp(prefix="castore-peers-", dir="/var/tmp"))
    try:
        found = peer_pulls(v1, v2, work)
    finally:
        shutil.rmtree(work)
    print(f"v1 {v1} ({v1.stat().st_size / 2**20:.1f} MiB), v2 {v2} ({v2.stat().st_size / 2**20:.1f} MiB)")
    head = f"{'pull':6} {'peer':22} {'time':>8} {'wire':>11} {'requests':>8}  note"
    print(head + "\n" + "-" * len(head))
    for kind, peers in found.items():
        for name, p in peers.items():
            if isinstance(p, str):
                print(f"{kind:6} {name:22} failed: {p}")
            else:
                print(f"{kind:6} {name:22} {p.seconds:6.3f} s {p.wire / 2**20:7.2f} MiB {p.requests:8}  {p.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
