"""The distribution strategy and the precision policy of a run: one small factory each.

Shaped like TF Model Garden's `official/common/distribute_utils.py`: a name maps to a strategy, each option is a
short branch, and an unknown name raises a ValueError naming the allowed values. Every strategy, multi-worker
included, is driven by the same custom loop in `trainer.train` (Keras 3.15's `fit` fails under
MultiWorkerMirroredStrategy with two workers).

Call order matters: `configure_logical_devices` must run before anything initialises the TensorFlow runtime, and
`set_precision` before the model is built.
"""

import json
import math
import os

import keras
import tensorflow as tf

from trainer import errors

# Defined in trainer.config, which main checks before it imports TensorFlow.
from trainer.config import LR_SCALING, PRECISIONS, STRATEGIES  # pylint: disable=g-importing-member

# SlurmClusterResolver's default: worker i listens on <node i>:8888. The port must be free on every node.
SLURM_PORT = 8888


def configure_logical_devices(n: int) -> None:
  """Splits the host CPU into `n` logical devices, so MirroredStrategy has `n` replicas on a laptop or in CI.

  Only the CPU is split: GPUs, if any, stay as they are, and the 'mirrored' strategy uses them instead of the
  logical CPUs. Calling it again with the same `n` is harmless.

  Args:
    n: the number of logical CPU devices; 0 or 1 leaves the CPU alone.

  Raises:
    ValueError: if `n` is negative.
    RuntimeError: if the TensorFlow runtime is already initialised (an op, a dataset or a strategy was created
      first), because TensorFlow fixes its devices at that moment.
  """
  if n < 0:
    raise errors.InvalidValue(f'logical_devices must be zero or more, got {n}.')
  if n <= 1:
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  try:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
  except RuntimeError as e:
    raise RuntimeError(
        f'Cannot split the CPU into {n} logical devices: the TensorFlow runtime is already initialised. '
        'Call configure_logical_devices before creating any tensor, dataset or strategy.') from e


def resolve_precision(name: str) -> str:
  """Maps a precision name to a Keras dtype policy name, choosing one for 'auto'.

  'auto' picks mixed_float16 when every GPU is an NVIDIA GPU of compute capability 7.0 or more (Tensor Cores;
  older GPUs run float16 no faster than float32), and float32 elsewhere, CPU included. There is no TPU strategy
  (`get_strategy`), so no TPU case; mixed_bfloat16 is there to be asked for.

  Args:
    name: one of PRECISIONS.

  Returns:
    'float32', 'mixed_float16' or 'mixed_bfloat16'.

  Raises:
    ValueError: if `name` is not one of PRECISIONS.
  """
  if name not in PRECISIONS:
    raise errors.InvalidValue(f'Unknown precision {name!r}; expected one of {", ".join(PRECISIONS)}.')
  if name != 'auto':
    return name
  gpus = tf.config.list_physical_devices('GPU')
  # Only NVIDIA GPUs report a compute capability; others (ROCm) get float32.
  capabilities = [tf.config.experimental.get_device_details(gpu).get('compute_capability', (0, 0)) for gpu in gpus]
  if gpus and min(capabilities) >= (7, 0):
    return 'mixed_float16'
  return 'float32'


def set_precision(name: str) -> str:
  """Sets the Keras global dtype policy; layers built afterwards compute in it and keep float32 variables.

  Under mixed_float16 a custom training loop must wrap its optimizer in `keras.optimizers.LossScaleOptimizer`,
  or small gradients underflow to zero.

  Args:
    name: one of PRECISIONS.

  Returns:
    The resolved policy name (see `resolve_precision`).

  Raises:
    ValueError: if `name` is not one of PRECISIONS.
  """
  policy = resolve_precision(name)
  keras.mixed_precision.set_global_policy(policy)
  return policy


def get_strategy(name: str, *, cluster_resolver=None) -> tf.distribute.Strategy:
  """Returns the tf.distribute strategy for a strategy name.

  Args:
    name: one of STRATEGIES.
      'auto': MirroredStrategy over all GPUs when there are several, else OneDeviceStrategy on the GPU or CPU.
      'one_device': OneDeviceStrategy on the first GPU, or the CPU when there is none.
      'mirrored': MirroredStrategy over all GPUs, or over all logical CPU devices when there is no GPU (see
        `configure_logical_devices`).
      'multi_worker': MultiWorkerMirroredStrategy; each worker mirrors over its own GPUs (or its CPU).
    cluster_resolver: for 'multi_worker' only, a `tf.distribute.cluster_resolver.ClusterResolver` to use instead of
      the one `cluster_resolver_from_env` finds.

  Returns:
    A tf.distribute.Strategy.

  Raises:
    ValueError: if `name` is not one of STRATEGIES, or for 'multi_worker' when the environment describes no cluster
      (see `cluster_resolver_from_env`).
  """
  gpus = tf.config.list_physical_devices('GPU')
  if name == 'auto':
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else _one_device(gpus)

  if name == 'one_device':
    return _one_device(gpus)

  if name == 'mirrored':
    if gpus:
      return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices('CPU')])

  if name == 'multi_worker':
    resolver = cluster_resolver or cluster_resolver_from_env()
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL
                      if gpus else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))

  raise errors.InvalidValue(f'Unknown strategy {name!r}; expected one of {", ".join(STRATEGIES)}.')


def _one_device(gpus: list) -> tf.distribute.Strategy:
  return tf.distribute.OneDeviceStrategy('/gpu:0' if gpus else '/cpu:0')


def cluster_resolver_from_env() -> tf.distribute.cluster_resolver.ClusterResolver:
  """Finds the multi-worker cluster this process belongs to.

  TF_CONFIG wins when it is set (launch/local_cluster.py, a Kubeflow TFJob, launch/kubernetes). Otherwise, inside a
  Slurm job step (SLURM_JOB_ID set, one task per node), SlurmClusterResolver builds the cluster from SLURM_*
  variables: worker i is the i-th node of the step on port SLURM_PORT and drives every GPU Slurm gave its node.

  Returns:
    A TFConfigClusterResolver; under Slurm a SlurmClusterResolver (a SimpleClusterResolver with its cluster on CPU
    nodes).

  Raises:
    ValueError: if TF_CONFIG is malformed, or missing outside Slurm, or the Slurm step variables are missing.
  """
  if 'TF_CONFIG' not in os.environ and 'SLURM_JOB_ID' in os.environ:
    return _slurm_cluster_resolver()
  _check_tf_config(os.environ.get('TF_CONFIG'))
  return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def _slurm_cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
  """SlurmClusterResolver for one task per node, each task driving all of its node's GPUs."""
  tasks, nodes = os.environ.get('SLURM_STEP_NUM_TASKS'), os.environ.get('SLURM_STEP_NUM_NODES')
  if tasks is None:
    raise errors.InvalidValue('SLURM_JOB_ID is set but SLURM_STEP_NUM_TASKS is not: start the workers with srun inside '
                              'the batch script (see launch/slurm_multinode.sbatch).')
  if tasks != nodes:
    raise errors.InvalidValue(f'The Slurm step runs {tasks} tasks on {nodes} nodes; run one task per node '
                     '(#SBATCH --ntasks-per-node=1): each worker mirrors over all GPUs of its node.')
  # The GPU count comes from TensorFlow, not from the resolver's nvidia-smi probe (absent on CPU nodes).
  # auto_set_gpu=False keeps the GPUs Slurm assigned: TF has enumerated them by now, so changing
  # CUDA_VISIBLE_DEVICES would have no effect.
  gpus = len(tf.config.list_physical_devices('GPU'))
  slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
      port_base=SLURM_PORT, gpus_per_node=max(gpus, 1), gpus_per_task=max(gpus, 1), auto_set_gpu=False)
  if gpus:
    return slurm
  # SlurmClusterResolver places tasks by stepping through GPUs, so with zero GPUs it places none. On CPU nodes its
  # cluster is laid out with one GPU per node and handed on without accelerators.
  cluster = slurm.cluster_spec()
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      cluster, task_type=slurm.task_type, task_id=slurm.task_id, num_accelerators={'GPU': 0}, rpc_layer='grpc')


def _check_tf_config(raw: str | None) -> None:
  """Raises a one-line ValueError unless `raw` is a TF_CONFIG naming a task of its own cluster."""
  if not raw:
    raise errors.InvalidValue('--strategy=multi_worker needs TF_CONFIG (or a Slurm job step): set TF_CONFIG on every '
                              'worker, e.g. with launch/local_cluster.py; see launch/README.md.')
  try:
    config = json.loads(raw)
    workers = config['cluster']
    task_type, index = config['task']['type'], int(config['task']['index'])
  except (ValueError, KeyError, TypeError) as e:
    raise errors.InvalidValue(f'TF_CONFIG is not JSON of the form {{"cluster": {{"worker": [...]}}, "task": '
                              f'{{"type": ..., "index": ...}}}} ({type(e).__name__}: {e}): {raw!r}') from e
  if not isinstance(workers, dict) or not 0 <= index < len(workers.get(task_type, ())):
    raise errors.InvalidValue(f'TF_CONFIG task {task_type}:{index} is not in its cluster {workers}.')


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's checkpoints, summaries and exported model.

  Args:
    strategy: the run's strategy.

  Returns:
    True for single-machine strategies. Under a multi-worker strategy, True only for the chief: the task of type
    'chief', or worker 0 when the cluster has no 'chief' job (the TF_CONFIG convention).
  """
  resolver = strategy.cluster_resolver
  task_type = resolver.task_type if resolver else None
  if task_type is None or task_type == 'chief':
    return True
  return task_type == 'worker' and resolver.task_id == 0 and 'chief' not in resolver.cluster_spec().jobs


def worker_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
  """The folder this process writes its checkpoints and summaries to.

  Under MultiWorkerMirroredStrategy every worker must take part in saving (the save itself runs collectives), but
  only the chief's files are kept: the others write to a throw-away folder of their own, the pattern of the TF
  multi-worker tutorial and Keras's `write_filepath`. The caller deletes that folder at the end of the run
  (`tf.io.gfile.rmtree`).

  Args:
    model_dir: the run's output folder, on a local or mounted disk (exports, checkpoint repair and the run lock need
      symlinks, fsync and file locks, which gs:// has not).
    strategy: the run's strategy.

  Returns:
    `model_dir` on the chief; `model_dir/.workers/<task type>_<task id>`, created, on every other worker.
  """
  if is_chief(strategy):
    return model_dir
  resolver = strategy.cluster_resolver
  path = os.path.join(model_dir, '.workers', f'{resolver.task_type}_{resolver.task_id}')
  tf.io.gfile.makedirs(path)
  return path


def scaled_learning_rate(base_lr: float, global_batch: int, *, rule: str = 'none', reference_batch: int = 32) -> float:
  """Scales a learning rate tuned at `reference_batch` to `global_batch`.

  Args:
    base_lr: the learning rate that works at `reference_batch`.
    global_batch: the batch size across all replicas and workers.
    rule: 'none' keeps `base_lr` as given; 'linear' multiplies it by global_batch / reference_batch (Goyal et al.
      2017, "Accurate, Large Minibatch SGD", for SGD with warm-up); 'sqrt' by the square root of that ratio (the
      milder rule often used with Adam, Hoffer et al. 2017).
    reference_batch: the batch size `base_lr` was tuned at.

  Returns:
    The learning rate to use.

  Raises:
    ValueError: if `rule` is not one of LR_SCALING, or a batch size or the learning rate is not positive.
  """
  if not base_lr > 0:
    raise errors.InvalidValue(f'The learning rate must be positive, got {base_lr}.')
  if global_batch <= 0 or reference_batch <= 0:
    raise errors.InvalidValue(f'Batch sizes must be positive, got global_batch={global_batch}, '
                     f'reference_batch={reference_batch}.')
  ratio = global_batch / reference_batch
  if rule == 'none':
    return base_lr
  if rule == 'linear':
    return base_lr * ratio
  if rule == 'sqrt':
    return base_lr * math.sqrt(ratio)
  raise errors.InvalidValue(f'Unknown learning-rate scaling rule {rule!r}; expected one of {", ".join(LR_SCALING)}.')
