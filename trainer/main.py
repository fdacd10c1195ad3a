r"""Trains a pneumonia classifier on chest X-rays.

  python -m trainer.main --model=resnet50 --unfreeze=5 --dataset=chest_xray_pneumonia/224 \
      --manual_dir=~/Downloads/chest-xray-pneumonia --model_dir=runs/resnet50

Flags are made here from the settings' declarations in trainer/config.py (`define_flags`), and read here, once,
into a `Config`; nothing below this module reads FLAGS.
"""

import dataclasses
import os
import tempfile
import time
import typing

from absl import flags
from absl import logging

from trainer import cli
from trainer import config as config_lib

# absl's definer for each kind of setting; a setting's kind follows from its declaration (`_flag_kind`).
_DEFINERS = {'enum': flags.DEFINE_enum, 'list': flags.DEFINE_list, 'bool': flags.DEFINE_bool,
             'integer': flags.DEFINE_integer, 'float': flags.DEFINE_float, 'string': flags.DEFINE_string}


def _flag_kind(field: dataclasses.Field) -> str:
  if field.metadata['list']:
    return 'list'
  if field.metadata['choices']:
    return 'enum'
  # `int | None` and the like: the flag parses the type that is not None.
  kind = next((t for t in typing.get_args(field.type) if t is not type(None)), field.type)
  return {bool: 'bool', int: 'integer', float: 'float', str: 'string'}[kind]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per `Config` field, from its declaration: name, default, help and choices.

  Ranges are not given to absl, whose float bounds let nan through: `Config.validate` checks every value, once the
  flags are read, through `config.check_range`.
  """
  for field in dataclasses.fields(config_lib.Config):
    kind = _flag_kind(field)
    choices = (field.metadata['choices'],) if kind == 'enum' else ()
    _DEFINERS[kind](field.name, field.default, *choices, field.metadata['help'], flag_values=flag_values)


define_flags()


def config_from_flags() -> config_lib.Config:
  names = [f.name for f in dataclasses.fields(config_lib.Config)]
  return config_from_values({name: getattr(flags.FLAGS, name) for name in names if name in flags.FLAGS})


def config_from_values(values: dict) -> config_lib.Config:
  """The checked Config of flag values as absl parsed them (lists for list flags, paths with ~)."""
  values = dict(values)
  for name in ('data_dir', 'manual_dir', 'model_dir', 'cache_dir'):
    if values.get(name):
      values[name] = os.path.expanduser(values[name])
  if values.get('profile_steps') is not None:
    try:
      first, last = (int(step) for step in values['profile_steps'])
    except ValueError:
      raise config_lib.ConfigError(
          f'--profile_steps={",".join(values["profile_steps"])} must be two integers FIRST,LAST.') from None
    values['profile_steps'] = (first, last)
  if values.get('augment_families') is not None:
    # One spelling per set of families, so that config.json tells a resumed run's families apart by comparing strings.
    given = [name.strip() for name in values['augment_families']]
    values['augment_families'] = ','.join([name for name in config_lib.FAMILIES if name in given] +
                                          [name for name in given if name not in config_lib.FAMILIES])
  if values.get('weights') not in (None, 'imagenet', 'none'):
    values['weights'] = os.path.expanduser(values['weights'])
  return config_lib.Config(**values).validate()


def _check_writable(model_dir: str) -> None:
  try:
    os.makedirs(model_dir, exist_ok=True)
    # A probe of this process's own: the workers of a multi-worker job check the same model_dir at once.
    with tempfile.TemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise config_lib.ConfigError(f'--model_dir={model_dir} is not writable: {e.strerror}.') from None


def summary(config: config_lib.Config, report: dict, seconds: float) -> str:
  """The lines a finished run ends with: where its files are and its test score."""
  at = report['at_val_threshold']
  minutes, secs = divmod(round(seconds), 60)
  lines = [f'Done in {minutes} min {secs} s.' if minutes else f'Done in {secs} s.',
           f'  model:       {os.path.join(config.model_dir, "model.keras")} (and saved_model/ for TF Serving)',
           f'  report:      {os.path.join(config.model_dir, "report.md")} (report.json, the figures, model_card.md)',
           f'  TensorBoard: tensorboard --logdir={config.model_dir}',
           f'  test:        ROC-AUC {report["ranking"]["roc_auc"]:.3f}; at the validation threshold '
           f'{at["threshold"]:.3f}: accuracy {at["accuracy"]:.3f}, sensitivity {at["sensitivity"]:.3f}, '
           f'specificity {at["specificity"]:.3f}']
  if report.get('warning'):
    lines.append(f'  note:        {report["warning"]}')
  return '\n'.join(lines)


def main(argv):
  started = time.monotonic()
  if len(argv) > 1:
    raise config_lib.ConfigError(f'Unexpected arguments {" ".join(argv[1:])}: every setting is a flag, '
                                 '--name=value (see --helpfull).')
  config = config_from_flags()
  _check_writable(config.model_dir)

  # Imported here, after the flags are checked, so a bad flag fails in a second and not after TF starts.
  import keras
  import tensorflow as tf

  from trainer import distribute
  from trainer import train
  # Before anything else touches TensorFlow's runtime, which fixes the device list when it starts.
  distribute.configure_logical_devices(config.logical_devices)
  if config.seed is not None:
    keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  distribute.set_precision(config.precision)
  strategy = distribute.get_strategy(config.strategy)
  logging.info('%s over %s.', type(strategy).__name__, ', '.join(strategy.extended.worker_devices))
  report = train.run(config, strategy)
  if report:  # The chief's; the other workers of a job write nothing.
    print(summary(config, report, time.monotonic() - started), flush=True)


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
