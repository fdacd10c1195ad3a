"""Tests of trainer.main's flags: Config is the one source of every default."""

import dataclasses

from trainer import config as config_lib
from trainer import main


def test_every_config_field_is_a_flag_with_the_config_default():
  flags = main.flags.FLAGS
  for field in dataclasses.fields(config_lib.Config):
    assert field.name in flags, f'Config.{field.name} has no flag'
    default = flags[field.name].default
    expected = getattr(config_lib.DEFAULTS, field.name)
    # A list flag's default is a list; the Config holds it as a tuple, or (augment_families) as one comma-joined
    # string, the spelling config.json compares.
    if isinstance(default, list):
      default = ','.join(default) if isinstance(expected, str) else tuple(default)
    assert default == expected, field.name


def test_the_flag_defaults_make_the_default_config():
  # Read as main reads the flags, without a command line: the config it builds is DEFAULTS (the flags' own types and
  # Config's agree, e.g. 1e-3 and not '1e-3').
  flags = main.flags.FLAGS
  values = {field.name: flags[field.name].default for field in dataclasses.fields(config_lib.Config)}
  assert main.config_from_values(values) == config_lib.DEFAULTS
