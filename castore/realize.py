"""Realize plans: walk the graph in dependency order; for each plan use the local
realisation if there is one, else build it. The only code that moves build
outputs into the store and records realisations.

Builds run in a scratch directory under the store's ``tmp/`` with a fixed
environment; the output is hashed and renamed into place only when the
builder succeeded, so a failure or a kill leaves the store as it was. A
per-plan lock makes concurrent realizes of the same plan build it once; a
shared gc lock keeps ``gc`` from deleting what a realize is using.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from castore.builders import (
    SPECS,
    BlobInput,
    BlobResult,
    BuildContext,
    ExistingResult,
    ImageResult,
    Input,
    Spec,
    TreeInput,
    TreeResult,
    load,
)
from castore.errors import DISK_ERRNOS, BuildError, CastoreError, HashMismatch, StoreError
from castore.plan import Plan, hash_graph
from castore.store import LocalStore, remove_tree, store_os_error
from castore.tools import library_version, prune_versions, tool_version

if TYPE_CHECKING:  # imported when a substituter is asked: a realize that needs none stays fast
    from castore.cache.transport import Transport
    from castore.cache.trust import Trust


class Reporter(Protocol):
    def start(self, plan: Plan, plan_hash: str, index: int, total: int) -> None:
        """A step is about to be built (steps already present are only reported as done)."""
    def status(self, plan: Plan, text: str) -> None: ...
    def done(self, plan: Plan, oid: str, how: str, seconds: float) -> None: ...
    def failed(self, plan: Plan, error: CastoreError, log: Path | None) -> None: ...


class NullReporter:
    def start(self, plan: Plan, plan_hash: str, index: int, total: int) -> None:
        pass

    def status(self, plan: Plan, text: str) -> None:
        pass

    def done(self, plan: Plan, oid: str, how: str, seconds: float) -> None:
        pass

    def failed(self, plan: Plan, error: CastoreError, log: Path | None) -> None:
        pass


@dataclass
class Step:
    plan: Plan
    hash: str
    record: bytes
    oid: str | None = None
    how: str = ""  # "present", "substituted", "build" (to do), "built"; "" when not needed


@dataclass
class Outcome:
    root: Step
    steps: list[Step] = field(default_factory=list)

    @property
    def built(self) -> list[Step]:
        return [s for s in self.steps if s.how == "built"]

    @property
    def substituted(self) -> list[Step]:
        return [s for s in self.steps if s.how == "substituted"]


class Realizer:
    def __init__(self, store: LocalStore, reporter: Reporter | None = None, *, jobs: int | None = None,
                 keep_failed: bool = False, substituters: list[Transport] | None = None,
                 trust: Trust | None = None, note: Callable[[str], None] = lambda s: None) -> None:
        self.store = store
        self.substituters = substituters or []
        self._down: set[str] = set()  # substituters that could not be asked: not asked again
        self.trust = trust
        self.note = note
        self.reporter = reporter or NullReporter()
        self.jobs = jobs or os.cpu_count() or 1
        self.keep_failed = keep_failed
        self._tool_cache: dict[str, str] | None = None
        self._tool_cache_dirty = False

    # -- hashing ------------------------------------------------------------

    def _spec(self, plan: Plan) -> Spec:
        try:
            return SPECS[plan.builder]
        except KeyError:
            raise CastoreError(f"{plan.origin}: unknown builder {plan.builder!r}") from None

    def _describe(self, plan: Plan) -> tuple[int, dict[str, str]]:
        b = self._spec(plan)
        if self._tool_cache is None:
            self._tool_cache = self.store.kv_get("tool:")
        before = len(self._tool_cache)
        tools = {t: tool_version(t, self._tool_cache) for t in b.tools_of(plan.params)}
        tools.update((lib, library_version(lib, self._tool_cache)) for lib in b.libraries)
        if len(self._tool_cache) != before:
            self._tool_cache_dirty = True
        return b.version, tools

    def steps(self, root: Plan) -> list[Step]:
        order, hashes = hash_graph(root, self._describe)
        if self._tool_cache_dirty and self._tool_cache is not None:
            stale = prune_versions(self._tool_cache)  # something changed: what it replaced is stale
            self.store.kv_put("tool:", self._tool_cache, drop=stale)
            self._tool_cache_dirty = False
        steps = []
        for plan in order:
            h, record = hashes[id(plan)]
            steps.append(Step(plan, h, record, self.store.realisation(h)))
        return steps

    # -- realizing -------------------------------------------------------------

    def realize(self, root: Plan) -> Outcome:
        """Realize root: what the store has is used, what a trusted cache has is substituted
        (top-down, so the inputs of a substituted plan are never realized), the rest is built."""
        self.store.clean_stale_staging()  # before the lock: a killed import's strays need it alone
        with self.store.lock("gc", shared=True):
            steps = self.steps(root)
            total = len(steps)
            index = {id(s.plan): i for i, s in enumerate(steps)}
            self._walk(steps, lambda step: self._substitute(step, index[id(step.plan)], total))
            results = {id(s.plan): s.oid for s in steps if s.oid is not None}
            for i, step in enumerate(steps):
                if step.how != "build":
                    if step.how == "present" and step.oid is not None:
                        self.reporter.done(step.plan, step.oid, step.how, 0.0)
                    continue
                t0 = time.monotonic()
                self.reporter.start(step.plan, step.hash, i, total)
                with self.store.lock(step.hash):
                    step.oid = self.store.realisation(step.hash)
                    if step.oid is not None:
                        step.how = "present"
                    else:
                        step.oid = self._build(step, results)
                        step.how = "built"
                results[id(step.plan)] = step.oid
                self.reporter.done(step.plan, step.oid, step.how, time.monotonic() - t0)
            return Outcome(steps[-1], steps)

    def dry_run(self, root: Plan) -> list[Step]:
        """What realize would do, changing nothing: each step's `how` is "present", "substitute"
        (a trusted realisation is in a substituter: its object would be fetched), "build", or ""
        (not needed: a step above it is present or substituted)."""
        from castore.cache.copy import substitute
        from castore.cache.trust import Trust

        def would(step: Step) -> bool:
            found = substitute(self.store, self.substituters, step.hash, self.trust or Trust(), note=self.note,
                               down=self._down, fetch=False, kind=step.plan.output)
            if found is not None:
                step.how = "substitute"
            return found is not None

        steps = self.steps(root)
        self._walk(steps, would)
        return steps

    def _walk(self, steps: list[Step], substitute: Callable[[Step], bool]) -> None:
        """Top-down from the root: present, else substituted, else built after its inputs. The
        inputs of a present or substituted step are never needed."""
        by_plan = {id(s.plan): s for s in steps}
        seen: set[int] = set()
        todo = [steps[-1]]
        while todo:
            step = todo.pop()
            if id(step.plan) in seen:
                continue
            seen.add(id(step.plan))
            if step.oid is not None:
                step.how = "present"
                continue
            if self.substituters and substitute(step):
                continue
            step.how = "build"
            todo.extend(by_plan[id(child)] for child in step.plan.plan_inputs())

    def _substitute(self, step: Step, index: int, total: int) -> bool:
        from castore.cache.copy import substitute
        from castore.cache.trust import Trust

        t0 = time.monotonic()
        self.reporter.start(step.plan, step.hash, index, total)
        self.reporter.status(step.plan, "asking the substituters")
        with self.store.lock(step.hash):
            found = substitute(self.store, self.substituters, step.hash, self.trust or Trust(), note=self.note,
                               down=self._down, kind=step.plan.output)
            if found is None:
                return False
            oid = found.object
            if found.record != step.record:
                return False  # cannot happen: the record hashes to the plan hash
            self.store.record_realisation(step.hash, oid, found.record, step.plan.label,
                                          substituted=(found.origin, found.realisation))
        step.oid, step.how = oid, "substituted"
        self.reporter.done(step.plan, oid, step.how, time.monotonic() - t0)
        return True

    def _inputs(self, plan: Plan, results: dict[int, str]) -> dict[str, Input]:
        inputs: dict[str, Input] = {}
        for name, value in plan.inputs.items():
            if isinstance(value, Plan):
                oid = results[id(value)]
            else:
                try:
                    oid = self.store.add_file(value.path, expect=value.id)
                except HashMismatch as exc:
                    raise CastoreError(
                        f"{plan.origin}: {value.path} changed after the recipe was evaluated",
                        "run realize again",
                    ) from exc
            info = self.store.info(oid)
            if info.kind == "tree":
                inputs[name] = TreeInput(oid, self.store.read_tree(oid))
            else:
                label = value.label if isinstance(value, Plan) else value.path
                inputs[name] = BlobInput(oid, self.store.blob_path(oid), info.size, label)
        return inputs

    def _build(self, step: Step, results: dict[int, str]) -> str:
        plan = step.plan
        self._spec(plan)  # an unknown builder is reported with the recipe line
        build = load(plan.builder)
        inputs = self._inputs(plan, results)
        scratch = self.store.staging_dir(plan.builder)
        log_path = self.store.logs / f"{step.hash}.log"
        ok = False
        try:
            with open(log_path, "wb") as log:
                log.write(f"# {plan.builder} {plan.label} ({plan.origin})\n# plan {step.hash}\n".encode())
                ctx = BuildContext(
                    scratch=scratch,
                    out=scratch / "out",
                    params={**plan.params, **plan.hints},
                    inputs=inputs,
                    plan_hash=step.hash,
                    blob_path=self.store.blob_path,
                    log=log,
                    status=lambda text: self.reporter.status(plan, text),
                    jobs=self.jobs,
                )
                try:
                    try:
                        result = build(ctx)
                    except OSError as exc:
                        if exc.errno in DISK_ERRNOS:
                            raise
                        # the builder's own, from what the recipe asked for: a size past what the
                        # filesystem takes, a file:// URL naming a directory
                        where = f": {exc.filename}" if exc.filename else ""
                        raise CastoreError(f"{exc.strerror or exc}{where}") from exc
                    oid = self._import(ctx, result)
                except StoreError:
                    raise
                except CastoreError as exc:
                    log.write(f"\nerror: {exc.message}\n".encode())
                    log.flush()  # the reporter shows the log's tail: a builder that ran no tool wrote only here
                    hint = f"{exc.hint}; the build log is {log_path}" if exc.hint else f"the build log is {log_path}"
                    if self.keep_failed:
                        scratch = self.store.keep_failed(scratch, f"{plan.builder}-{step.hash[:12]}")
                        hint += f"; the build directory is kept at {scratch} (castore gc removes it)"
                    error = BuildError(
                        f"{plan.origin}: building {plan.label} ({plan.builder}) failed:\n{exc.message}", hint)
                    self.reporter.failed(plan, error, log_path)
                    raise error from exc
            self.store.record_realisation(step.hash, oid, step.record, plan.label)
            ok = True
            return oid
        except OSError as exc:  # the log, the scratch directory or a builder's own writes
            failure = store_os_error(exc, self.store.root, retry="nothing was added; free space (castore gc) "
                                   "and realize again")
            self.reporter.failed(plan, failure, None)  # the log may be what could not be written
            raise failure from exc
        finally:
            if ok or not self.keep_failed:
                remove_tree(scratch)

    def _import(self, ctx: BuildContext, result: Any) -> str:
        if isinstance(result, BlobResult):
            if not ctx.out.is_file():
                raise BuildError(f"builder {ctx.plan_hash} wrote no output")
            return self.store.add_file(ctx.out, move=True)
        if isinstance(result, ExistingResult):
            if not self.store.has(result.id):
                raise BuildError(f"builder named object {result.id}, which is not in the store")
            return result.id
        if isinstance(result, TreeResult):
            with self.store.batch():
                for oid, path in result.new_blobs.items():
                    self.store.add_file(path, move=True, expect=oid)
                return self.store.add_tree(result.tree)
        if isinstance(result, ImageResult):
            return self.store.add_image(result.image)
        raise BuildError(f"builder returned {result!r}")


@contextlib.contextmanager
def open_store(path: str | os.PathLike[str]) -> Iterator[LocalStore]:
    store = LocalStore(path)
    try:
        yield store
    finally:
        store.close()
