"""Tests for launch/recipe.sh: the from-scratch recipe's commands, its errors, and one tiny run end to end.

The end-to-end run uses the synthetic config with the recipe's settings shrunk through its environment overrides, so
it checks the plumbing (build -> train the cnn from scratch, once per seed -> the ensemble's export with its
validation threshold, report.json and model card -> the stress test of the export), not the accuracy.
"""

import json
import os
import pathlib
import shlex
import subprocess

import conftest
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from trainer import config as config_lib
from trainer import metrics
from trainer import shift

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'recipe.sh'


def _recipe(*args, env=None, timeout=120):
  return subprocess.run(['bash', str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def _flags(command_line):
  """The --name=value flags of one printed command, as a dict (a repeated flag keeps its last value, like absl)."""
  return dict(word[2:].split('=', 1) for word in shlex.split(command_line) if word.startswith('--') and '=' in word)


def test_dry_run_builds_trains_each_seed_then_reports_their_ensemble(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  out = tmp_path / 'out'
  done = _recipe(manual, out, env={'DRY_RUN': '1', 'DATA_DIR': '/data/tfds'})
  assert done.returncode == 0, done.stderr
  build, *trains, report, stress = done.stdout.strip().splitlines()
  assert build.startswith('python -m cxr_tfds.build ')
  assert _flags(build) == {'config': '224', 'manual_dir': str(manual), 'data_dir': '/data/tfds'}
  assert len(trains) == 2
  for seed, train in zip((1, 2), trains):
    assert train.startswith('python -m trainer.main ')
    flags = _flags(train)
    assert flags['model'] == 'cnn' and flags['weights'] == 'none'
    assert flags['dataset'] == 'chest_xray_pneumonia/224'
    assert flags['data_dir'] == '/data/tfds' and 'manual_dir' not in flags
    assert flags['model_dir'] == str(out / f'seed-{seed}') and flags['seed'] == str(seed)
    assert flags['lr_schedule'] == 'cosine' and flags['equalize'] == 'clahe'
    # Every family, each at least as wide as the stress test's shift of it.
    assert flags['augment_families'].split(',') == list(config_lib.FAMILIES)
    assert (flags['augment_fov'], flags['augment_contrast'], flags['augment_noise']) == ('0.15', '0.3', '8')
  members = f'{out}/seed-1,{out}/seed-2'
  assert report.startswith('python -m trainer.export ')
  assert _flags(report) == {'model_dir': members, 'out_dir': f'{out}/model', 'threshold_rule': 'youden_with_shifts'}
  assert stress.startswith('python -m trainer.shift ')
  # The exported model, at the threshold stored with it.
  assert _flags(stress) == {'model_dir': f'{out}/model', 'split': 'validation', 'out': f'{out}/shift_validation.json'}
  assert not out.exists()


def test_leave_one_out_trains_one_run_without_each_stress_family_and_scores_each_family_with_it(tmp_path):
  out = tmp_path / 'out'
  done = _recipe(tmp_path, out, env={'DRY_RUN': '1', 'LEAVE_ONE_OUT': '1', 'SEEDS': '3 4'})
  assert done.returncode == 0, done.stderr
  _, *trains, _, stress = done.stdout.strip().splitlines()
  lofo = [_flags(train) for train in trains[2:]]
  assert [flags['model_dir'] for flags in lofo] == [str(out / 'lofo' / f'without-{family}')
                                                    for family in shift.FAMILIES]
  for family, flags in zip(shift.FAMILIES, lofo):
    assert flags['augment_families'].split(',') == [f for f in config_lib.FAMILIES if f != family]
    assert flags['seed'] == '3'  # The first seed's run, but for the family.
  assert _flags(stress)['leave_one_out'] == str(out / 'lofo')


def test_environment_and_extra_flags_override_the_recipe(tmp_path):
  done = _recipe(tmp_path, tmp_path / 'out', '--epochs=1', '--horizontal_flip',
                 env={'DRY_RUN': '1', 'IMAGE_SIZE': '96', 'EQUALIZE': 'none', 'CONFIG': '512', 'SEEDS': '7',
                      'AUGMENT_STRENGTH': '2', 'LR_SCHEDULE': 'constant', 'THRESHOLD_RULE': 'youden'})
  assert done.returncode == 0, done.stderr
  build, train, report, _ = done.stdout.strip().splitlines()
  assert _flags(build)['config'] == '512' and 'data_dir' not in _flags(build)
  words = shlex.split(train)
  flags = _flags(train)
  assert flags['image_size'] == '96' and flags['equalize'] == 'none' and flags['seed'] == '7'
  assert flags['augment_strength'] == '2' and flags['lr_schedule'] == 'constant'
  assert flags['dataset'] == 'chest_xray_pneumonia/512'
  # The recipe's own --epochs stays in the command; absl keeps the last value given.
  assert [word for word in words if word.startswith('--epochs=')][-1] == '--epochs=1'
  assert flags['epochs'] == '1'
  assert words[-1] == '--horizontal_flip'
  assert _flags(report)['model_dir'] == str(tmp_path / 'out' / 'seed-7')
  assert _flags(report)['threshold_rule'] == 'youden'


def test_missing_arguments_manual_dir_or_seeds_fail_on_one_line(tmp_path):
  usage = _recipe(tmp_path)
  assert usage.returncode == 2 and usage.stderr.startswith('usage:')
  missing = _recipe(tmp_path / 'nowhere', tmp_path / 'out')
  assert missing.returncode == 1
  assert missing.stderr.strip() == (f'error: MANUAL_DIR={tmp_path / "nowhere"} does not exist: put the Kaggle or '
                                    'Mendeley download there (see BUILD.md).')
  no_seeds = _recipe(tmp_path, tmp_path / 'out', env={'SEEDS': ' '})
  assert no_seeds.returncode == 1
  assert no_seeds.stderr.strip() == "error: SEEDS is empty: give one seed or more, e.g. SEEDS='1 2'."
  assert not (tmp_path / 'out').exists()


def test_tiny_synthetic_recipe_writes_the_ensemble_report_and_stress_test(synthetic_data_dir, tmp_path):
  out = tmp_path / 'out'
  # The session's synthetic build: the recipe's build step finds it made and goes on (building it is
  # tests/test_dataset_builder.py's).
  env = {'CONFIG': 'synthetic', 'DATA_DIR': synthetic_data_dir, 'IMAGE_SIZE': '32', 'CNN_FILTERS': '4',
         'CNN_DEPTH': '2', 'EPOCHS': '1', 'BATCH_SIZE': '128'}
  done = _recipe(tmp_path / 'unused', out, env=env, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'recipe: ' in done.stdout

  thresholds = []
  for seed in (1, 2):
    run = json.loads((out / f'seed-{seed}' / 'run.json').read_text())
    assert run['config']['model'] == 'cnn' and run['config']['weights'] == 'none'
    assert run['config']['seed'] == seed and run['config']['lr_schedule'] == 'cosine'
    assert run['config']['epochs'] == 1 and run['config']['fine_tune_epochs'] == 0
    assert run['image_size'] == 32
    thresholds.append(run['threshold'])

  report = json.loads((out / 'model' / 'report.json').read_text())
  assert report['dataset'] == 'chest_xray_pneumonia/synthetic' and report['split'] == 'test'
  assert report['ensemble']['members'] == [str(out / 'seed-1'), str(out / 'seed-2')]
  assert report['ensemble']['member_thresholds'] == thresholds
  # The synthetic test split: 30 normal and 90 pneumonia images.
  assert report['n_images'] == 120 and report['positives'] == 90
  assert 0.0 < report['at_val_threshold']['threshold'] < 1.0
  (tn, fp), (fn, tp) = report['at_val_threshold']['confusion_matrix']
  assert tn + fp == 30 and fn + tp == 90
  # The report's numbers are the members' mean probability on the test split, computed here again.
  labels, probs = conftest.reference_predictions([out / 'seed-1', out / 'seed-2'], synthetic_data_dir)
  assert report['ranking']['roc_auc'] == pytest.approx(sk_metrics.roc_auc_score(labels, probs), abs=1e-6)
  predicted = probs >= report['at_val_threshold']['threshold']
  assert tp == int(np.sum(predicted & (labels == 1))) and tn == int(np.sum(~predicted & (labels == 0)))

  assert report['threshold_rule'] == metrics.RULES['youden_with_shifts'].text
  assert report['operating_point']['threshold_rule'] == 'youden_with_shifts'
  assert json.loads((out / 'model' / 'run.json').read_text())['threshold'] == report['at_val_threshold']['threshold']
  assert (out / 'model' / 'saved_model' / '1' / 'saved_model.pb').is_file()
  assert 'youden_with_shifts' in (out / 'model' / 'model_card.md').read_text()
  stress = json.loads((out / 'shift_validation.json').read_text())
  assert stress['threshold'] == report['at_val_threshold']['threshold'] and stress['split'] == 'validation'
  # The export's own threshold and rule, not chosen again.
  assert (stress['threshold_rule'], stress['threshold_chosen']) == ('youden_with_shifts', 'stored')
  assert '| **worst** |' in (out / 'shift_validation.md').read_text()
