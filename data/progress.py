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
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

__all__ = ["Progress", "track", "format_seconds", "is_tty", "MODES"]

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
        clock: time source (a test passes a fake one).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 mode: str = "auto", interval: float = 30.0, initial: int = 0,
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
        self._start = clock()
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
