#!/usr/bin/env python3
"""Runs a grid of trainings as sibling runs of one sweep folder, to compare in TensorBoard's HParams dashboard.

    python launch/sweep.py --sweep_dir=runs/sweep --dry_run
    python launch/sweep.py --sweep_dir=runs/sweep -- --dataset=chest_xray_pneumonia/224 --manual_dir=~/chest-xray
    tensorboard --logdir=runs/sweep

The default grid is the seed's experiments on resnet50: --unfreeze 5 vs 10, --optimizer adam vs nadam, and --dropout
0.2, 0.3, 0.4, 0.5: 16 runs. Each run is `python -m trainer.main` with its own model_dir under SWEEP_DIR, named after
its values (e.g. unfreeze_5-optimizer_adam-dropout_0.2). The trainer logs each run's flags there with `hp.hparams`,
and its epoch scalars in the run's train/ and validation/ folders. This script writes the experiment's
`hp.hparams_config` at SWEEP_DIR: it tells the HParams dashboard which hyperparameters and which metrics to tabulate
(the last epoch's validation auc, pr_auc, loss and accuracy, and the training loss and auc).

Runs go one after the other, since each may take every GPU of the machine. A run whose model_dir holds report.json has
finished and is skipped, so a sweep started again continues where it stopped (an interrupted run resumes from its
checkpoint). A failed run does not stop the others; the exit code is 1 if any failed. Flags after `--` go to every
run, after the sweep's own, so they win (e.g. `-- --model=vgg16`).
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

from trainer import config as config_lib

# The swept flags, in the order they appear in run names and commands, and how to read their values.
SWEPT = {'unfreeze': int, 'optimizer': str, 'dropout': float}
DEFAULT_GRID = {'unfreeze': [5, 10], 'optimizer': ['adam', 'nadam'], 'dropout': [0.2, 0.3, 0.4, 0.5]}
# Flags every run gets before the user's: the grid's unfreeze only means something for a pretrained backbone.
BASE_FLAGS = ['--model=resnet50']
# Config fields also shown as HParams columns (without a domain), so that sweeps with other fixed settings can be
# told apart in one dashboard.
FIXED_HPARAMS = ('model', 'dataset', 'image_size', 'batch_size', 'learning_rate', 'fine_tune_learning_rate', 'epochs',
                 'fine_tune_epochs', 'equalize', 'seed')
# (group, tag): the run subfolder and the scalar tag trainer.train writes each epoch.
METRICS = (('validation', 'auc'), ('validation', 'pr_auc'), ('validation', 'loss'), ('validation', 'accuracy'),
           ('train', 'loss'), ('train', 'auc'))


def run_name(values: dict) -> str:
  """The model_dir name of one grid point, e.g. 'unfreeze_5-optimizer_adam-dropout_0.2'."""
  return '-'.join(f'{name}_{value}' for name, value in values.items())


def grid_points(grid: dict[str, list]) -> list[dict]:
  """Every combination of the grid's values, the last flag varying fastest."""
  points = [{}]
  for name, values in grid.items():
    points = [{**point, name: value} for point in points for value in values]
  return points


def commands(sweep_dir: str, grid: dict[str, list], trainer_flags: list[str]) -> list[tuple[str, list[str]]]:
  """The trainer command of every grid point.

  Args:
    sweep_dir: the sweep's folder; each run's model_dir is a subfolder.
    grid: {flag: values} for the flags in SWEPT.
    trainer_flags: flags for every run, placed last so they win.

  Returns:
    [(model_dir, command)] in grid order.
  """
  runs = []
  for values in grid_points(grid):
    model_dir = os.path.join(sweep_dir, run_name(values))
    runs.append((model_dir, [sys.executable, '-m', 'trainer.main', *BASE_FLAGS, f'--model_dir={model_dir}',
                             *(f'--{name}={value}' for name, value in values.items()), *trainer_flags]))
  return runs


def write_hparams_config(sweep_dir: str, grid: dict[str, list]) -> None:
  """Writes the experiment summary (hyperparameters and metrics) that the HParams dashboard reads at the logdir root."""
  # Imported here: TensorBoard's summary API loads TensorFlow, which a dry run does not need.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=import-outside-toplevel

  hparams = [hp.HParam(name, hp.Discrete(values)) for name, values in grid.items()]
  hparams += [hp.HParam(name) for name in FIXED_HPARAMS]
  metrics = [hp.Metric(tag, group=group, display_name=f'{group}/{tag}') for group, tag in METRICS]
  with tf.summary.create_file_writer(sweep_dir).as_default():
    hp.hparams_config(hparams=hparams, metrics=metrics)


def _parse_grid(args) -> dict[str, list]:
  grid = {}
  for name, parse in SWEPT.items():
    try:
      values = [parse(value) for value in getattr(args, name).split(',')]
    except ValueError:
      raise ValueError(f'--{name}={getattr(args, name)} must be a comma-separated list of {parse.__name__} '
                       'values.') from None
    if len(set(values)) != len(values):
      raise ValueError(f'--{name}={getattr(args, name)} repeats a value.')
    grid[name] = values
  if bad := [o for o in grid['optimizer'] if o not in config_lib.OPTIMIZERS]:
    raise ValueError(f'--optimizer: {", ".join(bad)} is not one of {", ".join(config_lib.OPTIMIZERS)}.')
  if bad := [d for d in grid['dropout'] if not 0 <= d < 1]:
    raise ValueError(f'--dropout: {", ".join(map(str, bad))} is not in [0, 1).')
  if bad := [u for u in grid['unfreeze'] if u < 0]:
    raise ValueError(f'--unfreeze: {", ".join(map(str, bad))} is negative.')
  return grid


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, trainer_flags = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   usage='%(prog)s --sweep_dir=DIR [options] -- [trainer flags]')
  parser.add_argument('--sweep_dir', required=True, help='the folder of the sweep: one model_dir per run inside')
  for name, values in DEFAULT_GRID.items():
    parser.add_argument(f'--{name}', default=','.join(map(str, values)),
                        help=f'comma-separated values of --{name} (default: %(default)s)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands and write nothing')
  args = parser.parse_args(ours)
  try:
    grid = _parse_grid(args)
  except ValueError as e:
    parser.error(str(e))
  runs = commands(args.sweep_dir, grid, trainer_flags)
  if args.dry_run:
    for _, command in runs:
      print(shlex.join(command))
    return 0

  os.makedirs(args.sweep_dir, exist_ok=True)
  write_hparams_config(args.sweep_dir, grid)
  failed = []
  for i, (model_dir, command) in enumerate(runs, 1):
    if os.path.exists(os.path.join(model_dir, 'report.json')):
      print(f'[sweep] {i}/{len(runs)} {model_dir}: finished before, skipped.', flush=True)
      continue
    print(f'[sweep] {i}/{len(runs)} {shlex.join(command)}', flush=True)
    start = time.monotonic()
    code = subprocess.run(command, check=False).returncode
    print(f'[sweep] {i}/{len(runs)} {model_dir}: exit code {code} after {time.monotonic() - start:.0f}s.', flush=True)
    if code:
      failed.append(model_dir)
  if failed:
    print(f'[sweep] {len(failed)} of {len(runs)} runs failed: {", ".join(failed)}', file=sys.stderr)
  print(f'[sweep] Compare the runs: tensorboard --logdir={shlex.quote(args.sweep_dir)} (HPARAMS tab).', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print('[sweep] interrupted; started again, it skips the finished runs and resumes the interrupted one.',
          file=sys.stderr)
    sys.exit(130)
