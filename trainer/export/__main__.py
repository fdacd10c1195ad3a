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
from trainer import data
from trainer import export
from trainer import runs as runs_lib
from trainer import tta

flags.DEFINE_list('model_dir', None, 'The --model_dir of a finished run, or several (DIR1,DIR2,...) to export '
                  'their ensemble (the mean probability).', required=True)
flags.DEFINE_string('out_dir', None, 'Where the export goes (its current/, exports/N/ and links to them).',
                    required=True)
runs_lib.define_operating_point_flags()
flags.DEFINE_string('data_dir', None, 'Where TFDS keeps built datasets (default: the first run\'s).')
flags.DEFINE_string('manual_dir', None, 'The downloaded data, if the dataset is not built yet (default: the run\'s).')
flags.DEFINE_integer('batch_size', 32, 'Images per prediction batch.', lower_bound=1)
flags.DEFINE_integer('n_resamples', 1000, 'Bootstrap resamples (of patients) for the 95% intervals.', lower_bound=1)

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
  runs = [runs_lib.load_run(d) for d in dirs]
  run = runs[0]
  if len(runs) > 1:
    run = runs_lib.TrainedRun(model_dir=out_dir, model=export.ensemble_model([r.model for r in runs]),
                              image_size=runs[0].image_size, threshold=float('nan'), config=runs[0].config,
                              threshold_rule=None)
    runs_lib.run_dataset(runs)
  # The exported model carries the views, so predict and TF Serving average over them too.
  run = runs_lib.with_tta([run], FLAGS.tta)[0]
  data_dir = os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else run.config.get('data_dir')
  manual_dir = os.path.expanduser(FLAGS.manual_dir) if FLAGS.manual_dir else run.config.get('manual_dir')
  point = runs_lib.operating_point([run], FLAGS.threshold_rule, data_dir=data_dir, manual_dir=manual_dir,
                                   batch_size=FLAGS.batch_size)
  dataset = run.config['dataset']
  builder = data.prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  test = runs_lib.predict_runs([run], builder, 'test', batch_size=FLAGS.batch_size)
  members = {'members': [r.model_dir for r in runs], 'member_thresholds': [r.threshold for r in runs]}
  views = {'tta_views': list(tta.VIEWS[:FLAGS.tta])} if FLAGS.tta > 1 else {}
  info = {'config': run.config, 'command': _command(), **views,
          **(members if len(runs) > 1 else {'exported_from': run.model_dir})}
  report = export.write_export(
      out_dir, run.model, image_size=run.image_size, threshold=point['threshold'],
      threshold_rule=point['threshold_rule'], test_predictions=test, run_info=info,
      extra={'model': run.config.get('model'), 'dataset': dataset, 'image_size': run.image_size, 'split': 'test',
             **views, **({'ensemble': members} if len(runs) > 1 else {})},
      n_resamples=FLAGS.n_resamples, tensorboard_dir=os.path.join(out_dir, 'test'), stress=point.get('stress'))
  at = report['at_val_threshold']
  logging.info('Exported %s: threshold %.4f (%s); test ROC AUC %.3f, sensitivity %.3f, specificity %.3f.',
               export.current_dir(out_dir), point['threshold'], point['threshold_rule'], report['ranking']['roc_auc'],
               at['sensitivity'], at['specificity'])


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main, progress=True)


if __name__ == '__main__':
  run()
