"""The training state's commit protocol, without a training run: a small model, fake metrics, a temporary model dir.

An epoch commits in three steps (`TrainState.commit`): the epoch checkpoint, the removal of the preempted checkpoint
it supersedes, the best epoch's weights. A kill can fall between any two; `TrainState.resume` must repair each case,
and a lost state file or an unreadable checkpoint too. tests/test_resilience.py checks the same end to end, with
real processes killed by real signals.
"""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import control
from trainer import steps as steps_lib
from trainer import train
from trainer.config import Config

STEPS_PER_EPOCH = 4


class Crash(Exception):
  """A kill between two commit steps: nothing after the step that raises it runs."""


def _state(model_dir, *, seed=0, units=2):
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units), keras.layers.Dropout(0.5, seed=seed),
                            keras.layers.Dense(1, activation='sigmoid')])
  optimizers = {phase: keras.optimizers.Adam(1e-3) for phase in train.PHASES}
  for optimizer in optimizers.values():
    optimizer.build(model.trainable_variables)
  config = Config(model_dir=str(model_dir), epochs=2, fine_tune_epochs=1, learning_rate=1e-3,
                  fine_tune_learning_rate=1e-4)
  return train.TrainState(config, tf.distribute.get_strategy(), model=model, optimizers=optimizers,
                          learning_rates={'head': 1e-3, 'fine_tune': 1e-4}, metrics=steps_lib.train_metrics(),
                          steps_per_epoch=STEPS_PER_EPOCH, write_dir=str(model_dir))


def _started(model_dir):
  state = _state(model_dir)
  state.resume(chief=True)
  return state


def _crash(*args, **kwargs):
  raise Crash()


def _weights(model):
  return [w.numpy().copy() for w in model.weights]


def _assert_same(weights, others):
  assert len(weights) == len(others)
  for a, b in zip(weights, others):
    np.testing.assert_array_equal(a, b)


def _train(state, by=1.0):
  """Stands in for an epoch of training: moves every weight and the loss metric."""
  for weight in state.model.trainable_variables:
    weight.assign(weight + by)
  state.metrics['loss'].update_state([by])


def _end_epoch(state, epoch, auc):
  """The end-of-epoch commit with the bookkeeping an epoch of validation ROC-AUC `auc` gives."""
  improved = state.best.test(auc)
  if improved:
    state.best.commit(auc, 0.25 + epoch / 100, epoch + 1)
  state.control.end_epoch(auc)
  state.epoch.assign(epoch + 1)
  state.commit(epoch + 1, improved)
  return improved


def _checkpoints(folder):
  return sorted(os.path.basename(p)[:-len('.index')] for p in glob.glob(os.path.join(folder, 'ckpt-*.index')))


def test_best_epoch_test_is_pure_and_commit_records():
  best = control.BestEpoch()
  assert best.test(0.1) and best.test(0.1)  # Asking twice changes nothing.
  best.commit(0.7, 0.3, 2)
  assert not best.test(0.7) and not best.test(0.6) and best.test(0.71)
  assert best.as_dict() == {'epoch': 2, 'validation_roc_auc': pytest.approx(0.7)}
  assert float(best.threshold) == pytest.approx(0.3)


def test_a_state_commits_before_resume_as_after_it(tmp_path):
  """The state is whole once built: its epoch manager exists before `resume`, which remakes it after a repair."""
  state = _state(tmp_path)
  _train(state)
  assert _end_epoch(state, 0, auc=0.8)
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-1'] and _checkpoints(tmp_path / 'best') == ['ckpt-1']
  again = _state(tmp_path, seed=1)
  assert again.resume(chief=True) == 0 and int(again.epoch) == 1
  _assert_same(_weights(again.model), _weights(state.model))


def test_a_new_run_resumes_from_nothing(tmp_path):
  state = _state(tmp_path)
  assert state.resume(chief=True) == 0
  assert int(state.epoch) == 0 and int(state.global_step) == 0 and int(state.best.epoch) == 0
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_a_committed_epoch_resumes_with_its_weights_bookkeeping_and_best(tmp_path):
  state = _started(tmp_path)
  _train(state)
  assert _end_epoch(state, 0, auc=0.8)
  best_weights = _weights(state.model)
  _train(state)
  assert not _end_epoch(state, 1, auc=0.7)  # Worse: the best stays epoch 1.
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-1', 'ckpt-2']
  assert _checkpoints(tmp_path / 'best') == ['ckpt-1']

  again = _state(tmp_path, seed=1)
  assert any(not np.array_equal(a, b) for a, b in zip(_weights(again.model), _weights(state.model)))
  assert again.resume(chief=True) == 0
  _assert_same(_weights(again.model), _weights(state.model))
  assert int(again.epoch) == 2 and int(again.global_step) == 2 * STEPS_PER_EPOCH
  assert again.best.as_dict() == {'epoch': 1, 'validation_roc_auc': pytest.approx(0.8)}
  tf.train.Checkpoint(model=again.model).restore(again.best_manager.latest_checkpoint).expect_partial()
  _assert_same(_weights(again.model), best_weights)


def test_a_crash_between_the_checkpoint_and_the_best_save_is_repaired_on_resume(tmp_path, monkeypatch):
  state = _started(tmp_path)
  _train(state)
  committed = _weights(state.model)
  monkeypatch.setattr(state.best_manager, 'save', _crash)
  with pytest.raises(Crash):
    _end_epoch(state, 0, auc=0.8)
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-1']
  assert _checkpoints(tmp_path / 'best') == []  # The checkpoint names epoch 1 the best; its weights are not saved.

  again = _state(tmp_path, seed=1)
  again.resume(chief=True)
  assert _checkpoints(tmp_path / 'best') == ['ckpt-1']
  best = _state(tmp_path, seed=2)
  tf.train.Checkpoint(model=best.model).restore(str(tmp_path / 'best' / 'ckpt-1')).expect_partial()
  _assert_same(_weights(best.model), committed)


def test_a_crash_before_the_checkpoint_commits_resumes_from_the_epoch_before(tmp_path, monkeypatch):
  """A kill inside the save, before CheckpointManager rewrites the state file: the epoch's files may be there, the
  state file still names the epoch before, which resumes."""
  state = _started(tmp_path)
  _train(state)
  _end_epoch(state, 0, auc=0.8)
  epoch_one = _weights(state.model)
  _train(state)
  monkeypatch.setattr(tf.compat.v1.train, 'update_checkpoint_state', _crash)
  monkeypatch.setattr(tf.train.CheckpointManager, '_record_state', lambda self: _crash())
  with pytest.raises(Crash):
    _end_epoch(state, 1, auc=0.9)
  monkeypatch.undo()
  assert tf.train.get_checkpoint_state(str(tmp_path / 'checkpoints')).model_checkpoint_path.endswith('ckpt-1')

  again = _state(tmp_path, seed=1)
  again.resume(chief=True)
  # ckpt-2's files were written in full before the crash: found by its files, it is the run's newest epoch. A crash
  # while they were written leaves no ckpt-2.index (TF writes it last) and epoch 1 resumes instead.
  assert int(again.epoch) == 2
  assert 'ckpt-2' in tf.train.get_checkpoint_state(str(tmp_path / 'checkpoints')).all_model_checkpoint_paths[-1]
  for name in glob.glob(str(tmp_path / 'checkpoints' / 'ckpt-2.index')):
    os.remove(name)
  third = _state(tmp_path, seed=2)
  third.resume(chief=True)
  assert int(third.epoch) == 1
  _assert_same(_weights(third.model), epoch_one)


def test_a_full_disk_at_the_commit_is_one_line_and_keeps_the_previous_epoch(tmp_path, monkeypatch):
  state = _started(tmp_path)
  _train(state)
  _end_epoch(state, 0, auc=0.8)

  def full(*args, **kwargs):
    os.makedirs(tmp_path / 'checkpoints' / 'ckpt-2_temp', exist_ok=True)  # What TF leaves of a failed write.
    raise tf.errors.ResourceExhaustedError(None, None, 'No space left on device')
  monkeypatch.setattr(state.manager, 'save', full)
  _train(state)
  with pytest.raises(OSError, match='Cannot write a checkpoint in .*No space left on device.*previous one is kept'):
    _end_epoch(state, 1, auc=0.9)
  assert not glob.glob(str(tmp_path / 'checkpoints' / '*_temp'))
  again = _state(tmp_path, seed=1)
  again.resume(chief=True)
  assert int(again.epoch) == 1 and again.best.as_dict()['epoch'] == 1


def test_a_preempted_step_resumes_with_its_metrics_until_the_next_epoch_commits(tmp_path):
  state = _started(tmp_path)
  _train(state)
  _end_epoch(state, 0, auc=0.8)
  state.metrics['loss'].reset_state()
  _train(state, by=3.0)
  path = state.save_preempted(STEPS_PER_EPOCH + 3)
  assert path.endswith(os.path.join('preempted', f'ckpt-{STEPS_PER_EPOCH + 3}'))

  again = _state(tmp_path, seed=1)
  assert again.resume(chief=True) == 3
  assert int(again.epoch) == 1 and int(again.global_step) == STEPS_PER_EPOCH + 3
  assert float(again.metrics['loss'].result()) == pytest.approx(3.0)
  _assert_same(_weights(again.model), _weights(state.model))
  assert again.steps_trained(3) == STEPS_PER_EPOCH + 3

  _train(again)
  _end_epoch(again, 1, auc=0.9)
  assert not os.path.exists(tmp_path / 'checkpoints' / 'preempted')


def test_a_crash_before_the_preempted_checkpoint_is_removed_leaves_it_ignored(tmp_path, monkeypatch):
  state = _started(tmp_path)
  _train(state)
  state.save_preempted(2)  # Preempted in epoch 1, at step 2 ...
  again = _state(tmp_path)
  assert again.resume(chief=True) == 2
  _train(again)
  # ... resumed, and killed after epoch 1's checkpoint but before the preempted one was removed.
  monkeypatch.setattr(train.shutil, 'rmtree', _crash)
  with pytest.raises(Crash):
    _end_epoch(again, 0, auc=0.8)
  monkeypatch.undo()
  assert _checkpoints(tmp_path / 'checkpoints' / 'preempted') == ['ckpt-2']

  third = _state(tmp_path, seed=1)
  assert third.resume(chief=True) == 0  # Older than the epoch checkpoint: not restored over it.
  assert int(third.epoch) == 1 and int(third.global_step) == STEPS_PER_EPOCH
  _assert_same(_weights(third.model), _weights(again.model))


def test_a_lost_state_file_is_rebuilt_by_the_chief_from_the_checkpoint_files(tmp_path):
  state = _started(tmp_path)
  for epoch in range(2):
    _train(state)
    _end_epoch(state, epoch, auc=0.5 + epoch / 10)
  os.remove(tmp_path / 'checkpoints' / 'checkpoint')

  worker = _state(tmp_path, seed=1)
  worker.resume(chief=False)  # Reads, repairs nothing.
  assert int(worker.epoch) == 2
  assert not os.path.exists(tmp_path / 'checkpoints' / 'checkpoint')

  chief = _state(tmp_path, seed=1)
  chief.resume(chief=True)
  assert int(chief.epoch) == 2
  kept = tf.train.get_checkpoint_state(str(tmp_path / 'checkpoints')).all_model_checkpoint_paths
  assert [os.path.basename(p) for p in kept] == ['ckpt-1', 'ckpt-2']
  # The manager, made after the repair, keeps trimming them: two at most.
  _train(chief)
  _end_epoch(chief, 2, auc=0.9)
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-2', 'ckpt-3']


def _truncate_data(prefix):
  [data_file] = glob.glob(str(prefix) + '.data-*')
  with open(data_file, 'r+b') as f:
    f.truncate(8)


def test_an_unreadable_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path):
  state = _started(tmp_path)
  for epoch in range(2):
    _train(state)
    _end_epoch(state, epoch, auc=0.5 + epoch / 10)
  _truncate_data(tmp_path / 'checkpoints' / 'ckpt-2')

  again = _state(tmp_path, seed=1)
  again.resume(chief=True)
  assert int(again.epoch) == 1
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-1']
  assert _checkpoints(tmp_path / 'checkpoints' / 'unreadable') == ['ckpt-2']
  assert os.path.basename(tf.train.latest_checkpoint(str(tmp_path / 'checkpoints'))) == 'ckpt-1'


def test_no_readable_checkpoint_stops_and_changes_nothing(tmp_path):
  state = _started(tmp_path)
  _train(state)
  _end_epoch(state, 0, auc=0.8)
  _truncate_data(tmp_path / 'checkpoints' / 'ckpt-1')
  before = sorted(glob.glob(str(tmp_path / '**'), recursive=True))

  with pytest.raises(ValueError, match='No checkpoint in .* can be read'):
    _state(tmp_path, seed=1).resume(chief=True)
  assert sorted(glob.glob(str(tmp_path / '**'), recursive=True)) == before


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  state = _started(tmp_path)
  _train(state)
  _end_epoch(state, 0, auc=0.8)
  with pytest.raises(ValueError, match='is of another model'):
    _state(tmp_path, units=5).resume(chief=True)


def test_end_epoch_records_the_best_epoch_from_its_validation_predictions(tmp_path):
  state = _started(tmp_path)
  writers = {name: tf.summary.create_noop_writer() for name in ('train', 'validation')}
  labels = np.array([0, 0, 1, 1, 1, 0])
  good = {'labels': labels, 'probs': np.array([0.1, 0.2, 0.8, 0.9, 0.7, 0.3]), 'groups': np.arange(6)}
  bad = {**good, 'probs': np.array([0.9, 0.2, 0.1, 0.9, 0.7, 0.3])}
  train_scalars = {name: 0.5 for name in steps_lib.SCALARS}

  _train(state)
  next_epoch, val = train.end_epoch(state, epoch=0, phase='head', train=train_scalars, val_pred=good,
                                    writers=writers)
  assert next_epoch == 1 and val['auc'] == pytest.approx(1.0)
  assert state.best.as_dict() == {'epoch': 1, 'validation_roc_auc': pytest.approx(1.0)}
  _train(state)
  next_epoch, val = train.end_epoch(state, epoch=1, phase='head', train=train_scalars, val_pred=bad,
                                    writers=writers)
  assert next_epoch == 2 and val['auc'] < 1.0
  assert state.best.as_dict()['epoch'] == 1
  assert _checkpoints(tmp_path / 'checkpoints') == ['ckpt-1', 'ckpt-2']
  assert _checkpoints(tmp_path / 'best') == ['ckpt-1']
  reader = tf.train.load_checkpoint(str(tmp_path / 'checkpoints' / 'ckpt-2'))
  assert reader.get_tensor('epoch/.ATTRIBUTES/VARIABLE_VALUE') == 2
  assert reader.get_tensor('best_epoch/.ATTRIBUTES/VARIABLE_VALUE') == 1
  assert reader.get_tensor('phase_control/trained_epochs/.ATTRIBUTES/VARIABLE_VALUE') == 2
