"""Bad values of the programs' shared flags end in one `error:` line, before anything runs."""

import subprocess
import sys

import pytest

from trainer import cli


@pytest.mark.parametrize('program, value', [('trainer.evaluate', 0), ('trainer.shift', 0), ('trainer.predict', -1)])
def test_a_batch_size_below_one_is_one_line(program, value, tmp_path, run_program):
  code, stdout, stderr = run_program(program, f'--model_dir={tmp_path}', f'--batch_size={value}',
                                     *(['image.jpeg'] if program == 'trainer.predict' else []))
  assert code == 1
  assert stdout == ''
  [line] = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert 'Traceback' not in stderr and stderr.strip().endswith(line)
  assert line.startswith(f'error: flag --batch_size={value}: ') and 'is not a positive integer' in line, stderr


@pytest.mark.parametrize('program, flag, line', [
    ('trainer.evaluate', '--n_resamples=0', 'error: flag --n_resamples=0: 0 is not a positive integer (see --helpfull).'),
    ('trainer.export', '--n_resamples=-5', 'error: flag --n_resamples=-5: -5 is not a positive integer (see --helpfull).'),
    ('trainer.shift', '--tta=0', 'error: flag --tta=0: 0 is not an integer in the range [1, 8] (see --helpfull).'),
])
def test_a_program_number_out_of_range_is_one_line(program, flag, line, tmp_path, run_program):
  code, stdout, stderr = run_program(program, f'--model_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', flag)
  assert code == 1 and stdout == ''
  assert stderr.strip().splitlines()[-1] == line, stderr[-2000:]
  assert 'Traceback' not in stderr and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('message', [
    # A peer killed mid-collective (seen on the 2-worker local cluster).
    'Graph execution error:\n\nDetected at node CollectiveReduceV2\nrecvmsg:Connection reset by peer\nAdditional GRPC '
    'error information from remote target /job:worker/replica:0/task:1 while calling '
    '/tensorflow.WorkerService/RecvBuf:',
    # A peer that stopped sending heartbeats.
    'Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped '
    'sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.',
])
def test_a_dead_peer_is_named_on_one_line(message):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  line = cli.peer_message(tf.errors.UnavailableError(None, None, message))
  assert line.startswith('worker 1 of this multi-worker job stopped or cannot be reached') and '\n' not in line
  assert cli.peer_message(tf.errors.UnavailableError(None, None, 'Socket closed')) is None


_PROGRAM = '''
import sys
from trainer import cli, errors

def main(argv):
  if sys.argv[1] == 'user':
    raise errors.MissingPath('/data/scans: no such folder.')
  # A bug inside a library raises the same built-in types a user error once did.
  raise ValueError('Exception encountered when calling layer "dense" (type Dense): shapes mismatch')

cli.run(main)
'''


@pytest.mark.parametrize('kind', ['user', 'bug'])
def test_a_user_error_is_one_line_and_any_other_exception_keeps_its_traceback(kind, tmp_path):
  program = tmp_path / 'program.py'
  program.write_text(_PROGRAM)
  done = subprocess.run([sys.executable, str(program), kind], capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1
  if kind == 'user':
    assert done.stderr.strip() == 'error: /data/scans: no such folder.'
  else:
    assert 'Traceback (most recent call last)' in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith('ValueError: Exception encountered when calling layer')
    assert not [line for line in done.stderr.splitlines() if line.startswith('error:')]
