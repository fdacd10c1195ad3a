"""Predicting a split with a model: what training does each epoch and every program does with a loaded run.

Below both `trainer.train` and `trainer.runs`: it takes a Keras model and a `trainer.data.eval_dataset`, nothing of
how the model was trained or loaded.
"""

import keras
import numpy as np
import tensorflow as tf

from trainer import progress
from trainer import report as report_lib


def make_predict(model: keras.Model):
  """A traced function: uint8 images (batch, side, side, 1) -> float32 pneumonia probabilities (batch,).

  Traced once for every batch size, so build it once and call it for every batch and every epoch.
  """
  side = model.inputs[0].shape[1]

  @tf.function(input_signature=[tf.TensorSpec([None, side, side, 1], tf.uint8)])
  def predict(images):
    return tf.cast(model(images, training=False), tf.float32)[:, 0]

  return predict


def predict_split(model: keras.Model, dataset: tf.data.Dataset, *, predict=None) -> dict[str, np.ndarray]:
  """Runs `model` over a whole split, on this worker alone.

  Args:
    model: a model from `trainer.models.build_model` (uint8 images in, probabilities out).
    dataset: batches of dicts with 'image', 'label' and 'patient_id', as `trainer.data.eval_dataset` yields them.
    predict: `make_predict(model)`, for a caller that predicts many times (each epoch); made here if None.

  Returns:
    {'probs', 'labels', 'groups' (patient ids)}: one entry per image, in the dataset's order.
  """
  predict = predict or make_predict(model)
  probs, labels, groups = [], [], []
  batches = int(dataset.cardinality())
  with progress.steps('predicting', batches if batches > 0 else None) as task:
    for batch in dataset:
      probs.append(predict(batch['image']).numpy())
      labels.append(batch['label'].numpy())
      groups.append(batch['patient_id'].numpy())
      task.advance()
  return {'probs': np.concatenate(probs), 'labels': np.concatenate(labels), 'groups': np.concatenate(groups)}


def evaluate_model(model: keras.Model, dataset: tf.data.Dataset, *, threshold: float, out_dir: str,
                   tensorboard_dir: str | None = None, extra: dict | None = None, n_resamples: int = 1000) -> dict:
  """Reports a model on one split: report.json, report.md and the figures in `out_dir`, and the figures in TensorBoard.

  Args:
    model: a model from `trainer.models.build_model`.
    dataset: the split, as `trainer.data.eval_dataset` yields it.
    threshold: the decision threshold chosen on validation (run.json's 'threshold').
    out_dir: where the report files and PNGs go; created if missing.
    tensorboard_dir: if given, the same PNGs are written there as TensorBoard images, at step 0.
    extra: more entries for the report, as in `build_report`.
    n_resamples: bootstrap resamples of the 95% intervals.

  Returns:
    The report, as `build_report` returns it.

  Raises:
    ValueError: as `build_report`, e.g. if the split holds only one class.
  """
  return report_lib.report_predictions(predict_split(model, dataset), threshold=threshold, out_dir=out_dir,
                            tensorboard_dir=tensorboard_dir, extra=extra, n_resamples=n_resamples)
