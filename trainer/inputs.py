"""What each training phase reads: the training images, or a frozen backbone's cached features (trainer.features).

Both come with their validation function, so that the loop (trainer.train) treats them alike.
"""

import keras
import tensorflow as tf

from trainer import data
from trainer import features
from trainer import inference
from trainer import steps as steps_lib
from trainer.config import Config


def validation(config: Config, strategy: tf.distribute.Strategy, model: keras.Model, builder, image_size: int):
  """The function that predicts the validation split each epoch: shared out over the replicas when there are
  several, on this worker alone when there is one."""
  val_ds = data.eval_dataset(builder, 'validation', image_size=image_size, batch_size=config.batch_size)
  if strategy.num_replicas_in_sync > 1:
    shards = steps_lib.distributed_split(strategy, val_ds, config.batch_size)
    predict = steps_lib.make_distributed_predict(model, strategy)
    return lambda: predict(shards)
  predict = inference.make_predict(model)  # Once: a function traced anew every epoch would retrace every epoch.
  return lambda: inference.predict_split(model, val_ds, predict=predict)


def phase_inputs(config: Config, strategy: tf.distribute.Strategy, model: keras.Model, builder, image_size: int):
  """What each phase reads: a function of the phase -> (the model its steps train, a function of the global steps
  already read -> its training iterator, its validation function).

  Phase 1 of a frozen backbone reads the features of `trainer.features`' cache where --feature_cache allows it,
  computed when that phase is first entered (never, for a run resumed in phase 2); every other phase reads images.
  """
  def images(skip_steps):
    return steps_lib.training_iterator(strategy, lambda ctx: data.train_dataset(
        builder, image_size=image_size, global_batch=config.batch_size, seed=config.seed,
        cache_dir=config.cache_dir, shuffle_buffer=config.shuffle_buffer, input_context=ctx, skip_steps=skip_steps,
        balanced=config.class_weight == 'resample'))

  from_images = (model, images, validation(config, strategy, model, builder, image_size))
  cached = []

  def inputs_of(phase):
    if phase != 'head' or not features.applies(model, config.feature_cache):
      return from_images
    if not cached:
      cache = features.build(model, builder, image_size=image_size, batch_size=config.batch_size, seed=config.seed)
      num_classes = builder.info.features['label'].num_classes if config.class_weight == 'resample' else None
      cached.append((cache.head, lambda skip_steps: steps_lib.training_iterator(strategy, cache.dataset_fn(
          global_batch=config.batch_size, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
          skip_steps=skip_steps, num_classes=num_classes)), cache.predict_validation))
    return cached[0]

  return inputs_of
