"""The castore command line: parsing and printing only.

Every command takes ``--store`` (or CASTORE_STORE) and prints JSON with
``--json``. A :class:`CastoreError` becomes ``error: ...`` plus its hint and a
non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from castore.errors import CastoreError, NotFound, StoreError

app = typer.Typer(
    name="castore",
    help="Build, share and deploy Firecracker microVM images from a content-addressed store.\n\n"
    "Start with `castore realize recipes/app.py`: it builds the kernel, the squashfs rootfs "
    "and the image that bundles them, and prints the image id.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state: dict[str, Any] = {"store": None, "debug": False}

StoreOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Option("--store", metavar="DIR", help="Store directory [env CASTORE_STORE; default /var/lib/castore "
                 "for root, else $XDG_DATA_HOME/castore, ~/.local/share/castore when that is unset].",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
_ID_HELP = "Object id, unique prefix of 8+ hex digits, or an out-link (result) or store path."


def _version(value: bool) -> None:
    if value:
        from castore import __version__

        print(f"castore {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    store: StoreOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and every command run.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print castore's version and exit.")] = False,
) -> None:
    _state["store"] = store
    _state["debug"] = debug
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(message)s")


def _store(create: bool = True) -> Any:
    from castore.config import default_store
    from castore.store import LocalStore

    return LocalStore(_state["store"] or default_store(), create=create)


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _err(text: str) -> None:
    """To stderr, with control characters escaped: messages quote what caches, servers and build
    logs hold, and an escape sequence or a carriage return from those must not drive the terminal."""
    if not text.isprintable():
        text = "\n".join("".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)
                          for line in text.split("\n"))
    print(text, file=sys.stderr)


@app.command()
def realize(
    target: Annotated[str, typer.Argument(metavar="FILE[:NAME]", help="A recipe file, and which recipe in it "
                                          "(default: 'default', else the only one).")],
    out_link: Annotated[Optional[str], typer.Option("-o", "--out-link", metavar="NAME",  # noqa: UP045
                        help="Make a symlink NAME to the result and keep it from gc (it replaces only an "
                        "earlier out-link, never a file of yours).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be built or fetched, "
                       "and build nothing.")] = False,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep the scratch directory "
                           "of a failed build for inspection, as STORE/tmp/failed-BUILDER-PLAN-… "
                           "(castore gc removes it).")] = False,
    jobs: Annotated[int, typer.Option("-j", "--jobs", metavar="N", help="Parallel jobs inside a build "
                    "(make -j, compressor threads). 0: one per core.")] = 0,
    no_substitute: Annotated[bool, typer.Option("--no-substitute", help="Build everything missing "
                             "locally; do not ask the configured substituters.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build what a recipe describes, or reuse what the store already has; print the result's id.

    Evaluating the recipe builds nothing; then each step, inputs first, is looked
    up in the store by its plan hash and built only if missing. Running it again
    changes nothing and takes a fraction of a second.

    Example: castore realize recipes/app.py -o result
    """
    from castore.realize import Realizer
    from castore.recipes import evaluate_target

    _, plan = evaluate_target(target)
    with _store() as store:
        link = _out_link(out_link, store) if out_link is not None else None
        live = not as_json and not dry_run and sys.stderr.isatty()
        from castore.progress import LiveReporter, PlainReporter

        reporter: Any = LiveReporter() if live else PlainReporter(quiet=as_json)
        caches, trust = ([], None) if no_substitute else _substituters()
        realizer = Realizer(store, reporter, jobs=jobs or None, keep_failed=keep_failed,
                            substituters=caches, trust=trust, note=lambda m: _err(f"note: {m}"))
        if dry_run:
            steps = realizer.dry_run(plan)

            def action(s: Any) -> str:
                if s.oid is not None:
                    return "present"
                if s.how == "build" and s.plan.builder in ("fetch", "debian_package"):
                    return "fetch"
                return str(s.how or "not needed")

            if as_json:
                _emit({"plans": [{"name": s.plan.label, "builder": s.plan.builder, "plan": s.hash,
                                  "object": s.oid, "action": action(s)} for s in steps],
                       "id": steps[-1].oid, "dry_run": True})  # id: null until the last step is present
                return
            todo = [s for s in steps if s.how in ("build", "substitute")]
            if not todo:
                print(f"nothing to do: {steps[-1].plan.label} is {steps[-1].oid}")
                return
            print(f"{len(todo)} of {len(steps)} steps would run:")
            for s in todo:
                verb = action(s)
                label = s.plan.label if len(s.plan.label) <= 28 else s.plan.label[:27] + "…"  # the columns stay
                print(f"  {verb:10} {label:28} {s.plan.builder:14} plan {s.hash[:16]}  ({s.plan.origin})")
            return
        store.clean_stale_staging()  # what a killed add or build left: before the lock it must take alone
        with store.lock("gc", shared=True):  # no gc between the build and its out-link's root
            if live:
                with reporter:
                    outcome = realizer.realize(plan)
            else:
                outcome = realizer.realize(plan)
            oid = outcome.root.oid
            assert oid is not None
            if link is not None:
                _out_link(str(link), store)  # still free to take
                tmp = link.with_name(f".{link.name}.{os.getpid()}")
                try:
                    os.symlink(store.blob_path(oid), tmp)
                    store.add_root(str(link), oid, link=True)  # gc keeps what the link points at then
                    os.replace(tmp, link)
                except OSError as exc:
                    raise CastoreError(f"cannot make the out-link {link}: {exc.strerror}",
                                       f"{oid} is built; `castore path {oid[:12]}` shows where") from exc
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        info = store.info(oid)
        details = _details(store, oid, info.kind)
        if as_json:
            _emit({"id": oid, "kind": info.kind, "path": str(store.blob_path(oid)),
                   "plan": outcome.root.hash, "built": [s.plan.label for s in outcome.built],
                   "substituted": [s.plan.label for s in outcome.substituted], **details})
            return
        print(oid)
        if outcome.substituted and not outcome.built:
            _err(f"{outcome.root.plan.label}: substituted from a cache, nothing built")
        elif not outcome.built:
            _err(f"{outcome.root.plan.label}: already in the store, nothing built")
        for key, value in details.items():
            if key == "layers":
                for i, layer in enumerate(value):
                    _err(f"  rootfs{i if len(value) > 1 else ''}  {layer}")
            elif key == "kernel":
                _err(f"  kernel  {value}")
        if info.kind != "image":
            _err(f"  path    {store.blob_path(oid)}")


def _substituters() -> tuple[list[Any], Any]:
    from castore.config import load_config

    config = load_config()
    if not config.substituters:
        return [], None
    from castore.cache.transport import open_cache
    from castore.cache.trust import Trust

    caches = []
    for url in config.substituters:
        try:
            caches.append(open_cache(url, token=config.token_for(url, named=False)))
        except CastoreError as exc:
            _err(f"note: substituter {url} skipped: {exc.message}")
    return caches, Trust.from_config(config)


def _details(store: Any, oid: str, kind: str) -> dict[str, Any]:
    if kind != "image":
        return {}
    img = store.read_image(oid)
    return {"kernel": str(store.blob_path(img.kernel)),
            "layers": [str(store.blob_path(layer.blob)) for layer in img.layers],
            "cmdline": img.cmdline}


@app.command()
def add(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A file (vmlinux, rootfs.img, ...) or a directory.")],
    all_root: Annotated[bool, typer.Option("--all-root", help="Record every entry of a directory "
                        "as owned by root (0:0) instead of its owner on this host.")] = False,
    root_name: Annotated[Optional[str], typer.Option("--root", metavar="NAME", help="Keep the result as a named "  # noqa: UP045
                         "gc root.")] = None,
    move: Annotated[bool, typer.Option("--move", help="Move a file into the store instead of copying "
                    "it (same filesystem, one link, owned by you); it leaves its old path.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import an existing file as a blob, or a directory as a tree; print its id.

    Example: castore add vmlinux; castore add --all-root ./rootfs-dir
    """
    import stat

    if root_name is not None and not root_name.strip():
        raise CastoreError("a gc root needs a name", "e.g. --root demo-kernel")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CastoreError(f"{path} does not exist", "castore add takes a file (vmlinux, rootfs.img) "
                           "or a directory") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise CastoreError(f"{path} is not a regular file or a directory",
                           "castore adds files (kernels, images) and directory trees")
    with _store() as store:
        store.clean_stale_staging()  # what a killed add left: before the lock it must take alone
        with store.lock("gc", shared=True):  # no gc between the add and its root
            if stat.S_ISDIR(mode):
                if move:
                    _err(f"note: copying {path}: --move applies to files")
                oid = store.add_dir(path, all_root=all_root)
            else:
                oid = store.add_file(path, move=move and _movable(path, store.root))
            if root_name is not None:
                before = {n: o for n, o, link in store.roots() if not link}.get(root_name)
                store.add_root(root_name, oid)
                if before not in (None, oid):
                    _err(f"note: root {root_name} now keeps {oid[:12]}, no longer {before[:12]}")
            info = store.info(oid)
            if as_json:
                _emit({"id": oid, "kind": info.kind, "size": info.size, "path": str(store.blob_path(oid))})
            else:
                print(oid)


def _out_link(name: str, store: Any) -> Path:
    """Where -o puts its symlink: a new name, or an earlier out-link to replace: a symlink into
    this store's blobs, or one recorded as an out-link root (which may be dangling by now)."""
    if not name:
        raise CastoreError("-o needs a name", "e.g. -o result")
    link = Path(name).absolute()
    if not link.parent.is_dir():
        raise CastoreError(f"cannot make the out-link {link}: {link.parent} is not a directory",
                           "make the directory first, or give -o a name in an existing one")
    if link.is_symlink():
        if store.root_object(str(link), "", True) is None and not any(
                n == str(link) and is_link for n, _, is_link in store.roots()):
            raise CastoreError(f"{link} is a symlink that is not an out-link of this store",
                               "-o replaces only an earlier out-link; pick another name, or remove it")
    elif link.exists():
        raise CastoreError(f"{link} exists and is not a symlink", "-o replaces only an earlier out-link; "
                           "pick another name, or remove it")
    return link


def _movable(path: Path, root: Path) -> bool:
    """Moving is safe only for a file nobody else can still write through another name: not a
    symlink (that would move the link, not the file), not a file of the store itself."""
    import stat

    st = path.lstat()
    same_fs = st.st_dev == os.stat(root).st_dev
    inside = path.resolve().is_relative_to(root.resolve())
    if not (same_fs and st.st_nlink == 1 and st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode)) or inside:
        _err(f"note: copying {path}: --move needs a regular file (not a symlink) with one link, owned by "
             "you, on the store's filesystem and outside the store")
        return False
    return True


@app.command()
def export(
    object_id: Annotated[str, typer.Argument(metavar="ID", help=_ID_HELP)],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Where to write: a file for a blob, a new "
                    "directory for a tree or an image.")],
    as_json: JsonOpt = False,
) -> None:
    """Write an object out of the store: a blob as a file (holes kept), a tree as a directory,
    an image as a directory with vmlinux, rootfs layers and image.json.

    Example: castore export result ./out
    """
    from castore.fsutil import copy_sparse, materialize
    from castore.store import DAMAGED, remove_tree

    with _store(create=False) as store:
        oid = store.resolve(object_id)
        kind = store.info(oid).kind
        if dest.exists() or dest.is_symlink():
            raise CastoreError(f"{dest} already exists", "export writes only new paths")
        lost = store.absent([oid, *(store.info(oid).refs if kind == "image" else ())])
        if lost:
            raise StoreError(f"object {sorted(lost)[0]} has lost its file, or it changed size, in the store "
                             f"at {store.root}", DAMAGED)
        # written beside dest, renamed into place when whole: a failed export leaves nothing
        part = dest.parent / f".{dest.name}.{os.getpid()}.part"
        made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
        done = False
        try:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CastoreError(f"cannot make the directory {dest.parent}: {exc.strerror}",
                                   "export makes missing parent directories, but not in place of a file") from exc
            if kind == "blob":
                copy_sparse(store.blob_path(oid), part)
                os.chmod(part, 0o644)
            elif kind == "tree":
                materialize(store.read_tree(oid), part, store.blob_path, warn=lambda m: _err(f"warning: {m}"))
            else:
                img = store.read_image(oid)
                part.mkdir()
                copy_sparse(store.blob_path(img.kernel), part / "vmlinux")
                for i, layer in enumerate(img.layers):
                    copy_sparse(store.blob_path(layer.blob), part / f"rootfs{i}.{layer.format}")
                (part / "image.json").write_text(json.dumps(img.to_record(), indent=2, sort_keys=True) + "\n")
            if dest.exists() or dest.is_symlink():
                raise CastoreError(f"{dest} appeared while exporting", "export writes only new paths")
            os.rename(part, dest)
            done = True
        except OSError as exc:
            raise CastoreError(f"cannot export {oid[:12]} to {dest}: {exc.strerror}",
                               f"nothing was left at {dest}") from exc
        finally:
            if part.exists() or part.is_symlink():
                remove_tree(part)
            for d in made if not done else ():  # the directories made for it, if still empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        if as_json:
            _emit({"id": oid, "kind": kind, "dest": str(dest.absolute())})
        else:
            print(dest)


@app.command()
def push(
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Objects (ids or prefixes) whose "
                   "closures to upload.")],
    to: Annotated[str, typer.Option("--to", metavar="CACHE", help="The cache: a directory or file:// URL (created "
                  "if missing), or the http(s) URL of a `castore serve` (token in CASTORE_TOKEN).")],
    as_json: JsonOpt = False,
) -> None:
    """Copy closures into a binary cache: only the chunks it lacks, records last.

    Example: castore push 43fbd2a4 --to /srv/castore-cache
    """
    from castore.cache.copy import push as do_push
    from castore.cache.transport import open_cache
    from castore.cache.trust import Trust, secret_keys
    from castore.config import load_config

    config = load_config()
    secrets = secret_keys(config)
    if not secrets and not as_json:
        _err("note: no secret-key-files configured: the realisations of what this store built are not "
             "pushed (others can pull these ids, but realize cannot substitute them); those it substituted "
             "are, with the signatures of keys this machine still trusts")
    with _store(create=False) as store:
        full = [store.resolve(i) for i in ids]
        cache = open_cache(to, create=True, token=config.token_for(to))
        try:
            stats = do_push(store, cache, full, progress=lambda s: None if as_json else _err(s), secrets=secrets,
                            trust=Trust.from_config(config))
        finally:
            cache.close()
    _copy_report(stats, "pushed", as_json)


@app.command()
def pull(
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Full ids of the objects to fetch "
                   "with their closures.")],
    from_: Annotated[Optional[str], typer.Option("--from", metavar="CACHE", help="The cache: a directory, file:// or "  # noqa: UP045
                     "http(s) URL. Default: the configured substituters, in order.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be fetched, and how much.")] = False,
    root_name: Annotated[Optional[str], typer.Option("--root", metavar="NAME", help="Keep what is pulled as a "  # noqa: UP045
                         "named gc root (one ID); without one, the next gc deletes it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch objects by id from a binary cache, taking every chunk it can from local blobs.

    Every chunk and every object is verified before it enters the store; content
    pulled by id needs no trust. A killed pull resumes without refetching. Without
    --from, the configured substituters are tried in order until one has it all.
    What is pulled is not a gc root unless --root names it.

    Example: castore pull 43fbd2a44933817d2cfc51ff17fc5c39055c4ac1529a53e127f488bb504efb91 --from /mnt/cache --root app
    """
    from castore.cache.copy import pull as do_pull
    from castore.cache.transport import open_cache
    from castore.hashing import is_id

    ids = list(dict.fromkeys(i.strip().lower() for i in ids))  # as other commands read ids; once each
    bad = [i for i in ids if not is_id(i)]
    if bad:
        raise CastoreError(f"{bad[0]} is not a full object id", "pull needs the 64-digit id")
    if root_name is not None and (len(ids) != 1 or not root_name.strip()):
        raise CastoreError("--root names one object" if root_name.strip() else "--root needs a name",
                           "pull one ID with --root NAME, e.g. --root app")
    from castore.config import load_config

    config = load_config()
    if from_ is not None:
        urls = [from_]
    else:
        urls = list(config.substituters)
        if not urls:
            raise CastoreError("no cache to pull from", "pass --from URL, or set substituters in castore.toml")
    failures = []
    with _store() as store, store.lock("gc", shared=True):  # no gc between the pull and its root
        for url in urls:
            try:
                cache = open_cache(url, token=config.token_for(url, named=from_ is not None))
                try:
                    with _meter(enabled=not as_json and not dry_run and sys.stderr.isatty()) as meter:
                        stats = do_pull(store, cache, ids, dry_run=dry_run, meter=meter,
                                        progress=lambda s: None if as_json else _err(s))
                finally:
                    cache.close()
            except CastoreError as exc:
                if len(urls) == 1 or isinstance(exc, StoreError):  # the store's own trouble: no failover
                    raise
                failures.append(f"{url}: {exc.message}")
                _err(f"note: {url}: {exc.message}; trying the next substituter")
                continue
            if root_name is not None and not dry_run:
                store.add_root(root_name, ids[0])
            _copy_report(stats, "would fetch" if dry_run else "pulled", as_json)
            return
    raise CastoreError("no substituter could provide it:\n  " + "\n  ".join(failures))


@contextlib.contextmanager
def _meter(enabled: bool) -> Iterator[Any]:
    """A rich progress bar with bytes and rate on a terminal; None (plain lines) elsewhere."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("fetching", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("fetch", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _copy_report(stats: Any, verb: str, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        data = asdict(stats)
        if verb == "would fetch":  # what would be fetched, as the text says it, and marked as a guess
            data.update(objects=len(stats.ids), dry_run=True)
        _emit(data)
        return
    if verb == "would fetch":
        print(f"would fetch {_count(len(stats.ids), 'object')} ({stats.present} already there): "
              f"{_count(stats.chunks_fetched, 'chunk')}, about {_human(stats.bytes_on_wire)} before compression; "
              f"{_count(stats.chunks_seeded, 'chunk')} would be taken from local blobs")
        return
    if verb == "pushed":
        chunks = f"{_count(stats.chunks_sent, 'chunk')} sent (the rest were there)"
    else:
        chunks = f"chunks: {stats.chunks_fetched} fetched, {stats.chunks_seeded} taken from local blobs"
    print(f"{verb} {_count(stats.objects, 'object')} ({stats.present} already there); {chunks}; "
          f"{_human(stats.bytes_on_wire)} on the wire"
          + (f"; {_count(stats.realisations, 'signed realisation')}" if stats.realisations else ""))


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The cache directory (created if missing).")],
    bind: Annotated[str, typer.Option("--bind", metavar="HOST:PORT", help="Where to listen.")] = "127.0.0.1:8080",
    private: Annotated[bool, typer.Option("--private", help="Reads need a token with read scope too "
                                          "(by default anyone may read).")] = False,
) -> None:
    """Serve a cache directory over HTTP: reads for everyone (--private: for read tokens), verified
    uploads for tokens with write scope.

    Make tokens with `castore token add DIR --scope write`; clients pass them in CASTORE_TOKEN
    (to a cache they name) or under [tokens] in castore.toml. The same directory can also be
    served read-only by nginx or any static host.

    Example: castore serve /srv/castore-cache --bind 0.0.0.0:8080
    """
    from castore.cache.server import CacheApp, listen
    from castore.cache.server import serve as run_server

    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CastoreError(f"--bind {bind!r} is not HOST:PORT (a port from 1 to 65535)", "for example 127.0.0.1:8080")
    sockets = listen(host, int(port))  # first: a port in use is an error before DIR is made
    cache = CacheApp(directory, public_read=not private)
    _err(f"serving {directory.absolute()} on http://{host}:{port}" + (" (reads need a token)" if private else ""))
    run_server(cache, sockets)


token_app = typer.Typer(help="Access tokens for `castore serve`.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("add")
def token_add(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The cache directory `castore serve` serves.")],
    scope: Annotated[list[str], typer.Option("--scope", metavar="SCOPE", help="read, or write (which may "
                                             "also read).")],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Who the token is for.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Make a token and print it; the server keeps only its hash.

    Example: castore token add /srv/castore-cache --scope write --name ci
    """
    from castore.cache.server import add_token

    bad = [s for s in scope if s not in ("read", "write")]
    if bad:
        raise CastoreError(f"scope {bad[0]!r} is not read or write")
    if not (directory / "castore-cache.json").exists():  # a new cache, or a typo: say which directory
        _err(f"note: {directory.absolute()} holds no cache yet; the token is for the cache "
             "`castore serve` or `castore push` makes there")
    token = add_token(directory, scope, name)
    if as_json:
        _emit({"token": token, "scopes": sorted(set(scope)), "name": name})
    else:
        print(token)


@token_app.command("list")
def token_list(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The cache directory `castore serve` serves.")],
    as_json: JsonOpt = False,
) -> None:
    """The tokens a cache directory takes: name, scopes, and the start of the hash kept for each.

    Example: castore token list /srv/castore-cache
    """
    from castore.cache.server import cache_dir, load_tokens

    known = load_tokens(cache_dir(directory))
    rows = sorted(({"name": e["name"], "scopes": e["scopes"], "hash": h} for h, e in known.items()),
                  key=lambda r: (r["name"], r["hash"]))
    if as_json:
        _emit(rows)
        return
    for r in rows:
        print(f"{r['hash'][:16]}  {','.join(r['scopes']):10}  {r['name'] or '(no name)'}")
    if not rows:
        _err(f"no tokens for {directory}: add one with `castore token add {directory} --scope write --name ci`")


@token_app.command("remove")
def token_remove(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The cache directory `castore serve` serves.")],
    which: Annotated[str, typer.Argument(metavar="NAME|HASH", help="A token's name (all tokens of that name), "
                     "or the start of its hash as `token list` shows it (8 digits or more).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke tokens: a running `castore serve` refuses them from its next request on.

    Example: castore token remove /srv/castore-cache ci
    """
    from castore.cache.server import remove_tokens

    gone = remove_tokens(directory, which)
    if not gone:
        raise NotFound(f"no token named {which!r} or with a hash starting {which!r} in {directory}",
                       f"`castore token list {directory}` shows them")
    if as_json:
        _emit({"removed": gone})
    else:
        print(f"removed {_count(len(gone), 'token')}")


key_app = typer.Typer(help="ed25519 signing keys for binary caches.", no_args_is_help=True)
app.add_typer(key_app, name="key")


@key_app.command("generate")
def key_generate(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Key name, by convention LAB-N (bump N to rotate).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE",
                                      help="Where to write the secret key (mode 0600).")],
    as_json: JsonOpt = False,
) -> None:
    """Make a key pair: write the secret key to --out and print the public key (NAME:BASE64).

    Put the secret key file in `secret-key-files` of castore.toml on the machine that pushes,
    and the public key in `trusted-public-keys` on the machines that substitute.

    Example: castore key generate lab-1 --out /etc/castore/lab-1.secret
    """
    from castore.signing import generate

    if out.exists():
        raise CastoreError(f"{out} already exists", "keys are never overwritten; pick another path")
    secret, public = generate(name)
    # the key file itself is 0600; its directory stays readable, as castore.toml beside it must be
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    if as_json:
        _emit({"public_key": str(public), "secret_key_file": str(out.absolute())})
    else:
        print(public)


@key_app.command("public")
def key_public(secret_file: Annotated[Path, typer.Argument(metavar="SECRET_FILE", help="A secret key file.")],
               as_json: JsonOpt = False) -> None:
    """Print the public key of a secret key file (one that only its owner can read).

    Example: castore key public /etc/castore/lab-1.secret
    """
    from castore.cache.trust import read_secret_key
    from castore.signing import public_of

    public = public_of(read_secret_key(secret_file))
    if as_json:
        _emit({"public_key": str(public)})
    else:
        print(public)


@app.command()
def path(object_id: Annotated[str, typer.Argument(metavar="ID", help=_ID_HELP)], as_json: JsonOpt = False) -> None:
    """Print the store path of an object (read-only; Firecracker can open it directly).

    Example: castore path result
    """
    with _store(create=False) as store:
        oid = store.resolve(object_id)
        if as_json:
            _emit({"id": oid, "path": str(store.blob_path(oid))})
        else:
            print(store.blob_path(oid))


@app.command()
def show(
    object_id: Annotated[str, typer.Argument(metavar="ID", help=_ID_HELP)],
    entries: Annotated[bool, typer.Option("--entries", help="List a tree's entries.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show an object: kind, size, references, and the plan that made it.

    Example: castore show result --entries
    """
    with _store(create=False) as store:
        oid = store.resolve(object_id)
        info = store.info(oid)
        plans = store.plans_for(oid)
        data: dict[str, Any] = {"id": oid, "kind": info.kind, "size": info.size, "refs": list(info.refs),
                                "path": str(store.blob_path(oid)),
                                "plans": [{"plan": h, "name": n, "record": _jsonable(r),
                                           "substituted_from": _origin(store, h)} for h, n, r in plans]}
        if info.kind == "image":
            data["image"] = store.read_image(oid).to_record()
        if info.kind == "tree" and (entries or as_json):
            data["entries"] = [_jsonable(e.to_record()) for e in store.read_tree(oid)]
        if as_json:
            _emit(data)
            return
        print(f"id           {oid}\nkind         {info.kind}\nsize         {info.size}\npath         {data['path']}")
        if info.refs:
            print(f"refs         {len(info.refs)}" + "".join(f"\n  {r}" for r in info.refs[:20])
                  + ("\n  ..." if len(info.refs) > 20 else ""))
        if info.kind == "image":
            for k, v in data["image"].items():
                if k == "layers":
                    for i, layer in enumerate(v):
                        print(f"{f'layer {i}':<13}{layer['format']} {layer['blob']}")
                elif k == "overlay_size":
                    print(f"{k:<13}{v} ({_human(v)})")
                elif k not in ("format", "kind"):
                    print(f"{k:<13}{v}")
        for h, name, record in plans:
            print(f"made by plan {h}  ({name})")
            if origin := _origin(store, h):
                print(f"  substituted from {origin}")
            print(f"  builder {record['builder']} v{record['version']}")
            for t, v in record["tools"].items():
                print(f"  tool    {t}: {v}")
            for k, v in record["inputs"].items():
                print(f"  input   {k}: {next(iter(v))} {next(iter(v.values()))}")
            for k, v in record["params"].items():
                text = repr(v)
                print(f"  param   {k}: {text[:100]}{'...' if len(text) > 100 else ''}")
        if not plans:
            print("made by      no plan of this store: added, or pulled by id")
        if info.kind == "tree" and entries:
            for e in data["entries"]:
                extra = e.get("blob") or e.get("target") or (f"{e['major']},{e['minor']}" if "major" in e else "")
                print(f"{e['type']:8} {e['mode']:04o} {e['uid']}:{e['gid']} {e['path']} {extra}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@app.command(name="ls")
def ls(
    kind: Annotated[Optional[str], typer.Option("--kind", metavar="KIND", help="Only blob, tree or image.")] = None,  # noqa: UP045
    as_json: JsonOpt = False,
) -> None:
    """List the objects in the store, with the names of the plans that made them.

    Example: castore ls --kind image
    """
    from castore.manifest import KINDS

    if kind is not None and kind not in KINDS:
        raise CastoreError(f"--kind {kind!r}: there are {', '.join(KINDS)} objects", "for example --kind image")
    with _store(create=False) as store:
        names = {oid: n for oid, n in store._q("SELECT object, name FROM realisations")}
        roots = {o for _, o, _ in store.roots()}
        objs = store.objects(kind)
        if as_json:
            _emit([{"id": o.id, "kind": o.kind, "size": o.size, "name": names.get(o.id),
                    "root": o.id in roots} for o in objs])
            return
        for o in objs:
            mark = "root" if o.id in roots else "    "  # a column of its own: copying the id takes no mark
            print(f"{o.id}  {o.kind:5} {_human(o.size):>9}  {mark}  {names.get(o.id, '')}")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


@app.command()
def verify(
    no_contents: Annotated[bool, typer.Option("--no-contents", help="Check sizes and records only, "
                           "do not re-hash.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Remove the files of damaged objects (and "
                      "make writable ones read-only): the next realize or pull puts good copies back.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every object and check references and realisations; exit 1 on corruption.

    Example: castore verify --no-contents   (sizes, modes and references only: fast)
    Example: castore verify --repair && castore realize recipes/app.py
    """
    with _store(create=False) as store:
        problems, notes = store.verify(contents=not no_contents, repair=repair)
        count = len(store.objects())
        if as_json:
            _emit({"objects": count, "problems": problems, "notes": notes, "ok": not problems})
        else:
            for p in problems:
                print(f"corrupt: {p}")
            for n in notes:
                print(f"note: {n}")
            print(f"{_count(count, 'object')} checked, {_count(len(problems), 'problem')}")
            if problems and not repair:
                _err("hint: `castore verify --repair` removes the damaged files; then `castore realize` "
                     "(or `castore pull ID`) puts good copies back")
        if problems:
            raise typer.Exit(1)


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete every object that no root reaches (out-links from realize -o, named roots), and what
    killed or failed runs left: stray files, stale staging, partial pulls, kept scratch directories.

    Example: castore gc --dry-run
    """
    with _store(create=False) as store:
        dead, freed = store.gc(dry_run=dry_run)
        if as_json:
            _emit({"deleted": dead, "bytes": freed, "dry_run": dry_run})
        else:
            verb = "would delete" if dry_run else "deleted"
            print(f"{verb} {_count(len(dead), 'object')}, {_human(freed)}")


def _origin(store: Any, plan_hash: str) -> str | None:
    """The cache a plan's realisation was substituted from; None when it was built here."""
    came = store.substitution(plan_hash)
    if came is None:
        return None
    return came[0] or "a cache (substituted before castore recorded which)"


@app.command()
def roots(
    remove: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--remove", metavar="NAME", help="Remove this root (repeatable): a name given to `add --root`, "
        "or an out-link's path as listed; the link itself is left alone.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the gc roots: out-links and named roots.

    gc keeps whatever a root reaches; `add --root NAME` again moves the name to the new object.

    Example: castore roots --remove demo-kernel
    """
    with _store(create=False) as store:
        links = {n for n, _, link in store.roots() if link}
        for name in remove or []:
            # an out-link's root is named by its absolute path: take it as typed, relative, too
            named = next((n for n in (name, os.path.abspath(name)) if store.remove_root(n)), None)
            if named is None:
                raise CastoreError(f"there is no root {name!r}", "`castore roots` lists them")
            _err(f"removed root {name}" + ("; the out-link stays, and points at nothing once gc has run"
                                           if named in links else ""))
        if remove:
            return
        now = [(n, link, o, store.root_object(n, o, link)) for n, o, link in store.roots()]
        rows = [(n, link, kept or o, kept is not None) for n, link, o, kept in now]
        if as_json:
            _emit([{"name": n, "id": o, "link": link, "live": live} for n, link, o, live in rows])
            return
        for n, link, o, live in rows:
            gone = "" if live else "  (gone, or points out of the store: the next gc drops it)"
            print(f"{o}  {'link' if link else 'name'}  {n}{gone}")


@app.command()
def log(object_id: Annotated[str, typer.Argument(metavar="ID", help="Object id (or prefix), or a plan hash.")]) -> None:
    """Print the build log of the plan that made an object (or of a failed plan, by plan hash).

    Example: castore log result
    """
    from castore.errors import NotFound
    from castore.hashing import is_prefix

    with _store(create=False) as store:
        try:
            oid = store.resolve(object_id)
        except NotFound:  # a plan hash, or a unique prefix of one, names its log (a failed build's)
            wanted = object_id.strip().lower()
            logs = sorted(store.logs.glob(f"{wanted}*.log")) if is_prefix(wanted) else []
            if len(logs) != 1:
                raise
            candidate = logs[0]
        else:
            plans = store.plans_for(oid)
            if not plans:
                raise CastoreError(f"{oid} was not built here (added, or pulled by id): it has no build log")
            candidate = store.logs / f"{plans[-1][0]}.log"
            came = store.substitution(plans[-1][0])
            if came is not None and not candidate.exists():
                raise CastoreError(f"{oid} was substituted from {came[0] or 'a cache'}, not built here: "
                                   "it has no build log", "the lab that built it keeps the log")
        if not candidate.exists():
            raise CastoreError(f"no log kept for {object_id}")
        sys.stdout.write(candidate.read_text(errors="replace"))


def _only(argv: list[str]) -> None:
    """Keep only the command argv names, if it names one: typer reads every command's signature and
    type hints on each start (9 ms for all, 1.5 ms for one, measured here). With no command, or an
    unknown one, all stay, for the command list and click's "did you mean"."""
    words = iter(argv)
    for word in words:
        if word == "--help":
            return  # castore --help add: the whole list
        if word == "--store":
            next(words, None)
        elif not word.startswith("-"):
            from typer.main import get_command_name

            cmds = [c for c in app.registered_commands
                    if (c.name or get_command_name(getattr(c.callback, "__name__", ""))) == word]
            groups = [g for g in app.registered_groups if g.name == word]
            if cmds or groups:
                app.registered_commands, app.registered_groups = cmds, groups
            return


def _globals_first(argv: list[str]) -> list[str]:
    """`castore export ID DEST --store DIR` as `castore --store DIR export ID DEST`: the global
    options (--store, --debug) may also follow the command, as nix takes --store anywhere. The
    value of a command's own option (`--name --store`) stays its value, and a --store with no
    value stays where it is, for click to say so."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # the global options already in front
        at += 2 if argv[at] == "--store" else 1
    tail = argv[at + 1:]
    if at >= len(argv) or not any(w == "--debug" or w.startswith("--store") for w in tail):
        return argv
    valued = _valued_options(argv[at], tail[0] if tail else "")
    moved: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(tail):
        word = tail[i]
        if word == "--":
            rest += tail[i:]
            break
        if word in valued and i + 1 < len(tail):
            rest += tail[i:i + 2]
            i += 2
            continue
        if word == "--debug" or word.startswith("--store="):
            moved.append(word)
        elif word == "--store" and i + 1 < len(tail):
            moved += tail[i:i + 2]
            i += 1
        else:
            rest.append(word)
        i += 1
    return [*argv[:at], *moved, argv[at], *rest]


def _valued_options(command: str, sub: str) -> set[str]:
    """The options of a command (or of a group's subcommand) that take a value."""
    from typer.main import get_command

    found: Any = get_command(app)  # click's objects (typer 0.28 carries its own click: duck-typed)
    for name in (command, sub):
        if not hasattr(found, "commands") or (found := found.commands.get(name)) is None:
            break
    if found is None:
        return set()
    return {o for p in found.params if getattr(p, "param_type_name", "") == "option" and not p.is_flag
            for o in [*p.opts, *p.secondary_opts]}


def main() -> None:
    every = app.registered_commands, app.registered_groups
    sys.argv[1:] = _globals_first(sys.argv[1:])
    _only(sys.argv[1:])
    try:
        app()  # click's standalone mode handles usage errors and exits; ours come through
    except CastoreError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _err(f"error: {exc.message}")
        if exc.hint:
            _err(f"hint: {exc.hint}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:  # typer turns Ctrl-C into a silent exit 130
        if exc.code == 130 and _caused_by(exc, KeyboardInterrupt):
            _interrupted()
        raise
    except OSError as exc:  # one the command did not expect: still one line, not a traceback
        if _state["debug"]:
            raise
        _err(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        _err("hint: --debug shows where it happened")
        sys.exit(1)
    finally:
        app.registered_commands, app.registered_groups = every


def _interrupted() -> NoReturn:
    _err("interrupted; the store is unchanged by the step that was running")
    sys.exit(130)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


if __name__ == "__main__":
    main()
