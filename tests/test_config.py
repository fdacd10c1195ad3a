"""Tests of trainer.config: each setting declared once, the flags made from the declarations, the checks by them."""

import dataclasses
import json
import math
import subprocess
import sys

from absl import flags
import pytest

from trainer import config as config_lib
from trainer import main

_FIELDS = dataclasses.fields(config_lib.Config)
_NUMBERS = [field for field in _FIELDS if main._flag_kind(field) in ('integer', 'float')]  # pylint: disable=protected-access


def test_every_setting_is_declared_once_with_help_a_default_and_its_checks():
  names = [field.name for field in _FIELDS]
  assert len(names) == len(set(names)) >= 50
  # Each setting belongs to exactly one group, and Config is the groups' fields, nothing more.
  grouped = [field.name for group in config_lib.GROUPS for field in dataclasses.fields(group)]
  assert sorted(grouped) == sorted(names)
  for field in _FIELDS:
    assert isinstance(field.metadata['help'], str) and len(field.metadata['help']) > 10, field.name
    assert field.default is not dataclasses.MISSING, field.name
    if field.metadata['choices'] and not field.metadata['list']:
      assert field.default in field.metadata['choices'], field.name
  # Every number has a range, so no number setting skips the check of finiteness and range.
  assert all(isinstance(field.metadata['allowed'], config_lib.Range) for field in _NUMBERS)
  assert {'weight_decay', 'clipnorm', 'augment_noise', 'seed', 'batch_size'} <= {f.name for f in _NUMBERS}
  assert config_lib.DEFAULTS.validate() == config_lib.Config()


def test_the_flags_are_the_declarations():
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  assert sorted(flag_values) == sorted(field.name for field in _FIELDS)
  for field in _FIELDS:
    flag = flag_values[field.name]
    # absl puts an enum's values before its help.
    assert flag.help.endswith(field.metadata['help']), field.name
    default = ','.join(flag.default) if field.name == 'augment_families' else flag.default
    assert default == field.default, field.name
    if main._flag_kind(field) == 'enum':  # pylint: disable=protected-access
      assert tuple(flag.parser.enum_values) == field.metadata['choices']
  assert type(flag_values['seed'].parser).__name__ == 'IntegerParser'
  assert type(flag_values['clipnorm'].parser).__name__ == 'FloatParser'
  assert type(flag_values['horizontal_flip'].parser).__name__ == 'BooleanParser'
  assert flag_values['profile_steps'].default is None and flag_values['image_size'].default is None


def test_fixed_on_resume_follows_from_the_declarations():
  declared = [field.name for field in _FIELDS if field.metadata['fixed_on_resume']]
  assert list(config_lib.FIXED_ON_RESUME) == declared
  assert {'model', 'dataset', 'image_size', 'optimizer', 'augment_families', 'crop', 'cnn_depth'} <= set(declared)
  # What a resumed run may change: a lower learning rate after a NaN loss, fewer GPUs, weight decay and clipping.
  assert not {'learning_rate', 'epochs', 'batch_size', 'strategy', 'weight_decay', 'clipnorm',
              'early_stopping_patience', 'plateau_factor'} & set(declared)


@pytest.mark.parametrize('changes, line', [
    (dict(weight_decay=math.nan), '--weight_decay must be zero or more and finite, got nan.'),
    (dict(weight_decay=math.inf), '--weight_decay must be zero or more and finite, got inf.'),
    (dict(clipnorm=math.nan), '--clipnorm must be zero or more and finite, got nan.'),
    (dict(clipnorm=math.inf), '--clipnorm must be zero or more and finite, got inf.'),
    (dict(augment_noise=math.inf), '--augment_noise must be zero or more and finite, got inf.'),
    (dict(seed=-1), '--seed must be in [0, 4294967295], got -1.'),
    (dict(seed=2**32), '--seed must be in [0, 4294967295], got 4294967296.'),
    (dict(plateau_min_lr=math.nan), '--plateau_min_lr must be zero or more and finite, got nan.'),
    (dict(dropout=math.nan), '--dropout must be in [0, 1), got nan.'),
    (dict(augment_fov=-0.1), '--augment_fov must be zero or more, got -0.1.'),
    (dict(batch_size=0), '--batch_size must be positive, got 0.'),
    (dict(weight_decay=-0.1), '--weight_decay must be zero or more, got -0.1.'),
    (dict(learning_rate=math.nan), '--learning_rate must be positive and finite, got nan.'),
    (dict(augment_jpeg=0.0), '--augment_jpeg must be a JPEG quality in [1, 100], got 0.0.'),
])
def test_a_bad_number_is_one_line_naming_the_flag_the_value_and_the_range(changes, line):
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.Config(**changes).validate()
  assert str(raised.value) == line


@pytest.mark.parametrize('field', [field for field in _NUMBERS if main._flag_kind(field) == 'float'],  # pylint: disable=protected-access
                         ids=lambda field: field.name)
def test_no_float_setting_takes_nan_or_inf(field):
  for value in (math.nan, math.inf, -math.inf):
    with pytest.raises(config_lib.ConfigError, match=f'^--{field.name} must be .*, got {value}\\.$'):
      config_lib.Config(**{field.name: value}).validate()


def test_the_edges_of_a_range():
  for value in (0, 4294967295):
    assert config_lib.Config(seed=value).validate().seed == value
  assert config_lib.Config(clipnorm=0.0, weight_decay=0.0, augment_noise=0.0).validate()
  with pytest.raises(config_lib.ConfigError, match=r'--plateau_factor must be in \(0, 1\), got 1.0'):
    config_lib.Config(plateau_factor=1.0).validate()
  with pytest.raises(config_lib.ConfigError, match=r'--augment_strength must be in \[0, 5.0\], got 5.5'):
    config_lib.Config(augment_strength=5.5).validate()


@pytest.mark.parametrize('flag, line', [
    ('--weight_decay=nan', 'error: --weight_decay must be zero or more and finite, got nan.'),
    ('--clipnorm=inf', 'error: --clipnorm must be zero or more and finite, got inf.'),
    ('--augment_noise=inf', 'error: --augment_noise must be zero or more and finite, got inf.'),
    ('--seed=-1', 'error: --seed must be in [0, 4294967295], got -1.'),
    ('--seed=4294967296', 'error: --seed must be in [0, 4294967295], got 4294967296.'),
])
def test_a_bad_training_flag_is_one_line_and_writes_nothing(flag, line, tmp_path):
  model_dir = tmp_path / 'run'
  done = subprocess.run([sys.executable, '-m', 'trainer.main', f'--model_dir={model_dir}', flag],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip() == line, done.stderr[-2000:]
  assert not model_dir.exists()


def test_a_config_json_round_trips_and_an_older_one_still_reads(tmp_path):
  config = config_lib.Config(model='vgg16', profile_steps=(2, 4), augment_families='rotation,gamma', seed=3)
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(dataclasses.asdict(config)))
  stored = json.loads(path.read_text())
  # Flat, as every run wrote it: one key per setting, named as its flag.
  assert sorted(stored) == sorted(field.name for field in _FIELDS)
  assert config_lib.Config.from_stored(stored) == config
  # A run from before a setting existed ran with its default; a key no setting has any more is left out.
  older = {name: value for name, value in stored.items() if name not in ('feature_cache', 'steps_per_loop')}
  restored = config_lib.Config.from_stored({**older, 'retired_setting': 1})
  assert restored == dataclasses.replace(config, feature_cache='auto', steps_per_loop=1)


def test_a_group_is_its_own_object():
  config = config_lib.Config(model='vgg16', dropout=0.2, augment_noise=8.0, horizontal_flip=True, weights='none')
  model = config.group(config_lib.ModelSettings)
  augmentation = config.group(config_lib.AugmentationSettings)
  assert type(model) is config_lib.ModelSettings and model.model == 'vgg16' and model.dropout == 0.2
  assert model.weights_arg is None and config_lib.ModelSettings(model='cnn').weights_arg is None
  assert config_lib.ModelSettings(model='vgg16').weights_arg == 'imagenet'
  assert augmentation.horizontal_flip and augmentation.augment_ranges['noise'] == 8.0
  assert augmentation.families == config_lib.DEFAULT_FAMILIES
  with pytest.raises(dataclasses.FrozenInstanceError):
    model.dropout = 0.5  # pytype: disable=not-writable
