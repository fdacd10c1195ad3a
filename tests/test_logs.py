"""The log of a run outside a terminal (Slurm, `kubectl logs`, a sweep): plain lines, mostly the project's own."""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT_FILES = {path.name for folder in ('trainer', 'cxr_tfds') for path in (REPO / folder).rglob('*.py')}
# absl's and TensorFlow's C++ log prefix: level letter, date or zeros, time, thread, file:line]
LOG_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\]')


def test_a_run_outside_a_terminal_logs_plain_lines_one_per_epoch(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.main', '--dataset=chest_xray_pneumonia/synthetic',
       f'--data_dir={tmp_path / "tfds"}', f'--model_dir={tmp_path / "run"}', '--model=cnn', '--cnn_filters=4',
       '--cnn_depth=2', '--image_size=32', '--epochs=2', '--fine_tune_epochs=1', '--batch_size=64'],
      capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stdout + result.stderr
  for control in ('\x1b', '\r', '\b'):  # Escape codes, carriage returns, backspaces: a progress bar redrawing.
    assert control not in log, repr(control)
  assert [line.split('] ', 1)[1].split(' (')[0] for line in log.splitlines() if '] epoch ' in line] == [
      'epoch 1/3', 'epoch 2/3', 'epoch 3/3']
  # The log's line of class weights is the one place they show: --class_weight=balanced (the default) is
  # n / (2 * n_class), on the synthetic train split's 129 normal and 405 pneumonia images.
  counts = re.search(r'training images per class \[129, 405\], class weights \[([\d.]+), ([\d.]+)\]', log)
  assert counts, log[-3000:]
  assert [float(weight) for weight in counts.groups()] == [round(534 / (2 * 129), 3), round(534 / (2 * 405), 3)]
  files = [match.group(1) for match in map(LOG_LINE.match, log.splitlines()) if match]
  ours = [name for name in files if name in PROJECT_FILES]
  theirs = [name for name in files if name not in PROJECT_FILES]
  assert len(ours) >= 8  # The build's counts, class weights, phases, epochs, the test result, the report.
  assert len(theirs) <= len(ours), theirs
