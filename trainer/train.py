"""The training loop: one loop for every strategy, in two phases (the head, then the last N backbone layers).

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy with two workers, so the loop is our own, in the
shape TF Model Garden / Orbit use: a `tf.function` step under `strategy.run` (`trainer.steps`), Keras layers, losses,
optimizers and metrics, `tf.train.CheckpointManager` for resume (`trainer.checkpoints`) and `tf.summary` for
TensorBoard. The phase and best-epoch policy is `trainer.control`'s. The same code runs on one device, on several GPUs
and on several machines.

This module holds the loop: the state a run resumes from (`TrainState`, whole once built), an epoch
(`train_epoch`), the end-of-epoch actions (`end_epoch`, one small function each), and `finish`.
"""

import contextlib
import dataclasses
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

from trainer import checkpoints
from trainer import config as config_lib
from trainer import control as control_lib
from trainer import data
from trainer import distribute
from trainer import errors
from trainer import files
from trainer import inputs
from trainer import metrics as metrics_lib
from trainer import inference
from trainer import export
from trainer import lock
from trainer import models
from trainer import preemption
from trainer import steps as steps_lib
from trainer import summaries
from trainer import tflite
from trainer.config import Config

PHASES = models.PHASES
# Training steps between two reads of the metrics (progress bar, divergence check).
LOG_EVERY = 10


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


class TrainState:
  """Everything a run resumes from, and the protocol that commits it, in Orbit's trainer shape.

  It holds the model, both phases' optimizers and the training metrics (built by `build_state`), the phase policy
  (`control.Phases`, which sets the learning rates), the bookkeeping variables (epoch, best epoch, global step) and
  three checkpoint managers: checkpoints/ (one per epoch, the commit point; the two newest are kept), best/ (the best
  epoch's weights) and checkpoints/preempted/ (a preempted run's step). An epoch commits in this order (`commit`):
  the epoch checkpoint, the removal of the preempted checkpoint it supersedes, then the best epoch's weights. `resume`
  repairs what a kill between two of them leaves, and a lost state file or an unreadable checkpoint
  (`checkpoints.restore`).

  Args:
    config: the run's Config.
    strategy: the run's strategy.
    model, optimizers ({phase: optimizer}, each built on its phase's variables), learning_rates ({phase: the flags'
      rate or schedule}), metrics (`steps.train_metrics()`): made in the strategy's scope, as `build_state` makes
      them.
    steps_per_epoch: training steps in an epoch.
    write_dir: this worker's folder (`distribute.worker_dir`): the chief's is the model dir.
  """

  def __init__(self, config: Config, strategy: tf.distribute.Strategy, *, model: keras.Model, optimizers: dict,
               learning_rates: dict, metrics: dict, steps_per_epoch: int, write_dir: str):
    self.config, self.strategy, self.model = config, strategy, model
    self.optimizers, self.metrics = optimizers, metrics
    self.steps_per_epoch, self.write_dir = steps_per_epoch, write_dir
    # The loop's bookkeeping, outside the strategy scope: Python reads it on the host, and a MirroredVariable has no
    # __int__ or __float__ (int(epoch) fails under MirroredStrategy).
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.best = control_lib.BestEpoch()
    self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name='global_step')
    self.control = control_lib.PhaseControl(config.early_stopping_patience,
                                            (config.plateau_factor, config.plateau_patience, config.plateau_min_lr)
                                            if config.lr_schedule == 'plateau' else None)
    self.phases = control_lib.Phases(dict(zip(PHASES, (config.epochs, config.fine_tune_epochs))), optimizers,
                                     learning_rates, self.control)
    # random_states: the seed states of the augmentation and dropout layers, which Keras leaves out of the model's
    # checkpoint. Without them a resumed run draws other augmentations than an uninterrupted one.
    self.checkpoint = tf.train.Checkpoint(model=model, epoch=self.epoch, best_auc=self.best.auc,
                                          best_threshold=self.best.threshold, best_epoch=self.best.epoch,
                                          random_states=checkpoints.seed_states(model),
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
    self._manager = None

  @property
  def manager(self) -> tf.train.CheckpointManager:
    """The epoch checkpoints' manager, made when first used, from the state file as `resume` leaves it.

    A CheckpointManager reads the state file once, when it is made, to know which checkpoints it keeps and trims; the
    chief's `resume` may rewrite that file (a lost one, an unreadable checkpoint moved aside), and then drops the
    manager it had, so that the next use reads the repaired file. max_to_keep=2: the one before the latest is the
    fallback when the latest cannot be read.
    """
    if self._manager is None:
      self._manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(self.write_dir, 'checkpoints'),
                                                 max_to_keep=2)
    return self._manager

  def resume(self, *, chief: bool) -> int:
    """Restores the newest readable epoch checkpoint, then a preempted run's step if it is newer.

    Every worker resumes from the chief's checkpoint, as in the TF multi-worker tutorial: a non-chief's own folder is
    deleted at the end of a run, and workers resuming at different epochs would run different numbers of steps and
    wait on each other's collectives forever. The chief alone repairs (`checkpoints.restore`'s `repair`).

    Returns:
      The step within epoch `int(self.epoch)` to go on from: 0 unless a preempted run stopped inside it.

    Raises:
      ValueError: as `checkpoints.restore` and `checkpoints.restore_preempted`.
    """
    restored = checkpoints.restore(self.checkpoint, os.path.join(self.config.model_dir, 'checkpoints'), repair=chief)
    self._manager = None  # Made again from the state file the restore may have rewritten.
    # Tracked after the restore, and restored on its own: a checkpoint from before the counters existed still resumes.
    self.checkpoint.phase_control = self.control
    epoch = int(self.epoch)
    if restored:
      control_lib.restore_counters(self.control, restored, epoch)
      logging.info('Resuming from %s after epoch %d.', restored, epoch)
      if int(self.best.epoch) == epoch:
        # The run may have stopped between the checkpoint that names this epoch the best and the best's own save.
        checkpoints.save(self.best_manager, epoch)
    self.global_step.assign(epoch * self.steps_per_epoch)
    # Each worker's own: between two epochs' syncs the replicas' BatchNormalization statistics differ (see
    # steps.make_statistics_sync), and a worker resumed with the chief's would end the epoch with other ones. The
    # chief's serves a worker that has none (a job resumed with more workers).
    preempted_dirs = dict.fromkeys(os.path.join(d, 'checkpoints', 'preempted')
                                   for d in (self.write_dir, self.config.model_dir))
    if checkpoints.restore_preempted(self.preempted_checkpoint, list(preempted_dirs), epoch=epoch,
                                     fallback=(self.checkpoint, restored)):
      logging.info('Resuming at step %d of epoch %d (global step %d), where a preempted run stopped.',
                   int(self.global_step) - epoch * self.steps_per_epoch, epoch + 1, int(self.global_step))
    return int(self.global_step) - epoch * self.steps_per_epoch

  def steps_trained(self, first_step: int) -> int:
    """The training batches read so far: the data pipeline's position, which an early-stopped phase's skipped epochs
    do not move."""
    return int(self.control.trained_epochs) * self.steps_per_epoch + first_step

  def enter_phase(self, epoch: int, class_weights: np.ndarray, model: keras.Model | None = None):
    """Enters epoch `epoch`'s phase, from a new run, a resumed one or the phase before.

    The policy (`control.Phases.enter`) resets the counters at the phase's first epoch and sets the learning rate;
    after an early stop the phase starts from the best weights so far. Then the phase's layers are made trainable.
    `model`: what the phase's steps run, if not the whole model: the head alone, on cached features
    (`trainer.features`); it shares the model's variables.

    Returns:
      (the phase, its training step, its BatchNormalization sync or None).
    """
    phase = self.phases.phase_of(epoch)
    if self.phases.enter(epoch) and epoch and self.config.early_stopping_patience:
      checkpoints.restore_best(self.model, self.best_manager, self.config.model_dir)
    trainable = models.set_trainable(self.model, phase, _unfreeze(self.config, phase))
    logging.info('Phase %s: %d trainable variables, backbone layers trained: %s', phase,
                 len(self.model.trainable_variables), trainable or 'none')
    model = model or self.model
    train_step = steps_lib.make_train_step(model, self.optimizers[phase], self.metrics, self.strategy,
                                           class_weights=class_weights, global_batch=self.config.batch_size,
                                           label_smoothing=self.config.label_smoothing)
    return phase, train_step, steps_lib.make_statistics_sync(model, self.strategy)

  def save_preempted(self, global_step: int) -> str:
    """Saves the run at a step boundary inside an epoch; returns the checkpoint's path."""
    self.global_step.assign(global_step)
    checkpoints.save(self.preempted_manager, global_step)
    return self.preempted_manager.latest_checkpoint

  def commit(self, epochs_done: int, improved: bool) -> None:
    """Commits an epoch whose bookkeeping is assigned: its checkpoint, then the rest in an order resume repairs.

    Raises:
      OSError: a checkpoint could not be written (`checkpoints.save`); what was committed before stays in charge.
    """
    checkpoints.save(self.manager, epochs_done)
    # Older than the checkpoint just committed; a kill before this is repaired by `restore_preempted`'s epoch check.
    shutil.rmtree(os.path.join(self.write_dir, 'checkpoints', 'preempted'), ignore_errors=True)
    if improved:
      # After the checkpoint, which is the commit point: a kill in between is repaired on resume.
      checkpoints.save(self.best_manager, epochs_done)


def build_state(config: Config, strategy: tf.distribute.Strategy, *, image_size: int, steps_per_epoch: int,
                write_dir: str) -> TrainState:
  """Builds the model, the optimizers and the metrics in the strategy's scope, and the state around them."""
  loss_scale = keras.mixed_precision.dtype_policy().name == 'mixed_float16'
  learning_rates = {
      phase: steps_lib.learning_rate_schedule(
          distribute.scaled_learning_rate(lr, config.batch_size, rule=config.lr_scaling), config.lr_schedule,
          steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
      for phase, lr, epochs in zip(PHASES, (config.learning_rate, config.fine_tune_learning_rate),
                                   (config.epochs, config.fine_tune_epochs))}
  with strategy.scope():
    model = models.build_model(config.group(config_lib.ModelSettings), config.group(config_lib.AugmentationSettings),
                               image_size=image_size, seed=config.seed)
    optimizers = {phase: steps_lib.make_optimizer(config.optimizer, learning_rates[phase], loss_scale,
                                                  weight_decay=config.weight_decay, clipnorm=config.clipnorm)
                  for phase in PHASES}
    # Both optimizers are built up front, each on its phase's variables, so a checkpoint taken in either phase
    # restores into objects that already exist.
    for phase in PHASES:
      models.set_trainable(model, phase, _unfreeze(config, phase))
      optimizers[phase].build(model.trainable_variables)
    metrics = steps_lib.train_metrics()
  return TrainState(config, strategy, model=model, optimizers=optimizers, learning_rates=learning_rates,
                    metrics=metrics, steps_per_epoch=steps_per_epoch, write_dir=write_dir)


def _run(config: Config, strategy: tf.distribute.Strategy, chief: bool, stop: preemption.Watcher) -> dict:
  """The recipe: data and state, resume, then epochs of training, validation and commit; the chief reports."""
  write_dir = distribute.worker_dir(config.model_dir, strategy)
  os.makedirs(write_dir, exist_ok=True)
  builder = data.prepare(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
  image_size = config.image_size or data.stored_image_size(builder) or 224
  new_settings = _check_model_dir(config, image_size) if chief else None
  class_weights, steps_per_epoch = steps_lib.class_weights_and_steps(
      builder, batch_size=config.batch_size, class_weight=config.class_weight, dataset=config.dataset,
      replicas=strategy.num_replicas_in_sync)

  state = build_state(config, strategy, image_size=image_size, steps_per_epoch=steps_per_epoch, write_dir=write_dir)
  if new_settings:
    files.write_atomic(os.path.join(config.model_dir, 'config.json'),
                       json.dumps(new_settings, indent=2, sort_keys=True))
  first_step = state.resume(chief=chief)
  if int(state.epoch) > config.epochs + config.fine_tune_epochs:  # A finished run, asked for fewer epochs.
    return _kept_export(config, int(state.epoch)) if chief else {}

  inputs_of = inputs.phase_inputs(config, strategy, state.model, builder, image_size)
  # Every worker makes its first iterator here, before the chief's own work below, where it always was: made after
  # it, the two-worker tests of tests/test_scale_out.py failed (worker 1 stopped).
  reading = inputs_of(state.phases.phase_of(int(state.epoch)))[1]
  iterator = reading(state.steps_trained(first_step))
  writers = {name: (tf.summary.create_file_writer(os.path.join(config.model_dir, name)) if chief
                    else tf.summary.create_noop_writer()) for name in ('train', 'validation')}
  if chief and int(state.global_step) == 0:
    summaries.log_run_start(config, state.model, builder, image_size, writers['train'])

  total_epochs = config.epochs + config.fine_tune_epochs
  progress = summaries.Progress(total_epochs, steps_per_epoch, verbose=chief)
  # The global steps to profile, cut to the run's length so that a started profile is always stopped.
  profile = (-1, -1)
  if chief and config.profile_steps:
    profile = (config.profile_steps[0], min(config.profile_steps[1], total_epochs * steps_per_epoch))
  phase, epoch = None, int(state.epoch)
  while epoch < total_epochs:
    if phase != state.phases.phase_of(epoch):
      step_model, make_iterator, predict_validation = inputs_of(state.phases.phase_of(epoch))
      phase, train_step, sync_statistics = state.enter_phase(epoch, class_weights, model=step_model)
      if make_iterator is not reading:  # At the position an uninterrupted run's stream of this kind would be.
        iterator, reading = make_iterator(state.steps_trained(first_step)), make_iterator
    start = time.time()
    train = train_epoch(state, train_step, iterator, epoch=epoch, first_step=first_step, phase=phase, stop=stop,
                        bar=progress.bar(), profile=profile, sync_statistics=sync_statistics)
    first_step = 0
    next_epoch, val = end_epoch(state, epoch=epoch, phase=phase, train=train, val_pred=predict_validation(),
                                writers=writers)
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
    train_step: the phase's `steps.make_train_step`.
    iterator: `steps.training_iterator`'s, at the epoch's `first_step`.
    epoch, first_step, phase: where the run is.
    stop: the preemption watcher: a stop saves the step (`TrainState.save_preempted`) and exits.
    bar: the epoch's progress bar.
    profile: the first and last global step to profile ((-1, -1): none).
    sync_statistics: `steps.make_statistics_sync`'s function, called once the epoch's steps are done.

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
  """The end of an epoch, as Orbit's actions: each a small step of its own, in this order.

  The summaries (`summaries.write_summaries`), the best-epoch test and record (`control.BestEpoch.update`), early
  stopping and the plateau (`control.Phases.end_epoch`), then the commit (`TrainState.commit`), which saves what
  they assigned.

  Returns:
    (the next epoch to train, the validation scalars).
  """
  val = steps_lib.split_scalars(val_pred['labels'], val_pred['probs'])
  # This epoch's own threshold, the one the run keeps if the epoch is its best.
  threshold = metrics_lib.choose_threshold(val_pred['labels'], val_pred['probs'])
  summaries.write_summaries(writers, epoch=epoch, train=train, val=val, val_pred=val_pred, threshold=threshold,
                  learning_rate=float(state.optimizers[phase].learning_rate.numpy()),
                  global_step=(epoch + 1) * state.steps_per_epoch)
  improved = state.best.update(val['auc'], threshold, epoch + 1)
  next_epoch = state.phases.end_epoch(epoch, val['auc'])
  state.epoch.assign(next_epoch)
  state.commit(epoch + 1, improved)
  return next_epoch, val


def _remove_worker_dir(write_dir: str) -> None:
  """A non-chief's folder, and the shared .workers folder once the last non-chief is done with it, so model_dir
  holds the chief's outputs alone."""
  shutil.rmtree(write_dir, ignore_errors=True)
  with contextlib.suppress(OSError):
    os.rmdir(os.path.dirname(write_dir))


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


def _unfreeze(config: Config, phase: str) -> int:
  """--unfreeze applies to a backbone's fine-tuning phase; the cnn trains every layer in both phases."""
  return config.unfreeze if phase == 'fine_tune' and config.model != 'cnn' else 0


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


def _diverged_message(loss: float, epoch: int, step: int, phase: str) -> str:
  flag = 'learning_rate' if phase == 'head' else 'fine_tune_learning_rate'
  resume = f'from the checkpoint of epoch {epoch}' if epoch else 'from the start'
  return (f'The training loss became {loss} in step {step + 1} of epoch {epoch + 1}, and that epoch was not saved. '
          f'Run the same command with a lower --{flag} to go on {resume}.')


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
      test_predictions=inference.predict_split(model, test), tensorboard_dir=os.path.join(config.model_dir, 'test'),
      run_info={'config': dataclasses.asdict(config), 'best': best,
                # The process's own arguments: trainer.main's, when it runs as the program.
                'command': ' '.join(['python -m trainer.main', *map(shlex.quote, sys.argv[1:])])},
      extra={'model': config.model, 'dataset': config.dataset, 'image_size': image_size, 'split': 'test'},
      sample_images=tflite.sample_images(builder, image_size))
  logging.info('Test at the validation threshold %.3f: %s', threshold,
               {k: report['at_val_threshold'][k] for k in ('accuracy', 'sensitivity', 'specificity')})
  return report
