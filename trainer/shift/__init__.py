r"""How a run's metrics move when the images shift: a stress test for choosing between recipes on validation.

The official test split of Kermany et al. (2018) is shifted from its train folder (a CNN at ~97% on a validation split
made by image scores ~73% there), and it may not be used for choices. What can be measured on the validation split is
how much each candidate's ROC-AUC, sensitivity and specificity move under the kinds of difference that separate
radiographs of other machines, settings and post-processing: exposure (gamma), contrast, sharpness, noise, JPEG
compression and field of view. Each shift is one fixed, deterministic transform of the uint8 images at the model's
input size, and the threshold stays the one stored with the run or export (run.json names the rule that chose it), as
in deployment; --threshold_rule=youden_with_shifts chooses THRESHOLD_RULE's instead, which also looks at the shifted
copies (`python -m trainer.export --threshold_rule=youden_with_shifts` stores it with the model).

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

import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import metrics


def _gamma(g):
  return lambda x: 255 * tf.pow(x / 255, g)


def _contrast(factor):
  def contrast(x):
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    return (x - mean) * factor + mean
  return contrast


def _blur(x):
  # sigma of 1 pixel at 128 pixels a side: the same blur, relative to the anatomy, at every input size.
  sigma = x.shape[1] / 128
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma)**2)
  taps = tf.constant(taps / taps.sum(), tf.float32)
  padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='SYMMETRIC')
  rows = tf.nn.conv2d(padded, tf.reshape(taps, [-1, 1, 1, 1]), strides=1, padding='VALID')
  return tf.nn.conv2d(rows, tf.reshape(taps, [1, -1, 1, 1]), strides=1, padding='VALID')


def _noise(x):
  # Stateless with a fixed seed: every model of a comparison sees the same noise (the same pattern on every batch).
  return x + 8 * tf.random.stateless_normal(tf.shape(x), seed=[17, 29])


def _zoom(scale):
  def zoom(x):
    side = x.shape[1]
    if scale < 1:  # The whole image, smaller, inside a black border: a wider field of view.
      inner = int(round(side * scale))
      small = tf.image.resize(x, [inner, inner], antialias=True)
      return tf.image.resize_with_crop_or_pad(small, side, side)
    return tf.image.resize(tf.image.central_crop(x, 1 / scale), [side, side])
  return zoom


def _jpeg(quality):
  def jpeg(x):
    images = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    return tf.cast(tf.map_fn(lambda image: tf.image.adjust_jpeg_quality(image, quality), images), tf.float32)
  return jpeg


# name -> transform of float32 [0, 255] batches (batch, side, side, 1). 'none' first: the unshifted reference.
SHIFTS = {
    'none': lambda x: x,
    'darker (gamma 1.5)': _gamma(1.5),
    'brighter (gamma 0.67)': _gamma(1 / 1.5),
    'low contrast (x0.7)': _contrast(0.7),
    'high contrast (x1.3)': _contrast(1.3),
    'blur (sigma 1/128 side)': _blur,
    'noise (sigma 8 grey levels)': _noise,
    'jpeg quality 20': _jpeg(20),
    'zoom out (x0.85, black border)': _zoom(0.85),
    'zoom in (x1.15, cropped)': _zoom(1.15),
}


# A model trained without a family and scored on that family's shifts (config.SHIFT_FAMILIES) predicts how it meets
# a shift it was never shown (`leave_one_family_out`); scored on shifts it trained on, the stress test would partly
# confirm its own augmentation. These are the families the shifts cover, in SHIFTS' order.
FAMILIES = tuple(dict.fromkeys(config_lib.SHIFT_FAMILIES.values()))


def apply(name: str, images: tf.Tensor) -> tf.Tensor:
  """Shifts a batch of uint8 images (batch, side, side, 1) by SHIFTS[name]; returns uint8 of the same shape."""
  shifted = SHIFTS[name](tf.cast(images, tf.float32))
  return tf.cast(tf.clip_by_value(tf.round(shifted), 0, 255), tf.uint8)


THRESHOLD_RULE = (
    "The decision threshold is chosen on the validation split only: the threshold that maximises Youden's J "
    '(sensitivity + specificity - 1) over the validation images as they are and their copies under every shift of '
    'trainer.shift.SHIFTS, the unshifted images weighing as much as all the shifted ones together; an image is '
    'called pneumonia when its probability is at or above the threshold.')


def pooled_threshold(shifted: dict[str, dict]) -> float:
  """THRESHOLD_RULE on the validation split's predictions under every shift (`trainer.runs.predict_shifted`).

  Youden's J on the validation split alone puts the threshold just above its normal images; every shift in SHIFTS
  pushes normal images' probabilities up (measured in EXPERIMENTS.md), so that threshold loses specificity first
  on shifted data. Pooling the shifted copies moves it up, and weighting the unshifted copy as much as all shifted
  ones keeps the sensitivity on unshifted images from paying for all of it.
  """
  copies = len(shifted) - 1  # The unshifted copy weighs as much as all shifted ones.
  weighted = [shifted['none']] * copies + [split for name, split in shifted.items() if name != 'none']
  return metrics.choose_threshold(np.concatenate([split['labels'] for split in weighted]),
                                   np.concatenate([split['probs'] for split in weighted]))


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
