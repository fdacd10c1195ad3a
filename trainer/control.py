"""The phase and best-epoch policy: which phase an epoch is in, when a phase starts and stops, the learning rate,
and the best epoch so far. Plain arguments only (no Config); the counters are variables in the run's checkpoint.

`Phases.set_learning_rate` is the one place that sets an optimizer's learning rate: when a phase is entered (a new
run, a resumed one, the next phase) and when a plateau lowers it.
"""

from absl import logging
import keras
import tensorflow as tf

from trainer import models

PHASES = models.PHASES


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

  def update(self, auc: float, threshold: float, epoch: int) -> bool:
    """Records epoch `epoch` if its `auc` is the best so far; returns whether it was."""
    improved = self.test(auc)
    if improved:
      self.commit(auc, threshold, epoch)
    return improved

  def as_dict(self) -> dict:
    return {'epoch': int(self.epoch), 'validation_roc_auc': float(self.auc)}



def restore_counters(control: PhaseControl, path: str, epoch: int) -> None:
  """Restores the early-stopping and plateau counters from checkpoint `path`; fresh ones if it has none."""
  try:
    # expect_partial: the checkpoint's other values (the model, the optimizers) are restored elsewhere, and TF would
    # otherwise log each one (~160 lines, "moving_variance" among them) as not found.
    tf.train.Checkpoint(phase_control=control).restore(path).expect_partial().assert_existing_objects_matched()
  except AssertionError:
    logging.warning('%s has no early-stopping or plateau counters (it predates them): they start again.', path)
    control.trained_epochs.assign(epoch)  # Such a run never skipped an epoch.



class Phases:
  """The two phases' policy: the epochs of each, their learning rates, early stopping and the plateau.

  Args:
    epochs: {phase: epochs}, head first; a phase of 0 epochs is skipped.
    optimizers: {phase: optimizer}, each built with its phase's entry of `learning_rates`.
    learning_rates: {phase: a float, or a keras.optimizers.schedules.LearningRateSchedule}: the flags' peak rates.
    control: the counters, restored with the run's checkpoint.
  """

  def __init__(self, epochs: dict[str, int], optimizers: dict, learning_rates: dict, control: PhaseControl):
    self.epochs, self.optimizers, self.learning_rates, self.control = epochs, optimizers, learning_rates, control

  def phase_of(self, epoch: int) -> str:
    return PHASES[epoch >= self.epochs[PHASES[0]]]

  def bounds(self, phase: str) -> tuple[int, int]:
    """The phase's first epoch and the epoch after its last."""
    start = 0 if phase == PHASES[0] else self.epochs[PHASES[0]]
    return start, start + self.epochs[phase]

  def enter(self, epoch: int) -> bool:
    """Enters epoch `epoch`'s phase: fresh counters at the phase's first epoch (a resumed run may be there too, with
    nothing done), then its learning rate. Returns whether the phase starts here."""
    phase = self.phase_of(epoch)
    starts = epoch == self.bounds(phase)[0]
    if starts:
      self.control.start_phase()
    self.set_learning_rate(phase)
    return starts

  def set_learning_rate(self, phase: str) -> None:
    """Sets `phase`'s optimizer to the flags' rate, lowered by the phase's plateau reductions so far.

    The flags' rate, not a restored checkpoint's: a run stopped by a NaN loss goes on with a lower one. A schedule is
    left alone: the optimizer was built with the flags' one, and reads it at the restored step.
    """
    rate = self.learning_rates[phase]
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
      return
    self.optimizers[phase].learning_rate = self.control.learning_rate(rate) if self.control.plateau else rate

  def end_epoch(self, epoch: int, auc: float) -> int:
    """Counts epoch `epoch` for early stopping and the plateau; returns the next epoch to run (a phase's end skips)."""
    phase = self.phase_of(epoch)
    stop, reduced = self.control.end_epoch(auc)
    if reduced:
      self.set_learning_rate(phase)
      logging.info('Validation ROC-AUC flat for %d epochs: %s learning rate now %.3g.', self.control.plateau[1],
                   phase, self.control.learning_rate(self.learning_rates[phase]))
    phase_end = self.bounds(phase)[1]
    if stop and epoch + 1 < phase_end:
      logging.info('Early stopping: no better validation ROC-AUC in %d epochs; the %s phase ends after epoch %d of '
                   '%d.', self.control.patience, phase, epoch + 1, phase_end)
      return phase_end
    return epoch + 1
