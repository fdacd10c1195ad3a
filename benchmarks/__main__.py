"""`python -m benchmarks`, from the repository root: the throughput measurements of benchmarks/benchmark.py.

See benchmarks/benchmark.py for what is measured, and BENCHMARKS.md for a run of it.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags

from benchmarks.benchmark import MEASUREMENTS, Setup, run, targets, validate  # pylint: disable=g-importing-member
from trainer import cli


def _define_flags():
  flags.DEFINE_string('dataset', 'chest_xray_pneumonia/224', 'The TFDS dataset and config the pipeline reads.')
  flags.DEFINE_string('data_dir', None, 'Where the dataset is built or already is (default: a temporary folder, '
                      'removed at the end). When it is already built there, `build` builds into a temporary folder.')
  flags.DEFINE_string('manual_dir', None,
                      'The extracted Kaggle download (holding train/NORMAL and train/PNEUMONIA): the build reads it, '
                      'and so do the peers and the decode measurements.')
  flags.DEFINE_integer('image_size', 224, 'Side of the images the model takes.')
  flags.DEFINE_integer('batch_size', 32, 'Images per batch, in every pipeline and training step.')
  flags.DEFINE_integer('steps', None, 'Batches timed per pipeline measurement (default: each measurement\'s own, '
                       'a second or a few on two cores; a cold pass is capped at one epoch).')
  flags.DEFINE_integer('train_steps', 10, 'Training steps timed per input source, taking turns, after one untimed '
                       'step each; the ratio is the median over the pairs.')
  flags.DEFINE_integer('repeats', 3, 'Timed runs per pipeline measurement; the fastest is reported, the others show '
                       'how much other processes disturbed it.')
  flags.DEFINE_integer('seed', 0, 'Seed of the shuffles, the augmentation and the models\' initialisation.')
  flags.DEFINE_list('only', None, f'Measurements to run, comma-separated (default: all): {",".join(MEASUREMENTS)}.')
  flags.DEFINE_bool('isolate', True, 'Run each measurement (or pair timed together) in its own process, so that '
                    'peak RSS is its own.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  names = FLAGS.only or list(MEASUREMENTS)
  start, load = time.perf_counter(), os.getloadavg()
  with tempfile.TemporaryDirectory(prefix='cxr_benchmark_') as scratch:
    setup = Setup(dataset=FLAGS.dataset, data_dir=os.path.expanduser(FLAGS.data_dir or scratch),
                  manual_dir=FLAGS.manual_dir and os.path.expanduser(FLAGS.manual_dir), image_size=FLAGS.image_size,
                  batch_size=FLAGS.batch_size, steps=FLAGS.steps, train_steps=FLAGS.train_steps,
                  repeats=FLAGS.repeats, seed=FLAGS.seed)
    validate(setup, names)
    lines = []
    for line in run(names, setup, isolate=FLAGS.isolate):
      print(json.dumps(line), flush=True)
      lines.append(line)
  summary = targets(lines)
  summary.update(seconds=round(time.perf_counter() - start, 1), cpu_cores=os.cpu_count(),
                 load_average_1min={'start': round(load[0], 2), 'end': round(os.getloadavg()[0], 2)})
  print(json.dumps(summary), flush=True)
  return 1 if any('error' in line for line in lines) else 0


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
