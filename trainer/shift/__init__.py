r"""How a run's metrics move when the images shift: a stress test for choosing between recipes on validation.

The official test split of Kermany et al. (2018) is shifted from its train folder (a CNN at ~97% on a validation split
made by image scores ~73% there), and it may not be used for choices. What can be measured on the validation split is
how much each candidate's ROC-AUC, sensitivity and specificity move under the kinds of difference that separate
radiographs of other machines, settings and post-processing: exposure (gamma), contrast, sharpness, noise, JPEG
compression and field of view. Each shift is one fixed, deterministic transform of the uint8 images at the model's
input size, and the threshold stays the one stored with the run or export (run.json names the rule that chose it), as
in deployment; --threshold_rule=youden_with_shifts chooses one instead that also looks at the shifted copies
(trainer.metrics.RULES) (`python -m trainer.export --threshold_rule=youden_with_shifts` stores it with the model).

    python -m trainer.shift --model_dir=runs/recipe --split=validation
    python -m trainer.shift --model_dir=runs/seed1,runs/seed2 --split=validation --out=runs/shift.json

A recipe that loses less here is not proven better on the official test: these shifts are guesses at its kind of
difference, not measurements of it. They rank candidates that validation alone cannot tell apart.

Each shift is also scored with only the normal images shifted ('roc_auc_normals_shifted'). The official test's
normal images are a separate acquisition batch (the lowest patient numbers of both naming families), while its
pneumonia images are not; and in the train folder the normal images are sharper and higher in contrast than the
pneumonia ones (EXPERIMENTS.md). A shift of every image moves both classes' probabilities together, so the ranking
can survive it; a shift of one class is what breaks a ranking built on how the images were taken.
"""

from collections.abc import Callable
import dataclasses

import numpy as np
import tensorflow as tf

from trainer import metrics
from trainer import ops


@dataclasses.dataclass(frozen=True)
class Shift:
  """One shift: a fixed transform of float32 [0, 255] batches (batch, side, side, 1), and the augmentation family of
  trainer.config.FAMILIES that covers it (None for the unshifted reference)."""

  transform: Callable[[tf.Tensor], tf.Tensor]
  family: str | None

  def __call__(self, images):
    return self.transform(images)


def _blur(x):
  # sigma of 1 pixel at 128 pixels a side: the same blur, relative to the anatomy, at every input size.
  sigma = x.shape[1] / 128
  return ops.blur(x, tf.fill([tf.shape(x)[0]], sigma), ops.blur_radius(sigma))


def _jpeg(quality):
  return lambda x: ops.jpeg(x, tf.fill([tf.shape(x)[0]], quality))


# name -> Shift. 'none' first: the unshifted reference. Noise is stateless with a fixed seed: every model of a
# comparison sees the same noise (the same pattern on every batch).
SHIFTS = {
    'none': Shift(lambda x: x, None),
    'darker (gamma 1.5)': Shift(lambda x: ops.gamma(x, 1.5), 'gamma'),
    'brighter (gamma 0.67)': Shift(lambda x: ops.gamma(x, 1 / 1.5), 'gamma'),
    'low contrast (x0.7)': Shift(lambda x: ops.contrast(x, 0.7), 'contrast'),
    'high contrast (x1.3)': Shift(lambda x: ops.contrast(x, 1.3), 'contrast'),
    'blur (sigma 1/128 side)': Shift(_blur, 'blur'),
    'noise (sigma 8 grey levels)': Shift(lambda x: ops.noise(x, 8, [17, 29]), 'noise'),
    'jpeg quality 20': Shift(_jpeg(20), 'jpeg'),
    'zoom out (x0.85, black border)': Shift(lambda x: ops.zoom(x, 0.85), 'fov'),
    'zoom in (x1.15, cropped)': Shift(lambda x: ops.zoom(x, 1.15), 'fov'),
}
# {shift: the augmentation family that covers it}, for every shift but 'none'.
SHIFT_FAMILIES = {name: shift.family for name, shift in SHIFTS.items() if shift.family}

# A model trained without a family and scored on that family's shifts predicts how it meets a shift it was never
# shown (`leave_one_family_out`); scored on shifts it trained on, the stress test would partly confirm its own
# augmentation. These are the families the shifts cover, in SHIFTS' order.
FAMILIES = tuple(dict.fromkeys(SHIFT_FAMILIES.values()))


def apply(name: str, images: tf.Tensor) -> tf.Tensor:
  """Shifts a batch of uint8 images (batch, side, side, 1) by SHIFTS[name]; returns uint8 of the same shape."""
  return ops.to_uint8(SHIFTS[name](tf.cast(images, tf.float32)))


def normals_shifted_auc(plain: dict, shifted: dict) -> float:
  """ROC-AUC with only the normal images shifted: the normals' probabilities from `shifted`, the pneumonia images'
  from `plain` (two `trainer.runs.predict_runs` results on one split, so the i-th image is the same in both)."""
  if not np.array_equal(plain['labels'], shifted['labels']):
    raise ValueError('The two predictions are not of the same images in the same order.')
  labels = plain['labels']
  return metrics.ranking_metrics(labels, np.where(labels == 0, shifted['probs'], plain['probs']))['roc_auc']


def stress(shifted: dict[str, dict], *, threshold: float, split: str) -> dict:
  """Every shift's metrics for one run or an ensemble (the mean probability) on one split.

  Args:
    shifted: the split's predictions under every shift, from `trainer.runs.predict_shifted`.
    threshold: the decision threshold, chosen on the validation split.
    split: the split's name, for the result.

  Returns:
    {'threshold', 'split', 'shifts': {name: {'roc_auc', 'roc_auc_normals_shifted', 'accuracy', 'sensitivity',
    'specificity', 'mean_probability_normal', 'mean_probability_pneumonia'}}, 'worst': the lowest of each metric
    over the shifts}. At the threshold, only-the-normals-shifted needs no row of its own: its specificity is the
    shift's, its sensitivity the unshifted one.
  """
  rows = {}
  for name, predictions in shifted.items():
    labels, probs = predictions['labels'], predictions['probs']
    at = metrics.metrics_at(labels, probs, threshold)
    rows[name] = {'roc_auc': metrics.ranking_metrics(labels, probs)['roc_auc'],
                  'roc_auc_normals_shifted': normals_shifted_auc(shifted['none'], predictions),
                  'accuracy': at['accuracy'],
                  'sensitivity': at['sensitivity'], 'specificity': at['specificity'],
                  'mean_probability_normal': float(probs[labels == 0].mean()),
                  'mean_probability_pneumonia': float(probs[labels == 1].mean())}
  names = ('roc_auc', 'roc_auc_normals_shifted', 'accuracy', 'sensitivity', 'specificity')
  return {'threshold': threshold, 'split': split, 'shifts': rows,
          'worst': {metric: min(row[metric] for row in rows.values()) for metric in names}}


def markdown(result: dict) -> str:
  """The stress test as a Markdown table, one row per shift, then the worst of each column."""
  rule = f' ({result["threshold_rule"]})' if result.get('threshold_rule') else ''
  lines = [f'{result["split"]} split, threshold {result["threshold"]:.3f}{rule}', '',
           '| shift | ROC-AUC | ROC-AUC, normals only shifted | accuracy | sensitivity | specificity | '
           'mean p (normal) |', '|---|---|---|---|---|---|---|']
  for name, row in result['shifts'].items():
    lines.append(f'| {name} | {row["roc_auc"]:.4f} | {row["roc_auc_normals_shifted"]:.4f} | {row["accuracy"]:.3f} | '
                 f'{row["sensitivity"]:.3f} | {row["specificity"]:.3f} | {row["mean_probability_normal"]:.3f} |')
  worst = result['worst']
  lines.append(f'| **worst** | {worst["roc_auc"]:.4f} | {worst["roc_auc_normals_shifted"]:.4f} | '
               f'{worst["accuracy"]:.3f} | {worst["sensitivity"]:.3f} | {worst["specificity"]:.3f} | |')
  if 'leave_one_out' in result:
    lofo = result['leave_one_out']
    lines += ['', f'Leave-one-family-out, {lofo["split"]} split: each family scored by a run trained without it',
              '', '| family | ROC-AUC (its worst shift) | normals only shifted | run |', '|---|---|---|---|']
    lines += [f'| {family} | {row["roc_auc"]:.4f} | {row["roc_auc_normals_shifted"]:.4f} | '
              f'{", ".join(row["members"])} |' for family, row in lofo['families'].items()]
    worst = lofo['worst']
    lines.append(f'| **worst: {worst["family"]}** / **{worst["normals_shifted_family"]}** | {worst["roc_auc"]:.4f} | '
                 f'{worst["roc_auc_normals_shifted"]:.4f} | |')
    lines.append(f'| mean | {lofo["mean_roc_auc"]:.4f} | {lofo["mean_roc_auc_normals_shifted"]:.4f} | |')
  return '\n'.join(lines)
