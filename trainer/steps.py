"""The training step and what it runs with: the optimizer and its learning-rate schedule, the training metrics,
the class weights, the iterators, the sync of the BatchNormalization statistics and the distributed prediction of a
split.

Every builder takes plain arguments, no Config: `trainer.train` calls them for a run, and benchmarks/ times the same
step.
"""

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import data
from trainer import errors
from trainer import metrics as metrics_lib

# Scalars logged each epoch, with the same tag under train/ and validation/ so TensorBoard overlays them.
SCALARS = ('loss', 'accuracy', 'precision', 'recall', 'auc', 'pr_auc')


def learning_rate_schedule(peak: float, schedule: str, *, steps: int, steps_per_epoch: int):
  """One phase's learning rate: `peak` throughout, or a cosine decay from `peak` to 0 over the phase's `steps`.

  'plateau' starts at `peak` too; the loop lowers it between epochs (PhaseControl).

  The cosine warms up linearly from 0 over the phase's first epoch (a quarter of the phase at most): the first steps
  from a fresh initialisation, or into newly unfrozen layers, are the ones that diverge at the full rate.
  """
  if schedule != 'cosine' or steps == 0:
    return peak
  warmup = min(steps_per_epoch, steps // 4)
  return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=steps - warmup, warmup_target=peak,
                                                warmup_steps=warmup)


def make_optimizer(name: str, learning_rate, loss_scale: bool, *, weight_decay: float = 0.0,
                   clipnorm: float = 0.0) -> keras.optimizers.Optimizer:
  """Adam (AdamW with weight decay), Nadam or SGD with Nesterov momentum; wrapped for dynamic loss scaling under
  mixed_float16.

  `learning_rate` is a float or a keras.optimizers.schedules.LearningRateSchedule. `weight_decay` is decoupled from
  the gradient (Loshchilov & Hutter 2019), Keras's way for every optimizer, and spares biases and BatchNormalization
  offsets and scales, as fine-tuning recipes do: decaying them only shifts activations. `clipnorm` clips each
  variable's gradient to that L2 norm, after the loss scale is undone. 0 turns either off.
  """
  options = {'clipnorm': clipnorm or None}
  if weight_decay:
    options['weight_decay'] = weight_decay
  optimizer = {
      'adam': lambda: (keras.optimizers.AdamW if weight_decay else keras.optimizers.Adam)(learning_rate, **options),
      'nadam': lambda: keras.optimizers.Nadam(learning_rate, **options),
      'sgd': lambda: keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **options),
  }[name]()
  if weight_decay:
    optimizer.exclude_from_weight_decay(var_names=['bias', 'beta', 'gamma'])
  return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer


def train_metrics() -> dict[str, keras.metrics.Metric]:
  return {
      'loss': keras.metrics.Mean(),
      'accuracy': keras.metrics.BinaryAccuracy(),
      'precision': keras.metrics.Precision(),
      'recall': keras.metrics.Recall(),
      'auc': keras.metrics.AUC(curve='ROC'),
      'pr_auc': keras.metrics.AUC(curve='PR'),
  }


def make_train_step(model, optimizer, metrics, strategy, *, class_weights, global_batch, label_smoothing=0.0,
                    jit_compile=False):
  """A `tf.function` that runs `steps` steps (default 1) on every replica: `train_step(iterator, steps)`.

  The loss is summed over the replica's examples and divided by the GLOBAL batch, so that the all-reduced
  gradient is the same as one device would compute on the whole batch (tf.nn.compute_average_loss).

  Args:
    model, optimizer, metrics: made in the strategy's scope (metrics: `train_metrics()`).
    strategy: the run's strategy.
    class_weights: one weight per class, multiplying each example's loss.
    global_batch: the batch of all replicas together.
    label_smoothing: binary cross-entropy's, towards 0.5.
    jit_compile: compiles each replica's step (forward, backward, update and metrics) with XLA, as Keras's
      `jit_compile`; the iterator and the loop around it stay outside the compiled function.

  Returns:
    The function.
  """
  class_weights = tf.constant(class_weights, tf.float32)

  def step(images, labels):
    targets = tf.cast(labels, tf.float32)[:, None]
    with tf.GradientTape() as tape:
      probs = model(images, training=True)
      per_example = keras.losses.binary_crossentropy(targets, probs, label_smoothing=label_smoothing)
      weighted = per_example * tf.gather(class_weights, labels)
      loss = tf.nn.compute_average_loss(weighted, global_batch_size=global_batch)
      scaled = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    metrics['loss'].update_state(weighted)
    for name in SCALARS[1:]:
      metrics[name].update_state(targets, probs)

  replica_step = tf.function(step, jit_compile=True) if jit_compile else step

  @tf.function
  def train_step(iterator, steps=1):
    # A loop inside the function, as Orbit's use_tf_while_loop and Keras's steps_per_execution: one call from Python
    # for `steps` steps. A tensor `steps` traces once for every count (AutoGraph makes this a tf.while_loop).
    for _ in tf.range(steps):
      strategy.run(replica_step, args=next(iterator))

  return train_step


def make_statistics_sync(model, strategy):
  """A `tf.function` that sets the BatchNormalization moving statistics of every replica to their replica mean.

  Keras 3 creates the moving mean and variance with aggregation NONE, so under a multi-replica strategy each replica
  silently keeps its own copy, updated from its own share of the batch: the replicas, and under
  MultiWorkerMirroredStrategy the workers, end an epoch with different models, and inference reads whichever copy
  is local (measured: all 16 statistics of the CNN differ between 2 replicas after 4 steps). The moving averages are
  linear in the batch statistics and only inference reads them, so averaging them once an epoch gives what tf_keras
  gave by averaging every step (aggregation MEAN), for one collective an epoch. Training still normalises with each
  replica's own batch statistics, the default data-parallel BatchNormalization (`synchronized=False`).

  Args:
    model: a model from `models.build_model`, in its current phase (only BatchNormalization layers that train
      update their statistics).
    strategy: the run's strategy.

  Returns:
    The function, to be called by every worker at the same point; None when there is nothing to average.
  """
  statistics, pending = [], list(model.layers)
  while pending:
    layer = pending.pop(0)
    pending.extend(getattr(layer, 'layers', []))
    if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
      statistics += [layer.moving_mean, layer.moving_variance]
  if not statistics or strategy.num_replicas_in_sync == 1:
    return None

  def average():
    # Read through the tf.Variable: a tensor converted from the Keras variable has no device, and the all-reduce of
    # MultiWorkerMirroredStrategy rejects it ("destinations can not be empty").
    means = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.MEAN, [v.value.read_value() for v in statistics])
    for variable, mean in zip(statistics, means):
      variable.assign(mean)

  @tf.function
  def sync():
    strategy.run(average)

  return sync


def training_iterator(strategy: tf.distribute.Strategy, dataset_fn) -> tf.data.Iterator:
  """The iterator `make_train_step`'s function reads: `dataset_fn(input_context)`'s batches, one per replica.

  One replica on the host CPU reads the dataset's own iterator, with `dataset_fn(None)`: a distributed iterator has
  nothing to do there (no replicas to split a batch among, no device to copy it to), yet its `next` inside the step's
  loop kept a tiny model at --steps_per_loop=32 below Keras fit's rate (BENCHMARKS.md, train_loop_tiny). Any other
  strategy, one GPU included (whose distributed iterator prefetches to the GPU), gets the distributed one.
  """
  devices = strategy.extended.worker_devices
  if (isinstance(strategy, tf.distribute.OneDeviceStrategy)
      and tf.DeviceSpec.from_string(devices[0]).device_type == 'CPU'):
    return iter(dataset_fn(None))
  return iter(strategy.distribute_datasets_from_function(dataset_fn))


def distributed_split(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset,
                      batch_size: int) -> tf.distribute.DistributedDataset:
  """A split's batches (`data.eval_dataset`) spread over the replicas and workers, each image with its position.

  Every worker reads the whole split and keeps its share of the batches (AutoShardPolicy.DATA: by file, each worker
  would number its own images); each batch is then split between the worker's replicas. The position puts the
  gathered predictions back in the split's order. patient_id stays behind: strings go to no device, and the
  training loop's decision reads only labels and probabilities.
  """
  def with_position(number, batch):
    positions = number * batch_size + tf.range(tf.shape(batch['label'])[0], dtype=tf.int64)
    return {'image': batch['image'], 'label': batch['label'], 'position': positions}

  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return strategy.experimental_distribute_dataset(dataset.enumerate().map(with_position).with_options(options))


def make_distributed_predict(model: keras.Model, strategy: tf.distribute.Strategy):
  """Distributed evaluation: each replica scores its share of the split, and every worker gathers all of them.

  Returns:
    A function of `distributed_split`'s dataset that returns {'probs', 'labels', 'position'}, one entry per image,
    in the split's order: the same on every worker, so that every worker takes the same best-epoch decision.
  """
  def score(batch):
    # A replica's share of a last, short batch may be empty, which some layers reject (the CNN's: "Incompatible
    # shapes: [8] vs. [0,16,16,4]").
    probs = tf.cond(tf.shape(batch['label'])[0] > 0,
                    lambda: tf.cast(model(batch['image'], training=False), tf.float32)[:, 0],
                    lambda: tf.zeros([0], tf.float32))
    return probs, batch['label'], batch['position']

  @tf.function
  def gathered(batch):
    # All-gathers along the batch axis, which tolerates replicas with fewer (or no) images of a last, short batch.
    return [strategy.gather(value, axis=0) for value in strategy.run(score, args=(batch,))]

  def predict(dataset: tf.distribute.DistributedDataset) -> dict[str, np.ndarray]:
    parts = [[value.numpy() for value in gathered(batch)] for batch in dataset]
    probs, labels, positions = (np.concatenate(part) for part in zip(*parts))
    order = np.argsort(positions, kind='stable')
    return {'probs': probs[order], 'labels': labels[order], 'position': positions[order]}

  return predict


def split_scalars(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """The SCALARS for a split's predictions, at threshold 0.5, with the unweighted log loss."""
  at_half = metrics_lib.metrics_at(labels, probs, 0.5)
  ranking = metrics_lib.ranking_metrics(labels, probs)
  clipped = np.clip(probs, 1e-7, 1 - 1e-7)
  loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
  return {'loss': float(loss), 'accuracy': at_half['accuracy'], 'precision': at_half['precision'],
          'recall': at_half['sensitivity'], 'auc': ranking['roc_auc'], 'pr_auc': ranking['pr_auc']}


def class_weights_and_steps(builder, *, batch_size: int, class_weight: str, dataset: str,
                            replicas: int) -> tuple[np.ndarray, int]:
  """The class weights (from the training split's counts) and the training steps of an epoch.

  Args:
    builder: the dataset's builder; `dataset` names it in the log line.
    batch_size: the global batch.
    class_weight: 'balanced' (inverse class frequency) or any other mode (ones).
    replicas: the strategy's, for the log line.

  Raises:
    ValueError: a split lacks a class, or the batch is larger than the training split.
  """
  counts = data.class_counts(builder, 'train')
  check_classes(builder, {'train': counts, 'validation': data.class_counts(builder, 'validation')})
  class_weights = (counts.sum() / (len(counts) * counts) if class_weight == 'balanced'
                   else np.ones(len(counts)))
  steps_per_epoch = int(counts.sum()) // batch_size
  if steps_per_epoch == 0:
    raise errors.InvalidValue(f'--batch_size={batch_size} is larger than the {counts.sum()} training images.')
  logging.info('%s: %d training images per class %s, class weights %s, %d steps of %d per epoch, %d replicas.',
               dataset, counts.sum(), counts.tolist(), np.round(class_weights, 3).tolist(),
               steps_per_epoch, batch_size, replicas)
  return class_weights, steps_per_epoch


def check_classes(builder, counts: dict[str, np.ndarray]) -> None:
  """Refuses splits that lack a class: its class weight would be infinite and its validation ROC undefined.

  Raises:
    ValueError: naming the split and the class.
  """
  names = builder.info.features['label'].names
  for split, split_counts in counts.items():
    for name, count in zip(names, split_counts):
      if count == 0:
        per_class = dict(zip(names, split_counts.tolist()))
        raise errors.InvalidValue(f'The {split} split of {builder.info.full_name} has no {name} image ({per_class}): '
                                  'nothing can learn or be checked on it. Rebuild the dataset from a complete download '
                                  '(python -m cxr_tfds.build names the files it skips).')
