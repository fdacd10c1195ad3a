"""Scale-out on CPU: mixed precision, MirroredStrategy over logical CPU devices, and multi-worker training through
launch/local_cluster.py, each held against what one device computes.

Logical devices must be set before TensorFlow starts, and a multi-worker job is several processes, so those tests run
`python -m trainer.main` (or a short script) in subprocesses; this process's own TensorFlow stays on one device.
"""

import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import conftest
import keras
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from trainer import data
from trainer import distribute
from trainer import preemption
from trainer import train
from trainer.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
# Small enough for two busy cores, and the CNN still learns the synthetic config in 3 epochs (test ROC-AUC ~0.99 on
# one device). No augmentation: these tests compare strategies, and with it the spread between seeds of one device
# alone (epoch-3 training loss 0.49 to 0.63 over seeds 1-3) is wider than the comparisons' tolerance.
SMALL = dict(model='cnn', dataset='chest_xray_pneumonia/synthetic', image_size=64, cnn_filters=8, cnn_depth=4,
             learning_rate=3e-3, batch_size=32, seed=1, weights='none', fine_tune_epochs=0, augment_strength=0.0)
# For the tests that need a model but not its skill: a quarter of the pixels, the smallest CNN, 4 steps of 128 an
# epoch. (The multi-worker comparison with one worker needs SMALL: at 32 pixels and 3 blocks an epoch's training loss
# differed between the two by 17%, more than its 15%.)
TINY = dict(SMALL, image_size=32, cnn_filters=4, cnn_depth=2, batch_size=128)
# A hung collective must fail the test, not the CI job.
TIMEOUT = 300


def _flags(**overrides) -> list[str]:
  return [f'--{name}={value}' for name, value in {**SMALL, **overrides}.items()]


def _run(command: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CONFIG', 'SLURM_JOB_ID')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _scalars(run_dir: str, tag: str) -> list[float]:
  events = event_accumulator.EventAccumulator(run_dir, size_guidance={'tensors': 0})
  events.Reload()
  return [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]


def _report(model_dir) -> dict:
  with open(os.path.join(model_dir, 'report.json')) as f:
    return json.load(f)


@pytest.fixture
def bfloat16_policy():
  previous = keras.mixed_precision.dtype_policy()
  try:
    yield distribute.set_precision('mixed_bfloat16')
  finally:
    keras.mixed_precision.set_global_policy(previous)


def test_mixed_bfloat16_trains_and_keeps_float32_outputs(synthetic_data_dir, tmp_path, bfloat16_policy):
  strategy = distribute.get_strategy('auto')
  assert isinstance(strategy, tf.distribute.OneDeviceStrategy)  # no GPU here: 'auto' is one device
  config = Config(**TINY, data_dir=synthetic_data_dir, model_dir=str(tmp_path), epochs=1,
                  precision='mixed_bfloat16').validate()
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, strategy)

  assert report == _report(tmp_path)
  # The file keeps each layer's policy, whatever the global policy of the process that loads it.
  keras.mixed_precision.set_global_policy('float32')
  model = keras.saving.load_model(tmp_path / 'model.keras')
  conv = model.get_layer('backbone').get_layer('block1_conv1')
  assert (conv.compute_dtype, conv.variable_dtype) == ('bfloat16', 'float32')
  assert model.get_layer('rescale').compute_dtype == 'float32'
  assert model.get_layer('probability').compute_dtype == 'float32'
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)  # TINY's size
  probs = model(images, training=False)
  assert probs.dtype == 'float32' and np.all(np.isfinite(probs))
  # Trained through the bfloat16 convolutions: the output bias and every BatchNormalization offset start at zero.
  assert model.get_layer('probability').bias.numpy()[0] != 0
  assert np.any(model.get_layer('backbone').get_layer('block1_bn1').beta.numpy() != 0)
  assert np.isfinite(_scalars(str(tmp_path / 'train'), 'loss')).all()


def test_mirrored_over_two_logical_devices_trains_and_reports(synthetic_data_dir, tmp_path):
  result = _run([sys.executable, '-m', 'trainer.main', '--strategy=mirrored', '--logical_devices=2',
                 f'--data_dir={synthetic_data_dir}', f'--model_dir={tmp_path}', *_flags(**TINY, epochs=1)])
  assert result.returncode == 0, result.stderr[-3000:]
  devices = ', '.join(f'/job:localhost/replica:0/task:0/device:CPU:{i}' for i in range(2))
  assert f'MirroredStrategy over {devices}.' in result.stderr
  assert ' 2 replicas.' in result.stderr
  labels, probs = conftest.reference_predictions([tmp_path], synthetic_data_dir)
  assert _report(tmp_path)['ranking']['roc_auc'] == pytest.approx(sk_metrics.roc_auc_score(labels, probs), abs=1e-6)
  assert len(_scalars(str(tmp_path / 'validation'), 'auc')) == 1


# Runs the project's own train step under OneDeviceStrategy and under MirroredStrategy over 2 logical CPUs, from the
# same initial weights on the same global batches, with nothing random left in the model (no augmentation, dropout
# 0). Prints one JSON line.
_EQUIVALENCE = r'''
import json
import numpy as np
from trainer import distribute
distribute.configure_logical_devices(2)
import keras
import tensorflow as tf
from trainer import models
from trainer import steps as steps_lib

GLOBAL_BATCH, STEPS, SIZE = 16, 4, 32
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (GLOBAL_BATCH * STEPS, SIZE, SIZE, 1), dtype=np.uint8)
labels = rng.permutation(np.arange(GLOBAL_BATCH * STEPS) % 2)


def build(name):
  return models.build(name, image_size=SIZE, dropout=0.0, augment_strength=0, cnn_filters=4, cnn_depth=2)


def train_steps(strategy, name, phase, unfreeze, initial, loss_scale):
  with strategy.scope():
    model = build(name)
    model.set_weights(initial)
    models.set_trainable(model, phase, unfreeze)
    optimizer = steps_lib.make_optimizer('sgd', 0.01, loss_scale)
    optimizer.build(model.trainable_variables)
    metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[2.0, 0.5],
                               global_batch=GLOBAL_BATCH)
  batches = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)))
  losses = []
  for _ in range(STEPS):
    step(batches)
    losses.append(float(metrics['loss'].result()))  # the running mean over the steps so far
  out = {'losses': losses, 'metrics': {k: float(m.result()) for k, m in metrics.items()}}
  sync = steps_lib.make_statistics_sync(model, strategy)
  if sync:
    moving = [v for v in model.non_trainable_variables if 'moving' in v.path]
    out['statistics_before'] = [[c.numpy().tolist() for c in v.value.values] for v in moving]
    sync()
    out['statistics_after'] = [[c.numpy().tolist() for c in v.value.values] for v in moving]
  return model, out


one = tf.distribute.OneDeviceStrategy('/cpu:0')
two = distribute.get_strategy('mirrored')
assert two.num_replicas_in_sync == 2
results = {}
# ResNet50 fine-tuned: gradients through convolutions, BatchNormalization frozen. VGG16's head under mixed_float16:
# the loss scaling (float16 convolutions are too slow on a CPU to train them here).
for name, phase, unfreeze, policy in (('resnet50', 'fine_tune', 3, 'float32'),
                                      ('vgg16', 'head', 0, 'mixed_float16'),
                                      ('cnn', 'head', 0, 'float32')):
  keras.mixed_precision.set_global_policy(policy)
  keras.utils.set_random_seed(0)
  initial = build(name).get_weights()
  loss_scale = policy == 'mixed_float16'
  model_one, one_result = train_steps(one, name, phase, unfreeze, initial, loss_scale)
  model_two, two_result = train_steps(two, name, phase, unfreeze, initial, loss_scale)
  results[f'{name}/{phase}/{policy}'] = {
      'one': one_result, 'two': two_result,
      'weight_diff': max(float(np.max(np.abs(a - b))) for a, b in zip(model_one.get_weights(),
                                                                      model_two.get_weights()))}
print('EQUIVALENCE', json.dumps(results))
'''


def test_two_replicas_match_one_replica_on_the_same_global_batch(two_logical_devices):
  """Keras's own distribution tests check this: N replicas on a global batch == one device on it.

  The loss divided by the GLOBAL batch (tf.nn.compute_average_loss), the all-reduced gradients, the loss scaling of
  mixed_float16 and the metrics (variables summed over replicas on read) must all agree. The CNN is the exception by
  design: its BatchNormalization normalises each replica's share of the batch with that share's statistics, so its
  losses differ slightly, and `steps.make_statistics_sync` averages the replicas' moving statistics.
  """
  results = two_logical_devices['EQUIVALENCE']

  # Without BatchNormalization in training mode (ResNet50's is frozen, VGG16 has none): the same run, up to float
  # rounding (the replicas sum in another order).
  for case in ('resnet50/fine_tune/float32', 'vgg16/head/mixed_float16'):
    one, two = results[case]['one'], results[case]['two']
    np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-5, err_msg=case)
    for name, value in one['metrics'].items():
      assert two['metrics'][name] == pytest.approx(value, rel=1e-5), (case, name)
    assert results[case]['weight_diff'] < 1e-5, case
    assert one['losses'][0] != one['losses'][-1]  # it trained

  # The CNN: the first step's forward pass differs only by per-replica batch statistics.
  cnn = results['cnn/head/float32']
  assert cnn['two']['losses'][0] == pytest.approx(cnn['one']['losses'][0], rel=0.15)
  assert 'statistics_before' not in cnn['one']  # one replica: nothing to average
  before, after = cnn['two']['statistics_before'], cnn['two']['statistics_after']
  assert len(before) == 8  # 4 BatchNormalization layers x (moving mean, moving variance)
  for replicas_before, replicas_after in zip(before, after):
    np.testing.assert_allclose(replicas_after[0], np.mean(replicas_before, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(replicas_after[0], replicas_after[1])


# Scores the validation split on one device and shared out over 2 logical CPUs (steps.distributed_split), with one
# model. Prints one JSON line. It runs after _EQUIVALENCE, in its process and on its MirroredStrategy `two`: a second
# MirroredStrategy in one process numbers its collectives from the same start, and they clash with the first's.
_DISTRIBUTED_EVALUATION = r'''
import json
import sys
import keras
from trainer import data, inference, metrics, models
from trainer import steps as steps_lib

builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=sys.argv[1], manual_dir=None)
strategy = two
keras.utils.set_random_seed(0)
with strategy.scope():
  model = models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, seed=0)
predict = steps_lib.make_distributed_predict(model, strategy)
results = {}
for batch_size in (32, 5):
  ds = data.eval_dataset(builder, 'validation', image_size=32, batch_size=batch_size)
  one = inference.predict_split(model, ds)
  two = predict(steps_lib.distributed_split(strategy, ds, batch_size))
  results[batch_size] = {
      name: {'probs': p['probs'].tolist(), 'labels': p['labels'].tolist(),
             'roc_auc': metrics.ranking_metrics(p['labels'], p['probs'])['roc_auc'],
             'threshold': metrics.choose_threshold(p['labels'], p['probs'])}
      for name, p in (('one', one), ('two', two))}
  results[batch_size]['positions'] = two['position'].tolist()
print('EVALUATION', json.dumps(results))
'''


def test_distributed_evaluation_gathers_what_one_device_scores(two_logical_devices):
  """Each replica scores its share of each batch, and the gathered predictions are one device's, in its order: the
  same ROC-AUC and threshold, so every worker takes one device's best-epoch decision. Batches of 5 leave a last
  batch of 1 (66 validation images), so one replica scores nothing in it."""
  results = two_logical_devices['EVALUATION']
  for batch_size, case in results.items():
    one, two = case['one'], case['two']
    assert len(one['probs']) == 66 and case['positions'] == list(range(66)), batch_size
    assert two['labels'] == one['labels'], batch_size
    np.testing.assert_allclose(two['probs'], one['probs'], atol=1e-6, err_msg=batch_size)
    assert np.std(one['probs']) > 0 and 0 < sum(one['labels']) < 66
    assert two['roc_auc'] == pytest.approx(one['roc_auc'], abs=1e-6), batch_size
    assert two['threshold'] == pytest.approx(one['threshold'], abs=1e-6), batch_size


@pytest.fixture(scope='module')
def two_logical_devices(synthetic_data_dir):
  """_EQUIVALENCE, then _DISTRIBUTED_EVALUATION on its strategy, in one process over 2 logical CPUs (a process each
  would cost the suite another TensorFlow start).

  Returns:
    {'EQUIVALENCE': its results, 'EVALUATION': its results}.
  """
  result = _run([sys.executable, '-c', _EQUIVALENCE + _DISTRIBUTED_EVALUATION, synthetic_data_dir],
                timeout=2 * TIMEOUT)  # Each script had TIMEOUT of its own.
  assert result.returncode == 0, result.stderr[-3000:]
  return {key: json.loads(value) for key, _, value in (line.partition(' ') for line in result.stdout.splitlines())
          if key in ('EQUIVALENCE', 'EVALUATION')}


def test_each_worker_reads_its_own_share_of_the_training_files(synthetic_data_dir):
  builder = data.prepare(SMALL['dataset'], data_dir=synthetic_data_dir, manual_dir=None)
  total = builder.info.splits['train'].num_examples

  def first_images(count, context):
    ds = data.train_dataset(builder, image_size=64, global_batch=2, seed=1, input_context=context).unbatch()
    return [hash(image.tobytes()) for image, _ in ds.take(count).as_numpy_iterator()]

  everything = first_images(total, None)
  assert len(set(everything)) == total  # one pass over the split before the repeat
  # Each pipeline's first pass is its own share: a third of the split from each is already disjoint.
  shares = [set(first_images(total // 3, tf.distribute.InputContext(2, i, 2))) for i in (0, 1)]
  assert len(shares[0]) == len(shares[1]) == total // 3
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] <= set(everything)


def _launch(data_dir, model_dir, **overrides) -> list[str]:
  return [sys.executable, str(REPO / 'launch' / 'local_cluster.py'), '--workers=2', '--', f'--data_dir={data_dir}',
          f'--model_dir={model_dir}', '--deterministic', *_flags(**{'epochs': 2, **overrides})]


@pytest.fixture(scope='module')
def two_workers(synthetic_data_dir, tmp_path_factory):
  """Two workers of launch/local_cluster.py for 3 epochs, never interrupted: the run that one worker must learn like,
  and that a preempted job, started again with more epochs, must end the same as (each multi-worker launch costs a
  minute here).

  Returns:
    (model_dir, the launcher's output).
  """
  model_dir = tmp_path_factory.mktemp('two_workers')
  result = _run(_launch(synthetic_data_dir, model_dir, epochs=3))
  assert result.returncode == 0, result.stdout[-3000:]
  return model_dir, result.stdout


def test_multi_worker_writes_the_chiefs_outputs_alone_and_learns_like_one_worker(two_workers, synthetic_data_dir,
                                                                                tmp_path):
  """Two workers of launch/local_cluster.py: the chief's outputs alone, learning like one worker."""
  model_dir, output = two_workers
  assert 'all 2 workers finished' in output
  for worker in (0, 1):
    lines = [line for line in output.splitlines() if line.startswith(f'[worker {worker}]')]
    assert all(any(f'epoch {epoch}/3' in line for line in lines) for epoch in (1, 2, 3)), worker

  # One set of outputs, the chief's: the non-chief's folder is gone and it wrote no summaries.
  assert not (model_dir / '.workers').exists()
  for name in ('report.json', 'run.json', 'model.keras', 'saved_model', 'checkpoints', 'test'):
    assert (model_dir / name).exists(), name
  assert len(glob.glob(str(model_dir / 'train' / 'events.*'))) == 1
  assert len(_scalars(str(model_dir / 'validation'), 'auc')) == 3  # epochs 1, 2, 3: none twice

  # The same global batch on one worker. The data order differs (each worker reads its half of the files), so the
  # runs match in distribution, not step by step: the training curves agree, and both models learn.
  one_dir = tmp_path / 'one_worker'
  config = Config(**SMALL, data_dir=synthetic_data_dir, model_dir=str(one_dir), epochs=3).validate()
  keras.utils.set_random_seed(config.seed)
  train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  two_losses, one_losses = _scalars(str(model_dir / 'train'), 'loss'), _scalars(str(one_dir / 'train'), 'loss')
  np.testing.assert_allclose(two_losses, one_losses, rtol=0.15)
  assert two_losses[-1] < two_losses[0]
  assert _scalars(str(model_dir / 'train'), 'auc')[-1] == pytest.approx(_scalars(str(one_dir / 'train'), 'auc')[-1],
                                                                        abs=0.1)
  two_auc, one_auc = _report(model_dir)['ranking']['roc_auc'], _report(one_dir)['ranking']['roc_auc']
  assert two_auc > 0.8 and one_auc > 0.8
  assert two_auc == pytest.approx(one_auc, abs=0.15)


def test_a_preempted_multi_worker_job_stops_every_worker_at_one_step_and_resumes_there_exactly(two_workers,
                                                                                                  synthetic_data_dir,
                                                                                                  tmp_path):
  """SIGTERM to worker 1 alone, as a pod eviction sends: both workers save the same step and exit for a requeue. The
  job is started again with more epochs (not a setting fixed on resume): both workers resume at that step, go on
  into the new epoch, and end as the uninterrupted job of as many epochs did."""
  reference, _ = two_workers
  model_dir = tmp_path / 'run'
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CONFIG', 'SLURM_JOB_ID')}
  proc = subprocess.Popen(_launch(synthetic_data_dir, model_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, pids = [], {}
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('[local_cluster] worker') and ': pid ' in line:
      pids[int(line.split()[2].rstrip(':'))] = int(line.rsplit(' ', 1)[1])
    if line.startswith('[worker 0]') and 'epoch 1/2' in line:  # Epoch 1 committed: preempt early in epoch 2.
      os.kill(pids[1], signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT) == preemption.REQUEUE_EXIT_CODE, ''.join(lines[-60:])
  output = ''.join(lines)
  stopped = {worker: re.search(rf'\[worker {worker}\] .*Stopped by ([^\n]+?) after step (\d+) of epoch 2', output)
             for worker in (0, 1)}
  assert stopped[0] and stopped[1], output[-3000:]
  assert stopped[1].group(1) == 'SIGTERM' and stopped[0].group(1) == 'a signal to another worker'
  step = int(stopped[0].group(2))
  assert int(stopped[1].group(2)) == step and 0 < step < 16  # The same step boundary, inside the epoch.
  assert 'Traceback' not in output

  resumed = _run(_launch(synthetic_data_dir, model_dir, epochs=3))
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert 'all 2 workers finished' in resumed.stdout
  for worker in (0, 1):
    lines = [line for line in resumed.stdout.splitlines() if line.startswith(f'[worker {worker}]')]
    assert any(re.search(rf'Resuming at step {step} of epoch 2 \(global step {16 + step}\)', line)
               for line in lines), resumed.stdout[-3000:]
    assert any('epoch 3/3' in line for line in lines), worker
    assert not any('epoch 1/3' in line for line in lines), worker
  assert _report(model_dir) == _report(reference)
  assert _scalars(str(model_dir / 'validation'), 'auc') == _scalars(str(reference / 'validation'), 'auc')
  # One set of outputs, the chief's, and one summary file per launch.
  assert not (model_dir / '.workers').exists()
  assert len(glob.glob(str(model_dir / 'train' / 'events.*'))) == 2


def test_multi_worker_without_a_cluster_is_a_one_line_error(tmp_path, run_program, monkeypatch):
  for name in ('TF_CONFIG', 'SLURM_JOB_ID'):
    monkeypatch.delenv(name, raising=False)
  code, _, stderr = run_program('trainer.main', '--strategy=multi_worker', f'--model_dir={tmp_path}')
  assert code != 0
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'TF_CONFIG' in errors[0], stderr[-2000:]
  assert 'Traceback' not in stderr
