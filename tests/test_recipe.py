"""Tests for launch/recipe.sh: the from-scratch recipe's commands, its errors, and one tiny run end to end.

The end-to-end run uses the synthetic config with the recipe's settings shrunk through its environment overrides, so
it checks the plumbing (build -> train cnn from scratch -> validation threshold -> report.json), not the accuracy.
"""

import json
import os
import pathlib
import shlex
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'recipe.sh'


def _recipe(*args, env=None, timeout=120):
  return subprocess.run(['bash', str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def _flags(command_line):
  """The --name=value flags of one printed command, as a dict (a repeated flag keeps its last value, like absl)."""
  return dict(word[2:].split('=', 1) for word in shlex.split(command_line) if word.startswith('--') and '=' in word)


def test_dry_run_builds_then_trains_the_cnn_from_scratch(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  done = _recipe(manual, tmp_path / 'out', env={'DRY_RUN': '1', 'DATA_DIR': '/data/tfds'})
  assert done.returncode == 0, done.stderr
  build, train = done.stdout.strip().splitlines()
  assert build.startswith('python -m cxr_tfds.build ')
  assert _flags(build) == {'config': '224', 'manual_dir': str(manual), 'data_dir': '/data/tfds'}
  assert train.startswith('python -m trainer.main ')
  flags = _flags(train)
  assert flags['model'] == 'cnn' and flags['weights'] == 'none'
  assert flags['dataset'] == 'chest_xray_pneumonia/224'
  assert flags['data_dir'] == '/data/tfds' and 'manual_dir' not in flags
  assert flags['model_dir'] == str(tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_environment_and_extra_flags_override_the_recipe(tmp_path):
  done = _recipe(tmp_path, tmp_path / 'out', '--epochs=1', '--horizontal_flip',
                 env={'DRY_RUN': '1', 'IMAGE_SIZE': '96', 'EQUALIZE': 'clahe', 'CONFIG': '512'})
  assert done.returncode == 0, done.stderr
  build, train = done.stdout.strip().splitlines()
  assert _flags(build)['config'] == '512' and 'data_dir' not in _flags(build)
  words = shlex.split(train)
  flags = _flags(train)
  assert flags['image_size'] == '96' and flags['equalize'] == 'clahe'
  assert flags['dataset'] == 'chest_xray_pneumonia/512'
  # The recipe's own --epochs stays in the command; absl keeps the last value given.
  assert [word for word in words if word.startswith('--epochs=')][-1] == '--epochs=1'
  assert flags['epochs'] == '1'
  assert words[-1] == '--horizontal_flip'


def test_missing_arguments_or_manual_dir_fail_on_one_line(tmp_path):
  usage = _recipe(tmp_path)
  assert usage.returncode == 2 and usage.stderr.startswith('usage:')
  missing = _recipe(tmp_path / 'nowhere', tmp_path / 'out')
  assert missing.returncode == 1
  assert missing.stderr.strip() == (f'error: MANUAL_DIR={tmp_path / "nowhere"} does not exist: put the Kaggle or '
                                    'Mendeley download there (see BUILD.md).')
  assert not (tmp_path / 'out').exists()


def test_tiny_synthetic_recipe_writes_report_and_validation_threshold(tmp_path):
  out = tmp_path / 'out'
  env = {'CONFIG': 'synthetic', 'DATA_DIR': str(tmp_path / 'tfds'), 'IMAGE_SIZE': '32', 'CNN_FILTERS': '4',
         'CNN_DEPTH': '2', 'EPOCHS': '1', 'DECAY_EPOCHS': '1', 'BATCH_SIZE': '64'}
  done = _recipe(tmp_path / 'unused', out, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'recipe: ' in done.stdout

  run = json.loads((out / 'run.json').read_text())
  assert run['config']['model'] == 'cnn' and run['config']['weights'] == 'none'
  assert run['config']['epochs'] == 1 and run['config']['fine_tune_epochs'] == 1
  assert run['image_size'] == 32
  assert 0.0 < run['threshold'] < 1.0

  report = json.loads((out / 'report.json').read_text())
  assert report['model'] == 'cnn' and report['dataset'] == 'chest_xray_pneumonia/synthetic'
  # The synthetic test split: 30 normal and 90 pneumonia images.
  assert report['n_images'] == 120 and report['positives'] == 90
  assert report['at_val_threshold']['threshold'] == run['threshold']
  (tn, fp), (fn, tp) = report['at_val_threshold']['confusion_matrix']
  assert tn + fp == 30 and fn + tp == 90
  assert 0.0 <= report['ranking']['roc_auc'] <= 1.0
