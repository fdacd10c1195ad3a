"""Progress of the commands that run for a while (shift, export, evaluate): a bar on a terminal, one plain line per
step elsewhere (a Slurm log, `kubectl logs`, a file), where a bar's carriage returns would be noise.

Silent unless a program turns it on (`report_to`), so that the library stays quiet in tests and notebooks. Only the
outermost task reports: the shifted predictions of `trainer.shift` are its steps, not the batches of each.
No TensorFlow here: pure modules may use it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, TextIO

_BAR_WIDTH = 30
_stream: TextIO | None = None
_depth = 0


def report_to(stream: TextIO | None) -> None:
  """Reports progress on `stream` (a program's stderr) from now on; None turns it off.

  A bar when `stream` is a terminal (its `isatty()`), one line per step otherwise.
  """
  global _stream
  _stream = stream


def _seconds(seconds: float) -> str:
  minutes, secs = divmod(round(seconds), 60)
  return f'{minutes} min {secs} s' if minutes else f'{secs} s'


class Steps:
  """The progress of one task of `total` steps (None: not known in advance); see `steps`."""

  def __init__(self, what: str, total: int | None, stream: TextIO | None):
    self.what, self.total, self.done = what, total, 0
    self._stream = stream
    self._bar = bool(stream is not None and stream.isatty())
    self._start = time.monotonic()

  def advance(self, label: str = '') -> None:
    """Counts one step done; `label` says which (e.g. the shift's name)."""
    self.done += 1
    if self._stream is None:
      return
    elapsed = _seconds(time.monotonic() - self._start)
    count = f'{self.done}/{self.total}' if self.total else f'{self.done}'
    if self._bar:
      filled = _BAR_WIDTH * min(self.done, self.total) // self.total if self.total else 0
      bar = f'[{"=" * filled}{"." * (_BAR_WIDTH - filled)}] ' if self.total else ''
      # \r and erase-line: the bar is redrawn in place; the line ends when the task does (`close`).
      self._stream.write(f'\r\x1b[K{self.what} {bar}{count} {label} {elapsed}'.rstrip())
    else:
      self._stream.write(f'{self.what}: {count}{f" {label}" if label else ""} ({elapsed})\n')
    self._stream.flush()

  def close(self) -> None:
    if self._bar and self.done:
      self._stream.write('\n')
      self._stream.flush()


@contextlib.contextmanager
def steps(what: str, total: int | None = None) -> Iterator[Steps]:
  """A task of `total` steps: `with progress.steps('shifted predictions', 9) as task: ... task.advance(name)`.

  Reports (see `report_to`) only when no other task is open; a task inside another counts in silence.
  """
  global _depth
  task = Steps(what, total, _stream if _depth == 0 else None)
  _depth += 1
  try:
    yield task
  finally:
    _depth -= 1
    task.close()
