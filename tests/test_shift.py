"""Tests for trainer.shift: each shift does what its name says, and the stress test reports every one."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from trainer import data
from trainer import metrics
from trainer import runs as runs_lib
from trainer import shift

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def test_cli_reports_every_shift_and_the_unshifted_row_matches_evaluate(model_dir, synthetic_data_dir, tmp_path):
  out = tmp_path / 'shift.json'
  done = subprocess.run([sys.executable, '-m', 'trainer.shift', f'--model_dir={model_dir}', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  result = json.loads(out.read_text())
  assert list(result['shifts']) == list(shift.SHIFTS) and result['split'] == 'validation'
  assert all(f'| {name} |' in done.stdout for name in shift.SHIFTS)

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

  done = subprocess.run([sys.executable, '-m', 'trainer.shift', f'--model_dir={model_dir}', '--split=val'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith('error: --split=val is not a split of')


def test_threshold_with_shifts_weighs_the_unshifted_split_as_much_as_all_shifts(model_dir, synthetic_data_dir,
                                                                                 tmp_path):
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
  done = subprocess.run([sys.executable, '-m', 'trainer.evaluate', f'--model_dir={model_dir}', f'--out_dir={out}',
                         '--threshold_rule=youden_with_shifts', '--n_resamples=50'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  report = json.loads((out / 'report.json').read_text())
  assert report['at_val_threshold']['threshold'] == pytest.approx(threshold)
  assert report['threshold_rule'] == shift.THRESHOLD_RULE
  done = subprocess.run([sys.executable, '-m', 'trainer.shift', f'--model_dir={model_dir}', f'--out={tmp_path}/s.json',
                         '--threshold_rule=youden_with_shifts'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert json.loads((tmp_path / 's.json').read_text())['threshold'] == pytest.approx(threshold)


def test_cli_holds_the_runs_stored_threshold(untrained_run, synthetic_data_dir, tmp_path):
  # A stored threshold at the median validation probability, where 0.5 would label the split differently.
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  probe = runs_lib.load_run(str(untrained_run(SIZE, seed=3)))
  plain = runs_lib.predict_runs([probe], builder, 'validation')
  threshold = float(np.median(plain['probs']))
  at_stored = metrics.metrics_at(plain['labels'], plain['probs'], threshold)
  assert at_stored['confusion_matrix'] != metrics.metrics_at(plain['labels'], plain['probs'], 0.5)['confusion_matrix']
  model_dir = untrained_run(SIZE, seed=3, threshold=threshold)  # The same weights: the same seed.

  out = tmp_path / 'shift.json'
  done = subprocess.run([sys.executable, '-m', 'trainer.shift', f'--model_dir={model_dir}', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  result = json.loads(out.read_text())
  assert result['threshold'] == pytest.approx(threshold)
  assert result['shifts']['none']['specificity'] == pytest.approx(at_stored['specificity'])
  assert result['shifts']['none']['sensitivity'] == pytest.approx(at_stored['sensitivity'])
