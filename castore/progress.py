"""Showing realize progress: a live view on a terminal, plain lines otherwise.

Part of the CLI layer: it only prints what the realizer reports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from castore.errors import CastoreError
from castore.plan import Plan


def _short(oid: str) -> str:
    return oid[:12]


class PlainReporter:
    """One line per step start and end, to stderr; quiet steps that were already present."""

    def __init__(self, stream: Any = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._last_status = 0.0

    def start(self, plan: Plan, plan_hash: str, index: int, total: int) -> None:
        self._prefix = f"[{index + 1}/{total}]"

    def status(self, plan: Plan, text: str) -> None:
        now = time.monotonic()
        if not self.quiet and now - self._last_status > 5:
            self._last_status = now
            print(f"{self._prefix}   {plan.label}: {text}", file=self.stream, flush=True)

    def done(self, plan: Plan, oid: str, how: str, seconds: float) -> None:
        if how != "present" and not self.quiet:
            print(f"{self._prefix} {how} {plan.label} -> {_short(oid)} ({seconds:.1f} s)",
                  file=self.stream, flush=True)

    def failed(self, plan: Plan, error: CastoreError, log: Path | None) -> None:
        if log is not None and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"{self._prefix} FAILED {plan.label}; last lines of {log}:", file=self.stream)
            for line in tail:
                print(f"    {line}", file=self.stream)


class LiveReporter(PlainReporter):
    """A rich live line for the running step above a log of finished ones.

    rich is imported when the first step starts, so a realize that builds nothing stays fast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: Any = None
        self._t0 = 0.0
        self._label = ""

    def __enter__(self) -> LiveReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def _spinner(self, text: str) -> Any:
        from rich.spinner import Spinner

        return Spinner("dots", text)

    def start(self, plan: Plan, plan_hash: str, index: int, total: int) -> None:
        super().start(plan, plan_hash, index, total)
        if self.live is None:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(stderr=True)
            self.live = Live(console=self.console, refresh_per_second=8, transient=True)
            self.live.__enter__()
        from rich.markup import escape

        self._t0 = time.monotonic()
        self._label = escape(f"{self._prefix} {plan.label}")  # a recipe's name may hold [brackets]
        self.live.update(self._spinner(f"{self._label} [dim]{plan.builder}[/dim]"))

    def status(self, plan: Plan, text: str) -> None:
        from rich.markup import escape

        elapsed = time.monotonic() - self._t0  # text is a tool's output: make[1]: is not markup
        self.live.update(self._spinner(f"{self._label} [dim]{elapsed:4.0f}s {escape(text)}[/dim]"))

    def done(self, plan: Plan, oid: str, how: str, seconds: float) -> None:
        if how != "present":
            from rich.markup import escape

            self.console.print(f"{self._prefix} [green]{how}[/green] {escape(plan.label)} -> {_short(oid)} "
                               f"[dim]({seconds:.1f} s)[/dim]", highlight=False)

    def failed(self, plan: Plan, error: CastoreError, log: Path | None) -> None:
        self.live.update("")
        from rich.markup import escape

        self.console.print(f"{self._prefix} [red]failed[/red] {escape(plan.label)}", highlight=False)
        if log is not None and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            self.console.print(f"[dim]last lines of {escape(str(log))}:[/dim]", highlight=False)
            for line in tail:
                self.console.print(f"    {line}", highlight=False, markup=False)
