"""The training loop: one loop for every strategy, in two phases (the head, then the last N backbone layers).

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy with two workers, so the loop is our own, in the
shape TF Model Garden / Orbit use: a `tf.function` step under `strategy.run`, Keras layers, losses, optimizers and
metrics, `tf.train.CheckpointManager` for resume and `tf.summary` for TensorBoard. The same code runs on one device,
on several GPUs and on several machines.
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import shlex
import shutil
import sys
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer import config as config_lib
from trainer import data
from trainer import distribute
from trainer import errors
from trainer import files
from trainer import metrics as metrics_lib
from trainer import runs
from trainer import export
from trainer import figures
from trainer import lock
from trainer import models
from trainer import preemption
from trainer.config import Config

PHASES = models.PHASES
# Scalars logged each epoch, with the same tag under train/ and validation/ so TensorBoard overlays them.
SCALARS = ('loss', 'accuracy', 'precision', 'recall', 'auc', 'pr_auc')
# Training steps between two reads of the metrics (progress bar, divergence check).
LOG_EVERY = 10


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


def make_train_step(model, optimizer, metrics, strategy, *, class_weights, global_batch, label_smoothing=0.0):
  """A `tf.function` that runs `steps` steps (default 1) on every replica: `train_step(iterator, steps)`.

  The loss is summed over the replica's examples and divided by the GLOBAL batch, so that the all-reduced
  gradient is the same as one device would compute on the whole batch (tf.nn.compute_average_loss).
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

  @tf.function
  def train_step(iterator, steps=1):
    # A loop inside the function, as Orbit's use_tf_while_loop and Keras's steps_per_execution: one call from Python
    # for `steps` steps. A tensor `steps` traces once for every count (AutoGraph makes this a tf.while_loop).
    for _ in tf.range(steps):
      strategy.run(step, args=next(iterator))

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


def _validation(config: Config, strategy: tf.distribute.Strategy, model: keras.Model, builder, image_size: int):
  """The function that predicts the validation split each epoch: shared out over the replicas when there are
  several, on this worker alone when there is one."""
  val_ds = data.eval_dataset(builder, 'validation', image_size=image_size, batch_size=config.batch_size)
  if strategy.num_replicas_in_sync > 1:
    shards, predict = distributed_split(strategy, val_ds, config.batch_size), make_distributed_predict(model, strategy)
    return lambda: predict(shards)
  predict = runs.make_predict(model)  # Once: a function traced anew every epoch would retrace every epoch.
  return lambda: runs.predict_split(model, val_ds, predict=predict)


def split_scalars(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """The SCALARS for a split's predictions, at threshold 0.5, with the unweighted log loss."""
  at_half = metrics_lib.metrics_at(labels, probs, 0.5)
  ranking = metrics_lib.ranking_metrics(labels, probs)
  clipped = np.clip(probs, 1e-7, 1 - 1e-7)
  loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
  return {'loss': float(loss), 'accuracy': at_half['accuracy'], 'precision': at_half['precision'],
          'recall': at_half['sensitivity'], 'auc': ranking['roc_auc'], 'pr_auc': ranking['pr_auc']}


def _png_summary(name: str, png: bytes, step: int) -> None:
  tf.summary.image(name, tf.image.decode_png(png)[None], step=step)


class _Progress:
  """One line per epoch that says where the run is and how long is left, plus Keras's progress bar on the chief
  when it writes to a terminal."""

  def __init__(self, total_epochs: int, steps_per_epoch: int, verbose: bool):
    self.total_epochs, self.steps_per_epoch, self.verbose = total_epochs, steps_per_epoch, verbose
    self.epoch_seconds = []

  def bar(self):
    # Outside a terminal (Slurm, `kubectl logs`, a sweep) Keras's bar is escape codes and redraws, and the epoch line
    # below says the same once: there it is the only progress line.
    interactive = self.verbose and sys.stdout.isatty()
    return keras.utils.Progbar(self.steps_per_epoch, verbose=1 if interactive else 0, stateful_metrics=SCALARS)

  def epoch_done(self, epoch: int, phase: str, seconds: float, train: dict, val: dict) -> None:
    self.epoch_seconds.append(seconds)
    left = (self.total_epochs - epoch - 1) * float(np.mean(self.epoch_seconds))
    logging.info('epoch %d/%d (%s) %.0fs, about %.0fs left | train loss %.4f auc %.4f | '
                 'validation loss %.4f auc %.4f accuracy %.4f', epoch + 1, self.total_epochs, phase, seconds,
                 left, train['loss'], train['auc'], val['loss'], val['auc'], val['accuracy'])


class PhaseControl(tf.Module):
  """Early stopping and learning-rate reduction on a plateau of validation ROC-AUC, within one phase.

  Like keras.callbacks.EarlyStopping and ReduceLROnPlateau (mode 'max', min_delta 0, no cooldown), but the counters
  are variables in the run's checkpoint, so a resumed run goes on counting where the stopped one was. They start
  again with each phase: the fine-tuning phase's AUC is not compared with the head's.

  Args:
    patience: epochs without a better AUC that end the phase; 0 never ends it early.
    plateau: (factor, patience, min_lr) to lower the learning rate by, or None to leave it alone.
  """

  def __init__(self, patience: int, plateau: tuple[float, int, float] | None):
    super().__init__(name='phase_control')
    self.patience, self.plateau = patience, plateau
    self.best_auc = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name='phase_best_validation_auc')
    self.stale = tf.Variable(0, dtype=tf.int64, trainable=False, name='epochs_since_best')
    self.waiting = tf.Variable(0, dtype=tf.int64, trainable=False, name='epochs_since_best_or_reduction')
    self.lr_scale = tf.Variable(1.0, dtype=tf.float64, trainable=False, name='learning_rate_scale')
    # Epochs actually trained: the data pipeline's position, which an early stop no longer ties to the epoch number.
    self.trained_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name='trained_epochs')

  def start_phase(self) -> None:
    self.best_auc.assign(-1.0)
    for counter in (self.stale, self.waiting):
      counter.assign(0)
    self.lr_scale.assign(1.0)

  def learning_rate(self, peak: float) -> float:
    """With a plateau: the phase's learning rate after its reductions so far, never below the floor."""
    return max(peak * float(self.lr_scale), self.plateau[2])

  def end_epoch(self, auc: float) -> tuple[bool, bool]:
    """Counts one epoch of the phase; returns (stop the phase, the learning rate was lowered)."""
    self.trained_epochs.assign_add(1)
    if auc > float(self.best_auc):
      self.best_auc.assign(auc)
      self.stale.assign(0)
      self.waiting.assign(0)
    else:
      self.stale.assign_add(1)
      self.waiting.assign_add(1)
    reduced = False
    if self.plateau is not None and int(self.waiting) >= self.plateau[1]:
      self.waiting.assign(0)
      reduced = True
      self.lr_scale.assign(float(self.lr_scale) * self.plateau[0])
    return bool(self.patience) and int(self.stale) >= self.patience, reduced


def run(config: Config, strategy: tf.distribute.Strategy) -> dict:
  """Trains, picks the best epoch by validation ROC-AUC, evaluates it on test, and exports it.

  Resumes from the last completed epoch when `config.model_dir` holds a checkpoint of the same run, or from the step
  where a preempted run stopped. The chief holds the model dir's lock (`trainer.lock`) throughout, so a second run on
  the same model dir is refused. SIGTERM or SIGUSR1 stops every worker at a step boundary with a checkpoint and exits
  with `preemption.REQUEUE_EXIT_CODE`.

  Args:
    config: a validated Config.
    strategy: from `trainer.distribute.get_strategy`.

  Returns:
    The test report (also written to model_dir/report.json on the chief).

  Raises:
    trainer.lock.LockedError: another run holds the model dir.
  """
  chief = distribute.is_chief(strategy)
  os.makedirs(config.model_dir, exist_ok=True)
  with lock.hold(config.model_dir) if chief else contextlib.nullcontext(), preemption.Watcher(strategy) as stop:
    return _run(config, strategy, chief, stop)


class BestEpoch(tf.Module):
  """The best validation ROC-AUC so far, with its epoch and threshold: Orbit's NewBestMetric (higher is better).

  `test` only compares, `commit` records: the decision is made once, at the end of an epoch, and what it records
  commits with that epoch's checkpoint (the variables are in it) rather than in a file of its own, so a kill can
  never leave the best epoch's record and the run's position disagreeing.
  """

  def __init__(self):
    super().__init__(name='best_epoch')
    self.auc = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name='best_validation_auc')
    self.threshold = tf.Variable(0.5, dtype=tf.float64, trainable=False, name='best_threshold')
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='best_epoch')

  def test(self, auc: float) -> bool:
    """Whether `auc` is better than the best so far; changes nothing."""
    return auc > float(self.auc)

  def commit(self, auc: float, threshold: float, epoch: int) -> None:
    self.auc.assign(auc)
    self.threshold.assign(threshold)
    self.epoch.assign(epoch)

  def as_dict(self) -> dict:
    return {'epoch': int(self.epoch), 'validation_roc_auc': float(self.auc)}


class TrainState:
  """Everything a run resumes from, and the protocol that commits it, in Orbit's trainer shape.

  It owns the model, both phases' optimizers, the training metrics, the early-stopping and plateau counters
  (PhaseControl), the bookkeeping variables (epoch, best epoch, global step) and three checkpoint managers:
  checkpoints/ (one per epoch, the commit point; the two newest are kept), best/ (the best epoch's weights) and
  checkpoints/preempted/ (a preempted run's step). An epoch commits in this order (`commit`): the epoch checkpoint,
  the removal of the preempted checkpoint it supersedes, then the best epoch's weights. `resume` repairs what a kill
  between two of them leaves, and a lost state file or an unreadable checkpoint (see `_restore`).

  Args:
    config: the run's Config.
    strategy: the run's strategy.
    model, optimizers ({phase: optimizer}, each built on its phase's variables), learning_rates ({phase: the flags'
      rate or schedule}), metrics (`train_metrics()`): made in the strategy's scope, as `build` makes them.
    steps_per_epoch: training steps in an epoch.
    write_dir: this worker's folder (`distribute.worker_dir`): the chief's is the model dir.
  """

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, *, model: keras.Model, optimizers: dict,
               learning_rates: dict, metrics: dict, steps_per_epoch: int, write_dir: str):
    self.config, self.strategy, self.model = config, strategy, model
    self.optimizers, self.learning_rates, self.metrics = optimizers, learning_rates, metrics
    self.steps_per_epoch, self.write_dir = steps_per_epoch, write_dir
    # The loop's bookkeeping, outside the strategy scope: Python reads it on the host, and a MirroredVariable has no
    # __int__ or __float__ (int(epoch) fails under MirroredStrategy).
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.best = BestEpoch()
    self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name='global_step')
    self.control = PhaseControl(config.early_stopping_patience,
                                (config.plateau_factor, config.plateau_patience, config.plateau_min_lr)
                                if config.lr_schedule == 'plateau' else None)
    # random_states: the seed states of the augmentation and dropout layers, which Keras leaves out of the model's
    # checkpoint. Without them a resumed run draws other augmentations than an uninterrupted one.
    self.checkpoint = tf.train.Checkpoint(model=model, epoch=self.epoch, best_auc=self.best.auc,
                                          best_threshold=self.best.threshold, best_epoch=self.best.epoch,
                                          random_states=_seed_states(model),
                                          **{f'{phase}_optimizer': optimizers[phase] for phase in PHASES})
    # The best epoch's weights, in TF's format like the checkpoints: written and committed the same way.
    self.best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), os.path.join(write_dir, 'best'),
                                                   max_to_keep=1)
    # A preempted run's checkpoint, taken between two steps: the epoch checkpoint's state plus the step and the
    # partial epoch's training metrics. Kept apart, so the epoch checkpoints stay one per epoch, and removed once the
    # resumed run has committed the next epoch.
    self.preempted_checkpoint = tf.train.Checkpoint(
        run=self.checkpoint, global_step=self.global_step,
        metrics=[v for metric in metrics.values() for v in metric.variables])
    self.preempted_manager = tf.train.CheckpointManager(
        self.preempted_checkpoint, os.path.join(write_dir, 'checkpoints', 'preempted'), max_to_keep=1)
    self.manager = None  # Made by `resume`, which may first repair the state file it reads.

  @classmethod
  def build(cls, config: Config, strategy: tf.distribute.Strategy, *, image_size: int, steps_per_epoch: int,
            write_dir: str) -> 'TrainState':
    """Builds the model, the optimizers and the metrics in the strategy's scope, and the state around them."""
    loss_scale = keras.mixed_precision.dtype_policy().name == 'mixed_float16'
    learning_rates = {
        phase: learning_rate_schedule(
            distribute.scaled_learning_rate(lr, config.batch_size, rule=config.lr_scaling), config.lr_schedule,
            steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
        for phase, lr, epochs in zip(PHASES, (config.learning_rate, config.fine_tune_learning_rate),
                                     (config.epochs, config.fine_tune_epochs))}
    with strategy.scope():
      model = models.build_model(
          config.model, image_size=image_size, weights=config.weights_arg, dropout=config.dropout,
          horizontal_flip=config.horizontal_flip, augment_strength=config.augment_strength,
          equalize=config.equalize, cnn_filters=config.cnn_filters, cnn_depth=config.cnn_depth, seed=config.seed,
          augment_families=config.families, augment_ranges=config.augment_ranges, crop=config.crop,
          edge_channel=config.edge_channel)
      optimizers = {phase: make_optimizer(config.optimizer, learning_rates[phase], loss_scale,
                                          weight_decay=config.weight_decay, clipnorm=config.clipnorm)
                    for phase in PHASES}
      # Both optimizers are built up front, each on its phase's variables, so a checkpoint taken in either phase
      # restores into objects that already exist.
      for phase in PHASES:
        models.set_trainable(model, phase, _unfreeze(config, phase))
        optimizers[phase].build(model.trainable_variables)
      metrics = train_metrics()
    return cls(config, strategy, model=model, optimizers=optimizers, learning_rates=learning_rates, metrics=metrics,
               steps_per_epoch=steps_per_epoch, write_dir=write_dir)

  def phase_of(self, epoch: int) -> str:
    return PHASES[epoch >= self.config.epochs]

  def resume(self, *, chief: bool) -> int:
    """Restores the newest readable epoch checkpoint, then a preempted run's step if it is newer.

    Every worker resumes from the chief's checkpoint, as in the TF multi-worker tutorial: a non-chief's own folder is
    deleted at the end of a run, and workers resuming at different epochs would run different numbers of steps and
    wait on each other's collectives forever. The chief alone repairs (`_restore`'s `repair`).

    Returns:
      The step within epoch `int(self.epoch)` to go on from: 0 unless a preempted run stopped inside it.

    Raises:
      ValueError: as `_restore` and `_restore_preempted`.
    """
    config, steps_per_epoch = self.config, self.steps_per_epoch
    restored = _restore(self.checkpoint, os.path.join(config.model_dir, 'checkpoints'), repair=chief)
    # Tracked after the restore, and restored on its own: a checkpoint from before the counters existed still resumes.
    self.checkpoint.phase_control = self.control
    # After the restore, which may rewrite a lost state file: the manager reads it to know which checkpoints it keeps.
    # max_to_keep=2: the one before the latest is the fallback when the latest cannot be read.
    self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(self.write_dir, 'checkpoints'),
                                              max_to_keep=2)
    epoch = int(self.epoch)
    if restored:
      _restore_counters(self.control, restored, epoch)
      logging.info('Resuming from %s after epoch %d.', restored, epoch)
      # The flags' learning rates, not the checkpoint's: a run stopped by a NaN loss goes on with a lower one. (A
      # schedule is not in the checkpoint: the optimizer already has the flags' one, at the restored step.)
      for phase in PHASES:
        if not isinstance(self.learning_rates[phase], keras.optimizers.schedules.LearningRateSchedule):
          self.optimizers[phase].learning_rate = self.learning_rates[phase]
      if self.control.plateau:  # The restored phase's plateau reductions, applied to the flags' rate.
        phase = self.phase_of(epoch)
        self.optimizers[phase].learning_rate = self.control.learning_rate(self.learning_rates[phase])
      if int(self.best.epoch) == epoch:
        # The run may have stopped between the checkpoint that names this epoch the best and the best's own save.
        _save(self.best_manager, epoch)
    self.global_step.assign(epoch * steps_per_epoch)
    # Each worker's own: between two epochs' syncs the replicas' BatchNormalization statistics differ (see
    # make_statistics_sync), and a worker resumed with the chief's would end the epoch with other ones. The chief's
    # serves a worker that has none (a job resumed with more workers).
    preempted_dirs = dict.fromkeys(os.path.join(d, 'checkpoints', 'preempted')
                                   for d in (self.write_dir, config.model_dir))
    if _restore_preempted(self.preempted_checkpoint, list(preempted_dirs), epoch=epoch,
                          fallback=(self.checkpoint, restored)):
      logging.info('Resuming at step %d of epoch %d (global step %d), where a preempted run stopped.',
                   int(self.global_step) - epoch * steps_per_epoch, epoch + 1, int(self.global_step))
    return int(self.global_step) - epoch * steps_per_epoch

  def steps_trained(self, first_step: int) -> int:
    """The training batches read so far: the data pipeline's position, which an early-stopped phase's skipped epochs
    do not move."""
    return int(self.control.trained_epochs) * self.steps_per_epoch + first_step

  def start_phase(self, epoch: int) -> None:
    """A phase's first epoch (a resumed run may be there too, with nothing done): fresh counters and learning rate,
    and after an early stop the best weights so far."""
    self.control.start_phase()
    if epoch and self.config.early_stopping_patience:
      _restore_best(self.model, self.best_manager, self.config.model_dir)
    if self.control.plateau:
      phase = self.phase_of(epoch)
      self.optimizers[phase].learning_rate = self.learning_rates[phase]

  def enter_phase(self, phase: str, class_weights: np.ndarray):
    """Sets the phase's trainable layers; returns its training step and BatchNormalization sync (or None)."""
    trainable = models.set_trainable(self.model, phase, _unfreeze(self.config, phase))
    logging.info('Phase %s: %d trainable variables, backbone layers trained: %s', phase,
                 len(self.model.trainable_variables), trainable or 'none')
    train_step = make_train_step(self.model, self.optimizers[phase], self.metrics, self.strategy,
                                 class_weights=class_weights, global_batch=self.config.batch_size,
                                 label_smoothing=self.config.label_smoothing)
    return train_step, make_statistics_sync(self.model, self.strategy)

  def save_preempted(self, global_step: int) -> str:
    """Saves the run at a step boundary inside an epoch; returns the checkpoint's path."""
    self.global_step.assign(global_step)
    _save(self.preempted_manager, global_step)
    return self.preempted_manager.latest_checkpoint

  def commit(self, epochs_done: int, improved: bool) -> None:
    """Commits an epoch whose bookkeeping is assigned: its checkpoint, then the rest in an order resume repairs.

    Raises:
      OSError: a checkpoint could not be written (`_save`); what was committed before stays in charge.
    """
    _save(self.manager, epochs_done)
    # Older than the checkpoint just committed; a kill before this is repaired by `_restore_preempted`'s epoch check.
    shutil.rmtree(os.path.join(self.write_dir, 'checkpoints', 'preempted'), ignore_errors=True)
    if improved:
      # After the checkpoint, which is the commit point: a kill in between is repaired on resume.
      _save(self.best_manager, epochs_done)


def _run(config: Config, strategy: tf.distribute.Strategy, chief: bool, stop: preemption.Watcher) -> dict:
  """The recipe: data and state, resume, then epochs of training, validation and commit; the chief reports."""
  write_dir = distribute.worker_dir(config.model_dir, strategy)
  os.makedirs(write_dir, exist_ok=True)
  builder = data.prepare(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
  image_size = config.image_size or data.stored_image_size(builder) or 224
  new_settings = _check_model_dir(config, image_size) if chief else None
  class_weights, steps_per_epoch = _class_weights_and_steps(config, builder, strategy)

  state = TrainState.build(config, strategy, image_size=image_size, steps_per_epoch=steps_per_epoch,
                           write_dir=write_dir)
  if new_settings:
    files.write_atomic(os.path.join(config.model_dir, 'config.json'),
                       json.dumps(new_settings, indent=2, sort_keys=True))
  first_step = state.resume(chief=chief)
  if int(state.epoch) > config.epochs + config.fine_tune_epochs:  # A finished run, asked for fewer epochs.
    return _kept_export(config, int(state.epoch)) if chief else {}

  skip_steps = state.steps_trained(first_step)
  iterator = training_iterator(strategy, lambda ctx: data.train_dataset(
      builder, image_size=image_size, global_batch=config.batch_size, seed=config.seed,
      cache_dir=config.cache_dir, shuffle_buffer=config.shuffle_buffer, input_context=ctx, skip_steps=skip_steps,
      balanced=config.class_weight == 'resample'))
  predict_validation = _validation(config, strategy, state.model, builder, image_size)
  writers = {name: (tf.summary.create_file_writer(os.path.join(config.model_dir, name)) if chief
                    else tf.summary.create_noop_writer()) for name in ('train', 'validation')}
  if chief and int(state.global_step) == 0:
    _log_run_start(config, state.model, builder, image_size, writers['train'])

  total_epochs = config.epochs + config.fine_tune_epochs
  progress = _Progress(total_epochs, steps_per_epoch, verbose=chief)
  # The global steps to profile, cut to the run's length so that a started profile is always stopped.
  profile = (-1, -1)
  if chief and config.profile_steps:
    profile = (config.profile_steps[0], min(config.profile_steps[1], total_epochs * steps_per_epoch))
  phase, epoch = None, int(state.epoch)
  while epoch < total_epochs:
    if epoch in (0, config.epochs):
      state.start_phase(epoch)
    if phase != state.phase_of(epoch):
      phase = state.phase_of(epoch)
      train_step, sync_statistics = state.enter_phase(phase, class_weights)
    start = time.time()
    train = train_epoch(state, train_step, iterator, epoch=epoch, first_step=first_step, phase=phase, stop=stop,
                        bar=progress.bar(), profile=profile, sync_statistics=sync_statistics)
    first_step = 0
    val_pred = predict_validation()
    next_epoch, val = end_epoch(state, epoch=epoch, phase=phase, train=train, val_pred=val_pred, writers=writers)
    progress.epoch_done(epoch, phase, time.time() - start, train, val)
    epoch = next_epoch

  for writer in writers.values():
    writer.flush()
  if not chief:
    _remove_worker_dir(write_dir)
    return {}
  return finish(config, state.model, builder, image_size, threshold=float(state.best.threshold),
                best_checkpoint=state.best_manager.latest_checkpoint, best=state.best.as_dict())


def train_epoch(state: TrainState, train_step, iterator, *, epoch: int, first_step: int, phase: str,
                stop: preemption.Watcher, bar: keras.utils.Progbar, profile: tuple[int, int],
                sync_statistics=None) -> dict[str, float]:
  """Trains epoch `epoch` from step `first_step`; returns its training metrics.

  Args:
    state: the run's state.
    train_step: the phase's `make_train_step`.
    iterator: `training_iterator`'s, at the epoch's `first_step`.
    epoch, first_step, phase: where the run is.
    stop: the preemption watcher: a stop saves the step (`TrainState.save_preempted`) and exits.
    bar: the epoch's progress bar.
    profile: the first and last global step to profile ((-1, -1): none).
    sync_statistics: `make_statistics_sync`'s function, called once the epoch's steps are done.

  Raises:
    FloatingPointError: the training loss stopped being finite; the epoch is not saved.
    SystemExit: preempted (`preemption.REQUEUE_EXIT_CODE`), after the step's checkpoint is saved.
  """
  steps_per_epoch, per_loop = state.steps_per_epoch, state.config.steps_per_loop
  if not first_step:  # A preempted epoch goes on with its restored metrics.
    for metric in state.metrics.values():
      metric.reset_state()
  step = first_step
  while step < steps_per_epoch:
    # Loops end at multiples of steps_per_loop within the epoch, and the last one of an epoch is cut short.
    end = min((step // per_loop + 1) * per_loop, steps_per_epoch)
    first_done, last_done = epoch * steps_per_epoch + step + 1, epoch * steps_per_epoch + end
    if first_done <= profile[0] <= last_done:
      tf.profiler.experimental.start(os.path.join(state.config.model_dir, 'train'))
    train_step(iterator, tf.constant(end - step))
    if first_done <= profile[1] <= last_done:
      tf.profiler.experimental.stop()
    # Reading a metric waits for the steps and, across workers, is an all-reduce: so every LOG_EVERY steps (at the
    # loop boundary after them), for the progress bar and to stop a diverged run within a few steps of going bad.
    read = end // LOG_EVERY > step // LOG_EVERY or end == steps_per_epoch
    step = end
    if stop.requested(sync_point=read):
      path = state.save_preempted(last_done)
      logging.warning('Stopped by %s after step %d of epoch %d: saved %s. Run the same command to resume from '
                      'there (exit code %d: requeue).', stop.signal_name, step, epoch + 1, path,
                      preemption.REQUEUE_EXIT_CODE)
      sys.exit(preemption.REQUEUE_EXIT_CODE)
    if not read:
      continue
    loss = float(state.metrics['loss'].result())
    if not math.isfinite(loss):
      raise errors.Diverged(_diverged_message(loss, epoch, step - 1, phase))
    bar.update(step, [('loss', loss), ('auc', float(state.metrics['auc'].result()))])
  if sync_statistics:
    sync_statistics()
  return {name: float(metric.result()) for name, metric in state.metrics.items()}


def end_epoch(state: TrainState, *, epoch: int, phase: str, train: dict[str, float],
              val_pred: dict[str, np.ndarray], writers: dict) -> tuple[int, dict[str, float]]:
  """The end of an epoch: summaries, the best-epoch test and commit, early stopping and plateau, the checkpoint.

  Returns:
    (the next epoch to train, the validation scalars).
  """
  val = split_scalars(val_pred['labels'], val_pred['probs'])
  # This epoch's own threshold, the one the run keeps if the epoch is its best.
  threshold = metrics_lib.choose_threshold(val_pred['labels'], val_pred['probs'])
  _write_summaries(state, epoch=epoch, phase=phase, train=train, val=val, val_pred=val_pred, threshold=threshold,
                   writers=writers)
  improved = state.best.test(val['auc'])
  if improved:
    state.best.commit(val['auc'], threshold, epoch + 1)
  next_epoch = _control_phase(state.control, val['auc'], epoch, phase, state.config, state.optimizers[phase],
                              state.learning_rates[phase])
  state.epoch.assign(next_epoch)
  state.commit(epoch + 1, improved)
  return next_epoch, val


def _write_summaries(state: TrainState, *, epoch: int, phase: str, train: dict, val: dict, val_pred: dict,
                     threshold: float, writers: dict) -> None:
  with writers['train'].as_default():
    for name, value in train.items():
      tf.summary.scalar(name, value, step=epoch + 1)
    # .numpy(): a Keras variable created in a strategy scope wraps a MirroredVariable, which float() rejects.
    tf.summary.scalar('learning_rate', float(state.optimizers[phase].learning_rate.numpy()), step=epoch + 1)
    tf.summary.scalar('global_step', (epoch + 1) * state.steps_per_epoch, step=epoch + 1)
  with writers['validation'].as_default():
    for name, value in val.items():
      tf.summary.scalar(name, value, step=epoch + 1)
    # At this epoch's own threshold: test's matrix, beside it in TensorBoard, is drawn at the kept one.
    cm = metrics_lib.metrics_at(val_pred['labels'], val_pred['probs'], threshold)['confusion_matrix']
    title = f'Validation, epoch {epoch + 1}, threshold {threshold:.3f} ({metrics_lib.TRAINING_RULE})'
    _png_summary('confusion_matrix', figures.confusion_matrix_png(cm, title=title), epoch + 1)
    _png_summary('roc_curve', figures.roc_curve_png(val_pred['labels'], val_pred['probs']), epoch + 1)


def _class_weights_and_steps(config: Config, builder, strategy) -> tuple[np.ndarray, int]:
  """The class weights (from the training split's counts) and the training steps of an epoch.

  Raises:
    ValueError: a split lacks a class, or the batch is larger than the training split.
  """
  counts = data.class_counts(builder, 'train')
  _check_classes(builder, {'train': counts, 'validation': data.class_counts(builder, 'validation')})
  class_weights = (counts.sum() / (len(counts) * counts) if config.class_weight == 'balanced'
                   else np.ones(len(counts)))
  steps_per_epoch = int(counts.sum()) // config.batch_size
  if steps_per_epoch == 0:
    raise errors.InvalidValue(f'--batch_size={config.batch_size} is larger than the {counts.sum()} training images.')
  logging.info('%s: %d training images per class %s, class weights %s, %d steps of %d per epoch, %d replicas.',
               config.dataset, counts.sum(), counts.tolist(), np.round(class_weights, 3).tolist(),
               steps_per_epoch, config.batch_size, strategy.num_replicas_in_sync)
  return class_weights, steps_per_epoch


def _log_run_start(config: Config, model, builder, image_size: int, train_writer) -> None:
  """A new run's augmented images, and its HParams at the run's root, so the HParams plugin sees train/ and
  validation/ as this session's metric groups."""
  _log_augmented_images(model, builder, image_size, train_writer)
  with tf.summary.create_file_writer(config.model_dir).as_default():
    hp.hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in dataclasses.asdict(config).items()},
               trial_id=os.path.basename(os.path.abspath(config.model_dir)))


def _remove_worker_dir(write_dir: str) -> None:
  """A non-chief's folder, and the shared .workers folder once the last non-chief is done with it, so model_dir
  holds the chief's outputs alone."""
  shutil.rmtree(write_dir, ignore_errors=True)
  with contextlib.suppress(OSError):
    os.rmdir(os.path.dirname(write_dir))


def _control_phase(control: PhaseControl, auc: float, epoch: int, phase: str, config: Config, optimizer,
                   peak: float) -> int:
  """Counts the epoch for early stopping and the plateau; returns the next epoch to run (a phase's end skips)."""
  stop, reduced = control.end_epoch(auc)
  if reduced:
    optimizer.learning_rate = control.learning_rate(peak)
    logging.info('Validation ROC-AUC flat for %d epochs: %s learning rate now %.3g.', config.plateau_patience, phase,
                 control.learning_rate(peak))
  phase_end = config.epochs if phase == 'head' else config.epochs + config.fine_tune_epochs
  if stop and epoch + 1 < phase_end:
    logging.info('Early stopping: no better validation ROC-AUC in %d epochs; the %s phase ends after epoch %d of %d.',
                 config.early_stopping_patience, phase, epoch + 1, phase_end)
    return phase_end
  return epoch + 1


def _kept_export(config: Config, trained: int) -> dict:
  """A model dir that has trained more epochs than asked: nothing is trained or exported again, so run.json keeps
  the epochs its model trained; says so. Returns the export's test report.

  Raises:
    errors.InvalidValue: the run was never exported (stopped in its final export): only its own epochs finish it.
  """
  asked = (f'the {config.epochs + config.fine_tune_epochs} of --epochs={config.epochs} + '
           f'--fine_tune_epochs={config.fine_tune_epochs}')
  report = os.path.join(config.model_dir, 'report.json')
  if not os.path.isfile(report):
    raise errors.InvalidValue(f'--model_dir={config.model_dir} holds a run trained for {trained} epochs, more than '
                              f'{asked}, and not exported yet: run it again with its own --epochs and '
                              '--fine_tune_epochs (its config.json has them), or give this run a new --model_dir.')
  logging.warning('--model_dir=%s holds a run trained for %d epochs, more than %s: nothing is trained, and its export '
                  '(its run.json names the epochs it trained) is kept as it is. For a shorter run, give a new '
                  '--model_dir; to export it again, python -m trainer.export.', config.model_dir, trained, asked)
  with open(report) as f:
    return json.load(f)


def _restore_counters(control: PhaseControl, path: str, epoch: int) -> None:
  """Restores the early-stopping and plateau counters from checkpoint `path`; fresh ones if it has none."""
  try:
    # expect_partial: the checkpoint's other values (the model, the optimizers) are restored elsewhere, and TF would
    # otherwise log each one (~160 lines, "moving_variance" among them) as not found.
    tf.train.Checkpoint(phase_control=control).restore(path).expect_partial().assert_existing_objects_matched()
  except AssertionError:
    logging.warning('%s has no early-stopping or plateau counters (it predates them): they start again.', path)
    control.trained_epochs.assign(epoch)  # Such a run never skipped an epoch.


def _restore_best(model: keras.Model, best_manager: tf.train.CheckpointManager, model_dir: str) -> None:
  """Loads the best epoch so far into `model`: the worker's own copy, which it has finished writing, else the
  chief's (a worker that joined a resumed run has none of its own)."""
  path = best_manager.latest_checkpoint or tf.train.latest_checkpoint(os.path.join(model_dir, 'best'))
  if path:
    logging.info('The next phase starts from the best epoch so far, %s.', path)
    tf.train.Checkpoint(model=model).restore(path).assert_existing_objects_matched()


def _log_augmented_images(model, builder, image_size, writer) -> None:
  """A grid of augmented training images, as the model's augmentation layers (and --crop) give them to the rest."""
  with writer.as_default():
    images = next(iter(data.eval_dataset(builder, 'train', image_size=image_size, batch_size=16, cache=False)))
    augmentation, crop = _find_layer(model, 'augmentation'), _find_layer(model, 'crop')
    augmented = images['image'] if augmentation is None else augmentation(images['image'], training=True)
    augmented = augmented if crop is None else crop(augmented)
    augmented = tf.cast(tf.clip_by_value(tf.round(tf.cast(augmented, tf.float32)), 0, 255), tf.uint8)
    _png_summary('augmented_training_images', figures.image_grid_png(augmented.numpy()), 0)


def _unfreeze(config: Config, phase: str) -> int:
  """--unfreeze applies to a backbone's fine-tuning phase; the cnn trains every layer in both phases."""
  return config.unfreeze if phase == 'fine_tune' and config.model != 'cnn' else 0


def _seed_states(model: keras.Model) -> list:
  """The model's random-seed states: Keras counts them among `variables` but not `weights`."""
  weights = {id(weight) for weight in model.weights}
  return [variable for variable in model.variables if id(variable) not in weights]


def _check_classes(builder, counts: dict[str, np.ndarray]) -> None:
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


def _check_model_dir(config: Config, image_size: int) -> dict | None:
  """Refuses to resume a run of another model; returns the settings to keep in model_dir/config.json, if new.

  The caller writes them once the model is built: a run that fails before (a bad --cnn_depth for the image size)
  trained nothing, and must not make its model dir refuse the corrected command.

  Raises:
    ValueError: model_dir holds a run whose FIXED_ON_RESUME settings differ from this one's, or a config.json that
      is not a run's settings.
  """
  path = os.path.join(config.model_dir, 'config.json')
  settings = {**dataclasses.asdict(config), 'image_size': image_size}
  if not os.path.exists(path):
    return settings
  try:
    with open(path) as f:
      stored = json.load(f)
  except ValueError as e:  # UnicodeDecodeError too.
    stored = e
  if not isinstance(stored, dict):
    reason = stored if isinstance(stored, ValueError) else f'JSON {type(stored).__name__}, not an object'
    raise errors.InvalidValue(f'{path} is not the settings of a run ({reason}): restore it, or move it away if this '
                              'model dir holds no training.')
  # A setting newer than the stored run had its default there.
  defaults = dataclasses.asdict(Config())
  changed = [f'--{name}={stored.get(name, defaults[name])} (this run: {settings[name]})'
             for name in config_lib.FIXED_ON_RESUME if stored.get(name, defaults[name]) != settings[name]]
  if changed:
    raise errors.InvalidValue(f'--model_dir={config.model_dir} holds a run of {", ".join(changed)}, and a run resumes '
                              'only with the same model: give this one a new --model_dir.')
  return None


def _restore(checkpoint: tf.train.Checkpoint, directory: str, *, repair: bool = False) -> str | None:
  """Restores the newest checkpoint in `directory` that can be read; returns its path, or None for a new run.

  CheckpointManager commits a checkpoint by rewriting the `checkpoint` state file after the checkpoint's own files,
  so a kill in the middle of a save leaves the previous checkpoint in charge. A file damaged afterwards (a disk
  error, a copy cut short) fails the bundle's checksums or lengths; that checkpoint is skipped, with a warning, for
  the one before it. The checkpoints are found by their files as well as by the state file: a state file lost or
  garbled would otherwise start the run over and overwrite checkpoints it never looked at.

  Args:
    checkpoint: the run's checkpoint object.
    directory: the chief's checkpoint folder.
    repair: rewrite a lost or garbled state file to name the checkpoints found (the chief's job: the others only
      read), so that CheckpointManager keeps and trims them as usual.

  Raises:
    ValueError: the checkpoints are of another model, or none of them can be read.
  """
  paths, state_ok = _checkpoint_paths(directory)
  if not paths:
    return None
  if not state_ok:
    logging.warning('The state file %s is missing, unreadable or incomplete; looking for a checkpoint among the '
                    'files found: %s',
                    os.path.join(directory, 'checkpoint'), ', '.join(os.path.basename(p) for p in paths))
  skipped = []
  for path in reversed(paths):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, IndexError) as e:  # IndexError: TF's reader on a data file cut short.
      logging.warning('Skipping checkpoint %s, which cannot be read: %s', path, errors.error_reason(e))
      skipped.append(path)
      continue
    except (AssertionError, ValueError) as e:
      raise errors.InvalidValue(f'The checkpoint {path} is of another model ({str(e).splitlines()[0]}): give this run '
                                'a new --model_dir.') from e
    if repair:
      # Only now that the run goes on from an older checkpoint: a run that stops changes nothing.
      for unreadable in skipped:
        _move_aside(unreadable)
    if repair and (skipped or not state_ok):
      # Relative names, as CheckpointManager writes them, so that the folder can be moved. With their times: a
      # CheckpointManager counts a listed checkpoint without one as preserved for ever, and would never trim it.
      kept = paths[:paths.index(path) + 1]
      tf.compat.v1.train.update_checkpoint_state(
          directory, os.path.basename(path), all_model_checkpoint_paths=[os.path.basename(p) for p in kept],
          all_model_checkpoint_timestamps=[_written_at(p) for p in kept], last_preserved_timestamp=0.0)
    return path
  raise errors.InvalidValue(f'No checkpoint in {directory} can be read (see the warnings above): move the folder away '
                            'to start over, or give this run a new --model_dir.')


def _written_at(prefix: str) -> float:
  """When a checkpoint's .index file (written last) was written, in seconds since the epoch; 0 if it is gone."""
  try:
    return tf.io.gfile.stat(prefix + '.index').mtime_nsec / 1e9
  except tf.errors.NotFoundError:
    return 0.0


def _move_aside(prefix: str) -> None:
  """Moves an unreadable checkpoint's files into checkpoints/unreadable/: the epoch trained again would save under
  the same name, and a file a disk error damaged may still hold what someone wants to recover."""
  folder = os.path.join(os.path.dirname(prefix), 'unreadable')
  tf.io.gfile.makedirs(folder)
  for name in tf.io.gfile.glob(glob.escape(prefix) + '.*'):
    tf.io.gfile.rename(name, os.path.join(folder, os.path.basename(name)), overwrite=True)
  logging.warning('Moved the files of %s to %s.', os.path.basename(prefix), folder)


def _checkpoint_paths(directory: str) -> tuple[list[str], bool]:
  """The checkpoint prefixes in `directory`, oldest first, and whether the state file lists every one of them.

  A prefix counts when its .index file exists (TF writes it last); the state file's own list is kept too, so that a
  listed checkpoint whose files are gone is reported as unreadable rather than ignored.
  """
  try:
    state = tf.train.get_checkpoint_state(directory)
  except ValueError:  # An empty or truncated state file: TF's parser rejects it.
    state = None
  listed = list(state.all_model_checkpoint_paths) if state else []
  found = [path[:-len('.index')] for path in tf.io.gfile.glob(os.path.join(directory, 'ckpt-*.index'))]
  listed_names = {os.path.basename(p) for p in listed}
  paths = listed + [p for p in found if os.path.basename(p) not in listed_names]

  def number(path):
    tail = os.path.basename(path).rsplit('-', 1)[-1]
    return int(tail) if tail.isdigit() else -1

  return sorted(paths, key=number), state is not None and {os.path.basename(p) for p in found} <= listed_names


def _restore_preempted(checkpoint: tf.train.Checkpoint, directories: list[str], *, epoch: int, fallback) -> bool:
  """Restores a preempted run's checkpoint if it is newer than the epoch checkpoint restored; True if it did.

  Args:
    checkpoint: the preempted-checkpoint object (the run's checkpoint as its `run` child).
    directories: the folders of preempted checkpoints to try in turn (this worker's own, then the chief's).
    epoch: the epochs the restored epoch checkpoint has done.
    fallback: (the run's checkpoint, the path restored or None), restored again when every preempted one is torn.

  Raises:
    ValueError: a preempted checkpoint exists, none can be read, and there is no epoch checkpoint to go back to.
  """
  paths = [path for path in map(tf.train.latest_checkpoint, directories) if path]
  for path in paths:
    try:
      if int(tf.train.load_checkpoint(path).get_tensor('run/epoch/.ATTRIBUTES/VARIABLE_VALUE')) < epoch:
        return False  # Left by a kill between the next epoch's commit and its removal.
      checkpoint.restore(path).assert_existing_objects_matched()
      return True
    except (tf.errors.OpError, IndexError, AssertionError, ValueError) as e:
      logging.warning('Skipping the preempted run\'s checkpoint %s, which cannot be read: %s', path,
                      errors.error_reason(e) if isinstance(e, tf.errors.OpError) else e)
  if not paths:
    return False
  run_checkpoint, restored = fallback
  if not restored:  # Nothing to restore over what a failed restore may have assigned.
    raise errors.InvalidValue(f'The preempted run\'s checkpoint {paths[-1]} cannot be read (see the warnings above): '
                              'move it away to start over, or give this run a new --model_dir.')
  run_checkpoint.restore(restored).assert_existing_objects_matched()
  return False


def _save(manager: tf.train.CheckpointManager, epoch: int) -> None:
  """Saves a checkpoint named after the epoch; a failed write (a full disk) becomes a one-line OSError.

  Raises:
    OSError: the checkpoint could not be written. The previous one stays in charge.
  """
  try:
    manager.save(checkpoint_number=epoch)
  except tf.errors.OpError as e:
    # TF writes a checkpoint into '<prefix>_temp' before renaming it into place.
    for partial in tf.io.gfile.glob(os.path.join(manager.directory, '*_temp')):
      tf.io.gfile.rmtree(partial)
    raise errors.WriteFailed(f'Cannot write a checkpoint in {manager.directory}: {errors.error_reason(e)}. The '
                             'previous one is kept: make room and run the same command again to resume.') from e


def _diverged_message(loss: float, epoch: int, step: int, phase: str) -> str:
  flag = 'learning_rate' if phase == 'head' else 'fine_tune_learning_rate'
  resume = f'from the checkpoint of epoch {epoch}' if epoch else 'from the start'
  return (f'The training loss became {loss} in step {step + 1} of epoch {epoch + 1}, and that epoch was not saved. '
          f'Run the same command with a lower --{flag} to go on {resume}.')


def _find_layer(model, name):
  return next((layer for layer in model.layers if layer.name == name), None)


def finish(config: Config, model: keras.Model, builder, image_size: int, *, threshold: float,
           best_checkpoint: str | None, best: dict) -> dict:
  """Loads the best epoch, reports it on the test split and exports it (the chief's job).

  `best` ({'epoch', 'validation_roc_auc'}) goes into run.json, next to the threshold chosen at that epoch.
  """
  if best_checkpoint:
    tf.train.Checkpoint(model=model).restore(best_checkpoint).assert_existing_objects_matched()
  test = data.eval_dataset(builder, 'test', image_size=image_size, batch_size=config.batch_size, cache=False)
  # One export (trainer.export.write_export): the report, model, weights, SavedModel, run.json and model card at this
  # threshold are made current together, so a kill or a full disk never pairs this model with an older threshold.
  report = export.write_export(
      config.model_dir, model, image_size=image_size, threshold=threshold, threshold_rule=metrics_lib.TRAINING_RULE,
      test_predictions=runs.predict_split(model, test), tensorboard_dir=os.path.join(config.model_dir, 'test'),
      run_info={'config': dataclasses.asdict(config), 'best': best,
                # The process's own arguments: trainer.main's, when it runs as the program.
                'command': ' '.join(['python -m trainer.main', *map(shlex.quote, sys.argv[1:])])},
      extra={'model': config.model, 'dataset': config.dataset, 'image_size': image_size, 'split': 'test'})
  logging.info('Test at the validation threshold %.3f: %s', threshold,
               {k: report['at_val_threshold'][k] for k in ('accuracy', 'sensitivity', 'specificity')})
  return report
