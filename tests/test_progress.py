"""trainer.progress: a bar on a terminal, one plain line per step elsewhere, silent unless a program turns it on."""

import io

import pytest

from trainer import progress


class FakeTerminal(io.StringIO):

  def isatty(self):
    return True


@pytest.fixture
def report_to():
  def start(stream):
    progress.report_to(stream)
    return stream
  yield start
  progress.report_to(None)


def test_off_a_terminal_one_plain_line_per_step(report_to):
  stream = report_to(io.StringIO())
  with progress.steps('validation shifted', 3) as task:
    for name in ('gamma_1.5', 'blur', 'jpeg_20'):
      task.advance(name)
  lines = stream.getvalue().splitlines()
  assert [line.rsplit(' (', 1)[0] for line in lines] == [
      'validation shifted: 1/3 gamma_1.5', 'validation shifted: 2/3 blur', 'validation shifted: 3/3 jpeg_20']
  assert all(line.endswith(' s)') for line in lines), lines
  # No carriage return or escape code: a Slurm log or `kubectl logs` shows it as it is.
  assert '\r' not in stream.getvalue() and '\x1b' not in stream.getvalue()


def test_on_a_terminal_a_bar_redrawn_in_place(report_to):
  stream = report_to(FakeTerminal())
  with progress.steps('predicting', 4) as task:
    for _ in range(4):
      task.advance()
  out = stream.getvalue()
  # One line, redrawn four times, ended once the task is.
  assert out.count('\r') == 4 and out.endswith('\n') and out.count('\n') == 1, repr(out)
  frames = out.split('\r')[1:]
  assert frames[0].startswith('\x1b[Kpredicting [' + '=' * 7 + '.' * 23 + '] 1/4')
  assert frames[-1].startswith('\x1b[Kpredicting [' + '=' * 30 + '] 4/4')


def test_an_unknown_total_counts_without_a_bar(report_to):
  stream = report_to(FakeTerminal())
  with progress.steps('predicting') as task:
    task.advance()
    task.advance()
  assert stream.getvalue().split('\r')[-1].startswith('\x1b[Kpredicting 2 ')


def test_only_the_outermost_task_reports(report_to):
  stream = report_to(io.StringIO())
  with progress.steps('outer', 2) as outer:
    for _ in range(2):
      with progress.steps('inner', 5) as inner:
        for _ in range(5):
          inner.advance()
      outer.advance()
  assert [line.split(' (')[0] for line in stream.getvalue().splitlines()] == ['outer: 1/2', 'outer: 2/2']
  assert inner.done == 5  # It counted, in silence.


def test_silent_unless_turned_on(capsys):
  with progress.steps('predicting', 2) as task:
    task.advance()
    task.advance()
  assert capsys.readouterr() == ('', '')


def test_trainer_shift_reports_each_shifted_prediction(untrained_run, run_program):
  """The programs turn it on: one line per shift of trainer.shift (stderr is captured here, not a terminal)."""
  from trainer import shift  # pylint: disable=import-outside-toplevel
  model_dir = untrained_run(64)
  code, _, stderr = run_program('trainer.shift', f'--model_dir={model_dir}', '--split=validation',
                                 '--batch_size=16')
  assert code == 0, stderr
  lines = [line for line in stderr.splitlines() if line.startswith('validation shifted: ')]
  assert [line.rsplit(' (', 1)[0] for line in lines] == [
      f'validation shifted: {i}/{len(shift.SHIFTS)} {name}' for i, name in enumerate(shift.SHIFTS, 1)]
  assert '\r' not in stderr
