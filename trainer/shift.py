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
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cli
from trainer import config as config_lib
from trainer import data
from trainer import evaluate

FLAGS = flags.FLAGS


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


def predict_shifted(runs, builder, split: str, *, batch_size: int = 32) -> dict[str, dict]:
  """One run's (or an ensemble's mean) predictions on a split under every shift: {name: `predict_runs`'s result}."""
  return {name: evaluate.predict_runs(runs, builder, split, batch_size=batch_size,
                                      transform=lambda images, name=name: apply(name, images))
          for name in SHIFTS}


def threshold_with_shifts(runs, builder, *, batch_size: int = 32) -> float:
  """THRESHOLD_RULE: a threshold for images that may come from the training data's machines or from others.

  Youden's J on the validation split alone puts the threshold just above its normal images; every shift in SHIFTS
  pushes normal images' probabilities up (measured in EXPERIMENTS.md), so that threshold loses specificity first
  on shifted data. Pooling the shifted copies moves it up, and weighting the unshifted copy as much as all shifted
  ones keeps the sensitivity on unshifted images from paying for all of it.

  Args:
    runs: from `trainer.evaluate.load_run`; several are an ensemble (the mean probability).
    builder: their dataset, from `trainer.data.prepare`; its validation split is used.
    batch_size: images per prediction batch.

  Returns:
    The threshold, as `trainer.evaluate.choose_threshold` picks it on the pooled predictions.
  """
  return pooled_threshold(predict_shifted(runs, builder, 'validation', batch_size=batch_size))


def pooled_threshold(shifted: dict[str, dict]) -> float:
  """`threshold_with_shifts` on the validation split's `predict_shifted` predictions, already made."""
  copies = len(shifted) - 1  # The unshifted copy weighs as much as all shifted ones.
  weighted = [shifted['none']] * copies + [split for name, split in shifted.items() if name != 'none']
  return evaluate.choose_threshold(np.concatenate([split['labels'] for split in weighted]),
                                   np.concatenate([split['probs'] for split in weighted]))


def stress(shifted: dict[str, dict], *, threshold: float, split: str) -> dict:
  """Every shift's metrics for one run or an ensemble (the mean probability) on one split.

  Args:
    shifted: the split's predictions under every shift, from `predict_shifted`.
    threshold: the decision threshold, chosen on the validation split.
    split: the split's name, for the result.

  Returns:
    {'threshold', 'split', 'shifts': {name: {'roc_auc', 'accuracy', 'sensitivity', 'specificity',
    'mean_probability_normal', 'mean_probability_pneumonia'}}, 'worst': the lowest of each metric over the shifts}.
  """
  rows = {}
  for name, predictions in shifted.items():
    labels, probs = predictions['labels'], predictions['probs']
    at = evaluate.metrics_at(labels, probs, threshold)
    rows[name] = {'roc_auc': evaluate.ranking_metrics(labels, probs)['roc_auc'], 'accuracy': at['accuracy'],
                  'sensitivity': at['sensitivity'], 'specificity': at['specificity'],
                  'mean_probability_normal': float(probs[labels == 0].mean()),
                  'mean_probability_pneumonia': float(probs[labels == 1].mean())}
  metrics = ('roc_auc', 'accuracy', 'sensitivity', 'specificity')
  return {'threshold': threshold, 'split': split, 'shifts': rows,
          'worst': {metric: min(row[metric] for row in rows.values()) for metric in metrics}}


def leave_one_family_out(runs_without: dict[str, list], builder, split: str, *, batch_size: int = 32) -> dict:
  """Each shift family scored by the runs trained without it: the stress test as a prediction, not a confirmation.

  Args:
    runs_without: {family: runs (from `trainer.evaluate.load_run`; several are an ensemble) trained with that family
      left out of --augment_families}, for every family of FAMILIES.
    builder: their dataset, from `trainer.data.prepare`.
    split: the split to shift (validation, to choose between recipes).
    batch_size: images per prediction batch.

  Returns:
    {'split', 'families': {family: {'roc_auc': the lowest over its shifts, 'shifts': {name: ROC-AUC},
    'members': [model_dir]}}, 'worst': {'family', 'roc_auc'}, 'mean_roc_auc': over the families}.

  Raises:
    ValueError: a family has no runs, or a run trained with the family it is meant to have left out.
  """
  missing = [family for family in FAMILIES if not runs_without.get(family)]
  if missing:
    raise ValueError(f'Leave-one-family-out needs runs trained without each of {", ".join(FAMILIES)}; none without '
                     f'{", ".join(missing)}.')
  for family in FAMILIES:
    for run in runs_without[family]:
      # Runs from before the families were flags trained on the default set.
      if family in run.config.get('augment_families', ','.join(config_lib.DEFAULT_FAMILIES)).split(','):
        raise ValueError(f'{run.model_dir} trained with the {family} augmentation, so it cannot score the {family} '
                         'shifts as unseen: train it with --augment_families without it.')
  families = {}
  for family in FAMILIES:
    runs = runs_without[family]
    shifts = {}
    for name in (name for name, of in config_lib.SHIFT_FAMILIES.items() if of == family):
      predictions = evaluate.predict_runs(runs, builder, split, batch_size=batch_size,
                                          transform=lambda images, name=name: apply(name, images))
      shifts[name] = evaluate.ranking_metrics(predictions['labels'], predictions['probs'])['roc_auc']
    families[family] = {'roc_auc': min(shifts.values()), 'shifts': shifts, 'members': [run.model_dir for run in runs]}
  worst = min(families, key=lambda family: families[family]['roc_auc'])
  return {'split': split, 'families': families, 'worst': {'family': worst, 'roc_auc': families[worst]['roc_auc']},
          'mean_roc_auc': float(np.mean([row['roc_auc'] for row in families.values()]))}


def markdown(result: dict) -> str:
  """The stress test as a Markdown table, one row per shift, then the worst of each column."""
  rule = f' ({result["threshold_rule"]})' if result.get('threshold_rule') else ''
  lines = [f'{result["split"]} split, threshold {result["threshold"]:.3f}{rule}', '',
           '| shift | ROC-AUC | accuracy | sensitivity | specificity | mean p (normal) |', '|---|---|---|---|---|---|']
  for name, row in result['shifts'].items():
    lines.append(f'| {name} | {row["roc_auc"]:.4f} | {row["accuracy"]:.3f} | {row["sensitivity"]:.3f} | '
                 f'{row["specificity"]:.3f} | {row["mean_probability_normal"]:.3f} |')
  worst = result['worst']
  lines.append(f'| **worst** | {worst["roc_auc"]:.4f} | {worst["accuracy"]:.3f} | {worst["sensitivity"]:.3f} | '
               f'{worst["specificity"]:.3f} | |')
  if 'leave_one_out' in result:
    lofo = result['leave_one_out']
    lines += ['', f'Leave-one-family-out, {lofo["split"]} split: each family scored by a run trained without it',
              '', '| family | ROC-AUC (its worst shift) | run |', '|---|---|---|']
    lines += [f'| {family} | {row["roc_auc"]:.4f} | {", ".join(row["members"])} |'
              for family, row in lofo['families'].items()]
    lines.append(f'| **worst: {lofo["worst"]["family"]}** | {lofo["worst"]["roc_auc"]:.4f} | |')
    lines.append(f'| mean | {lofo["mean_roc_auc"]:.4f} | |')
  return '\n'.join(lines)


def _define_flags():
  flags.DEFINE_list('model_dir', None, 'The --model_dir of a finished run, or several (DIR1,DIR2) for their ensemble.',
                    required=True)
  flags.DEFINE_string('split', 'validation', 'The split to shift: validation (to choose) or test (to report).')
  flags.DEFINE_string('out', None, 'Also write the result here as JSON.')
  flags.DEFINE_integer('batch_size', 32, 'Images per prediction batch.', lower_bound=1)
  flags.DEFINE_string('leave_one_out', None, 'Also score each shift family with a run trained without it: a folder '
                      'holding without-FAMILY/, the --model_dir of such a run, for every family of '
                      f'{", ".join(FAMILIES)} (launch/lofo.sh trains them).')
  evaluate.define_threshold_rule_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  runs = [evaluate.load_run(os.path.expanduser(d)) for d in FLAGS.model_dir]
  data_dir, manual_dir = runs[0].config.get('data_dir'), runs[0].config.get('manual_dir')
  builder = data.prepare(evaluate.run_dataset(runs), data_dir=data_dir, manual_dir=manual_dir)
  if FLAGS.split not in builder.info.splits:
    raise ValueError(f'--split={FLAGS.split} is not a split of {evaluate.run_dataset(runs)}: choose one of '
                     f'{", ".join(sorted(builder.info.splits))}.')
  shifted = predict_shifted(runs, builder, FLAGS.split, batch_size=FLAGS.batch_size)
  # On validation, the predictions just made are the ones youden_with_shifts pools.
  point = evaluate.operating_point(runs, FLAGS.threshold_rule, data_dir=data_dir, manual_dir=manual_dir,
                                   batch_size=FLAGS.batch_size,
                                   shifted=shifted if FLAGS.split == 'validation' else None)
  result = {**stress(shifted, threshold=point['threshold'], split=FLAGS.split), 'members': FLAGS.model_dir,
            'threshold_rule': point['threshold_rule'], 'threshold_chosen': point['chosen']}
  if FLAGS.leave_one_out:
    result['leave_one_out'] = leave_one_family_out(_runs_without(os.path.expanduser(FLAGS.leave_one_out)), builder,
                                                   FLAGS.split, batch_size=FLAGS.batch_size)
  print(markdown(result))
  if FLAGS.out:
    with open(os.path.expanduser(FLAGS.out), 'w') as f:
      json.dump(result, f, indent=2)
    logging.info('Wrote %s.', FLAGS.out)


def _runs_without(folder: str) -> dict[str, list]:
  if not os.path.isdir(folder):
    raise ValueError(f'--leave_one_out={folder}: no such folder.')
  return {family: [evaluate.load_run(os.path.join(folder, f'without-{family}'))] for family in FAMILIES
          if os.path.isdir(os.path.join(folder, f'without-{family}'))}


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
