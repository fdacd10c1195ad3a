"""Tests for trainer.shift: each shift does what its name says, and the stress test reports every one."""

import json
import shutil

import numpy as np
import pytest

from trainer import config as config_lib
from trainer import data
from trainer import metrics
from trainer import runs as runs_lib
from trainer import shift
from trainer.shift import families

SIZE = 64


def _chest():
  """A smooth grey disc with a sharp-edged bright square: enough structure for every shift to show."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  image = 60 + 120 * np.clip(1 - np.hypot(yy - 32, xx - 32) / 30, 0, 1)
  image[20:28, 20:28] = 230
  return np.repeat(image.astype(np.uint8)[None, ..., None], 2, axis=0)


def _shifted(name):
  return np.asarray(shift.apply(name, _chest())).astype(float)


def test_every_shift_keeps_shape_and_dtype_and_changes_the_image():
  images = _chest()
  for name in shift.SHIFTS:
    out = shift.apply(name, images)
    assert out.dtype == 'uint8' and out.shape == images.shape, name
    assert (np.asarray(out) == images).all() == (name == 'none'), name


def test_each_shift_moves_what_it_names():
  original = _chest().astype(float)
  assert _shifted('darker (gamma 1.5)').mean() < original.mean() < _shifted('brighter (gamma 0.67)').mean()
  assert _shifted('low contrast (x0.7)').std() < original.std() < _shifted('high contrast (x1.3)').std()
  sharpness = lambda x: np.abs(np.diff(x, axis=2)).max()  # the square's edge, 121 grey levels
  assert sharpness(_shifted('blur (sigma 1/128 side)')) < 0.85 * sharpness(original)  # sigma 0.5 px here: 94
  noise = _shifted('noise (sigma 8 grey levels)') - original
  assert 6 < noise.std() < 10
  np.testing.assert_array_equal(_shifted('noise (sigma 8 grey levels)'), _shifted('noise (sigma 8 grey levels)'))
  zoomed_out = _shifted('zoom out (x0.85, black border)')
  assert (zoomed_out[:, :4] == 0).all() and (original[:, :4] > 0).all()
  # Zooming in moves the square away from the centre: its corner at (20, 20) goes to (19, 19).
  zoomed_in = _shifted('zoom in (x1.15, cropped)')
  assert zoomed_in[0, 19, 19, 0] > 200 and original[0, 19, 19, 0] < 200
  assert 0 < np.abs(_shifted('jpeg quality 20') - original).mean() < 10


@pytest.fixture(scope='module')
def model_dir(untrained_run):
  return untrained_run(SIZE)


def test_cli_reports_every_shift_and_the_unshifted_row_matches_evaluate(model_dir, synthetic_data_dir, tmp_path,
                                                                         run_program):
  out = tmp_path / 'shift.json'
  code, stdout, stderr = run_program('trainer.shift', f'--model_dir={model_dir}', f'--out={out}')
  assert code == 0, stderr
  result = json.loads(out.read_text())
  assert list(result['shifts']) == list(shift.SHIFTS) and result['split'] == 'validation'
  assert all(f'| {name} |' in stdout for name in shift.SHIFTS)

  run = runs_lib.load_run(str(model_dir))
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  plain = runs_lib.predict_runs([run], builder, 'validation')
  assert result['shifts']['none']['roc_auc'] == pytest.approx(
      metrics.ranking_metrics(plain['labels'], plain['probs'])['roc_auc'])
  assert result['shifts']['none']['specificity'] == pytest.approx(
      metrics.metrics_at(plain['labels'], plain['probs'], 0.5)['specificity'])
  # The shifted rows are other predictions, and 'worst' is the minimum over all rows.
  assert len({row['mean_probability_normal'] for row in result['shifts'].values()}) == len(shift.SHIFTS)
  assert result['worst']['roc_auc'] == min(row['roc_auc'] for row in result['shifts'].values())
  # With only the normals shifted, the unshifted row is the plain ROC-AUC and a shifted row mixes two predictions.
  assert result['shifts']['none']['roc_auc_normals_shifted'] == pytest.approx(result['shifts']['none']['roc_auc'])
  darker = runs_lib.predict_runs([run], builder, 'validation',
                                 transform=lambda images: shift.apply('darker (gamma 1.5)', images))
  assert result['shifts']['darker (gamma 1.5)']['roc_auc_normals_shifted'] == pytest.approx(
      shift.normals_shifted_auc(plain, darker))
  assert result['worst']['roc_auc_normals_shifted'] == min(
      row['roc_auc_normals_shifted'] for row in result['shifts'].values())

  code, _, stderr = run_program('trainer.shift', f'--model_dir={model_dir}', '--split=val')
  assert code == 1
  assert stderr.strip().splitlines()[-1].startswith('error: --split=val is not a split of')


def test_threshold_with_shifts_weighs_the_unshifted_split_as_much_as_all_shifts(model_dir, synthetic_data_dir,
                                                                                 tmp_path, run_program):
  run = runs_lib.load_run(str(model_dir))
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  threshold = runs_lib.threshold_with_shifts([run], builder)
  splits = {name: runs_lib.predict_runs([run], builder, 'validation',
                                        transform=lambda images, name=name: shift.apply(name, images))
            for name in shift.SHIFTS}
  shifted = [split for name, split in splits.items() if name != 'none']
  weighted = [splits['none']] * len(shifted) + shifted
  assert threshold == pytest.approx(metrics.choose_threshold(
      np.concatenate([s['labels'] for s in weighted]), np.concatenate([s['probs'] for s in weighted])))

  # The evaluate CLI reports at that threshold, names the rule, and the stress test holds the same threshold.
  out = tmp_path / 'report'
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', f'--out_dir={out}',
                                 '--threshold_rule=youden_with_shifts', '--n_resamples=50')
  assert code == 0, stderr
  report = json.loads((out / 'report.json').read_text())
  assert report['at_val_threshold']['threshold'] == pytest.approx(threshold)
  assert report['threshold_rule'] == metrics.RULES['youden_with_shifts'].text
  code, _, stderr = run_program('trainer.shift', f'--model_dir={model_dir}',
                                 f'--out={tmp_path}/s.json', '--threshold_rule=youden_with_shifts')
  assert code == 0, stderr
  assert json.loads((tmp_path / 's.json').read_text())['threshold'] == pytest.approx(threshold)


def test_cli_holds_the_runs_stored_threshold(untrained_run, synthetic_data_dir, tmp_path, run_program):
  # A stored threshold at the median validation probability, where 0.5 would label the split differently.
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  probe = runs_lib.load_run(str(untrained_run(SIZE, seed=3)))
  plain = runs_lib.predict_runs([probe], builder, 'validation')
  threshold = float(np.median(plain['probs']))
  at_stored = metrics.metrics_at(plain['labels'], plain['probs'], threshold)
  assert at_stored['confusion_matrix'] != metrics.metrics_at(plain['labels'], plain['probs'], 0.5)['confusion_matrix']
  model_dir = untrained_run(SIZE, seed=3, threshold=threshold)  # The same weights: the same seed.

  out = tmp_path / 'shift.json'
  code, _, stderr = run_program('trainer.shift', f'--model_dir={model_dir}', f'--out={out}')
  assert code == 0, stderr
  result = json.loads(out.read_text())
  assert result['threshold'] == pytest.approx(threshold)
  assert result['shifts']['none']['specificity'] == pytest.approx(at_stored['specificity'])
  assert result['shifts']['none']['sensitivity'] == pytest.approx(at_stored['sensitivity'])


def _without(untrained_run, folder, family, *, trained_on=None, seed=0):
  """A run in folder/without-FAMILY whose config.json says it trained on every family but FAMILY (or `trained_on`)."""
  run_dir = untrained_run(SIZE, seed=seed)
  run = json.loads((run_dir / 'run.json').read_text())
  run['config']['augment_families'] = ','.join(trained_on or [f for f in config_lib.FAMILIES if f != family])
  (run_dir / 'run.json').write_text(json.dumps(run))
  target = folder / f'without-{family}'
  run_dir.rename(target)
  return target


@pytest.fixture(scope='module')
def lofo_runs(untrained_run, tmp_path_factory):
  """A leave-one-family-out folder: one run without each family, each a different model (seed), so that each
  family's number can only come from its own run. Returns {family: run dir}; copy the folder to change it."""
  folder = tmp_path_factory.mktemp('lofo')
  return {family: _without(untrained_run, folder, family, seed=i) for i, family in enumerate(shift.FAMILIES)}


def test_leave_one_family_out_scores_each_family_with_the_run_that_never_saw_it(lofo_runs, model_dir,
                                                                                  synthetic_data_dir, tmp_path,
                                                                                  run_program):
  dirs = lofo_runs
  folder = dirs[shift.FAMILIES[0]].parent
  out = tmp_path / 'shift.json'
  code, stdout, stderr = run_program('trainer.shift', f'--model_dir={model_dir}', f'--out={out}',
                                      f'--leave_one_out={folder}')
  assert code == 0, stderr
  lofo = json.loads(out.read_text())['leave_one_out']
  assert list(lofo['families']) == list(shift.FAMILIES)
  scored = sorted(name for row in lofo['families'].values() for name in row['shifts'])
  assert scored == sorted(shift.SHIFT_FAMILIES)

  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  family = 'gamma'
  run = runs_lib.load_run(str(dirs[family]))
  aucs, normals_shifted = [], []
  plain = runs_lib.predict_runs([run], builder, 'validation')
  for name in ('darker (gamma 1.5)', 'brighter (gamma 0.67)'):
    predictions = runs_lib.predict_runs([run], builder, 'validation',
                                        transform=lambda images, name=name: shift.apply(name, images))
    aucs.append(metrics.ranking_metrics(predictions['labels'], predictions['probs'])['roc_auc'])
    normals_shifted.append(shift.normals_shifted_auc(plain, predictions))
  assert lofo['families'][family]['roc_auc'] == pytest.approx(min(aucs))
  assert lofo['families'][family]['roc_auc_normals_shifted'] == pytest.approx(min(normals_shifted))
  assert lofo['families'][family]['members'] == [str(dirs[family])]
  rows = {name: row['roc_auc'] for name, row in lofo['families'].items()}
  assert len(set(rows.values())) > 1  # Other runs, other numbers.
  normals = {name: row['roc_auc_normals_shifted'] for name, row in lofo['families'].items()}
  assert lofo['worst'] == {'family': min(rows, key=rows.get), 'roc_auc': min(rows.values()),
                           'normals_shifted_family': min(normals, key=normals.get),
                           'roc_auc_normals_shifted': min(normals.values())}
  assert lofo['mean_roc_auc'] == pytest.approx(np.mean(list(rows.values())))
  assert lofo['mean_roc_auc_normals_shifted'] == pytest.approx(np.mean(list(normals.values())))
  assert f'| **worst: {lofo["worst"]["family"]}** / **{lofo["worst"]["normals_shifted_family"]}** |' in stdout


def test_leave_one_family_out_refuses_a_missing_family_or_a_run_that_saw_its_family(lofo_runs, untrained_run,
                                                                                         tmp_path):
  folder = tmp_path / 'lofo'
  shutil.copytree(lofo_runs[shift.FAMILIES[0]].parent, folder)
  shutil.rmtree(folder / f'without-{shift.FAMILIES[0]}')
  # Both are refused before anything is predicted, so no builder is needed to see it.
  with pytest.raises(ValueError) as missing:
    families.leave_one_family_out(families.load_runs_without(str(folder)), None, 'validation')
  assert str(missing.value) == (
      f'Leave-one-family-out needs runs trained without each of {", ".join(shift.FAMILIES)}; none without '
      f'{shift.FAMILIES[0]}.')
  saw = _without(untrained_run, folder, shift.FAMILIES[0], trained_on=list(shift.FAMILIES))
  with pytest.raises(ValueError, match=f'^{saw} trained with the {shift.FAMILIES[0]} augmentation'):
    families.leave_one_family_out(families.load_runs_without(str(folder)), None, 'validation')


def test_normals_shifted_auc_shifts_one_class_and_refuses_other_images():
  labels = np.array([0, 0, 1, 1])
  plain = {'labels': labels, 'probs': np.array([0.1, 0.2, 0.8, 0.9])}
  # Every image pushed the same way keeps its rank; only the normals pushed up overtake the pneumonia images.
  shifted = {'labels': labels, 'probs': np.array([0.85, 0.88, 0.9, 0.97])}
  assert metrics.ranking_metrics(labels, shifted['probs'])['roc_auc'] == 1.0
  # The (normal, pneumonia) pairs: 0.85 and 0.88 each rank above 0.8 and below 0.9.
  assert shift.normals_shifted_auc(plain, shifted) == 0.5
  assert shift.normals_shifted_auc(plain, plain) == 1.0
  with pytest.raises(ValueError, match='not of the same images'):
    shift.normals_shifted_auc(plain, {'labels': labels[::-1], 'probs': shifted['probs']})
