"""Tests for trainer/distribute.py: strategies, precision policies, chief rules and learning-rate scaling (CPU)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import keras
import pytest
import tensorflow as tf

from trainer import distribute
from trainer import steps as steps_lib


@pytest.fixture
def env(monkeypatch):
  """A process environment with no cluster in it; tests add what they simulate."""
  for name in ('TF_CONFIG', 'SLURM_JOB_ID', 'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NUM_NODES',
               'SLURM_STEP_NODELIST', 'SLURM_STEP_TASKS_PER_NODE'):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def _tf_config(cluster, task_type, index):
  return json.dumps({'cluster': cluster, 'task': {'type': task_type, 'index': index}})


def _run_python(code):
  """Runs `code` in a fresh interpreter, where TF's runtime is not yet initialised; returns its stdout."""
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CONFIG', 'SLURM_JOB_ID')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_one_device_and_auto_on_cpu():
  for name in ('one_device', 'auto'):
    strategy = distribute.get_strategy(name)
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    with strategy.scope():
      v = tf.Variable(1.0)
    assert v.device.endswith('CPU:0')


def test_mirrored_over_two_logical_cpus_has_two_replicas():
  out = _run_python("""
      from trainer import distribute
      distribute.configure_logical_devices(2)
      distribute.configure_logical_devices(2)  # the same split again is harmless
      import tensorflow as tf
      strategy = distribute.get_strategy('mirrored')
      ids = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group + 1)
      print(type(strategy).__name__, strategy.num_replicas_in_sync, int(strategy.reduce('SUM', ids, axis=None)))
      print(type(distribute.get_strategy('auto')).__name__)
      from trainer import steps as steps_lib
      contexts = []
      iterator = steps_lib.training_iterator(
          strategy, lambda ctx: contexts.append(ctx) or tf.data.Dataset.range(8).batch(4))
      print(isinstance(iterator, tf.distribute.DistributedIterator), contexts[0].num_replicas_in_sync)
  """)
  assert out.split() == ['MirroredStrategy', '2', '3', 'OneDeviceStrategy', 'True', '2']


def test_one_cpu_trains_from_the_datasets_own_iterator():
  strategy = distribute.get_strategy('one_device')
  contexts = []

  def dataset_fn(input_context):
    contexts.append(input_context)
    return tf.data.Dataset.range(12).batch(4).map(lambda x: (tf.cast(x, tf.float32)[:, None], tf.cast(x % 2, tf.int32)))

  iterator = steps_lib.training_iterator(strategy, dataset_fn)
  assert contexts == [None]  # a single pipeline: data.train_dataset reads every file, the global batch
  assert not isinstance(iterator, tf.distribute.DistributedIterator)
  with strategy.scope():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation='sigmoid')])
    optimizer = steps_lib.make_optimizer('sgd', 0.1, loss_scale=False)
    optimizer.build(model.trainable_variables)
    metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[1.0, 1.0], global_batch=4)
  step(iterator, tf.constant(2))
  step(iterator, tf.constant(1))
  assert int(optimizer.iterations) == 3
  with pytest.raises(tf.errors.OutOfRangeError):  # the three batches were each read once
    step(iterator, tf.constant(1))


def test_logical_devices_after_runtime_start_is_a_clear_error():
  tf.constant(1.0)  # makes sure this process's runtime is initialised, so the split cannot leak into other tests
  with pytest.raises(RuntimeError, match='before creating any tensor'):
    distribute.configure_logical_devices(3)
  distribute.configure_logical_devices(1)  # 0 and 1 do nothing, so they never fail
  distribute.configure_logical_devices(0)
  with pytest.raises(ValueError, match='-1'):
    distribute.configure_logical_devices(-1)


def test_unknown_names_raise_naming_the_allowed_values():
  with pytest.raises(ValueError, match="'tpu'.*auto, one_device, mirrored, multi_worker"):
    distribute.get_strategy('tpu')
  with pytest.raises(ValueError, match="'fp16'.*auto, float32, mixed_float16, mixed_bfloat16"):
    distribute.resolve_precision('fp16')
  with pytest.raises(ValueError, match="'cubic'.*none, linear, sqrt"):
    distribute.scaled_learning_rate(1e-3, 64, rule='cubic')


def test_precision_auto_is_float32_without_gpus(monkeypatch):
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind=None: [] if kind == 'GPU' else real(kind))
  assert distribute.resolve_precision('auto') == 'float32'
  assert distribute.resolve_precision('mixed_float16') == 'mixed_float16'


def test_precision_auto_on_this_machines_gpus():
  gpus = tf.config.list_physical_devices('GPU')
  if not gpus:
    pytest.skip('needs a GPU')
  capabilities = [tf.config.experimental.get_device_details(gpu).get('compute_capability', (0, 0)) for gpu in gpus]
  expected = 'mixed_float16' if min(capabilities) >= (7, 0) else 'float32'
  assert distribute.resolve_precision('auto') == expected


@pytest.mark.parametrize('capabilities, expected', [
    ([(8, 0), (8, 0)], 'mixed_float16'),
    ([(7, 0)], 'mixed_float16'),
    ([(8, 0), (6, 1)], 'float32'),  # one older GPU would slow every step down
    ([None], 'float32'),  # not NVIDIA: no compute capability reported
])
def test_precision_auto_on_simulated_gpus(monkeypatch, capabilities, expected):
  gpus = [tf.config.PhysicalDevice(name=f'/physical_device:GPU:{i}', device_type='GPU')
          for i in range(len(capabilities))]
  details = {gpu.name: {} if c is None else {'compute_capability': c} for gpu, c in zip(gpus, capabilities)}
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind=None: gpus if kind == 'GPU' else real(kind))
  monkeypatch.setattr(tf.config.experimental, 'get_device_details', lambda gpu: details[gpu.name])
  assert distribute.resolve_precision('auto') == expected


def test_set_precision_sets_the_global_policy():
  try:
    assert distribute.set_precision('mixed_bfloat16') == 'mixed_bfloat16'
    assert keras.mixed_precision.global_policy().name == 'mixed_bfloat16'
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert layer.compute_dtype == 'bfloat16'
    assert layer.kernel.dtype == 'float32'
  finally:
    keras.mixed_precision.set_global_policy('float32')
  assert distribute.set_precision('auto') == 'float32'
  assert keras.mixed_precision.global_policy().name == 'float32'


def test_scaled_learning_rate_rules():
  assert distribute.scaled_learning_rate(1e-3, 256, rule='none') == 1e-3
  assert distribute.scaled_learning_rate(1e-3, 256) == 1e-3
  assert distribute.scaled_learning_rate(1e-3, 256, rule='linear') == pytest.approx(8e-3)
  assert distribute.scaled_learning_rate(1e-3, 128, rule='sqrt') == pytest.approx(2e-3)
  assert distribute.scaled_learning_rate(0.1, 512, rule='linear', reference_batch=256) == pytest.approx(0.2)
  with pytest.raises(ValueError, match='global_batch=0'):
    distribute.scaled_learning_rate(1e-3, 0, rule='linear')
  with pytest.raises(ValueError, match='-1'):
    distribute.scaled_learning_rate(-1.0, 32)


def test_single_machine_strategy_is_chief_and_writes_to_model_dir(tmp_path):
  strategy = distribute.get_strategy('one_device')
  assert distribute.is_chief(strategy)
  assert distribute.worker_dir(str(tmp_path), strategy) == str(tmp_path)
  assert not (tmp_path / '.workers').exists()


def test_chief_rules_and_worker_dirs_from_tf_config(env, tmp_path):
  workers = {'worker': ['localhost:1111', 'localhost:2222']}
  # A stand-in strategy: a real multi-worker strategy would wait for its peers to connect.
  strategy = types.SimpleNamespace(cluster_resolver=None)

  env.setenv('TF_CONFIG', _tf_config(workers, 'worker', 1))
  strategy.cluster_resolver = distribute.cluster_resolver_from_env()
  assert isinstance(strategy.cluster_resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
  assert not distribute.is_chief(strategy)
  path = distribute.worker_dir(str(tmp_path), strategy)
  assert path == str(tmp_path / '.workers' / 'worker_1')
  assert os.path.isdir(path)

  env.setenv('TF_CONFIG', _tf_config(workers, 'worker', 0))
  assert distribute.is_chief(strategy)
  assert distribute.worker_dir(str(tmp_path), strategy) == str(tmp_path)

  # With a 'chief' job, worker 0 is an ordinary worker.
  env.setenv('TF_CONFIG', _tf_config({'chief': ['localhost:3333'], **workers}, 'worker', 0))
  assert not distribute.is_chief(strategy)
  env.setenv('TF_CONFIG', _tf_config({'chief': ['localhost:3333'], **workers}, 'chief', 0))
  assert distribute.is_chief(strategy)


def test_multi_worker_without_a_cluster_raises(env):
  with pytest.raises(ValueError, match='needs TF_CONFIG'):
    distribute.get_strategy('multi_worker')


@pytest.mark.parametrize('tf_config, message', [
    ('{not json', 'not JSON'),
    ('{"cluster": {"worker": ["localhost:1"]}}', 'not JSON'),  # no task
    (_tf_config({'worker': ['localhost:1']}, 'worker', 1), 'task worker:1 is not in its cluster'),
    (_tf_config({'worker': ['localhost:1']}, 'chief', 0), 'task chief:0 is not in its cluster'),
])
def test_malformed_tf_config_raises(env, tf_config, message):
  env.setenv('TF_CONFIG', tf_config)
  with pytest.raises(ValueError, match=message):
    distribute.get_strategy('multi_worker')


def _simulate_slurm(env, procid, tasks='2', nodes='2'):
  env.setenv('SLURM_JOB_ID', '4242')
  env.setenv('SLURM_PROCID', str(procid))
  env.setenv('SLURM_STEP_NUM_TASKS', tasks)
  env.setenv('SLURM_STEP_NUM_NODES', nodes)
  env.setenv('SLURM_STEP_NODELIST', 'gpu[07-08]')
  env.setenv('SLURM_STEP_TASKS_PER_NODE', '1(x2)')


def test_slurm_step_on_cpu_nodes_gives_one_worker_per_node(env):
  real = tf.config.list_physical_devices
  env.setattr(tf.config, 'list_physical_devices', lambda kind=None: [] if kind == 'GPU' else real(kind))
  _simulate_slurm(env, procid=1)
  resolver = distribute.cluster_resolver_from_env()
  assert resolver.cluster_spec().as_dict() == {'worker': ['gpu07:8888', 'gpu08:8888']}
  assert (resolver.task_type, resolver.task_id) == ('worker', 1)
  assert resolver.num_accelerators() == {'GPU': 0}  # no GPU: workers mirror over their CPU
  assert not distribute.is_chief(types.SimpleNamespace(cluster_resolver=resolver))


def test_slurm_needs_one_task_per_node_and_a_job_step(env):
  _simulate_slurm(env, procid=0, tasks='8', nodes='2')
  with pytest.raises(ValueError, match='8 tasks on 2 nodes'):
    distribute.cluster_resolver_from_env()
  env.delenv('SLURM_STEP_NUM_TASKS')
  with pytest.raises(ValueError, match='srun'):
    distribute.cluster_resolver_from_env()


def test_tf_config_wins_over_slurm(env):
  _simulate_slurm(env, procid=1)
  env.setenv('TF_CONFIG', _tf_config({'worker': ['a:1', 'b:2', 'c:3']}, 'worker', 2))
  resolver = distribute.cluster_resolver_from_env()
  assert resolver.cluster_spec().as_dict() == {'worker': ['a:1', 'b:2', 'c:3']}
  assert resolver.task_id == 2


def test_config_validates_the_same_names_this_module_accepts():
  # trainer.config keeps its own copy so that flags are checked before TensorFlow is imported.
  from trainer import config
  assert config.STRATEGIES == distribute.STRATEGIES
  assert config.PRECISIONS == distribute.PRECISIONS
  assert config.LR_SCALING == distribute.LR_SCALING
