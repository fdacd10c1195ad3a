r"""`python -m trainer.evaluate`: reports a finished run again, or an ensemble of runs, e.g. on another split.

    python -m trainer.evaluate --model_dir=runs/resnet50 --split=test
    python -m trainer.evaluate --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble   # their mean probability

The report (report.json, report.md, the PNGs and their TensorBoard event file) is `trainer.report`'s, with the gallery
of mistakes beside it (gallery.html, `trainer.gallery`); the metrics are
`trainer.metrics`'s; loading the runs and choosing their threshold is `trainer.runs`'s.
"""

import os

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import errors
from trainer import lock
from trainer import gallery
from trainer import metrics
from trainer import report as report_lib
from trainer import runs as runs_lib
from trainer import tta

cli.define_run_flags('The --model_dir of a finished training run; or several, DIR1,DIR2,..., to report their '
                     'ensemble (the mean probability, at a threshold chosen on the validation split for that mean).',
                     report=True)
flags.DEFINE_string('split', 'test', 'The split to report on: train, validation or test.')
flags.DEFINE_string('dataset', None, 'A TFDS name with its config to evaluate on, e.g. '
                    'chest_xray_pneumonia/original (default: the run\'s dataset); images are resized to the '
                    'run\'s input size.')
flags.DEFINE_string('out_dir', None, 'Where the report, the PNGs and their TensorBoard event file go (default for '
                    'one run: MODEL_DIR/eval_SPLIT; required for an ensemble).')

FLAGS = flags.FLAGS


def _described(runs: runs_lib.Runs, point: dict) -> dict:
  """What the report says of the model: its architecture and input size, its views, or the ensemble's members."""
  members = runs.members
  if len(members) > 1:
    return {'models': [run.config['model'] for run in members], 'image_sizes': [run.image_size for run in members],
            'ensemble': {k: point[k] for k in ('members', 'member_thresholds', 'validation_roc_auc',
                                                'member_validation_roc_auc')}}
  views = {'tta_views': list(tta.VIEWS[:runs.tta])} if runs.tta > 1 else {}
  return {'model': members[0].config['model'], 'image_size': members[0].image_size, **views}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  model_dirs = [os.path.expanduser(d) for d in FLAGS.model_dir]
  if len(model_dirs) > 1 and not FLAGS.out_dir:
    raise errors.InvalidValue(f'--model_dir names {len(model_dirs)} runs: give the ensemble\'s report a folder '
                              'with --out_dir.')
  runs = runs_lib.Runs.load(model_dirs, tta=FLAGS.tta, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                            batch_size=FLAGS.batch_size)
  # The split is checked first: the thresholds below take a pass (or, with shifts, ten) over validation.
  dataset = FLAGS.dataset or runs.dataset
  builder = runs.builder(FLAGS.split, dataset)
  point = runs.operating_point(FLAGS.threshold_rule)
  out_dir = os.path.expanduser(FLAGS.out_dir or os.path.join(model_dirs[0], f'eval_{FLAGS.split}'))
  operating = {'threshold': point['threshold'], 'threshold_rule': point['threshold_rule'], 'chosen': point['chosen']}
  predictions = runs.predict(builder, FLAGS.split)
  os.makedirs(out_dir, exist_ok=True)
  # Two evaluations into one folder would leave one's report.json beside the other's figures.
  with lock.hold(out_dir, what='evaluation', flag='--out_dir'):
    report = report_lib.report_predictions(
        predictions, threshold=point['threshold'], out_dir=out_dir, tensorboard_dir=out_dir,
        n_resamples=FLAGS.n_resamples,
        extra={**_described(runs, point), 'dataset': dataset, 'trained_on': runs.dataset, 'split': FLAGS.split,
               'operating_point': operating},
        threshold_rule=metrics.threshold_rule(point['threshold_rule']).text)
    if gallery.write(out_dir, runs.members, builder, FLAGS.split, predictions, point['threshold'],
                     tensorboard_dir=out_dir, title=f'{dataset} {FLAGS.split}: the mistakes of {", ".join(model_dirs)}'):
      gallery.link_from_report(out_dir)
  at = report['at_val_threshold']
  chosen = 'stored with the run' if point['chosen'] == 'stored' else 'chosen now on validation'
  logging.info('%s at the threshold %.3f (%s, %s): ROC AUC %.3f, sensitivity %.3f, specificity %.3f. Report: %s',
               FLAGS.split, point['threshold'], point['threshold_rule'], chosen, report['ranking']['roc_auc'],
               at['sensitivity'], at['specificity'], os.path.join(out_dir, 'report.md'))


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main, progress=True)


if __name__ == '__main__':
  run()
