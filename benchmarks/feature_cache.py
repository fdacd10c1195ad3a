"""Phase 1 of a frozen backbone, from the images and from the feature cache (trainer.features): epoch time of each,
and the one-time pass that fills the cache, timed in one process so that their ratio holds on a loaded machine.

The model is EfficientNet-Lite0 with its ImageNet weights, no augmentation (so --feature_cache=auto caches), built as
the trainer builds it; what each side reads comes from trainer.inputs.phase_inputs, with --feature_cache=off and auto,
and each side runs trainer.steps.make_train_step's step, one step per call (the trainer's --steps_per_loop=1).
"""

import time

import keras
import tensorflow as tf

from trainer import data
from trainer import inputs
from trainer import models
from trainer import steps as steps_lib
from trainer.config import Config

MODEL = 'efficientnet_lite0'
WEIGHTS = 'imagenet'


def _config(setup, feature_cache: str) -> Config:
  return Config(model=MODEL, weights=WEIGHTS, dataset=setup.dataset, data_dir=setup.data_dir,
                feature_cache=feature_cache, image_size=setup.image_size, batch_size=setup.batch_size,
                augment_families='', seed=setup.seed).validate()


def _rate(images: int, seconds: float, cpu: float) -> dict:
  # cpu: this process's CPU time (every thread), which other processes on the machine disturb less than the wall time.
  return {'images': images, 'seconds': round(seconds, 6), 'images_per_s': round(images / seconds, 1),
          'cpu_ms_per_image': round(1000 * cpu / images, 4)}


def _time_epochs(runs: dict, steps: int, repeats: int, metrics: dict) -> dict[str, list[tuple[float, float]]]:
  """Runs `steps` steps of each of `runs` ({name: (step, iterator)}), `repeats` times, taking turns so that a change
  in the machine's load hits both sides; returns each one's (wall, CPU) seconds per run."""
  seconds = {name: [] for name in runs}
  for _ in range(repeats):
    for name, (step, iterator) in runs.items():
      start, cpu = time.perf_counter(), time.process_time()
      for _ in range(steps):
        step(iterator, tf.constant(1))
      metrics['loss'].result().numpy()  # Waits for the steps.
      seconds[name].append((time.perf_counter() - start, time.process_time() - cpu))
  return seconds


def phase1_feature_cache(setup, batches: int | None) -> dict:
  """Times (a) a phase-1 epoch from the images, (b) the feature pass, (c) a phase-1 epoch from the features.

  Args:
    setup: benchmark.Setup: dataset, data_dir, image_size, batch_size, seed, repeats.
    batches: steps timed per epoch; None: a whole epoch of the training split (its full batches).

  Returns:
    The JSON line's fields: the cached epoch's images/s as the line's rate; each side's images/s and seconds per
    epoch (`epoch_s`: the fastest of setup.repeats epochs, the timed steps scaled to a whole epoch when fewer were
    timed); and `ratio`, the uncached epoch's time over the cached one's.
  """
  builder = data.prepare(setup.dataset, data_dir=setup.data_dir, manual_dir=setup.manual_dir)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  configs = {mode: _config(setup, mode) for mode in ('off', 'auto')}
  class_weights, epoch_steps = steps_lib.class_weights_and_steps(
      builder, batch_size=setup.batch_size, class_weight=configs['off'].class_weight, dataset=setup.dataset,
      replicas=1)
  keras.utils.set_random_seed(setup.seed)
  with strategy.scope():
    # Built as the trainer builds it: a backbone comes back in phase 'head', frozen.
    model = models.build(MODEL, image_size=setup.image_size, weights=WEIGHTS, augment_families=(),
                         seed=setup.seed)
    optimizer = steps_lib.make_optimizer('adam', 1e-3, loss_scale=False)
    optimizer.build(model.trainable_variables)
    metrics = steps_lib.train_metrics()
  phases = {mode: inputs.phase_inputs(config, strategy, model, builder, setup.image_size)
            for mode, config in configs.items()}

  start, cpu = time.perf_counter(), time.process_time()
  cached_inputs = phases['auto']('head')  # features.build: the training and validation splits through the backbone.
  pass_images = sum(builder.info.splits[split].num_examples for split in ('train', 'validation'))
  feature_pass = _rate(pass_images, time.perf_counter() - start, time.process_time() - cpu)

  runs = {}
  for name, (step_model, make_iterator, _) in (('uncached', phases['off']('head')), ('cached', cached_inputs)):
    step = steps_lib.make_train_step(step_model, optimizer, metrics, strategy, class_weights=class_weights,
                                     global_batch=setup.batch_size)
    runs[name] = (step, make_iterator(0))
    step(runs[name][1], tf.constant(1))  # Traces the step, and fills the pipeline's cache and shuffle buffer.
  timed_steps = min(batches or epoch_steps, epoch_steps)
  images, scale = timed_steps * setup.batch_size, epoch_steps / timed_steps
  sides = {name: {**_rate(images, *min(timings)), 'epoch_s': round(min(timings)[0] * scale, 4),
                  'epoch_s_runs': [round(wall * scale, 4) for wall, _ in timings]}
           for name, timings in _time_epochs(runs, timed_steps, setup.repeats, metrics).items()}
  saved = sides['uncached']['epoch_s'] - sides['cached']['epoch_s']
  return {'images': images, 'seconds': sides['cached']['seconds'], 'images_per_s': sides['cached']['images_per_s'],
          'uncached': sides['uncached'], 'feature_pass': feature_pass, 'cached': sides['cached'],
          'ratio': round(sides['uncached']['epoch_s'] / sides['cached']['epoch_s'], 1),
          'cpu_ratio': round(sides['uncached']['cpu_ms_per_image'] / sides['cached']['cpu_ms_per_image'], 1),
          'break_even_epochs': round(feature_pass['seconds'] / saved, 2) if saved > 0 else None,
          'epoch_steps': epoch_steps, 'timed_steps': timed_steps,
          'model': {'name': MODEL, 'weights': WEIGHTS, 'image_size': setup.image_size,
                    'batch_size': setup.batch_size, 'augmentation': 'none',
                    'features': int(cached_inputs[0].inputs[0].shape[-1])},
          'trainable': 'head only (backbone frozen)', 'device': 'host CPU, float32', 'steps_per_call': 1,
          'note': 'ratio: the uncached phase-1 epoch over the cached one (cpu_ratio: their CPU time per image); '
                  'break_even_epochs: the feature pass over the time one cached epoch saves'}
