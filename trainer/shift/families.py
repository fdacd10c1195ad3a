"""Leave-one-family-out: each shift family of `trainer.shift` scored by runs trained without that augmentation family.

    python -m trainer.shift --model_dir=runs/recipe --leave_one_out=runs/without   # runs/without/without-FAMILY/
"""

import os

import numpy as np

from trainer import config as config_lib
from trainer import errors
from trainer import metrics
from trainer import progress
from trainer import runs as runs_lib
from trainer import shift


def load_runs_without(folder: str) -> dict[str, list[runs_lib.TrainedRun]]:
  """{family: [the run in folder/without-FAMILY]} for each family of `trainer.shift.FAMILIES` that has one: the
  runs `leave_one_family_out` takes.

  Raises:
    errors.MissingPath: there is no such folder.
  """
  if not os.path.isdir(folder):
    raise errors.MissingPath(f'--leave_one_out={folder}: no such folder.')
  return {family: [runs_lib.load_run(os.path.join(folder, f'without-{family}'))] for family in shift.FAMILIES
          if os.path.isdir(os.path.join(folder, f'without-{family}'))}


def leave_one_family_out(runs_without: dict[str, list], builder, split: str, *, batch_size: int = 32) -> dict:
  """Each shift family scored by the runs trained without it: the stress test as a prediction, not a confirmation.

  Args:
    runs_without: {family: runs (from `trainer.runs.load_run`; several are an ensemble) trained with that family
      left out of --augment_families}, for every family of `trainer.shift.FAMILIES`.
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
  with progress.steps('leave-one-family-out', len(shift.FAMILIES) + len(shift.SHIFT_FAMILIES)) as task:
    for family in shift.FAMILIES:
      runs = runs_without[family]
      plain = runs_lib.predict_runs(runs, builder, split, batch_size=batch_size)
      task.advance(f'without-{family}')
      shifts, normals_shifted = {}, {}
      for name in (name for name, of in shift.SHIFT_FAMILIES.items() if of == family):
        predictions = runs_lib.predict_runs(runs, builder, split, batch_size=batch_size,
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
