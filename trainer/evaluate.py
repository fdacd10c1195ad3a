r"""`python -m trainer.evaluate`: reports a finished run again, or an ensemble of runs, e.g. on another split.

    python -m trainer.evaluate --model_dir=runs/resnet50 --split=test
    python -m trainer.evaluate --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble   # their mean probability

The report (report.json, report.md, the PNGs and their TensorBoard event file) is `trainer.report`'s; the metrics are
`trainer.metrics`'s; loading the runs and choosing their threshold is `trainer.runs`'s.
"""

import os

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import errors
from trainer import data
from trainer import report as report_lib
from trainer import runs as runs_lib
from trainer import tta

flags.DEFINE_list('model_dir', None, 'The --model_dir of a finished training run; or several, DIR1,DIR2,..., to '
                  'report their ensemble (the mean probability, at a threshold chosen on the validation split for '
                  'that mean).', required=True)
flags.DEFINE_string('split', 'test', 'The split to report on: train, validation or test.')
flags.DEFINE_string('dataset', None, 'A TFDS name with its config to evaluate on, e.g. '
                    'chest_xray_pneumonia/original (default: the run\'s dataset); images are resized to the '
                    'run\'s input size.')
flags.DEFINE_string('data_dir', None, 'Where TFDS keeps built datasets (default: the run\'s).')
flags.DEFINE_string('manual_dir', None, 'The downloaded data, if the dataset is not built yet (default: the '
                    'run\'s).')
flags.DEFINE_string('out_dir', None, 'Where the report, the PNGs and their TensorBoard event file go (default for '
                    'one run: MODEL_DIR/eval_SPLIT; required for an ensemble).')
flags.DEFINE_integer('batch_size', 32, 'Images per prediction batch.', lower_bound=1)
flags.DEFINE_integer('n_resamples', 1000, 'Bootstrap resamples (of patients) for the 95% intervals.')
runs_lib.define_operating_point_flags()

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  model_dirs = [os.path.expanduser(d) for d in FLAGS.model_dir]
  if len(model_dirs) > 1 and not FLAGS.out_dir:
    raise errors.InvalidValue(f'--model_dir names {len(model_dirs)} runs: give the ensemble\'s report a folder '
                              'with --out_dir.')
  runs = runs_lib.with_tta([runs_lib.load_run(d) for d in model_dirs], FLAGS.tta)
  data_dir = os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else runs[0].config.get('data_dir')
  manual_dir = os.path.expanduser(FLAGS.manual_dir) if FLAGS.manual_dir else runs[0].config.get('manual_dir')
  # The split is checked first: the thresholds below take a pass (or, with shifts, ten) over validation.
  dataset = FLAGS.dataset or runs_lib.run_dataset(runs)
  builder = data.prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  if FLAGS.split not in builder.info.splits:
    raise errors.InvalidValue(f'--split={FLAGS.split} is not a split of {dataset}: choose one of '
                     f'{", ".join(sorted(builder.info.splits))}.')
  point = runs_lib.operating_point(runs, FLAGS.threshold_rule, data_dir=data_dir, manual_dir=manual_dir,
                                   batch_size=FLAGS.batch_size)
  threshold = point['threshold']
  extra = {'model': runs[0].config['model'], 'image_size': runs[0].image_size}
  if FLAGS.tta > 1:
    extra['tta_views'] = list(tta.VIEWS[:FLAGS.tta])
  if len(runs) > 1:
    extra = {'models': [run.config['model'] for run in runs], 'image_sizes': [run.image_size for run in runs],
             'ensemble': {k: point[k] for k in ('members', 'member_thresholds', 'validation_roc_auc',
                                                 'member_validation_roc_auc')}}
  out_dir = os.path.expanduser(FLAGS.out_dir or os.path.join(model_dirs[0], f'eval_{FLAGS.split}'))
  predictions = runs_lib.predict_runs(runs, builder, FLAGS.split, batch_size=FLAGS.batch_size)
  operating = {'threshold': threshold, 'threshold_rule': point['threshold_rule'], 'chosen': point['chosen']}
  report = report_lib.report_predictions(
      predictions, threshold=threshold, out_dir=out_dir, tensorboard_dir=out_dir, n_resamples=FLAGS.n_resamples,
      extra={**extra, 'dataset': dataset, 'trained_on': runs_lib.run_dataset(runs), 'split': FLAGS.split,
             'operating_point': operating},
      threshold_rule=report_lib.rule_text(point['threshold_rule']))
  at = report['at_val_threshold']
  logging.info('%s at the threshold %.3f (%s, %s): ROC AUC %.3f, sensitivity %.3f, specificity %.3f. Report: %s',
               FLAGS.split, threshold, point['threshold_rule'], 'stored with the run' if point['chosen'] == 'stored'
               else 'chosen now on validation', report['ranking']['roc_auc'], at['sensitivity'], at['specificity'],
               os.path.join(out_dir, 'report.md'))


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main, progress=True)


if __name__ == '__main__':
  run()
