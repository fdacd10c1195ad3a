r"""`python -m trainer.shift`: a run's (or an ensemble's) metrics under every shift of `trainer.shift.SHIFTS`.

    python -m trainer.shift --model_dir=runs/recipe --split=validation
    python -m trainer.shift --model_dir=runs/seed1,runs/seed2 --split=validation --out=runs/shift.json

The library it runs is `trainer.shift` (trainer/shift/__init__.py and families.py) and `trainer.runs`.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import files
from trainer import runs as runs_lib
from trainer import shift
from trainer.shift import families

cli.define_run_flags('The --model_dir of a finished run, or several (DIR1,DIR2) for their ensemble.')
flags.DEFINE_string('split', 'validation', 'The split to shift: validation (to choose) or test (to report).')
flags.DEFINE_string('out', None, 'Also write the result here as JSON.')
flags.DEFINE_string('leave_one_out', None, 'Also score each shift family with a run trained without it: a folder '
                    'holding without-FAMILY/, the --model_dir of such a run, for every family of '
                    f'{", ".join(shift.FAMILIES)} (LEAVE_ONE_OUT=1 launch/recipe.sh trains them).')

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  runs = runs_lib.Runs.load(FLAGS.model_dir, tta=FLAGS.tta, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                            batch_size=FLAGS.batch_size)
  builder = runs.builder(FLAGS.split)
  shifted = runs.predict_shifted(builder, FLAGS.split)
  # On validation, the predictions just made are the ones youden_with_shifts pools.
  point = runs.operating_point(FLAGS.threshold_rule, shifted=shifted if FLAGS.split == 'validation' else None)
  result = {**shift.stress(shifted, threshold=point['threshold'], split=FLAGS.split), 'members': FLAGS.model_dir,
            'threshold_rule': point['threshold_rule'], 'threshold_chosen': point['chosen']}
  if FLAGS.leave_one_out:
    # The same views as the model above, so that each family's number is of the same kind of prediction.
    without = {family: runs_lib.with_tta(members, FLAGS.tta)
               for family, members in families.load_runs_without(os.path.expanduser(FLAGS.leave_one_out)).items()}
    result['leave_one_out'] = families.leave_one_family_out(without, builder, FLAGS.split,
                                                            batch_size=FLAGS.batch_size)
  print(shift.markdown(result))
  if FLAGS.out:
    files.write_atomic(os.path.expanduser(FLAGS.out), json.dumps(result, indent=2))
    logging.info('Wrote %s.', FLAGS.out)


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main, progress=True)


if __name__ == '__main__':
  run()
