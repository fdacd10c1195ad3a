"""End to end on the synthetic config: the trainer learns, and leaves every output a user reads."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

from trainer import config as config_lib
from trainer import data
from trainer import control as control_lib
from trainer import steps as steps_lib
from trainer import train
from trainer.config import Config


@pytest.fixture(scope='module')
def trained(synthetic_data_dir, tmp_path_factory):
  """One short CNN run, shared by the tests below (training is the expensive part). At 32 pixels and 8 filters it
  still learns the synthetic config: best validation ROC-AUC 0.99, test 0.99 (an untrained one scores about 0.5)."""
  model_dir = str(tmp_path_factory.mktemp('run'))
  config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                  model_dir=model_dir, image_size=32, epochs=5, fine_tune_epochs=1, batch_size=32, cnn_filters=8,
                  cnn_depth=3, learning_rate=1e-3, fine_tune_learning_rate=3e-4, seed=1, weights='none').validate()
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  return config, report


def _events(run_dir):
  acc = event_accumulator.EventAccumulator(run_dir, size_guidance={'tensors': 0, 'images': 0})
  acc.Reload()
  return acc


def _scalar(acc, tag):
  return [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def test_run_learns_and_reports(trained):
  config, report = trained
  val = _events(os.path.join(config.model_dir, 'validation'))
  aucs = _scalar(val, 'auc')
  assert len(aucs) == 6
  assert max(aucs) > 0.9, aucs
  with open(os.path.join(config.model_dir, 'report.json')) as f:
    on_disk = json.load(f)
  for threshold in ('at_0.5', 'at_val_threshold'):
    for key in ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1', 'confusion_matrix'):
      assert key in on_disk[threshold]
  assert on_disk['ranking']['roc_auc'] > 0.85
  assert on_disk['n_images'] == sum(np.ravel(on_disk['at_0.5']['confusion_matrix']))
  run = json.load(open(os.path.join(config.model_dir, 'run.json')))
  # A model of the procedural images says so wherever it is read.
  assert on_disk['warning'] == run['warning'] == config_lib.data_warning('chest_xray_pneumonia/synthetic')
  assert on_disk['warning'] in open(os.path.join(config.model_dir, 'report.md')).read()
  assert on_disk['at_val_threshold']['threshold'] == pytest.approx(run['threshold'])


def test_tensorboard_has_scalars_images_and_hparams(trained):
  config, _ = trained
  train_events = _events(os.path.join(config.model_dir, 'train'))
  val_events = _events(os.path.join(config.model_dir, 'validation'))
  for tag in ('loss', 'accuracy', 'precision', 'recall', 'auc', 'pr_auc'):
    assert len(_scalar(train_events, tag)) == 6, tag
    assert len(_scalar(val_events, tag)) == 6, tag
  losses = _scalar(train_events, 'loss')
  assert losses[-1] < losses[0]
  assert _scalar(train_events, 'learning_rate')[0] == pytest.approx(1e-3)
  assert _scalar(train_events, 'learning_rate')[-1] == pytest.approx(3e-4)
  assert 'augmented_training_images' in train_events.Tags()['tensors']
  assert {'confusion_matrix', 'roc_curve'} <= set(val_events.Tags()['tensors'])
  root = _events(config.model_dir)
  assert '_hparams_/session_start_info' in root.Tags()['tensors']


def test_best_checkpoint_and_exports_load(trained, synthetic_data_dir):
  config, report = trained
  assert os.path.exists(os.path.join(config.model_dir, 'best.weights.h5'))
  assert tf.train.latest_checkpoint(os.path.join(config.model_dir, 'checkpoints'))
  model = keras.saving.load_model(os.path.join(config.model_dir, 'model.keras'), safe_mode=True)
  # TF Serving's layout: MODEL_DIR/saved_model/VERSION.
  served = tf.saved_model.load(os.path.join(config.model_dir, 'saved_model', '1')).signatures['serve']

  builder = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir)
  ds = builder.as_dataset('test', decoders={'image': tfds.decode.SkipDecoding()}).take(8)
  encoded = [ex['image'] for ex in ds]
  images = tf.stack([data.decode_image(b, report['image_size']) for b in encoded])
  keras_probs = model(images, training=False).numpy()[:, 0]
  served_out = served(image_bytes=tf.stack(encoded))
  np.testing.assert_allclose(served_out['probability'].numpy(), keras_probs, atol=1e-5)
  assert keras_probs.std() > 0
  threshold = json.load(open(os.path.join(config.model_dir, 'run.json')))['threshold']
  np.testing.assert_array_equal(served_out['pneumonia'].numpy(), keras_probs >= threshold)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_tensorboard_server_serves_the_run(trained):
  """Starts the real TensorBoard on the run's log dir and reads it back over HTTP, as a browser would."""
  import subprocess
  import sys
  import time
  import urllib.parse
  import urllib.request

  config, _ = trained
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'tensorboard.main', f'--logdir={config.model_dir}', f'--port={port}',
       '--host=127.0.0.1', '--load_fast=false', '--reload_interval=1'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  base = f'http://127.0.0.1:{port}/data'

  def get(path):
    with urllib.request.urlopen(base + path, timeout=10) as response:
      return response.read()

  try:
    deadline = time.time() + 90
    while True:
      try:
        if {'train', 'validation'} <= set(json.loads(get('/runs'))):
          break
      except OSError:
        pass
      assert time.time() < deadline, 'TensorBoard did not list the runs in time'
      time.sleep(1)
    auc = json.loads(get('/plugin/scalars/scalars?' + urllib.parse.urlencode({'run': 'validation', 'tag': 'auc'})))
    assert [step for _, step, _ in auc] == [1, 2, 3, 4, 5, 6]
    assert max(value for _, _, value in auc) > 0.9
    images = json.loads(get('/plugin/images/images?' + urllib.parse.urlencode(
        {'run': 'validation', 'tag': 'confusion_matrix', 'sample': 0})))
    assert len(images) == 6
    png = get('/plugin/images/individualImage?' + images[-1]['query'])
    assert png.startswith(b'\x89PNG')
    grid = json.loads(get('/plugin/images/images?' + urllib.parse.urlencode(
        {'run': 'train', 'tag': 'augmented_training_images', 'sample': 0})))
    assert get('/plugin/images/individualImage?' + grid[0]['query']).startswith(b'\x89PNG')
  finally:
    server.terminate()
    server.wait(timeout=30)


# One rule end to end (the rules themselves: tests/test_distribute.py), for the suite's time: at batch 128, against a
# reference batch of 32, sqrt doubles both phases' rates.
_LR_SCALING, _LR_FACTOR = 'sqrt', 2.0


@pytest.fixture(scope='module')
def tiny_run(synthetic_data_dir, tmp_path_factory):
  """A tiny two-phase run (4 steps of 128 an epoch) that scales its rates and profiles steps 2-3: the tests of
  --lr_scaling and --profile_steps share it, as each would pay the same tracing and export for a run of its own."""
  config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                  model_dir=str(tmp_path_factory.mktemp('tiny')), image_size=32, epochs=1, fine_tune_epochs=1,
                  cnn_filters=4, cnn_depth=2, weights='none', batch_size=128, learning_rate=1e-3,
                  fine_tune_learning_rate=1e-4, lr_scaling=_LR_SCALING, profile_steps=(2, 3)).validate()
  train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  return config


def test_profile_steps_record_a_tensorboard_profile(tiny_run):
  import dataclasses
  traces = glob.glob(os.path.join(tiny_run.model_dir, 'train', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with pytest.raises(ValueError, match='profile_steps'):
    dataclasses.replace(tiny_run, profile_steps=(5, 3)).validate()


def test_lr_scaling_sets_both_phases_rates_from_the_global_batch(tiny_run):
  rates = _scalar(_events(os.path.join(tiny_run.model_dir, 'train')), 'learning_rate')
  assert rates == pytest.approx([1e-3 * _LR_FACTOR, 1e-4 * _LR_FACTOR])  # Against a reference batch of 32.


def test_cosine_schedule_warms_up_and_decays_to_zero():
  assert steps_lib.learning_rate_schedule(1e-3, 'constant', steps=100, steps_per_epoch=10) == 1e-3
  assert steps_lib.learning_rate_schedule(1e-3, 'cosine', steps=0, steps_per_epoch=10) == 1e-3
  schedule = steps_lib.learning_rate_schedule(1e-3, 'cosine', steps=100, steps_per_epoch=10)
  rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100, 120)]
  # Warmup over the first epoch (10 steps), half the peak halfway through the decay, 0 at the end and after.
  assert rates == pytest.approx([0, 5e-4, 1e-3, 5e-4, 0, 0], abs=1e-9)
  # A short phase warms up over a quarter of its steps, not a whole epoch.
  short = steps_lib.learning_rate_schedule(1e-3, 'cosine', steps=8, steps_per_epoch=10)
  assert float(short(2)) == pytest.approx(1e-3)


def test_label_smoothing_moves_the_targets():
  """The loss the step records is binary cross-entropy against 1 - s/2 and s/2."""
  inputs = keras.Input((1,))
  outputs = keras.layers.Dense(1, activation='sigmoid', kernel_initializer='zeros',
                               bias_initializer=keras.initializers.Constant(2.0))(inputs)
  model = keras.Model(inputs, outputs)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  p = 1 / (1 + np.exp(-2.0))
  for smoothing in (0.0, 0.2):
    metrics = steps_lib.train_metrics()
    step = steps_lib.make_train_step(model, keras.optimizers.SGD(0.0), metrics, strategy, class_weights=[1.0, 1.0],
                                 global_batch=2, label_smoothing=smoothing)
    step(iter([(tf.zeros([2, 1]), tf.constant([1, 0]))]))
    targets = np.array([1 - smoothing / 2, smoothing / 2])
    expected = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    assert float(metrics['loss'].result()) == pytest.approx(expected, rel=1e-4), smoothing


def test_cosine_run_records_its_rates_and_best_epoch_and_resumes(synthetic_data_dir, tmp_path):
  model_dir = str(tmp_path / 'run')
  settings = dict(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                  model_dir=model_dir, image_size=32, cnn_filters=4, cnn_depth=2, batch_size=128, epochs=3,
                  fine_tune_epochs=0, learning_rate=1e-3, lr_schedule='cosine', label_smoothing=0.1,
                  weights='none', seed=1, shuffle_buffer=64)
  keras.utils.set_random_seed(1)
  train.run(Config(**settings).validate(), tf.distribute.OneDeviceStrategy('/cpu:0'))
  steps = 534 // 128  # the synthetic train split, in batches of 128
  expected = steps_lib.learning_rate_schedule(1e-3, 'cosine', steps=3 * steps, steps_per_epoch=steps)
  rates = _scalar(_events(os.path.join(model_dir, 'train')), 'learning_rate')
  assert rates == pytest.approx([float(expected(epoch * steps)) for epoch in (1, 2, 3)], abs=1e-9)
  assert rates[0] > rates[1] > rates[2] == pytest.approx(0, abs=1e-9)

  aucs = _scalar(_events(os.path.join(model_dir, 'validation')), 'auc')
  with open(os.path.join(model_dir, 'run.json')) as f:
    best = json.load(f)['best']
  assert best['epoch'] == 1 + int(np.argmax(aucs))
  assert best['validation_roc_auc'] == pytest.approx(max(aucs))

  # One more epoch, resumed from the checkpoint: the schedule comes from the flags, at the restored step.
  keras.utils.set_random_seed(1)
  train.run(Config(**{**settings, 'epochs': 4}).validate(), tf.distribute.OneDeviceStrategy('/cpu:0'))
  assert len(_scalar(_events(os.path.join(model_dir, 'validation')), 'auc')) == 4
  assert _scalar(_events(os.path.join(model_dir, 'train')), 'learning_rate')[-1] == pytest.approx(0, abs=1e-9)


def _weights(model):
  return [np.asarray(w) for w in model.weights]


def test_a_resumed_run_trains_the_new_epochs_and_exports_the_best_with_its_validation_threshold(trained, tmp_path):
  """A finished run started again with more epochs trains only the new ones; extended by epochs that ruin it, it keeps
  exporting its best epoch, with that epoch's threshold."""
  import dataclasses
  import shutil
  from trainer import export
  from trainer import models
  from trainer import metrics
  from trainer import inference
  config, _ = trained
  model_dir = str(tmp_path / 'ruined')
  shutil.copytree(config.model_dir, model_dir)
  # Learning rates can change on resume; at 1.0 each step throws the weights far from anything learnt.
  ruined = dataclasses.replace(config, model_dir=model_dir, fine_tune_epochs=3, fine_tune_learning_rate=1.0)
  train.run(ruined, tf.distribute.OneDeviceStrategy('/cpu:0'))
  run = json.load(open(os.path.join(model_dir, 'run.json')))
  aucs = _scalar(_events(os.path.join(model_dir, 'validation')), 'auc')
  # The finished run started again with more epochs trained only the new ones (6 + 2), keeping two checkpoints.
  assert len(aucs) == 8 and run['best']['epoch'] <= 6 < 8, (run['best'], aucs)  # The last epoch is not the best.
  assert len(glob.glob(os.path.join(model_dir, 'checkpoints', 'ckpt-*.index'))) == 2
  assert run['best']['validation_roc_auc'] == pytest.approx(max(aucs))

  def fresh():
    return models.build('cnn', image_size=config.image_size, cnn_filters=config.cnn_filters,
                              cnn_depth=config.cnn_depth, dropout=config.dropout)

  best, last = fresh(), fresh()
  tf.train.Checkpoint(model=best).restore(tf.train.latest_checkpoint(os.path.join(model_dir, 'best'))).expect_partial()
  tf.train.Checkpoint(model=last).restore(
      tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints'))).expect_partial()
  exported = export.load_model(os.path.join(model_dir, 'model.keras'))
  from_h5 = fresh()
  from_h5.load_weights(os.path.join(model_dir, 'best.weights.h5'))
  for a, b, c, d in zip(_weights(best), _weights(exported), _weights(from_h5), _weights(last)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert any(not np.array_equal(a, d) for a, d in zip(_weights(best), _weights(last)))

  # The threshold is the rule's choice on the exported model's validation predictions.
  builder = data.prepare(config.dataset, data_dir=config.data_dir, manual_dir=None)
  validation = data.eval_dataset(builder, 'validation', image_size=config.image_size, batch_size=32)
  split = inference.predict_split(exported, validation)
  assert run['threshold'] == pytest.approx(metrics.choose_threshold(split['labels'], split['probs']), abs=1e-6)
  assert run['threshold'] != 0.5

  # The SavedModel is the same model: same probabilities on the same encoded images, labels at run.json's threshold.
  [saved_model_dir] = {os.path.dirname(p) for p in glob.glob(os.path.join(model_dir, 'saved_model', '**',
                                                                          'saved_model.pb'), recursive=True)}
  serve = tf.saved_model.load(saved_model_dir).signatures['serve']
  images = next(iter(validation))['image'][:8]
  encoded = tf.stack([tf.io.encode_png(image) for image in images])
  served = serve(image_bytes=encoded)
  np.testing.assert_allclose(served['probability'].numpy().ravel(),
                             exported.predict(images, verbose=0).ravel(), atol=1e-5)
  assert float(np.ravel(served['threshold'].numpy())[0]) == pytest.approx(run['threshold'])
  np.testing.assert_array_equal(np.ravel(served['pneumonia'].numpy()),
                                served['probability'].numpy().ravel() >= run['threshold'])


def test_weight_decay_and_clipnorm():
  kernel, bias = keras.Variable(np.ones((2, 2), np.float32), name='kernel'), keras.Variable(np.ones(2, np.float32),
                                                                                           name='bias')
  adamw = steps_lib.make_optimizer('adam', 0.1, False, weight_decay=0.5)
  assert isinstance(adamw, keras.optimizers.AdamW)
  adamw.apply_gradients([(np.zeros((2, 2), np.float32), kernel), (np.zeros(2, np.float32), bias)])
  # Decoupled decay, without a gradient: the kernel shrinks by lr * decay, the bias is spared.
  np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(bias.numpy(), 1)
  assert type(steps_lib.make_optimizer('adam', 0.1, False)) is keras.optimizers.Adam
  assert steps_lib.make_optimizer('sgd', 0.1, False, weight_decay=0.5).weight_decay == 0.5

  # A gradient of norm 10 clipped to 1 moves a variable as the same gradient scaled to norm 1 does.
  moved = []
  for clipnorm, gradient in ((1.0, 10.0), (0.0, 1.0)):
    variable = keras.Variable(np.zeros(4, np.float32))
    steps_lib.make_optimizer('sgd', 0.1, False, clipnorm=clipnorm).apply_gradients(
        [(np.full(4, gradient / 2, np.float32), variable)])
    moved.append(variable.numpy())
  np.testing.assert_allclose(moved[0], moved[1], rtol=1e-6)
  assert np.all(moved[0] != 0)


def test_phase_control_counts_like_keras_callbacks():
  control = control_lib.PhaseControl(patience=3, plateau=(0.5, 2, 0.02))
  control.start_phase()
  decisions = [control.end_epoch(auc) for auc in (0.7, 0.8, 0.8, 0.75, 0.9, 0.85, 0.85, 0.85)]
  # Epochs since the best: 0 0 1 2 0 1 2 3 -> stop at the 8th; reductions after 2 flat epochs, counted afresh after
  # each: the 4th and the 7th.
  assert [stop for stop, _ in decisions] == [False] * 7 + [True]
  assert [reduced for _, reduced in decisions] == [False, False, False, True, False, False, True, False]
  assert control.learning_rate(0.1) == pytest.approx(0.1 * 0.25)
  control.end_epoch(0.5)
  control.end_epoch(0.5)
  assert control.learning_rate(0.1) == pytest.approx(0.02)  # The floor, not 0.0125.
  control.start_phase()
  assert control.learning_rate(0.1) == pytest.approx(0.1) and not control.end_epoch(0.1)[0]
  assert int(control.trained_epochs) == 11
  assert steps_lib.learning_rate_schedule(0.1, 'plateau', steps=100, steps_per_epoch=10) == 0.1


def test_a_checkpoint_without_counters_resumes_with_fresh_ones(tmp_path, caplog):
  """A checkpoint written before early stopping existed: its run resumes, with the data where its epoch left it."""
  epoch = tf.Variable(3, dtype=tf.int64)
  old = tf.train.Checkpoint(epoch=epoch).save(str(tmp_path / 'ckpt'))
  control = control_lib.PhaseControl(patience=2, plateau=None)
  control_lib.restore_counters(control, old, 3)
  assert int(control.trained_epochs) == 3 and int(control.stale) == 0
  assert 'predates them' in caplog.text

  control.end_epoch(0.5)
  control.end_epoch(0.4)
  new = tf.train.Checkpoint(epoch=epoch, phase_control=control).save(str(tmp_path / 'new'))
  again = control_lib.PhaseControl(patience=2, plateau=None)
  control_lib.restore_counters(again, new, 5)
  assert int(again.trained_epochs) == 5 and int(again.stale) == 1 and float(again.best_auc) == 0.5


def _looped_weights(steps_per_call):
  """A seeded model trained for 7 steps, `steps_per_call` steps a call (the last call takes what is left)."""
  keras.utils.set_random_seed(3)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                            keras.layers.Flatten(), keras.layers.Dropout(0.5, seed=3),
                            keras.layers.Dense(1, activation='sigmoid')])
  optimizer = keras.optimizers.Adam(1e-2)
  optimizer.build(model.trainable_variables)
  metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[2.0, 0.5], global_batch=4)
  initial = [w.numpy() for w in model.weights]
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (28, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 2, 28)
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)))
  done = 0
  while done < 7:
    steps = min(steps_per_call, 7 - done)
    step(iterator, tf.constant(steps))
    done += steps
  return (initial, [w.numpy() for w in model.weights], int(optimizer.iterations.numpy()),
          {name: float(m.result()) for name, m in metrics.items()})


def test_steps_per_loop_trains_the_same_steps_as_one_step_a_call():
  """4 steps a call (a loop inside the tf.function, then a last call of 3) give one step a call's weights, optimizer
  step count, metrics and dropout draws, to the bit: the loop runs the same step function."""
  initial, one_weights, one_iterations, one_metrics = _looped_weights(1)
  _, loop_weights, loop_iterations, loop_metrics = _looped_weights(4)
  assert one_iterations == loop_iterations == 7
  assert loop_metrics == one_metrics
  assert len(one_weights) == len(loop_weights) == 8  # Conv2D, BatchNormalization with its statistics, Dense.
  for before, one, loop in zip(initial, one_weights, loop_weights):
    assert not np.array_equal(one, before)  # Every weight trained: the comparison is not of untouched ones.
    np.testing.assert_array_equal(loop, one)


def _trained_dense(jit_compile):
  """A seeded model's initial and trained weights, and its metrics, after 3 steps of `make_train_step`'s function."""
  keras.utils.set_random_seed(5)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation='relu'),
                            keras.layers.Dense(1, activation='sigmoid')])
  optimizer = keras.optimizers.Adam(1e-2)
  optimizer.build(model.trainable_variables)
  metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[2.0, 0.5], global_batch=8,
                                   label_smoothing=0.1, jit_compile=jit_compile)
  initial = [w.numpy() for w in model.weights]
  rng = np.random.default_rng(1)
  batches = tf.data.Dataset.from_tensor_slices((rng.normal(size=(24, 6)).astype(np.float32),
                                                rng.integers(0, 2, 24))).batch(8)
  step(iter(strategy.experimental_distribute_dataset(batches)), tf.constant(3))
  return initial, [w.numpy() for w in model.weights], {name: float(m.result()) for name, m in metrics.items()}


def test_jit_compile_trains_the_same_steps_compiled_with_xla():
  """The XLA-compiled step (benchmarks/ times it) moves the weights and the metrics as the plain one does."""
  initial, plain_weights, plain_metrics = _trained_dense(False)
  xla_initial, xla_weights, xla_metrics = _trained_dense(True)
  for a, b in zip(initial, xla_initial):
    np.testing.assert_array_equal(a, b)
  assert all(np.any(a != b) for a, b in zip(initial, plain_weights))
  for a, b in zip(plain_weights, xla_weights):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert xla_metrics == pytest.approx(plain_metrics, rel=1e-4)


def test_the_learning_rate_is_set_on_entering_a_phase_and_on_a_plateau_only():
  """control.Phases.set_learning_rate, the one place that sets it: the flags' rate over a restored one, lowered by
  the phase's plateau reductions, and a schedule left alone."""
  control = control_lib.PhaseControl(patience=0, plateau=(0.5, 1, 1e-3))
  optimizers = {phase: keras.optimizers.SGD(9.0) for phase in control_lib.PHASES}
  schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=10)
  phases = control_lib.Phases({'head': 2, 'fine_tune': 2}, optimizers, {'head': 0.1, 'fine_tune': schedule}, control)
  assert [phases.phase_of(epoch) for epoch in range(4)] == ['head', 'head', 'fine_tune', 'fine_tune']
  assert phases.bounds('head') == (0, 2) and phases.bounds('fine_tune') == (2, 4)

  assert phases.enter(0)  # The phase starts: the flags' rate, not the optimizer's own.
  assert float(optimizers['head'].learning_rate.numpy()) == pytest.approx(0.1)
  assert phases.end_epoch(0, 0.7) == 1
  assert float(optimizers['head'].learning_rate.numpy()) == pytest.approx(0.1)
  assert phases.end_epoch(1, 0.6) == 2  # Flat for 1 epoch: lowered by half.
  assert float(optimizers['head'].learning_rate.numpy()) == pytest.approx(0.05)
  optimizers['head'].learning_rate = 9.0  # As a checkpoint restores it.
  assert not phases.enter(1)  # Resumed inside the phase: its reductions kept, the counters too.
  assert float(optimizers['head'].learning_rate.numpy()) == pytest.approx(0.05)

  assert phases.enter(2)  # The next phase: fresh counters, and its schedule is the optimizer's own.
  assert float(control.lr_scale) == 1.0 and int(control.stale) == 0
  assert float(optimizers['fine_tune'].learning_rate.numpy()) == pytest.approx(9.0)
