r"""`python -m trainer.predict`: one JSON line per image (see `trainer.predict`, trainer/predict/__init__.py).

    python -m trainer.predict --model_dir=runs/resnet50 scans/ more/IM-0001.jpeg
    python -m trainer.predict --model_dir=runs/cnn,runs/resnet50 --ensemble_dir=runs/ensemble scans/
"""

import json
import os
import sys

from absl import flags
from absl import logging

from trainer import cli
from trainer import errors
from trainer import export
from trainer import predict
from trainer import runs as runs_lib
from trainer import tflite

cli.define_run_flags('The --model_dir of a finished training run or the --out_dir of trainer.export; or several '
                     'runs, DIR1,DIR2,..., whose probabilities are averaged, with a threshold chosen on validation '
                     'for the ensemble.', required=False)
flags.DEFINE_list('ensemble', None, 'Replaced by --model_dir=DIR1,DIR2,... (as in trainer.evaluate and '
                  'trainer.shift).')
flags.DEFINE_string('ensemble_dir', None, f'Keep the ensemble\'s threshold in ENSEMBLE_DIR/{predict.ENSEMBLE_FILE}, '
                    'and reuse it while the members stay the same (without it, every call runs the members over the '
                    'validation split again).')
flags.DEFINE_string('gradcam_dir', None, 'Write a Grad-CAM overlay PNG of each image here (of several runs: the '
                    'mean of their maps).')
flags.DEFINE_enum('runtime', 'keras', ['keras', 'tflite', 'tflite_int8'], 'What computes the probabilities: the Keras '
                  'model, or the export\'s model.tflite (float32) or model.int8.tflite (trainer.tflite; one '
                  '--model_dir, no --tta). Grad-CAM is drawn from the Keras model.')

FLAGS = flags.FLAGS


def main(argv):
  if FLAGS.ensemble is not None:
    raise errors.InvalidValue(f'--ensemble is now --model_dir: give --model_dir={",".join(FLAGS.ensemble)}.')
  if not FLAGS.model_dir:
    raise errors.InvalidValue('Give --model_dir=DIR (a run or an export), or --model_dir=DIR1,DIR2,... (several runs).')
  if FLAGS.tta > 1 and FLAGS.gradcam_dir:
    raise errors.InvalidValue('--gradcam_dir explains the model on one view of each image: drop --tta to draw it.')
  files = predict.find_images(argv[1:], skip=FLAGS.gradcam_dir and os.path.expanduser(FLAGS.gradcam_dir))
  runs = runs_lib.Runs.load(FLAGS.model_dir, tta=FLAGS.tta, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                            batch_size=FLAGS.batch_size)
  if FLAGS.ensemble_dir and len(runs.members) > 1:
    point = predict.cached_ensemble_threshold(runs.members, os.path.expanduser(FLAGS.ensemble_dir),
                                              FLAGS.threshold_rule, data_dir=runs.data_dir,
                                              manual_dir=runs.manual_dir, batch_size=runs.batch_size)
  else:
    point = runs.operating_point(FLAGS.threshold_rule)
  threshold = point['threshold']
  logging.info('Threshold %.4f, rule %s (%s).', threshold, point['threshold_rule'],
               'stored with the model' if point['chosen'] == 'stored' else 'chosen on validation')
  predicts = None
  if FLAGS.runtime != 'keras':
    if len(runs.members) > 1 or FLAGS.tta > 1:
      raise errors.InvalidValue(f'--runtime={FLAGS.runtime} runs one export\'s TFLite model: give one --model_dir '
                                '(trainer.export makes several runs one) and no --tta.')
    predicts = [tflite.load_export(export.current_dir(runs.members[0].model_dir), int8=FLAGS.runtime == 'tflite_int8')]
  failed = overlays = 0
  for result in predict.predict_files(files, runs.members, threshold=threshold, gradcam_dir=FLAGS.gradcam_dir,
                                      batch_size=FLAGS.batch_size, threshold_rule=point['threshold_rule'],
                                      predicts=predicts):
    failed += 'error' in result and 'label' not in result
    overlays += 'error' in result and 'label' in result
    print(json.dumps(result), flush=True)
  if failed:
    print(f'error: {failed} of {len(files)} files could not be read (see their "error" lines).', file=sys.stderr)
  if overlays:
    print(f'error: {overlays} of {len(files)} Grad-CAM overlays could not be written (see their "error" lines; their '
          'labels are printed).', file=sys.stderr)
  return 1 if failed or overlays else 0


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main)


if __name__ == '__main__':
  run()
