"""Trained runs and ensembles: loading a finished run, predicting a split, and the threshold they are used at.

A run is what training (or `trainer.export`) leaves in its model_dir: model.keras and run.json with the validation
threshold. Several runs are an ensemble: the mean of their probabilities, at a threshold chosen on validation for
that mean. Every program that takes runs (evaluate, predict, shift, export) goes through `operating_point`, so the
same models given the same way get the same threshold everywhere.
"""

from collections.abc import Sequence
import dataclasses
import json
import os

from absl import flags
import keras
import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer import export
from trainer import metrics
from trainer import progress
from trainer import report as report_lib
from trainer import shift
from trainer import tta


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


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished training run, as `load_run` reads it from its model_dir."""

  model_dir: str
  model: keras.Model
  image_size: int
  threshold: float
  config: dict
  # The name of the rule that chose `threshold` (metrics.THRESHOLD_RULES); None for an ensemble not chosen yet.
  threshold_rule: str | None = metrics.TRAINING_RULE
  # Views `model` averages over (`with_tta`); `threshold` was chosen on one.
  tta_views: int = 1


def load_run(model_dir: str) -> TrainedRun:
  """Loads the model and the validation threshold a training run (or `trainer.export`) left in its model_dir.

  Both are read from one export (`trainer.export.current_dir`), so a new export committed meanwhile cannot pair this
  model with its threshold. The model is read with Keras's safe mode: no Lambda layer or pickled code runs on loading.

  Args:
    model_dir: the --model_dir of a finished run, or the --out_dir of `trainer.export` (it holds model.keras and
      run.json).

  Returns:
    The run's folder, model, input side, threshold, the name of the rule that chose it, and training config (a dict
    of trainer.config.Config's fields).

  Raises:
    FileNotFoundError: if model.keras or run.json is missing.
    ValueError: if run.json is not a run.json the trainer wrote.
  """
  folder = export.current_dir(model_dir)
  paths = {name: os.path.join(folder, name) for name in ('model.keras', 'run.json')}
  for path in paths.values():
    if not os.path.isfile(path):
      raise errors.MissingPath(f'{path}: no such file; give the --model_dir of a finished training run '
                              '(it holds model.keras and run.json).')
  try:
    with open(paths['run.json']) as f:
      run = json.load(f)
    image_size, threshold, config = int(run['image_size']), float(run['threshold']), dict(run['config'])
    if not 0 <= threshold <= 1:  # NaN too, which would label every image normal.
      raise ValueError(f'its threshold {threshold} is not a probability')
    # Runs written before the rule was stored were all chosen by the training rule.
    rule = str(run.get('threshold_rule', metrics.TRAINING_RULE))
  except (ValueError, KeyError, TypeError) as e:
    raise errors.InvalidValue(f'{paths["run.json"]} is not a run.json written by the trainer ({type(e).__name__}: {e}).'
                     ) from None
  model = export.load_model(paths['model.keras'])
  return TrainedRun(model_dir=model_dir, model=model, image_size=image_size, threshold=threshold, config=config,
                    threshold_rule=rule)


def with_tta(runs: Sequence[TrainedRun], views: int) -> list[TrainedRun]:
  """The runs with test-time augmentation: each model averaged over its first `views` `trainer.tta.VIEWS`.

  A run's stored threshold was chosen on single-view probabilities, which the mean over views does not keep, so
  `operating_point` chooses it again on validation, with the views, by the rule it was stored with.

  Raises:
    errors.InvalidValue: views is not in 1..trainer.tta.MAX_VIEWS.
  """
  try:
    return [run if views == 1 else dataclasses.replace(run, model=tta.with_tta(run.model, views), tta_views=views)
            for run in runs]
  except ValueError as e:
    raise errors.InvalidValue(f'--tta={views}: {e}') from None


def predict_runs(runs: Sequence[TrainedRun], builder, split: str, *, batch_size: int = 32,
                 transform=None) -> dict[str, np.ndarray]:
  """The mean probability of one or more runs on a split, each run at its own input size.

  Args:
    runs: from `load_run`.
    builder: the split's dataset, from `trainer.data.prepare`.
    split: its name.
    batch_size: images per prediction batch.
    transform: if given, a function applied to every batch of uint8 images before the models see it (e.g. a
      `trainer.shift` perturbation).

  Returns:
    As `predict_split`, with 'probs' the mean over the runs and 'member_probs' (runs, images).
  """
  members = []
  for run in runs:
    # eval_dataset reads the split in file order, so the i-th prediction of every run is the same image.
    dataset = data.eval_dataset(builder, split, image_size=run.image_size, batch_size=batch_size, cache=False)
    if transform is not None:
      dataset = dataset.map(lambda batch: {**batch, 'image': transform(batch['image'])})
    members.append(predict_split(run.model, dataset))
  return {**members[0], 'probs': np.mean([m['probs'] for m in members], axis=0),
          'member_probs': np.stack([m['probs'] for m in members])}


def predict_shifted(runs, builder, split: str, *, batch_size: int = 32) -> dict[str, dict]:
  """One run's (or an ensemble's mean) predictions on a split under every shift: {name: `predict_runs`'s result}."""
  shifted = {}
  with progress.steps(f'{split} shifted', len(shift.SHIFTS)) as task:
    for name in shift.SHIFTS:
      shifted[name] = predict_runs(runs, builder, split, batch_size=batch_size,
                                   transform=lambda images, name=name: shift.apply(name, images))
      task.advance(name)
  return shifted


def threshold_with_shifts(runs, builder, *, batch_size: int = 32) -> float:
  """trainer.shift.THRESHOLD_RULE for runs: a threshold for images from the training data's machines or from others
  (why: `trainer.shift.pooled_threshold`).

  Args:
    runs: from `load_run`; several are an ensemble (the mean probability).
    builder: their dataset, from `trainer.data.prepare`; its validation split is used.
    batch_size: images per prediction batch.

  Returns:
    The threshold, as `trainer.metrics.choose_threshold` picks it on the pooled predictions.
  """
  return shift.pooled_threshold(predict_shifted(runs, builder, 'validation', batch_size=batch_size))


def load_runs_without(folder: str) -> dict[str, list[TrainedRun]]:
  """{family: [the run in folder/without-FAMILY]} for each family of `trainer.shift.FAMILIES` that has one: the
  runs `leave_one_family_out` takes.

  Raises:
    errors.MissingPath: there is no such folder.
  """
  if not os.path.isdir(folder):
    raise errors.MissingPath(f'--leave_one_out={folder}: no such folder.')
  return {family: [load_run(os.path.join(folder, f'without-{family}'))] for family in shift.FAMILIES
          if os.path.isdir(os.path.join(folder, f'without-{family}'))}


def leave_one_family_out(runs_without: dict[str, list], builder, split: str, *, batch_size: int = 32) -> dict:
  """Each shift family scored by the runs trained without it: the stress test as a prediction, not a confirmation.

  Args:
    runs_without: {family: runs (from `load_run`; several are an ensemble) trained with that family left out of
      --augment_families}, for every family of `trainer.shift.FAMILIES`.
    builder: their dataset, from `trainer.data.prepare`.
    split: the split to shift (validation, to choose between recipes).
    batch_size: images per prediction batch.

  Returns:
    {'split', 'families': {family: {'roc_auc': the lowest over its shifts, 'roc_auc_normals_shifted': the same
    with only the normal images shifted (`trainer.shift.normals_shifted_auc`), 'shifts': {name: ROC-AUC},
    'normals_shifted': {name: ROC-AUC}, 'members': [model_dir]}}, 'worst': {'family', 'roc_auc',
    'normals_shifted_family', 'roc_auc_normals_shifted'}, 'mean_roc_auc', 'mean_roc_auc_normals_shifted': over the
    families}.

  Raises:
    errors.InvalidValue: a family has no runs, or a run trained with the family it is meant to have left out.
  """
  missing = [family for family in shift.FAMILIES if not runs_without.get(family)]
  if missing:
    raise errors.InvalidValue(f'Leave-one-family-out needs runs trained without each of '
                              f'{", ".join(shift.FAMILIES)}; none without {", ".join(missing)}.')
  for family in shift.FAMILIES:
    for run in runs_without[family]:
      # Runs from before the families were flags trained on the default set.
      if family in run.config.get('augment_families', ','.join(config_lib.DEFAULT_FAMILIES)).split(','):
        raise errors.InvalidValue(f'{run.model_dir} trained with the {family} augmentation, so it cannot score the '
                                  f'{family} shifts as unseen: train it with --augment_families without it.')
  families = {}
  # One step per prediction of the split: each family's plain one, then one per shift of the family.
  with progress.steps('leave-one-family-out', len(shift.FAMILIES) + len(config_lib.SHIFT_FAMILIES)) as task:
    for family in shift.FAMILIES:
      runs = runs_without[family]
      plain = predict_runs(runs, builder, split, batch_size=batch_size)
      task.advance(f'without-{family}')
      shifts, normals_shifted = {}, {}
      for name in (name for name, of in config_lib.SHIFT_FAMILIES.items() if of == family):
        predictions = predict_runs(runs, builder, split, batch_size=batch_size,
                                   transform=lambda images, name=name: shift.apply(name, images))
        task.advance(f'without-{family} {name}')
        shifts[name] = metrics.ranking_metrics(predictions['labels'], predictions['probs'])['roc_auc']
        normals_shifted[name] = shift.normals_shifted_auc(plain, predictions)
      families[family] = {'roc_auc': min(shifts.values()), 'roc_auc_normals_shifted': min(normals_shifted.values()),
                          'shifts': shifts, 'normals_shifted': normals_shifted,
                          'members': [run.model_dir for run in runs]}
  worst = min(families, key=lambda family: families[family]['roc_auc'])
  worst_normals = min(families, key=lambda family: families[family]['roc_auc_normals_shifted'])
  return {'split': split, 'families': families,
          'worst': {'family': worst, 'roc_auc': families[worst]['roc_auc'], 'normals_shifted_family': worst_normals,
                    'roc_auc_normals_shifted': families[worst_normals]['roc_auc_normals_shifted']},
          'mean_roc_auc': float(np.mean([row['roc_auc'] for row in families.values()])),
          'mean_roc_auc_normals_shifted': float(np.mean([row['roc_auc_normals_shifted'] for row in families.values()]))}


def operating_point(runs: Sequence[TrainedRun], rule: str | None = None, **kwargs) -> dict:
  """The one decision threshold of a run, an export or an ensemble of runs, and the name of the rule that chose it.

  A run or export keeps the threshold stored with it, unless `rule` names another rule; several runs get theirs
  chosen on validation by `rule` (youden if None), as `ensemble_threshold` does. Every command goes through here, so
  the same models given the same way get the same threshold everywhere.

  Args:
    runs: from `load_run`.
    rule: None, or one of metrics.THRESHOLD_RULES.
    **kwargs: for `ensemble_threshold` (data_dir, manual_dir, batch_size, shifted).

  Returns:
    {'threshold', 'threshold_rule', 'chosen' ('stored' or 'now')}, and `ensemble_threshold`'s entries if chosen now.
  """
  if rule is not None and rule not in metrics.THRESHOLD_RULES:
    raise errors.InvalidValue(f'Unknown threshold rule {rule!r}: choose one of {", ".join(metrics.THRESHOLD_RULES)}.')
  if len(runs) == 1 and runs[0].threshold_rule is not None and rule in (None, runs[0].threshold_rule):
    if runs[0].tta_views == 1:
      return {'threshold': runs[0].threshold, 'threshold_rule': runs[0].threshold_rule, 'chosen': 'stored'}
    rule = runs[0].threshold_rule  # Its own rule, on the views (`with_tta`).
  return {**ensemble_threshold(runs, rule=rule or metrics.TRAINING_RULE, **kwargs), 'chosen': 'now'}


def ensemble_threshold(runs: Sequence[TrainedRun], *, rule: str = metrics.TRAINING_RULE, data_dir: str | None = None,
                       manual_dir: str | None = None, batch_size: int = 32, shifted: dict | None = None) -> dict:
  """The decision threshold of an ensemble (or of one run, again), chosen on validation by the rule named `rule`.

  Every member predicts the validation split of the dataset it was trained on (the same one for all), each at its
  own input size; the probabilities are averaged image by image.

  Args:
    runs: the members, from `load_run`.
    rule: one of metrics.THRESHOLD_RULES: youden (`choose_threshold`) or youden_with_shifts
      (`trainer.shift.pooled_threshold`, `threshold_with_shifts`).
    data_dir: where TFDS keeps built datasets (None: the first member's --data_dir).
    manual_dir: the downloaded data, if the dataset must be built (None: the first member's).
    batch_size: images per prediction batch.
    shifted: for youden_with_shifts, the validation predictions under every shift if already made
      (`predict_shifted`).

  Returns:
    {'threshold', 'threshold_rule', 'dataset', 'validation_images', 'validation_roc_auc' (of the average), 'members'
    (model_dirs), 'member_thresholds', 'member_validation_roc_auc'}, and for youden_with_shifts 'stress'
    (`trainer.shift.stress` on validation at the threshold).

  Raises:
    ValueError: if the members were trained on different datasets.
  """
  dataset = run_dataset(runs)
  builder = data.prepare(dataset, data_dir=data_dir or runs[0].config.get('data_dir'),
                         manual_dir=manual_dir or runs[0].config.get('manual_dir'))
  stress = {}
  if rule == 'youden_with_shifts':
    shifted = shifted or predict_shifted(runs, builder, 'validation', batch_size=batch_size)
    split, threshold = shifted['none'], shift.pooled_threshold(shifted)
    stress = {'stress': shift.stress(shifted, threshold=threshold, split='validation')}
  else:
    split = predict_runs(runs, builder, 'validation', batch_size=batch_size)
    threshold = metrics.choose_threshold(split['labels'], split['probs'])
  labels = split['labels']
  return {
      'threshold': threshold,
      'threshold_rule': rule,
      **stress,
      'dataset': dataset,
      'validation_images': int(labels.size),
      'validation_roc_auc': metrics.ranking_metrics(labels, split['probs'])['roc_auc'],
      'members': [run.model_dir for run in runs],
      'member_thresholds': [run.threshold for run in runs],
      'member_validation_roc_auc': [metrics.ranking_metrics(labels, probs)['roc_auc']
                                    for probs in split['member_probs']],
  }


def run_dataset(runs: Sequence[TrainedRun]) -> str:
  """The dataset the runs were trained on.

  Raises:
    ValueError: if they were trained on different ones (an ensemble's threshold is chosen on one validation split).
  """
  datasets = sorted({run.config['dataset'] for run in runs})
  if len(datasets) != 1:
    raise errors.InvalidValue(f'The runs were trained on different datasets ({", ".join(datasets)}); an ensemble\'s '
                              'threshold is chosen on one validation split, so train them on the same one.')
  return datasets[0]



def define_operating_point_flags():
  """--threshold_rule and --tta, the same in every command that takes runs (evaluate, predict, shift, export)."""
  flags.DEFINE_enum('threshold_rule', None, metrics.THRESHOLD_RULES,
                    'Choose the threshold again on validation by this rule: '
                    'youden (Youden\'s J) or youden_with_shifts (Youden\'s J on validation and its shifted copies, '
                    'trainer.shift). Default: the threshold stored with the run or export (run.json names its rule); '
                    'for several runs, youden. `python -m trainer.export` stores an ensemble with its threshold.')
  flags.DEFINE_integer('tta', 1, 'Test-time augmentation: average each image\'s probability over its first N fixed '
                       f'views ({", ".join(tta.VIEWS)}); 1: none. The threshold is then chosen again on validation, '
                       'with the same views, by the run\'s rule (or --threshold_rule).')

