"""Tests for launch/sweep.py: the commands it runs, the HParams experiment it writes, skipping and failures."""

import dataclasses
import importlib.util
import itertools
import pathlib
import shlex
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'sweep.py'

_spec = importlib.util.spec_from_file_location('sweep', SCRIPT)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _flags(command):
  return dict(arg[2:].split('=', 1) for arg in command if arg.startswith('--'))


def test_dry_run_prints_the_grid_and_writes_nothing(tmp_path):
  sweep_dir = tmp_path / 'sweep'
  done = subprocess.run([sys.executable, str(SCRIPT), f'--sweep_dir={sweep_dir}', '--dry_run', '--',
                         '--epochs=1', '--model=vgg16'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  commands = [shlex.split(line) for line in done.stdout.splitlines()]
  assert len(commands) == 16
  assert all(c[1:3] == ['-m', 'trainer.main'] and c[-2:] == ['--epochs=1', '--model=vgg16'] for c in commands)
  flags = [_flags(c) for c in commands]
  combos = {(f['unfreeze'], f['optimizer'], f['dropout']) for f in flags}
  assert combos == set(itertools.product(['5', '10'], ['adam', 'nadam'], ['0.2', '0.3', '0.4', '0.5']))
  assert {f['model_dir'] for f in flags} == {str(sweep_dir / f'unfreeze_{u}-optimizer_{o}-dropout_{d}')
                                             for u, o, d in combos}
  # The user's --model comes after the sweep's own, and absl keeps the last value.
  assert commands[0].index('--model=resnet50') < commands[0].index('--model=vgg16')
  assert not sweep_dir.exists()


def test_bad_grid_values_fail_before_any_run(tmp_path):
  done = subprocess.run([sys.executable, str(SCRIPT), f'--sweep_dir={tmp_path}', '--optimizer=adam,rmsprop',
                         '--dry_run'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].endswith('--optimizer: rmsprop is not one of adam, nadam, sgd.')
  with pytest.raises(SystemExit):
    sweep.main([f'--sweep_dir={tmp_path}', '--dropout=0.2,1.5', '--dry_run'])


def test_hparams_config_is_readable_and_names_config_fields(tmp_path):
  grid = {'unfreeze': [5, 10], 'optimizer': ['adam', 'nadam'], 'dropout': [0.2, 0.5]}
  sweep.write_hparams_config(str(tmp_path), grid)
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert '_hparams_/experiment' in events.Tags()['tensors']
  content = events.SummaryMetadata('_hparams_/experiment').plugin_data.content
  experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
  hparams = {h.name: h for h in experiment.hparam_infos}
  assert [v.string_value for v in hparams['optimizer'].domain_discrete.values] == ['adam', 'nadam']
  assert [v.number_value for v in hparams['unfreeze'].domain_discrete.values] == [5, 10]
  assert [v.number_value for v in hparams['dropout'].domain_discrete.values] == [0.2, 0.5]
  # The trainer logs every Config field with hp.hparams; the dashboard matches them by name.
  assert set(hparams) <= {field.name for field in dataclasses.fields(Config)}
  metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
  assert {('validation', 'auc'), ('validation', 'pr_auc'), ('train', 'loss')} <= metrics


def test_runs_skip_finished_ones_and_report_failures(tmp_path, monkeypatch, capsys):
  finished = tmp_path / 'unfreeze_5-optimizer_adam-dropout_0.3'
  finished.mkdir()
  (finished / 'report.json').write_text('{}')
  ran = []

  def fake_run(command, check):
    ran.append(_flags(command)['model_dir'])
    return subprocess.CompletedProcess(command, 3 if 'nadam' in ran[-1] else 0)

  monkeypatch.setattr(sweep.subprocess, 'run', fake_run)
  code = sweep.main([f'--sweep_dir={tmp_path}', '--unfreeze=5', '--dropout=0.3', '--', '--epochs=1'])
  assert code == 1
  assert ran == [str(tmp_path / 'unfreeze_5-optimizer_nadam-dropout_0.3')]
  out, err = capsys.readouterr()
  assert 'finished before, skipped' in out and '1 of 2 runs failed' in err
  assert list(tmp_path.glob('events.out.tfevents.*'))
