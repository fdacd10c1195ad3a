r"""`python -m trainer.export`: one run, or several as their ensemble, as one deployable model with its threshold.

    python -m trainer.export --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble
    python -m trainer.export --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble \
        --threshold_rule=youden_with_shifts

The library it runs is `trainer.export` (trainer/export/__init__.py).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import errors
from trainer import export
from trainer import lock
from trainer import runs as runs_lib
from trainer import tflite
from trainer import tta

cli.define_run_flags('The --model_dir of a finished run, or several (DIR1,DIR2,...) to export their ensemble (the '
                     'mean probability).', report=True)
flags.DEFINE_string('out_dir', None, 'Where the export goes (its current/, exports/N/ and links to them).',
                    required=True)

FLAGS = flags.FLAGS


def _command() -> str:
  return ' '.join(['python -m trainer.export', *sys.argv[1:]])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  out_dir = os.path.expanduser(FLAGS.out_dir)
  dirs = [os.path.expanduser(d) for d in FLAGS.model_dir]
  if os.path.abspath(out_dir) in {os.path.abspath(d) for d in dirs} and len(dirs) > 1:
    raise errors.InvalidValue(f'--out_dir={out_dir} is one of the members: give the ensemble a folder of its own.')
  os.makedirs(out_dir, exist_ok=True)
  # Held from the start: a second writer (a training run, another export) is refused now, not after minutes of work.
  with lock.hold(out_dir, what='export', flag='--out_dir'):
    _export(out_dir, dirs)


def _export(out_dir: str, dirs: list[str]) -> None:
  """The export of the runs in `dirs` into out_dir, whose lock the caller holds."""
  runs = runs_lib.Runs.load(dirs, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, batch_size=FLAGS.batch_size)
  # The exported model carries the views, so predict and TF Serving average over them too.
  one = runs.as_one(out_dir, tta=FLAGS.tta)
  run = one.members[0]
  point = one.operating_point(FLAGS.threshold_rule)
  dataset = one.dataset
  test = one.predict(one.builder(), 'test')
  members = {'members': [r.model_dir for r in runs.members],
             'member_thresholds': [r.threshold for r in runs.members]}
  views = {'tta_views': list(tta.VIEWS[:FLAGS.tta])} if FLAGS.tta > 1 else {}
  info = {'config': run.config, 'command': _command(), **views,
          **(members if len(runs.members) > 1 else {'exported_from': run.model_dir})}
  report = export.write_export(
      out_dir, run.model, image_size=run.image_size, threshold=point['threshold'],
      threshold_rule=point['threshold_rule'], test_predictions=test, run_info=info,
      extra={'model': run.config.get('model'), 'dataset': dataset, 'image_size': run.image_size, 'split': 'test',
             **views, **({'ensemble': members} if len(runs.members) > 1 else {})},
      n_resamples=FLAGS.n_resamples, tensorboard_dir=os.path.join(out_dir, 'test'), stress=point.get('stress'),
      sample_images=tflite.sample_images(one.builder(), run.image_size))
  at = report['at_val_threshold']
  logging.info('Exported %s: threshold %.4f (%s); test ROC AUC %.3f, sensitivity %.3f, specificity %.3f.',
               export.current_dir(out_dir), point['threshold'], point['threshold_rule'], report['ranking']['roc_auc'],
               at['sensitivity'], at['specificity'])


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main, progress=True)


if __name__ == '__main__':
  run()
