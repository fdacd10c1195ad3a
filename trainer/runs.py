"""Trained runs and ensembles: what every program that takes runs loads.

A run is what training (or `trainer.export`) leaves in its model_dir: model.keras and run.json with the validation
threshold. Several runs are an ensemble: the mean of their probabilities, at a threshold chosen on validation for
that mean. `Runs` is the one object the programs (evaluate, export, predict, shift) load: the runs with their
test-time views (`with_tta`), their data (the given data_dir, or the run's own), their one threshold
(`operating_point`: stored, or chosen on validation by a rule of `trainer.metrics.RULES`) and their predictions
(`predict_runs`); so the same models given the same way get the same threshold everywhere. Predicting one model is
`trainer.inference`'s.
"""

from collections.abc import Sequence
import dataclasses
import json
import os

import keras
import numpy as np

from trainer import data
from trainer import errors
from trainer import export
from trainer import inference
from trainer import metrics
from trainer import progress
from trainer import shift
from trainer import tta


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished training run, as `load_run` reads it from its model_dir."""

  model_dir: str
  model: keras.Model
  image_size: int
  threshold: float
  config: dict
  # The name of the rule that chose `threshold` (metrics.RULES); None for an ensemble not chosen yet.
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
  if not model_dir:
    raise errors.InvalidValue('--model_dir has an empty entry (a trailing or doubled comma?): name a run or an export '
                              'in each entry of DIR1,DIR2,...')
  folder = export.current_dir(model_dir)
  paths = {name: os.path.join(folder, name) for name in ('model.keras', 'run.json')}
  for path in paths.values():
    if not os.path.isfile(path):
      raise errors.MissingPath(f'{path}: no such file; give the --model_dir of a finished training run '
                              '(it holds model.keras and run.json).')
  try:
    with open(paths['run.json']) as f:
      run = json.load(f)
  except ValueError as e:  # UnicodeDecodeError too.
    raise errors.InvalidValue(f'{paths["run.json"]} is not a run.json written by the trainer ({type(e).__name__}: {e}).'
                              ) from None
  model = export.load_model(paths['model.keras'])
  image_size, threshold, config, rule = checked_run_json(paths['run.json'], run, model.inputs[0].shape[1])
  return TrainedRun(model_dir=model_dir, model=model, image_size=image_size, threshold=threshold, config=config,
                    threshold_rule=rule)


def checked_run_json(path: str, run, model_side: int | None) -> tuple[int, float, dict, str]:
  """The entries of a run.json that every program uses, checked for type and range, as (image_size, threshold,
  config, threshold_rule).

  A run.json edited by hand, or copied from another run, must not label images silently: `"threshold": true` would be
  taken as 1.0 (every image normal), and an image_size that is not the model's input would fail on the first image.

  Args:
    path: the file, for the message.
    run: its parsed JSON.
    model_side: the input side of the model.keras beside it.

  Raises:
    errors.InvalidValue: on one line naming the file and the entry.
  """
  def refuse(reason):
    raise errors.InvalidValue(f'{path} is not a run.json written by the trainer (ValueError: {reason}).')

  def shown(value):  # As JSON, but NaN as Python writes it.
    return value if isinstance(value, float) else json.dumps(value)

  if not isinstance(run, dict):
    refuse(f'JSON {type(run).__name__}, not an object')
  missing = [name for name in ('image_size', 'threshold', 'config') if name not in run]
  if missing:
    refuse(f'it has no {", ".join(missing)}')
  image_size, threshold, config = run['image_size'], run['threshold'], run['config']
  # bool is an int in Python, and True == 1.
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
    refuse(f'its threshold {shown(threshold)} is not a probability')  # NaN too: it would label every image normal.
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    refuse(f'its image_size {shown(image_size)} is not a positive whole number')
  if model_side is not None and image_size != model_side:
    refuse(f'its image_size {image_size} is not the input size of its model.keras ({model_side})')
  if not isinstance(config, dict):
    refuse(f'its config {shown(config)} is not an object')
  # Runs written before the rule was stored were all chosen by the training rule.
  rule = run.get('threshold_rule', metrics.TRAINING_RULE)
  if not isinstance(rule, str):
    refuse(f'its threshold_rule {shown(rule)} is not a name')
  return image_size, float(threshold), config, rule


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
    As `inference.predict_split`, with 'probs' the mean over the runs and 'member_probs' (runs, images).
  """
  members = []
  for run in runs:
    # eval_dataset reads the split in file order, so the i-th prediction of every run is the same image.
    dataset = data.eval_dataset(builder, split, image_size=run.image_size, batch_size=batch_size, cache=False)
    if transform is not None:
      dataset = dataset.map(lambda batch: {**batch, 'image': transform(batch['image'])})
    members.append(inference.predict_split(run.model, dataset))
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
  """The youden_with_shifts rule for runs: a threshold for images from the training data's machines or from others
  (why: `trainer.metrics.pooled_threshold`).

  Args:
    runs: from `load_run`; several are an ensemble (the mean probability).
    builder: their dataset, from `trainer.data.prepare`; its validation split is used.
    batch_size: images per prediction batch.

  Returns:
    The threshold, as `trainer.metrics.pooled_threshold` picks it.
  """
  return metrics.RULES['youden_with_shifts'].choose(predict_shifted(runs, builder, 'validation',
                                                                   batch_size=batch_size))


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
  if rule is not None:
    metrics.threshold_rule(rule)
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
    rule: one of metrics.RULES: youden (`choose_threshold`) or youden_with_shifts (`pooled_threshold`), on the
      predictions of validation or of validation under every shift.
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
  if metrics.threshold_rule(rule).shifted:
    shifted = shifted or predict_shifted(runs, builder, 'validation', batch_size=batch_size)
    split, threshold = shifted['none'], metrics.RULES[rule].choose(shifted)
    stress = {'stress': shift.stress(shifted, threshold=threshold, split='validation')}
  else:
    split = predict_runs(runs, builder, 'validation', batch_size=batch_size)
    threshold = metrics.RULES[rule].choose(split)
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


class Runs:
  """A run, an export or an ensemble of runs, with its test-time views and its data: what every program loads.

  Several runs are an ensemble (the mean of their probabilities). The data is the runs' dataset, found in data_dir
  and manual_dir if given, else where the first run was trained from.

  Attributes:
    members: the runs, each with the test-time views (`with_tta`).
    tta: the number of views.
    data_dir, manual_dir: where their data is found.
    batch_size: images per prediction batch.
  """

  def __init__(self, members: Sequence[TrainedRun], *, tta: int = 1, data_dir: str | None = None,
               manual_dir: str | None = None, batch_size: int = 32):
    if not members:
      raise errors.InvalidValue('No run given: give --model_dir=DIR (a run or an export), or DIR1,DIR2,... (several '
                                'runs).')
    self.members = with_tta(members, tta)
    self.tta = tta
    self.data_dir = os.path.expanduser(data_dir) if data_dir else members[0].config.get('data_dir')
    self.manual_dir = os.path.expanduser(manual_dir) if manual_dir else members[0].config.get('manual_dir')
    self.batch_size = batch_size

  @classmethod
  def load(cls, model_dirs: Sequence[str], **kwargs) -> 'Runs':
    """Loads each of `model_dirs` (`load_run`; `~` expanded); kwargs as the constructor's."""
    return cls([load_run(os.path.expanduser(d)) for d in model_dirs], **kwargs)

  @property
  def dataset(self) -> str:
    """The dataset the runs were trained on (`run_dataset`: one for all)."""
    return run_dataset(self.members)

  def as_one(self, model_dir: str, *, tta: int = 1) -> 'Runs':
    """The runs as one model, as `trainer.export` writes it: the ensemble model of several (its threshold to be
    chosen), or the one run; then with `tta` views, which the model carries.

    Args:
      model_dir: the one model's folder, for an ensemble (the export's).
      tta: the number of test-time views.
    """
    run = self.members[0]
    if len(self.members) > 1:
      run = TrainedRun(model_dir=model_dir, model=export.ensemble_model([r.model for r in self.members]),
                       image_size=run.image_size, threshold=float('nan'), config=run.config, threshold_rule=None)
      run_dataset(self.members)
    return Runs([run], tta=tta, data_dir=self.data_dir, manual_dir=self.manual_dir, batch_size=self.batch_size)

  def builder(self, split: str | None = None, dataset: str | None = None):
    """The dataset's builder (`trainer.data.prepare`), of the runs' dataset unless `dataset` names another.

    Raises:
      errors.InvalidValue: `split` is given and is not one of its splits.
    """
    dataset = dataset or self.dataset
    builder = data.prepare(dataset, data_dir=self.data_dir, manual_dir=self.manual_dir)
    if split is not None and split not in builder.info.splits:
      raise errors.InvalidValue(f'--split={split} is not a split of {dataset}: choose one of '
                                f'{", ".join(sorted(builder.info.splits))}.')
    return builder

  def operating_point(self, rule: str | None = None, *, shifted: dict | None = None) -> dict:
    """Their one threshold and the rule that chose it: `operating_point` (shifted: `ensemble_threshold`'s)."""
    return operating_point(self.members, rule, data_dir=self.data_dir, manual_dir=self.manual_dir,
                           batch_size=self.batch_size, shifted=shifted)

  def predict(self, builder, split: str, *, transform=None) -> dict[str, np.ndarray]:
    """Their mean probability on `split` of `builder` (`predict_runs`)."""
    return predict_runs(self.members, builder, split, batch_size=self.batch_size, transform=transform)

  def predict_shifted(self, builder, split: str) -> dict[str, dict]:
    """Their predictions on `split` under every shift (`predict_shifted`)."""
    return predict_shifted(self.members, builder, split, batch_size=self.batch_size)
