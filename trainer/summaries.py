"""What the training loop reports: TensorBoard summaries (an epoch's scalars and pictures, a new run's augmented
images and HParams) and the progress line of each epoch."""

import dataclasses
import os
import sys

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer import data
from trainer import figures
from trainer import metrics as metrics_lib
from trainer import steps as steps_lib
from trainer.config import Config


def _png_summary(name: str, png: bytes, step: int) -> None:
  tf.summary.image(name, tf.image.decode_png(png)[None], step=step)


class Progress:
  """One line per epoch that says where the run is and how long is left, plus Keras's progress bar on the chief
  when it writes to a terminal."""

  def __init__(self, total_epochs: int, steps_per_epoch: int, verbose: bool):
    self.total_epochs, self.steps_per_epoch, self.verbose = total_epochs, steps_per_epoch, verbose
    self.epoch_seconds = []

  def bar(self):
    # Outside a terminal (Slurm, `kubectl logs`, a sweep) Keras's bar is escape codes and redraws, and the epoch line
    # below says the same once: there it is the only progress line.
    interactive = self.verbose and sys.stdout.isatty()
    return keras.utils.Progbar(self.steps_per_epoch, verbose=1 if interactive else 0,
                               stateful_metrics=steps_lib.SCALARS)

  def epoch_done(self, epoch: int, phase: str, seconds: float, train: dict, val: dict) -> None:
    self.epoch_seconds.append(seconds)
    left = (self.total_epochs - epoch - 1) * float(np.mean(self.epoch_seconds))
    logging.info('epoch %d/%d (%s) %.0fs, about %.0fs left | train loss %.4f auc %.4f | '
                 'validation loss %.4f auc %.4f accuracy %.4f', epoch + 1, self.total_epochs, phase, seconds,
                 left, train['loss'], train['auc'], val['loss'], val['auc'], val['accuracy'])


def write_summaries(writers: dict, *, epoch: int, train: dict, val: dict, val_pred: dict, threshold: float,
                    learning_rate: float, global_step: int) -> None:
  """The epoch's TensorBoard scalars under train/ and validation/, and validation's confusion matrix and ROC curve.

  Args:
    writers: {'train', 'validation'}: summary writers.
    epoch: the epoch just trained (its summaries are at step epoch + 1).
    train, val: the epoch's scalars.
    val_pred: the validation predictions ({'labels', 'probs'}).
    threshold: the epoch's own threshold, chosen on `val_pred`.
    learning_rate: the phase's rate at the epoch's end (read with .numpy(): a Keras variable created in a strategy
      scope wraps a MirroredVariable, which float() rejects).
    global_step: the training steps done.
  """
  with writers['train'].as_default():
    for name, value in train.items():
      tf.summary.scalar(name, value, step=epoch + 1)
    tf.summary.scalar('learning_rate', learning_rate, step=epoch + 1)
    tf.summary.scalar('global_step', global_step, step=epoch + 1)
  with writers['validation'].as_default():
    for name, value in val.items():
      tf.summary.scalar(name, value, step=epoch + 1)
    # At this epoch's own threshold: test's matrix, beside it in TensorBoard, is drawn at the kept one.
    cm = metrics_lib.metrics_at(val_pred['labels'], val_pred['probs'], threshold)['confusion_matrix']
    title = f'Validation, epoch {epoch + 1}, threshold {threshold:.3f} ({metrics_lib.TRAINING_RULE})'
    _png_summary('confusion_matrix', figures.confusion_matrix_png(cm, title=title), epoch + 1)
    _png_summary('roc_curve', figures.roc_curve_png(val_pred['labels'], val_pred['probs']), epoch + 1)


def log_run_start(config: Config, model, builder, image_size: int, train_writer) -> None:
  """A new run's augmented images, and its HParams at the run's root, so the HParams plugin sees train/ and
  validation/ as this session's metric groups."""
  _log_augmented_images(model, builder, image_size, train_writer)
  with tf.summary.create_file_writer(config.model_dir).as_default():
    hp.hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in dataclasses.asdict(config).items()},
               trial_id=os.path.basename(os.path.abspath(config.model_dir)))


def _log_augmented_images(model, builder, image_size, writer) -> None:
  """A grid of augmented training images, as the model's augmentation layers (and --crop) give them to the rest."""
  with writer.as_default():
    images = next(iter(data.eval_dataset(builder, 'train', image_size=image_size, batch_size=16, cache=False)))
    augmentation, crop = _find_layer(model, 'augmentation'), _find_layer(model, 'crop')
    augmented = images['image'] if augmentation is None else augmentation(images['image'], training=True)
    augmented = augmented if crop is None else crop(augmented)
    augmented = tf.cast(tf.clip_by_value(tf.round(tf.cast(augmented, tf.float32)), 0, 255), tf.uint8)
    _png_summary('augmented_training_images', figures.image_grid_png(augmented.numpy()), 0)


def _find_layer(model, name):
  return next((layer for layer in model.layers if layer.name == name), None)
