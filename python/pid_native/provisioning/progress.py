"""Download progress: structured events for hosts, tqdm bars for the command line.

A host passes ``progress=callback`` to :func:`pid_native.provision` and receives
:class:`FetchEvent` objects in order: ``repair`` if an existing bundle failed verification,
one ``plan``, then per file ``cached``, or ``start``, ``bytes``... and ``verified`` (with
``refetch`` when a download fails its check and is fetched again), and finally
``complete``. Callbacks run on the calling thread, except that ``bytes`` events of
Xet-backed downloads come from huggingface_hub's download thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

EventKind = Literal["repair", "plan", "cached", "start", "bytes", "verified", "refetch", "complete"]


class FetchEvent(BaseModel):
    """One provisioning progress report.

    Attributes:
        kind: what happened:
            ``repair``: the existing bundle failed verification (``message`` lists the
            problems) and is rebuilt;
            ``plan``: ``total`` bytes in ``files`` files are to be downloaded;
            ``cached``: ``file`` is already in the Hub cache (or local), nothing to download;
            ``start``: downloading ``file`` (``file_total`` bytes) begins;
            ``bytes``: ``file_done`` of ``file_total`` bytes, ``done`` of ``total`` overall;
            ``verified``: ``file`` passed its size, checksum and format checks;
            ``refetch``: ``file`` failed them (``message`` says how) and is downloaded again;
            ``complete``: the bundle at ``message`` is ready.
        component: ``pid``, ``gemma`` or ``vae``.
        file: the file's name in its repository.
        file_done: bytes of ``file`` downloaded so far.
        file_total: size of ``file``.
        done: bytes downloaded so far, all files.
        total: bytes to download, all files.
        files: number of files to download (``plan``).
        message: details for ``refetch`` and ``complete``.
    """

    model_config = ConfigDict(frozen=True)

    kind: EventKind
    component: str | None = None
    file: str | None = None
    file_done: int = 0
    file_total: int | None = None
    done: int = 0
    total: int = 0
    files: int = 0
    message: str = ""


ProgressCallback = Callable[[FetchEvent], None]


class Reporter:
    """Keeps the byte counts and turns them into :class:`FetchEvent` calls."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0
        self.component: str | None = None
        self.file: str | None = None
        self.file_done = 0
        self.file_total: int | None = None

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self.callback is not None:
            self.callback(FetchEvent(kind=kind, done=self.done, total=self.total, **fields))

    def _file_event(self, kind: EventKind, message: str = "") -> None:
        self._emit(
            kind,
            component=self.component,
            file=self.file,
            file_done=self.file_done,
            file_total=self.file_total,
            message=message,
        )

    def plan(self, total: int, files: int) -> None:
        self.total = total
        self._emit("plan", files=files)

    def cached(self, component: str, file: str) -> None:
        self._emit("cached", component=component, file=file)

    def start(self, component: str, file: str, size: int) -> type[tqdm]:
        """Announce a download; returns the ``tqdm_class`` that reports its bytes here."""
        self.component, self.file, self.file_done, self.file_total = component, file, 0, size
        self._file_event("start")
        return type("FileBar", (_FileBar,), {"reporter": self})

    def advance(self, n: int) -> None:
        self.file_done += n
        self.done += n
        self._file_event("bytes")

    def verified(self) -> None:
        self._file_event("verified")

    def refetch(self, component: str, file: str, size: int, reason: str, was_downloading: bool) -> None:
        """``file`` failed its check and is downloaded again: forget its bytes, or add it to the total."""
        if was_downloading:
            self.done -= self.file_done
        else:
            self.total += size
        self.component, self.file, self.file_done, self.file_total = component, file, 0, size
        self._file_event("refetch", reason)

    def repair(self, report: str) -> None:
        self._emit("repair", message=report)

    def complete(self, bundle: str) -> None:
        self._emit("complete", message=bundle)


class _FileBar(tqdm):
    """The ``tqdm_class`` given to ``huggingface_hub.hf_hub_download``: draws nothing, reports bytes.

    ``update`` receives the bytes written to disk (plain HTTP and Xet alike). Defining
    ``update_transfer`` makes huggingface_hub use this one bar for Xet downloads instead of
    two; the network-side counts it sends there are not needed.
    """

    reporter: Reporter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        if kwargs.get("initial"):
            self.reporter.advance(int(kwargs["initial"]))

    def update(self, n: float | None = 1) -> bool | None:
        self.reporter.advance(int(n or 0))
        return super().update(n)

    def update_transfer(self, n: float | None = 1) -> None:
        """Network bytes of a Xet download (ignored; ``update`` counts the bytes written)."""

    def set_transfer_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Transfer-rate text of a Xet download (ignored)."""


class ConsoleProgress:
    """A progress callback drawing tqdm bars on stderr: all bytes, and the current file."""

    def __init__(self) -> None:
        self.disable = not sys.stderr.isatty()
        self.overall: tqdm | None = None
        self.current: tqdm | None = None

    def __call__(self, event: FetchEvent) -> None:
        if event.kind == "plan":
            self.overall = tqdm(
                total=event.total,
                desc=f"{event.files} files",
                unit="B",
                unit_scale=True,
                disable=self.disable,
            )
        elif event.kind == "repair":
            tqdm.write(
                f"the existing bundle failed verification and is rebuilt:\n{event.message}", file=sys.stderr
            )
        elif event.kind == "cached":
            tqdm.write(f"  {event.component}: {event.file} (cached)", file=sys.stderr)
        elif event.kind == "start":
            self.current = tqdm(
                total=event.file_total,
                desc=event.file,
                unit="B",
                unit_scale=True,
                leave=False,
                disable=self.disable,
            )
        elif event.kind in ("bytes", "refetch", "verified"):
            if event.kind == "refetch":
                tqdm.write(
                    f"  {event.component}: {event.file}: {event.message}; downloading it again",
                    file=sys.stderr,
                )
            if self.current is not None:
                self.current.n = event.file_done
                self.current.refresh()
            if self.overall is not None:
                self.overall.n = event.done
                self.overall.refresh()
            if event.kind == "verified":
                self._close_current()
                tqdm.write(f"  {event.component}: {event.file} (downloaded, verified)", file=sys.stderr)
        elif event.kind == "complete":
            self.close()

    def _close_current(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> None:
        """Close the bars (also after a failure)."""
        self._close_current()
        if self.overall is not None:
            self.overall.close()
            self.overall = None


__all__ = ["ConsoleProgress", "EventKind", "FetchEvent", "ProgressCallback", "Reporter"]
