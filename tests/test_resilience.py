"""Faults and bad input: preemption, torn checkpoints, NaN losses, full disks, bad flags and data, unsafe models.

The runs that are stopped are real `python -m trainer.main` processes on the synthetic config at 32 pixels, killed
with a real SIGKILL (or preempted) in the middle of an epoch (the progress bar on stdout says where they are); the runs
that go to their end, the references and the last run of a resumed one, run in this process (`_train_here`), which
saves each the import of TensorFlow and Keras. With --seed and --deterministic, a run killed and started again ends
with the same model as one that never stopped, to the last bit, so the comparisons are exact. A user error must end
in exactly one `error:` line and exit code 1, and leave nothing half-written behind.
"""

import ast
import errno
import glob
import hashlib
import json
import os
import pathlib
import pty
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import zipfile

from absl import flags
from absl import logging as absl_logging
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # disable_op_determinism, which the public API lacks.
from tensorboard.backend.event_processing import event_accumulator

from trainer import data
from trainer import runs as runs_lib
from trainer import config as config_lib
from trainer import export
from trainer import lock
from trainer import main
from trainer import preemption
from trainer import train
from trainer.config import Config

# 534 training images at 32 px: 16 steps of 32 an epoch, about a second each here.
RUN_FLAGS = ('--dataset=chest_xray_pneumonia/synthetic', '--image_size=32', '--cnn_filters=8', '--cnn_depth=3',
             '--batch_size=32', '--epochs=2', '--fine_tune_epochs=1', '--learning_rate=1e-3',
             '--fine_tune_learning_rate=3e-4', '--weights=none', '--seed=1', '--deterministic',
             # Smaller than the split, so that the file cache is still being filled in the middle of epoch 1.
             '--shuffle_buffer=64')
_PROGRESS = re.compile(rb'(\d+)/(\d+)')


def _command(data_dir, model_dir, *extra):
  return [sys.executable, '-m', 'trainer.main', f'--data_dir={data_dir}', f'--model_dir={model_dir}', *RUN_FLAGS,
          *extra]


def _run(command, *, kill_in_epoch=None, sig=signal.SIGKILL):
  """Runs a trainer; with kill_in_epoch=N, sends `sig` in the middle of the N-th epoch it runs (counted from 1).

  Returns:
    (exit code, stderr).
  """
  # Keras's progress bar, whose step counts say when to kill, is drawn only on a terminal: stdout is a pseudo-terminal.
  terminal, child_stdout = pty.openpty()
  process = subprocess.Popen(command, stdout=child_stdout, stderr=subprocess.PIPE)
  os.close(child_stdout)
  stderr = []
  reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()))
  reader.start()
  epoch, last_step = 1, 0
  while chunk := _read_terminal(terminal):
    for match in _PROGRESS.finditer(chunk):
      step, steps = int(match.group(1)), int(match.group(2))
      epoch += step < last_step  # Keras's progress bar starts again at each epoch.
      last_step = step
      # Steps done, with some left: the kill lands before the epoch's checkpoint.
      if epoch == kill_in_epoch and 3 <= step <= steps - 4 and process.poll() is None:
        process.send_signal(sig)
        kill_in_epoch = None  # Once.
  returncode = process.wait(timeout=600)
  os.close(terminal)
  reader.join()
  return returncode, stderr[0].decode(errors='replace')


def _read_terminal(terminal: int) -> bytes:
  try:
    return os.read(terminal, 4096)
  except OSError:  # EIO: the child closed its end of the terminal.
    return b''


def _error_lines(stderr):
  assert 'Traceback' not in stderr, stderr[-3000:]
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def _resumed_after(stderr):
  """The epoch a run resumed after, from its log; None for a run that started from scratch."""
  match = re.search(r'Resuming from \S+ after epoch (\d+)\.', stderr)
  return int(match.group(1)) if match else None


def _scalars(run_dir, tag):
  events = event_accumulator.EventAccumulator(run_dir, size_guidance={'tensors': 0})
  events.Reload()
  return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def _metrics(model_dir):
  with open(os.path.join(model_dir, 'report.json')) as f:
    return json.load(f), _scalars(os.path.join(model_dir, 'validation'), 'auc')


def _latest_checkpoint_epoch(model_dir):
  return int(tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints')).rsplit('-', 1)[1])


def _digests(model_dir):
  """SHA-256 of every file under model_dir, by relative path."""
  digests = {}
  for path in glob.glob(os.path.join(model_dir, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, model_dir)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def _checkpoint_digests(model_dir):
  return {name: digest for name, digest in _digests(model_dir).items() if name.startswith('checkpoints/ckpt-')}


def _config(data_dir, model_dir, **changes):
  """The Config that RUN_FLAGS give, for runs in this process; without --deterministic unless asked for
  (deterministic=True, for a run compared to the bit with the processes')."""
  settings = dict(dataset='chest_xray_pneumonia/synthetic', data_dir=data_dir, model_dir=model_dir, image_size=32,
                  cnn_filters=8, cnn_depth=3, batch_size=32, epochs=2, fine_tune_epochs=1, learning_rate=1e-3,
                  fine_tune_learning_rate=3e-4, weights='none', seed=1, shuffle_buffer=64)
  return Config(**{**settings, **changes}).validate()


def _train_here(config):
  """train.run as trainer.main calls it, in this process (a process of its own costs some 6 s more, importing
  TensorFlow and Keras). --deterministic is undone after the run, so the tests after it run as they would alone."""
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  try:
    return train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  finally:
    if config.deterministic:
      tf_config.disable_op_determinism()


def _main_here(capsys, *argv, log=False):
  """Runs `python -m trainer.main ARGV` in this process; returns (exit code, stderr). With log=True, absl's log goes
  to the stderr that capsys reads, as a process of its own writes it there."""
  flags.FLAGS.unparse_flags()
  capsys.readouterr()
  with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
    patch.setattr(sys, 'argv', ['trainer.main', *argv])
    if log:
      patch.setattr(absl_logging.get_absl_handler().python_handler, 'stream', sys.stderr)
    main.run()
  return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope='module')
def reference(synthetic_data_dir, tmp_path_factory):
  """A run that is never interrupted, in this process: the model directory the others are compared with.
  test_killed_and_preempted_runs_resume_where_they_stopped_and_end_the_same checks that processes of their own, which
  parse the same settings as flags, end the same."""
  model_dir = str(tmp_path_factory.mktemp('reference'))
  _train_here(_config(synthetic_data_dir, model_dir, deterministic=True))
  return model_dir


def _train_logged(caplog, config):
  """_train_here; returns the run's log, what a process of its own writes on stderr. The level is set for each run:
  TensorFlow's SavedModel export leaves absl's at WARNING."""
  caplog.set_level('INFO', logger='absl')
  caplog.clear()
  _train_here(config)
  return caplog.text


def _copy(model_dir, tmp_path, name):
  copy = str(tmp_path / name)
  shutil.copytree(model_dir, copy)
  return copy


# Preemption.


def test_killed_and_preempted_runs_resume_where_they_stopped_and_end_the_same(reference, synthetic_data_dir, tmp_path,
                                                                             caplog):
  """One run, stopped four times on its way: killed in epoch 1 while filling the file cache (1 step a tf.function
  call), killed in epoch 2 at 3 steps a call, preempted (SIGTERM) in epoch 2 at a loop boundary, killed in epoch 3
  (fine_tune) at 4 steps a call; the last run, which is not stopped, in this process at 1 step a call. Each process
  changes --steps_per_loop (not fixed on resume), and the run ends with the model of the uninterrupted one, to the bit.
  SIGUSR1 takes SIGTERM's path (tests/test_preemption.py). The runs are deterministic: the processes, which parse
  RUN_FLAGS, and this process, which builds the Config, make the reference's model, so a process of its own would too
  (one uninterrupted process more would cost the suite a minute)."""
  model_dir, cache_dir = str(tmp_path / 'run'), str(tmp_path / 'cache')
  preempted = os.path.join(model_dir, 'checkpoints', 'preempted')

  def command(steps_per_loop):
    return _command(synthetic_data_dir, model_dir, f'--cache_dir={cache_dir}', f'--steps_per_loop={steps_per_loop}')

  returncode, stderr = _run(command(1), kill_in_epoch=1)
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  assert glob.glob(os.path.join(cache_dir, '*.lockfile')), 'the kill should leave a half-filled cache behind'
  assert not glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-*'))

  # Without the stale lockfile's removal, this run fails at its first step with AlreadyExistsError. 3 steps a call:
  # an epoch's 16 steps are five loops and a last one of 1.
  returncode, stderr = _run(command(3), kill_in_epoch=2)
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  assert _resumed_after(stderr) is None
  assert _latest_checkpoint_epoch(model_dir) == 1

  # The progress bar is drawn after the loop that passes step 10 (at 12): the signal stops the loop after it, at 15.
  sig = signal.SIGTERM
  returncode, stderr = _run(command(3), kill_in_epoch=1, sig=sig)
  assert returncode == preemption.REQUEUE_EXIT_CODE, stderr[-3000:]
  assert _resumed_after(stderr) == 1
  [line] = [line for line in stderr.splitlines() if 'Stopped by' in line]
  step = int(re.search(rf'Stopped by {sig.name} after step (\d+) of epoch 2: saved \S+preempted/ckpt-(\d+)\.',
                       line).group(1))
  assert step % 3 == 0 and 12 <= step < 16, line
  assert 10 <= step < 16 and _latest_checkpoint_epoch(model_dir) == 1
  assert tf.train.latest_checkpoint(preempted).endswith(f'-{16 + step}')

  # 4 steps a call from the preempted step: loops end at multiples of 4 within the epoch again.
  returncode, stderr = _run(command(4), kill_in_epoch=2)
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  assert f'Resuming at step {step} of epoch 2 (global step {16 + step}), where a preempted run stopped.' in stderr
  assert 'Phase fine_tune' in stderr  # Killed in the second phase.
  assert _latest_checkpoint_epoch(model_dir) == 2
  assert not os.path.exists(preempted)  # Superseded by epoch 2's checkpoint.

  log = _train_logged(caplog, _config(synthetic_data_dir, model_dir, cache_dir=cache_dir, deterministic=True))
  assert _resumed_after(log) == 2
  assert not glob.glob(os.path.join(cache_dir, '*.lockfile'))
  assert glob.glob(os.path.join(cache_dir, '*.index'))  # The cache was completed.

  # Same data order, augmentation draws, optimizer state, best epoch and threshold: the same model, exactly; and the
  # same training curves (the preempted epoch's metrics went on from their checkpointed state).
  report, aucs = _metrics(model_dir)
  assert len(aucs) == 3 and len(set(value for _, value in aucs)) > 1, aucs  # Three epochs, and a model that moves.
  assert (report, aucs) == _metrics(reference)
  assert _scalars(os.path.join(model_dir, 'train'), 'loss') == _scalars(os.path.join(reference, 'train'), 'loss')
  with open(os.path.join(model_dir, 'config.json')) as f:
    assert json.load(f)['steps_per_loop'] == 1  # The run's first settings; the resumed runs' differ and may.


# Every epoch without a better validation AUC halves the rate (plateau_patience 1), and two of them in a row end the
# phase. Where that happens depends on the arithmetic (with 2 threads the AUC reached 1.0 in epoch 4 and the phase ended
# after epoch 6; with 1 thread, in epoch 6 and after epoch 8), so the test reads it from the reference run.
_STOPPING = dict(epochs=10, fine_tune_epochs=2, learning_rate=1e-2, fine_tune_learning_rate=1e-3,
                 early_stopping_patience=2, lr_schedule='plateau', plateau_patience=1)
_STOPPING_FLAGS = tuple(f'--{name}={value}' for name, value in _STOPPING.items())


def test_early_stopping_and_plateau_keep_their_counters_across_a_kill(synthetic_data_dir, tmp_path, caplog,
                                                                     monkeypatch):
  """The reference and the resumed run in this process, the run that is killed in a process of its own. That one
  starts from the reference's own model dir as it was two epochs before the phase ended, so that it trains two epochs,
  not all of them, and is killed in the last: its checkpoint then holds an epoch without improvement and the rate
  reductions so far, which the resumed run must carry over to stop where the reference stopped."""
  reference = str(tmp_path / 'reference')
  end_epoch = train.end_epoch

  def end_epoch_and_copy(*args, **kwargs):
    result = end_epoch(*args, **kwargs)
    for writer in kwargs['writers'].values():
      writer.flush()
    shutil.copytree(reference, str(tmp_path / f'after-{kwargs["epoch"] + 1}'),
                    ignore=shutil.ignore_patterns(lock.LOCK_NAME))
    return result

  monkeypatch.setattr(train, 'end_epoch', end_epoch_and_copy)
  log = _train_logged(caplog, _config(synthetic_data_dir, reference, deterministic=True, **_STOPPING))
  monkeypatch.setattr(train, 'end_epoch', end_epoch)
  epochs = _STOPPING['epochs']
  stopped = re.search(rf'the head phase ends after epoch (\d+) of {epochs}', log)
  assert stopped, log[-3000:]
  ended = int(stopped.group(1))
  assert ended < epochs
  assert 'The next phase starts from the best epoch so far' in log
  aucs = _scalars(os.path.join(reference, 'validation'), 'auc')
  assert [step for step, _ in aucs] == [*range(1, ended + 1), epochs + 1, epochs + 2]
  rates = [rate for _, rate in _scalars(os.path.join(reference, 'train'), 'learning_rate')]
  # Each epoch's rate, as ReduceLROnPlateau with patience 1 sets it from the AUCs before it.
  expected, rate, best = [], 1e-2, -np.inf
  for _, auc in aucs[:ended]:
    expected.append(rate)
    best, rate = (auc, rate) if auc > best else (best, rate * 0.5)
  np.testing.assert_allclose(rates[:ended], expected, rtol=1e-6)
  # At least two reductions before the last epoch, which the kill below must carry over; and, as the phase ended,
  # its last two epochs did not improve.
  assert len(set(expected[:ended])) >= 3, expected
  assert max(auc for _, auc in aucs[:ended - 2]) >= max(auc for _, auc in aucs[ended - 2:ended])

  # Killed in the phase's last epoch: the checkpoint of the epoch before holds one epoch without improvement and the
  # reductions. The resumed run must stop after the same epoch and train it at the reduced rate, or it differs from
  # the reference.
  model_dir = str(tmp_path / f'after-{ended - 2}')
  command = _command(synthetic_data_dir, model_dir, *_STOPPING_FLAGS)
  returncode, stderr = _run(command, kill_in_epoch=2)  # Its second epoch: epoch `ended`.
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  assert _resumed_after(stderr) == ended - 2
  assert _latest_checkpoint_epoch(model_dir) == ended - 1
  log = _train_logged(caplog, _config(synthetic_data_dir, model_dir, deterministic=True, **_STOPPING))
  assert _resumed_after(log) == ended - 1
  assert f'the head phase ends after epoch {ended} of {epochs}' in log
  assert _metrics(model_dir) == _metrics(reference)
  assert _scalars(os.path.join(model_dir, 'train'), 'learning_rate')[-5:] == _scalars(
      os.path.join(reference, 'train'), 'learning_rate')[-5:]


def test_an_unreadable_preempted_checkpoint_falls_back_to_the_epoch_checkpoint(reference, synthetic_data_dir, tmp_path,
                                                                                caplog):
  caplog.set_level('INFO', logger='absl')
  model_dir = _copy(reference, tmp_path, 'torn_preempted')
  preempted = os.path.join(model_dir, 'checkpoints', 'preempted')
  os.makedirs(preempted)
  for name in ('ckpt-40.index', 'ckpt-40.data-00000-of-00001'):
    with open(os.path.join(preempted, name), 'wb') as f:
      f.write(b'cut short')
  with open(os.path.join(preempted, 'checkpoint'), 'w') as f:
    f.write('model_checkpoint_path: "ckpt-40"\nall_model_checkpoint_paths: "ckpt-40"\n')

  report = _train_here(_config(synthetic_data_dir, model_dir))

  assert re.search(r"Skipping the preempted run's checkpoint \S+ckpt-40, which cannot be read", caplog.text)
  assert 'Resuming at step' not in caplog.text
  assert report == _metrics(reference)[0]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(reference, synthetic_data_dir, tmp_path, caplog):
  # On absl's logger too: an earlier in-process run's unparse_flags() leaves absl's verbosity at WARNING.
  caplog.set_level('INFO', logger='absl')
  model_dir = _copy(reference, tmp_path, 'torn')
  [data_file] = glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-3.data-*'))
  with open(data_file, 'r+b') as f:
    f.truncate(os.path.getsize(data_file) // 2)

  report = _train_here(_config(synthetic_data_dir, model_dir))

  assert re.search(r'Skipping checkpoint \S+ckpt-3, which cannot be read', caplog.text)
  assert re.search(r'Resuming from \S+ckpt-2 after epoch 2\.', caplog.text)
  assert report['n_images'] == 120
  # Epoch 3 was trained again; the torn files were moved aside first, not overwritten.
  torn = os.path.join(model_dir, 'checkpoints', 'unreadable', os.path.basename(data_file))
  assert os.path.getsize(torn) == os.path.getsize(os.path.join(reference, 'checkpoints',
                                                               os.path.basename(data_file))) // 2
  reader = tf.train.load_checkpoint(os.path.join(model_dir, 'checkpoints', 'ckpt-3'))
  assert reader.get_tensor('epoch/.ATTRIBUTES/VARIABLE_VALUE') == 3
  assert _latest_checkpoint_epoch(model_dir) == 3


@pytest.mark.parametrize('damage', ['deleted', 'garbled', 'empty'])
def test_a_lost_state_file_resumes_from_the_checkpoint_files(damage, reference, synthetic_data_dir, tmp_path, caplog):
  caplog.set_level('INFO', logger='absl')
  model_dir = _copy(reference, tmp_path, damage)
  state = os.path.join(model_dir, 'checkpoints', 'checkpoint')
  if damage == 'deleted':
    os.remove(state)
  else:
    with open(state, 'w') as f:
      f.write('model_checkpoint_path: {{ \x00 garbage' if damage == 'garbled' else '')
  checkpoints = _checkpoint_digests(model_dir)

  report = _train_here(_config(synthetic_data_dir, model_dir))

  assert re.search(r'state file \S+checkpoint is missing, unreadable or incomplete', caplog.text)
  assert re.search(r'Resuming from \S+ckpt-3 after epoch 3\.', caplog.text)
  # Nothing was trained again or overwritten, and the state file names the checkpoints again.
  assert _checkpoint_digests(model_dir) == checkpoints
  assert _latest_checkpoint_epoch(model_dir) == 3
  assert report == _metrics(reference)[0]


def test_no_readable_checkpoint_is_one_line(reference, synthetic_data_dir, tmp_path, capsys):
  model_dir = _copy(reference, tmp_path, 'all_torn')
  for index in glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-*.index')):
    with open(index, 'r+b') as f:
      f.truncate(10)
  before = _digests(model_dir)

  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                            *[f for f in RUN_FLAGS if f != '--deterministic'])

  assert code == 1
  [line] = _error_lines(stderr)
  assert 'No checkpoint in' in line and 'can be read' in line and '--model_dir' in line
  assert _digests(model_dir) == before


def test_a_second_run_on_a_model_dir_in_use_is_one_line_and_changes_nothing(reference, synthetic_data_dir, tmp_path,
                                                                            capsys):
  model_dir = _copy(reference, tmp_path, 'in_use')
  before = _digests(model_dir)
  with lock.hold(model_dir):
    code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                              *[f for f in RUN_FLAGS if f != '--deterministic'])
    assert code == 1
    [line] = _error_lines(stderr)
    assert f'is in use by another training run (pid {os.getpid()} on ' in line, line
    assert {k: v for k, v in _digests(model_dir).items() if k != lock.LOCK_NAME} == before


def test_a_split_without_a_class_is_refused_before_training(synthetic_data_dir, tmp_path, monkeypatch):
  # A dataset built before the builder refused such splits: every normal image of train skipped.
  class_counts = data.class_counts
  monkeypatch.setattr(data, 'class_counts', lambda builder, split: (
      class_counts(builder, split) * np.array([0, 1]) if split == 'train' else class_counts(builder, split)))
  with pytest.raises(ValueError, match=r'The train split of \S+ has no normal image \(\{.normal.: 0, '
                                       r'.pneumonia.: 405\}\)'):
    _train_here(_config(synthetic_data_dir, str(tmp_path / 'run')))
  assert not glob.glob(str(tmp_path / 'run' / 'checkpoints' / '*'))


@pytest.mark.parametrize('content, reason', [('[]', 'JSON list, not an object'), ('null', 'JSON NoneType'),
                                             ('{"model": "cnn", ', 'Expecting')])
def test_a_config_json_that_is_not_settings_is_one_line_naming_it(content, reason, synthetic_data_dir, tmp_path,
                                                                   capsys):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / 'config.json').write_text(content)
  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                            *[f for f in RUN_FLAGS if f != '--deterministic'])
  assert code == 1
  [line] = _error_lines(stderr)
  assert f'{model_dir / "config.json"} is not the settings of a run' in line and reason in line, line
  assert (model_dir / 'config.json').read_text() == content


def test_a_run_that_fails_to_build_its_model_leaves_no_config_json(synthetic_data_dir, tmp_path, capsys):
  model_dir = tmp_path / 'run'
  # Ten 2x2 poolings do not fit in 32 pixels.
  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                            *[f for f in RUN_FLAGS if f not in ('--deterministic', '--cnn_depth=3')], '--cnn_depth=10')
  assert code == 1, stderr[-2000:]
  assert not (model_dir / 'config.json').exists()
  # So the corrected command is not refused as "a run of --cnn_depth=10".
  assert train._check_model_dir(_config(synthetic_data_dir, str(model_dir)), 32) is not None


# NaN and infinite losses.


def test_a_diverged_run_stops_at_once_keeps_the_last_good_checkpoint_and_resumes(synthetic_data_dir, tmp_path,
                                                                                 capsys):
  model_dir = str(tmp_path / 'diverged')
  # 1e30: a rate that overflows the weights. At 1e6 this cnn's loss only reached 1e10, still finite, with some draws
  # of the augmentation. In this process (the exit code and the error line are trainer.main's, as in a process of its
  # own), so without --deterministic, which cannot be undone.
  returncode, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                                  *[f for f in RUN_FLAGS if f != '--deterministic'], '--optimizer=sgd', '--epochs=1',
                                  '--fine_tune_learning_rate=1e30')

  assert returncode == 1
  [line] = _error_lines(stderr)
  assert re.search(r'loss became (nan|inf) in step \d+ of epoch 2\b', line), line
  assert '--fine_tune_learning_rate' in line
  assert _latest_checkpoint_epoch(model_dir) == 1
  assert not glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-2*'))
  reader = tf.train.load_checkpoint(os.path.join(model_dir, 'checkpoints', 'ckpt-1'))
  values = [reader.get_tensor(name) for name in reader.get_variable_to_shape_map()]
  assert all(np.isfinite(v).all() for v in values if np.issubdtype(np.asarray(v).dtype, np.floating))
  assert [step for step, _ in _scalars(os.path.join(model_dir, 'validation'), 'auc')] == [1]

  # The same run with a lower rate goes on from epoch 1, at the new rate (the checkpoint holds the old one).
  _train_here(_config(synthetic_data_dir, model_dir, optimizer='sgd', epochs=1, fine_tune_learning_rate=2e-4))
  assert _scalars(os.path.join(model_dir, 'train'), 'learning_rate') == [(1, pytest.approx(1e-3)),
                                                                          (2, pytest.approx(2e-4))]
  assert [step for step, _ in _scalars(os.path.join(model_dir, 'validation'), 'auc')] == [1, 2]


# Bad input.


@pytest.mark.parametrize('argv, message', [
    (['--modle=cnn'], "Unknown command line flag 'modle'"),
    (['--model=vit'], 'flag --model=vit: value should be one of <cnn|resnet50|vgg16|efficientnetb0|densenet121|'
                      'efficientnet_lite0|efficientnet_lite1|efficientnet_lite2>'),
    (['--model=densenet121', '--unfreeze=121'],
     '--unfreeze=121 is more than the 120 convolutional layers of densenet121'),
    (['--lr_schedule=plateau', '--plateau_factor=1'], '--plateau_factor must be in (0, 1), got 1.0'),
    (['--lr_schedule=plateau', '--plateau_min_lr=1e-3'], '--plateau_min_lr=0.001 must be zero or more and below'),
    (['--early_stopping_patience=-1'], '--early_stopping_patience must be zero or more, got -1'),
    (['--weight_decay=-0.1'], '--weight_decay must be zero or more, got -0.1'),
    (['--epochs=two'], 'flag --epochs=two'),
    (['--image_size=16'], '--image_size must be between 32 and 2048 pixels, got 16'),
    (['--learning_rate=0'], '--learning_rate must be positive and finite, got 0.0'),
    (['--fine_tune_learning_rate=inf'], '--fine_tune_learning_rate must be positive and finite, got inf'),
    (['--learning_rate=nan'], '--learning_rate must be positive and finite, got nan'),
    (['--deterministic'], '--deterministic needs --seed'),
    (['--steps_per_loop=0'], '--steps_per_loop must be positive, got 0'),
    (['cnn'], 'Unexpected arguments cnn'),
])
def test_bad_flags_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
  # In this process, through absl's flag parsing as `python -m trainer.main` parses them, with its log.
  model_dir = tmp_path / 'run'
  code, stderr = _main_here(capsys, f'--model_dir={model_dir}', *argv, log=True)
  assert code == 1
  assert [line for line in stderr.splitlines() if line.strip()] == [stderr.strip()]
  assert stderr.startswith('error: ') and message in stderr, stderr
  assert not model_dir.exists()


# A change of each setting fixed on resume, and what the refusal says. `dataset` is changed in config.json instead:
# another config of the data would need the download before the check.
_FIXED_CHANGES = {
    'model': ('--model=vgg16', '--model=cnn (this run: vgg16)'),
    'dataset': (None, '--dataset=chest_xray_pneumonia/224 (this run: chest_xray_pneumonia/synthetic)'),
    'image_size': ('--image_size=64', '--image_size=32 (this run: 64)'),
    'unfreeze': ('--unfreeze=3', '--unfreeze=5 (this run: 3)'),
    'optimizer': ('--optimizer=sgd', '--optimizer=adam (this run: sgd)'),
    'horizontal_flip': ('--horizontal_flip', '--horizontal_flip=False (this run: True)'),
    'augment_strength': ('--augment_strength=2', '--augment_strength=1.0 (this run: 2.0)'),
    'augment_families': ('--augment_families=gamma,rotation',
                         '--augment_families=rotation,fov,translation,contrast,brightness,noise (this run: '
                         'rotation,gamma)'),
    'augment_fov': ('--augment_fov=0.15', '--augment_fov=0.1 (this run: 0.15)'),
    'augment_gamma': ('--augment_gamma=0.5', '--augment_gamma=0.6 (this run: 0.5)'),
    'augment_contrast': ('--augment_contrast=0.3', '--augment_contrast=0.1 (this run: 0.3)'),
    'augment_brightness': ('--augment_brightness=0.2', '--augment_brightness=0.1 (this run: 0.2)'),
    'augment_blur': ('--augment_blur=1', '--augment_blur=1.5 (this run: 1.0)'),
    'augment_noise': ('--augment_noise=8', '--augment_noise=4.0 (this run: 8.0)'),
    'augment_jpeg': ('--augment_jpeg=30', '--augment_jpeg=20.0 (this run: 30.0)'),
    'crop': ('--crop=content', '--crop=none (this run: content)'),
    'edge_channel': ('--edge_channel=sobel', '--edge_channel=none (this run: sobel)'),
    'equalize': ('--equalize=clahe', '--equalize=none (this run: clahe)'),
    'cnn_filters': ('--cnn_filters=4', '--cnn_filters=8 (this run: 4)'),
    'cnn_depth': ('--cnn_depth=4', '--cnn_depth=3 (this run: 4)'),
}


@pytest.mark.parametrize('name', config_lib.FIXED_ON_RESUME)
def test_another_model_in_the_model_dir_is_refused(name, reference, synthetic_data_dir, tmp_path, capsys):
  change, expected = _FIXED_CHANGES[name]  # A KeyError here: a setting fixed on resume that no test changes.
  model_dir = reference
  if change is None:
    model_dir = _copy(reference, tmp_path, 'copy')
    with open(os.path.join(model_dir, 'config.json')) as f:
      stored = json.load(f)
    with open(os.path.join(model_dir, 'config.json'), 'w') as f:
      json.dump({**stored, name: 'chest_xray_pneumonia/224'}, f)
  before = _digests(model_dir)
  flags_32px = [f for f in RUN_FLAGS if f != '--deterministic']
  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}', *flags_32px,
                            *([change] if change else []))
  assert code == 1
  [line] = _error_lines(stderr)
  assert expected in line and 'new --model_dir' in line, line
  assert _digests(model_dir) == before


def test_the_docs_list_the_settings_fixed_on_resume():
  readme = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'troubleshooting.md').read_text()
  listed = re.search(r'These cannot change when a run resumes \(use a new `--model_dir`\): (.*?)\. Every other',
                     readme, flags=re.S).group(1)
  assert re.findall(r'`--(\w+)`', listed) == list(config_lib.FIXED_ON_RESUME)


def test_batch_size_strategy_and_epochs_can_change_on_resume(reference, synthetic_data_dir, tmp_path):
  model_dir = _copy(reference, tmp_path, 'resumed')
  flags_changed = [f for f in RUN_FLAGS if f not in ('--batch_size=32', '--fine_tune_epochs=1')]
  returncode, stderr = _run([sys.executable, '-m', 'trainer.main', f'--data_dir={synthetic_data_dir}',
                             f'--model_dir={model_dir}', *flags_changed, '--batch_size=64', '--fine_tune_epochs=2',
                             '--strategy=mirrored', '--logical_devices=2'])
  assert returncode == 0, stderr[-3000:]
  assert _resumed_after(stderr) == 3
  assert 'epoch 4/4 (fine_tune)' in stderr
  # 534 images // 64. Larger batches than the run's, not smaller: two replicas on a CPU pay each step's all-reduce
  # (an epoch of 33 steps of 16 took twice as long as one of 8 steps of 64 here).
  assert '8 steps of 64 per epoch, 2 replicas' in stderr, stderr[-3000:]
  assert [step for step, _ in _scalars(os.path.join(model_dir, 'validation'), 'auc')] == [1, 2, 3, 4]


def test_a_finished_run_asked_for_fewer_epochs_says_so_and_keeps_its_export(reference, synthetic_data_dir, tmp_path,
                                                                            capsys):
  model_dir = _copy(reference, tmp_path, 'fewer')
  exported = {name: digest for name, digest in _digests(model_dir).items() if name.startswith('exports/')}
  # In this process, with its log (nothing is trained: --deterministic, which cannot be undone, changes nothing here).
  returncode, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                                  *[f for f in RUN_FLAGS if f not in ('--epochs=2', '--deterministic')], '--epochs=1',
                                  log=True)
  assert not returncode, stderr[-3000:]  # SystemExit(None): absl's app.run after a main that returned.
  assert (f'--model_dir={model_dir} holds a run trained for 3 epochs, more than the 2 of --epochs=1 + '
          '--fine_tune_epochs=1: nothing is trained') in stderr, stderr[-3000:]
  assert {name: digest for name, digest in _digests(model_dir).items() if name.startswith('exports/')} == exported
  with open(os.path.join(model_dir, 'run.json')) as f:
    assert json.load(f)['config']['epochs'] == 2


@pytest.mark.parametrize('layout', ['empty', 'partial', 'none'])
def test_missing_or_partial_manual_data_is_one_line_and_builds_nothing(layout, tmp_path, capsys):
  manual_dir, data_dir = tmp_path / 'manual', tmp_path / 'tfds'
  manual_dir.mkdir()
  if layout == 'partial':  # The train folder's NORMAL images only.
    (manual_dir / 'chest_xray' / 'train' / 'NORMAL').mkdir(parents=True)
    (manual_dir / 'chest_xray' / 'train' / 'NORMAL' / 'IM-0001-0001.jpeg').write_bytes(b'\xff\xd8\xff')
  manual = [] if layout == 'none' else [f'--manual_dir={manual_dir}']

  code, stderr = _main_here(capsys, '--dataset=chest_xray_pneumonia/224', f'--data_dir={data_dir}',
                            f'--model_dir={tmp_path / "run"}', *manual)

  assert code == 1
  [line] = _error_lines(stderr)
  if layout in ('none', 'empty'):  # TFDS's own check, restated by the builder with what to download.
    assert 'manual dir' in line and 'does not exist or is empty' in line, line
  else:
    assert f'Chest X-ray images missing in {manual_dir}' in line, line
    assert 'test/NORMAL' in line and 'test/PNEUMONIA' in line
  assert 'kaggle datasets download -d paultimothymooney/chest-xray-pneumonia' in line
  assert not glob.glob(str(data_dir / 'chest_xray_pneumonia' / '224' / '*'))  # No version, no incomplete build.
  assert not os.listdir(tmp_path / 'run')


def test_the_default_dataset_is_the_real_data_and_its_absence_is_one_line(tmp_path, capsys):
  data_dir = tmp_path / 'tfds'
  code, stderr = _main_here(capsys, f'--data_dir={data_dir}', f'--model_dir={tmp_path / "run"}')
  assert code == 1
  [line] = _error_lines(stderr)
  # Where to put the download (TFDS's default manual dir), and how to try the trainer without it.
  assert f'The manual dir {data_dir / "downloads" / "manual"} does not exist or is empty' in line, line
  assert 'chest_xray_pneumonia/synthetic' in line
  assert not glob.glob(str(data_dir / 'chest_xray_pneumonia' / '224' / '*'))


def _zip(path, members):
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    for name, payload in members.items():
      if isinstance(payload, zipfile.ZipInfo):
        archive.writestr(payload, b'IM-0001-0001.jpeg')
      else:
        archive.writestr(name, payload)


def _symlink_member(name):
  info = zipfile.ZipInfo(name)
  info.external_attr = (0o120777 << 16)  # S_IFLNK: a symlink whose target is the member's content.
  return info


_IMAGE = 'chest_xray/train/NORMAL/IM-0001-0001.jpeg'


def test_a_hostile_archive_is_refused_on_one_line_by_the_trainer(tmp_path, capsys):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  _zip(manual_dir / 'archive.zip', {_IMAGE: b'\xff\xd8\xff', '../../outside.jpeg': b'\xff\xd8\xff'})
  code, stderr = _main_here(capsys, '--dataset=chest_xray_pneumonia/224', f'--manual_dir={manual_dir}',
                            f'--data_dir={tmp_path / "tfds"}', f'--model_dir={tmp_path / "run"}')
  assert code == 1
  [line] = _error_lines(stderr)
  assert "member '../../outside.jpeg' has a path outside the archive root" in line, line
  assert not (tmp_path / 'outside.jpeg').exists()
  assert not glob.glob(str(tmp_path / 'tfds' / 'chest_xray_pneumonia' / '224' / '*'))


@pytest.mark.parametrize('members, message', [
    ({_IMAGE: b'\xff\xd8\xff', '/etc/cron.d/evil.jpeg': b'x'}, 'has a path outside the archive root'),
    ({'chest_xray/train/NORMAL/IM-0002-0001.jpeg': _symlink_member('chest_xray/train/NORMAL/IM-0002-0001.jpeg')},
     'is a symlink'),
    ({_IMAGE: bytes(4 << 20)}, 'a zip bomb?'),  # 4 MB of zeros compress about 1000 times.
], ids=['absolute', 'symlink', 'bomb'])
def test_hostile_archives_are_refused_on_one_line(members, message, tmp_path, capsys):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  _zip(manual_dir / 'download.zip', members)
  code, stderr = _main_here(capsys, '--dataset=chest_xray_pneumonia/224', f'--manual_dir={manual_dir}',
                            f'--data_dir={tmp_path / "tfds"}', f'--model_dir={tmp_path / "run"}')
  assert code == 1
  [line] = _error_lines(stderr)
  assert line.startswith(f'error: Refusing {manual_dir / "download.zip"}') and message in line, line


def test_an_interrupted_dataset_build_is_named_and_ignored(synthetic_data_dir, tmp_path, caplog):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(synthetic_data_dir, data_dir)
  leftover = os.path.join(data_dir, 'chest_xray_pneumonia', 'synthetic', 'incomplete.K1LLED_1.0.0')
  os.makedirs(leftover)
  with open(os.path.join(leftover, 'chest_xray_pneumonia-train.tfrecord-00000-of-00008'), 'wb') as f:
    f.write(b'half a shard')

  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=data_dir, manual_dir=None)

  assert builder.info.splits['train'].num_examples == 534
  assert f'left by an interrupted build of chest_xray_pneumonia/synthetic: {leftover}' in caplog.text


def test_a_cache_being_filled_by_a_live_process_is_left_alone(synthetic_data_dir, tmp_path):
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  cache_dir = tmp_path / 'cache'
  cache_dir.mkdir()
  prefix = cache_dir / 'chest_xray_pneumonia_synthetic_1.0.0_train_32px_0'
  lockfile = cache_dir / f'{prefix.name}_0.lockfile'
  lockfile.write_text('Created at: 0')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import fcntl, sys, time\n'
       f'f = open({str(prefix) + ".owner"!r}, "w"); fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True)\n'
       'time.sleep(120)'], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    with pytest.raises(FileExistsError, match='Another running process is filling the cache'):
      data.train_dataset(builder, image_size=32, global_batch=32, cache_dir=str(cache_dir))
    assert lockfile.exists()
  finally:
    holder.kill()
    holder.wait()
  # Its owner gone, the lockfile is stale: removed, and the cache fills.
  ds = data.train_dataset(builder, image_size=32, global_batch=32, cache_dir=str(cache_dir))
  assert next(iter(ds))[0].shape == (32, 32, 32, 1)
  assert not lockfile.exists()


# Full disks.


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_outputs(reference, synthetic_data_dir,
                                                                               tmp_path, capsys):
  model_dir = _copy(reference, tmp_path, 'full')
  before = _digests(model_dir)
  checkpoint_bytes = os.path.getsize(glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-3.data-*'))[0])
  # RLIMIT_FSIZE fails any write past the limit with EFBIG, as a full disk fails it with ENOSPC: room for the event
  # files and the best model's checkpoint, none for a training checkpoint (the model and two optimizers' slots).
  limit = checkpoint_bytes // 2
  assert limit > max(os.path.getsize(p) for p in glob.glob(os.path.join(model_dir, '*', 'events.out.*')))
  # In this process, with the soft limit lowered for the run alone: Python ignores SIGXFSZ, so a write past the limit
  # fails with EFBIG instead of ending the process. Without --deterministic, which cannot be undone.
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    returncode, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
                                    *[f for f in RUN_FLAGS if f != '--deterministic'], '--fine_tune_epochs=2')
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

  assert returncode == 1, stderr[-3000:]
  [line] = _error_lines(stderr)
  assert re.fullmatch(r'error: Cannot write a checkpoint in \S+/checkpoints: File too large\. The previous one is '
                      r'kept: make room and run the same command again to resume\.', line), line
  after = _digests(model_dir)
  for name in ('model.keras', 'best.weights.h5', 'run.json', 'report.json', 'config.json'):
    assert after[name] == before[name], name
  assert {k: v for k, v in after.items() if k.startswith(('saved_model', 'checkpoints'))} == {
      k: v for k, v in before.items() if k.startswith(('saved_model', 'checkpoints'))}
  assert not [k for k in after if '_temp' in k or '.partial' in k]
  assert _latest_checkpoint_epoch(model_dir) == 3


# Loading models safely.


def test_load_model_refuses_code_in_a_model_file(reference, tmp_path):
  inputs = keras.Input((4,))
  outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
  path = str(tmp_path / 'lambda.keras')
  keras.Model(inputs, outputs).save(path)
  with pytest.raises(ValueError, match='Lambda'):
    export.load_model(path)
  # The loader of `python -m trainer.evaluate` and `trainer.predict` too.
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  shutil.copy(path, run_dir / 'model.keras')
  (run_dir / 'run.json').write_text(json.dumps({'image_size': 4, 'threshold': 0.5, 'config': {}}))
  with pytest.raises(ValueError, match='Lambda'):
    runs_lib.load_run(str(run_dir))

  with pytest.raises(ValueError, match='only .keras models are loaded'):
    export.load_model(str(tmp_path / 'model.h5'))

  model = export.load_model(os.path.join(reference, 'model.keras'))
  probabilities = model(np.zeros((2, 32, 32, 1), np.uint8)).numpy()
  assert probabilities.shape == (2, 1) and np.all((probabilities > 0) & (probabilities < 1))


# The one module allowed to name pickle: trainer/weights.py reads PyTorch checkpoints through an unpickler whose
# find_class refuses every global but the tensor-rebuilding ones (checked below, and by tests/test_weights.py).
_RESTRICTED_UNPICKLER = os.path.join('trainer', 'weights.py')


def test_no_code_path_deserializes_unsafely():
  root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
  sources = sorted(glob.glob(os.path.join(root, 'trainer', '**', '*.py'), recursive=True) +
                   glob.glob(os.path.join(root, 'cxr_tfds', '**', '*.py'), recursive=True))
  assert any(os.sep + 'export' + os.sep in s for s in sources) and any(os.sep + 'shift' + os.sep in s for s in sources)
  unsafe = re.compile(r'safe_mode\s*=\s*False|enable_unsafe_deserialization|\bpickle\b|\bdill\b|keras\.layers\.Lambda|'
                      r'marshal\.loads|yaml\.load\(|allow_pickle\s*=\s*True')
  found = []
  for source in sources:
    with open(source) as f:
      lines = f.readlines()
    if os.path.relpath(source, root) == _RESTRICTED_UNPICKLER:
      _check_the_restricted_unpickler(''.join(lines))
      lines = [re.sub(r'\bpickle\b', '', line) for line in lines]
    found += [f'{source}:{n}: {line.strip()}' for n, line in enumerate(lines, 1) if unsafe.search(line)]
  assert len(sources) > 15 and not found, found


def _check_the_restricted_unpickler(source):
  """pickle is used only as one Unpickler subclass that overrides find_class, instantiated as that subclass."""
  tree = ast.parse(source)
  uses = {node.attr for node in ast.walk(tree)
          if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'pickle'}
  assert uses == {'Unpickler', 'UnpicklingError'}, uses  # No pickle.load, loads, Unpickler(...) of its own.
  subclasses = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and
                any(ast.unparse(base) == 'pickle.Unpickler' for base in node.bases)]
  assert len(subclasses) == 1, [c.name for c in subclasses]
  methods = {f.name for f in subclasses[0].body if isinstance(f, ast.FunctionDef)}
  assert {'find_class', 'persistent_load'} <= methods, methods
  calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
  assert 'pickle.Unpickler' not in calls and subclasses[0].name in calls


def test_verbosity_1_adds_the_traceback_to_a_users_error(tmp_path, capsys):
  # In this process, with its log.
  verbosity = absl_logging.get_verbosity()
  try:
    code, stderr = _main_here(capsys, f'--data_dir={tmp_path / "tfds"}', f'--model_dir={tmp_path / "run"}',
                              '--verbosity=1', log=True)
  finally:
    flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)  # The tests after this one log as they would alone.
  assert code == 1
  assert 'Traceback (most recent call last)' in stderr and 'FileNotFoundError' in stderr
  assert stderr.strip().splitlines()[-1].startswith('error: The manual dir ')


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MB tmpfs of its own, so that a test can fill it and get the real ENOSPC (RLIMIT_FSIZE gives EFBIG)."""
  if os.geteuid() != 0:
    pytest.skip('needs root, to mount a small tmpfs')
  mount_point = tmp_path / 'small'
  mount_point.mkdir()
  subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mount_point)], check=True)
  yield mount_point
  subprocess.run(['umount', '-l', str(mount_point)], check=True)


def _fill(folder):
  """Writes a filler file until the disk under `folder` is full."""
  with open(os.path.join(folder, 'filler'), 'wb') as f:
    try:
      while True:
        f.write(b'\0' * (1 << 20))
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC, e


def test_a_disk_that_fills_during_the_final_report_and_exports_keeps_the_previous_export(
    reference, synthetic_data_dir, small_disk, capsys, monkeypatch):
  model_dir = str(small_disk / 'run')
  shutil.copytree(reference, model_dir, symlinks=True)
  before = _digests(export.current_dir(model_dir))
  write_export = export.write_export

  def after_filling_the_disk(*args, **kwargs):
    _fill(small_disk)  # The epoch's checkpoint is saved; the test report and the exports are what meet the full disk.
    return write_export(*args, **kwargs)

  monkeypatch.setattr(export, 'write_export', after_filling_the_disk)
  flags_32px = [f for f in RUN_FLAGS if f not in ('--deterministic', '--fine_tune_epochs=1')]
  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}', *flags_32px,
                            '--fine_tune_epochs=2')
  assert code == 1
  [line] = _error_lines(stderr)
  assert 'Cannot write an export' in line and 'No space left on device' in line, line
  # The previous export is current and whole, so predict and the report still agree on one threshold.
  assert _digests(export.current_dir(model_dir)) == before
  run = json.loads(pathlib.Path(model_dir, 'run.json').read_text())
  report = json.loads(pathlib.Path(model_dir, 'report.json').read_text())
  assert run['threshold'] == report['at_val_threshold']['threshold'] and run['best']['epoch'] <= 3
  assert not glob.glob(os.path.join(model_dir, 'exports', '*.partial'))
  assert _latest_checkpoint_epoch(model_dir) == 4  # The epoch trained before the disk filled is kept.

  # Room made, the same command exports the extended run and trains nothing again.
  os.remove(small_disk / 'filler')
  monkeypatch.setattr(export, 'write_export', write_export)
  code, stderr = _main_here(capsys, f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}', *flags_32px,
                            '--fine_tune_epochs=2')
  assert not code, stderr[-3000:]  # SystemExit(None): absl's app.run after a main that returned.
  assert [step for step, _ in _scalars(os.path.join(model_dir, 'validation'), 'auc')] == [1, 2, 3, 4]  # None twice.
  run = json.loads(pathlib.Path(model_dir, 'run.json').read_text())
  report = json.loads(pathlib.Path(model_dir, 'report.json').read_text())
  assert run['threshold'] == report['at_val_threshold']['threshold']
  assert export.current_dir(model_dir) != before and len(os.listdir(os.path.join(model_dir, 'exports'))) == 1


def test_a_model_file_cut_short_is_named_as_such(reference, tmp_path):
  whole = pathlib.Path(reference, 'model.keras').read_bytes()
  cut = tmp_path / 'model.keras'
  cut.write_bytes(whole[:len(whole) // 2])
  message = r'model\.keras is damaged or cut short \(\d+ bytes, not a whole .keras archive\)'
  with pytest.raises(ValueError, match=message):
    export.load_model(str(cut))
