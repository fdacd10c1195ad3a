"""Bad values of the programs' shared flags end in one `error:` line, before anything runs."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize('program, value', [('trainer.evaluate', 0), ('trainer.shift', 0), ('trainer.predict', -1)])
def test_a_batch_size_below_one_is_one_line(program, value, tmp_path):
  done = subprocess.run([sys.executable, '-m', program, f'--model_dir={tmp_path}', f'--batch_size={value}',
                         *(['image.jpeg'] if program == 'trainer.predict' else [])],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stdout == ''
  # TensorFlow's start-up lines may come first.
  [line] = [line for line in done.stderr.splitlines() if line.startswith('error:')]
  assert 'Traceback' not in done.stderr and done.stderr.strip().endswith(line)
  assert line.startswith(f'error: flag --batch_size={value}: ') and 'is not a positive integer' in line, done.stderr
