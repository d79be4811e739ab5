"""Where a long command reports: a live progress bar on a terminal, plain lines in a log file.

Three formats (:class:`Log`):

* ``rich``: a live bar (description, steps done, elapsed, ETA) and messages above it; for a
  terminal.
* ``plain``: one line per reported step or message, never wrapped, each with a timestamp and,
  for progress, ``[done/total steps, elapsed, ETA]``; what ``nohup`` or a batch scheduler keeps
  when stderr is a file or a pipe (the default there).
* ``json``: one JSON object per line (``--log-json``): ``time``, ``event`` (``step`` or
  ``message``), ``message``, and for progress ``done``, ``total``, ``elapsed_s``, ``eta_s``.

The ETA is this run's mean time per step so far times the steps left.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

__all__ = ["FORMATS", "Log", "Steps", "duration"]

FORMATS = ("auto", "rich", "plain", "json")


def duration(seconds: float | None) -> str:
    """``"1h02m03s"``, ``"2m05s"``, ``"7s"``; ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Log:
    """A command's report channel over a rich ``console`` (default: stderr). ``fmt`` ``auto``
    picks ``rich`` when the console is a terminal, else ``plain``."""

    def __init__(self, console: Console | None = None, fmt: str = "auto") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        if fmt == "auto":
            fmt = "rich" if self.console.is_terminal else "plain"
        self.fmt = fmt

    @classmethod
    def of(cls, target: Console | Log | None) -> Log:
        """``target`` as a Log (a Console gets the automatic format)."""
        return target if isinstance(target, Log) else cls(target)

    def write(self, event: str, message: str, fields: dict[str, Any] | None = None,
              progress: str = "") -> None:
        """One record: a line (``plain``), a JSON object (``json``) or a rich print."""
        if self.console.quiet:
            return
        if self.fmt == "json":
            now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
            record = {"time": now, "event": event, "message": message, **(fields or {})}
            self._raw(json.dumps(record))
        elif self.fmt == "plain":
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._raw(f"{stamp} {message}{f' [{progress}]' if progress else ''}")
        else:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _raw(self, line: str) -> None:
        f = self.console.file
        f.write(line.replace("\n", " ") + "\n")
        f.flush()

    def info(self, message: str) -> None:
        self.write("message", message)

    @contextmanager
    def steps(self, total: int, done: int = 0) -> Iterator[Steps]:
        """Count ``total`` steps of which ``done`` were done before this run."""
        steps = Steps(self, total, done)
        if self.fmt != "rich":
            yield steps
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            steps.bar = (progress, progress.add_task("", total=total, completed=done))
            yield steps


class Steps:
    """Progress of one run: :meth:`stage` names what runs now, :meth:`advance` counts a step
    (a line in a log when ``report``), :meth:`say` prints a message (with the progress when
    ``progress``)."""

    def __init__(self, log: Log, total: int, done: int) -> None:
        self.log, self.total, self.done = log, total, done
        self.first = done
        self.started = time.monotonic()
        self.bar: tuple[Any, Any] | None = None

    def _fields(self) -> tuple[dict[str, Any], str]:
        elapsed = time.monotonic() - self.started
        ran = self.done - self.first
        eta = elapsed / ran * max(self.total - self.done, 0) if ran > 0 else None
        fields = {"done": self.done, "total": self.total, "elapsed_s": round(elapsed, 1),
                  "eta_s": None if eta is None else round(eta, 1)}
        text = f"{self.done}/{self.total} steps, {duration(elapsed)} elapsed, ETA {duration(eta)}"
        return fields, text

    def stage(self, description: str) -> None:
        if self.bar is not None:
            progress, task = self.bar
            progress.update(task, description=description)

    def advance(self, description: str, report: bool = True) -> None:
        self.done = min(self.done + 1, self.total)
        if self.bar is not None:
            progress, task = self.bar
            progress.update(task, advance=1, description=description)
        elif report:
            fields, text = self._fields()
            self.log.write("step", description, fields, text)

    def say(self, message: str, progress: bool = False) -> None:
        if self.bar is not None:
            self.bar[0].console.print(message, markup=False, highlight=False, soft_wrap=True)
            return
        fields, text = self._fields() if progress else ({}, "")
        self.log.write("message", message, fields, text)

    def finish(self, description: str = "done") -> None:
        self.done = self.total
        if self.bar is not None:
            progress, task = self.bar
            progress.update(task, completed=self.total, description=description)
