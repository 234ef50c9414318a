"""Progress for long commands (train, export, calibrate, audit): a live bar on a terminal, lines in logs.

On a terminal (the stream is a TTY and tqdm is installed) :class:`Progress` is a tqdm bar with
rate and ETA. Anywhere else (CI, ``nohup``, a file) a bar's carriage returns would fill the log
with one endless line, so it writes a plain line at most every ``interval`` seconds and one
when it closes::

    audit 1200/5000 img (24%) 41.3 img/s ETA 0:01:32 flagged=17

Library code does not print: it reports through callbacks, and a command renders them with this
class. Torch-free (tqdm is optional: without it a terminal gets the plain lines too).

Example::

    from anomaly.data.progress import Progress, track

    with Progress(total=len(paths), desc="audit", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch), flagged=n_flagged)

    for path in track(paths, desc="calibrate", unit="img"):
        ...

    show = CountProgress(desc="evaluate", unit="img")   # a library's progress(done, total) callback
    try:
        evaluate_bundle(bundle, data, progress=show)
    finally:
        show.close()
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

__all__ = ["Progress", "CountProgress", "track", "format_seconds", "is_tty", "MODES"]

MODES = ("auto", "bar", "lines", "none")
T = TypeVar("T")


def is_tty(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float | None) -> str:
    """``h:mm:ss`` (``?`` when unknown), as tqdm shows remaining time."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Counts work done and shows it: a tqdm bar on a terminal, plain lines otherwise.

    Args:
        total: units of work expected (``None``: unknown, no percentage or ETA).
        desc: what is running (``"audit"``, ``"epoch 3/100"``).
        unit: name of one unit (``"img"``, ``"batch"``).
        stream: where to write (default: ``sys.stderr`` at the time of each write).
        mode: ``auto`` (``bar`` on a TTY when tqdm is importable, else ``lines``), ``bar``,
            ``lines`` or ``none`` (silent; :meth:`write` still writes).
        interval: seconds between two plain lines (``lines`` mode).
        initial: units already done (a resumed run); the rate counts only the new ones.
        elapsed: seconds the work had already run when this display opened (one opened at the
            first report of a callback); rate, ETA and time taken count from that start.
        clock: time source (a test passes a fake one).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 mode: str = "auto", interval: float = 30.0, initial: int = 0, elapsed: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self._stream = stream
        self.interval = interval
        self.n = initial
        self._initial = initial
        self._clock = clock
        self._start = clock() - max(float(elapsed), 0.0)
        self._last_line = self._start
        self._postfix: dict[str, Any] = {}
        self._closed = False
        self._bar = None
        if mode == "auto":
            mode = "bar" if is_tty(self.stream) and _tqdm() is not None else "lines"
        if mode == "bar" and _tqdm() is None:
            mode = "lines"
        self.mode = mode
        if mode == "bar":
            self._bar = _tqdm()(total=total, desc=desc, unit=unit, file=self.stream, initial=initial,
                                dynamic_ncols=True, leave=True, smoothing=0.1)
            if elapsed > 0:  # tqdm's elapsed time and first rate from the work's start too
                self._bar.start_t -= elapsed
                self._bar.last_print_t -= elapsed

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    # -- counting ------------------------------------------------------------------------------
    @property
    def rate(self) -> float | None:
        """Units per second since this display started (``None`` before the first unit)."""
        elapsed = self._clock() - self._start
        done = self.n - self._initial
        return done / elapsed if done > 0 and elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (``None`` when the total or the rate is unknown)."""
        rate = self.rate
        if self.total is None or rate is None:
            return None
        return max(self.total - self.n, 0) / rate

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Add ``n`` units done; keyword arguments replace the shown values (``loss=0.01``)."""
        self.n += n
        if postfix:
            self._postfix = dict(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _format_value(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines":
            now = self._clock()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._emit(self.status_line())

    def set_description(self, desc: str) -> None:
        """Change what the display says is running (``"epoch 4/100"``)."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def set_postfix(self, **postfix: Any) -> None:
        """Replace the shown values without counting work."""
        self._postfix = dict(postfix)
        if self._bar is not None:
            self._bar.set_postfix({k: _format_value(v) for k, v in postfix.items()})

    def status_line(self) -> str:
        """The plain line: ``desc n/total unit (pct%) rate unit/s ETA h:mm:ss key=value …``."""
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n} {self.unit}")
        rate = self.rate
        if rate is not None:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total:
            parts.append(f"ETA {format_seconds(self.eta)}")
        else:
            parts.append(f"elapsed {format_seconds(self._clock() - self._start)}")
        parts += [f"{k}={_format_value(v)}" for k, v in self._postfix.items()]
        return " ".join(parts)

    # -- output --------------------------------------------------------------------------------
    def write(self, line: str) -> None:
        """Write a line that stays (above a bar; in order with the plain lines)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._emit(line)

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Finish the display (``lines``: a final status line with the time taken)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.n > self._initial:
            self._emit(f"{self.status_line()} done in {format_seconds(self._clock() - self._start)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountProgress:
    """A library's ``progress(done, total, **postfix)`` callback shown with :class:`Progress`.

    Library functions report absolute counts (``done`` of ``total`` images) and do not know how
    they are shown; a command passes one of these and closes it when the call returns. The
    display opens at the first report, when the total is known (later reports keep that total),
    so nothing is shown for a call that has no work; it closes when ``done`` reaches the total,
    so the final line's time and rate are the work's, not those of what follows. Keyword
    arguments of a report replace the shown values (``flagged=3``).

    Args:
        desc, unit, stream, mode, interval: as for :class:`Progress` (``mode="none"``: silent).
    """

    def __init__(self, *, desc: str = "", unit: str = "it", stream: TextIO | None = None, mode: str = "auto",
                 interval: float = 30.0) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.desc = desc
        self.unit = unit
        self.stream = stream
        self.mode = mode
        self.interval = interval
        self.bar: Progress | None = None
        self._finished = False

    def __call__(self, done: int, total: int | None, *, seconds: float | None = None, **postfix: Any) -> None:
        """Report ``done`` of ``total`` units; ``seconds``: how long the work has run, where the caller
        measures it (a first report after the first unit then still gives the right rate)."""
        if self.mode == "none" or self._finished:
            return
        if self.bar is None:
            self.bar = Progress(total=total, desc=self.desc, unit=self.unit, stream=self.stream, mode=self.mode,
                                interval=self.interval, elapsed=seconds or 0.0)
        self.bar.update(done - self.bar.n, **postfix)
        if self.bar.total is not None and done >= self.bar.total > 0:
            self.close()  # the work is done: its time and rate, not those of what the caller does next

    def close(self) -> None:
        """Finish the display (``lines``: the final status line); safe to call twice or unopened."""
        self._finished = True
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> CountProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Yield from ``iterable`` while a :class:`Progress` counts one unit per item.

    ``total`` defaults to ``len(iterable)`` when it has one; other keyword arguments go to
    :class:`Progress`.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _tqdm():
    """``tqdm.tqdm`` or ``None`` when tqdm is not installed (it comes with the ``train`` extra)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
