"""The feature cache of a frozen backbone: phase 1 trains the head from pooled features computed once.

In phase 1 a backbone is frozen and runs in inference mode, so with nothing random before it an image's pooled
features are the same every epoch, and only the head (dropout, then the output layer) learns: the bottleneck cache of
Kermany et al. (2018). The training and validation splits go through the backbone once; phase 1's steps then run the
head alone on their features. The head is made of the model's own layers, so the checkpoints, the best epoch, a resume
and the export are those of a run without the cache, and the exported model still takes image bytes.

`--feature_cache` (config.FEATURE_CACHE):
  auto  cache where it changes nothing: a backbone model with no augmentation block before it;
  on    cache with an augmentation block too: phase 1 then trains the head on the images as stored (the augmentation,
        in inference mode, is the identity), and the augmentation starts with phase 2;
  off   never.
The cnn trains whole from its first epoch, so it has nothing to cache.
"""

import dataclasses
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import data


def applies(model: keras.Model, mode: str) -> bool:
  """Whether phase 1 of `model` (from `models.build_model`) trains from cached features under --feature_cache=`mode`."""
  if mode == 'off' or model.name == 'cnn':
    return False
  return mode == 'on' or not any(layer.name == 'augmentation' for layer in model.layers)


def head(model: keras.Model) -> keras.Model:
  """The model's head as a model of its own: pooled features -> probability, sharing the model's layers (and so its
  variables, which the checkpoints and the optimizer already hold)."""
  pooled = keras.Input(model.get_layer('pool').output.shape[1:], name='features')
  outputs = model.get_layer('probability')(model.get_layer('dropout')(pooled))
  return keras.Model(pooled, outputs, name='head')


def extractor(model: keras.Model):
  """A function from a batch of the model's input images to their pooled features, as float32.

  Traced once, for any batch size: traced per batch shape, a backbone was traced four times (each split's full and
  last batch), ~1.5 s each for EfficientNet-Lite0 at 32 pixels."""
  pooled = keras.Model(model.inputs, model.get_layer('pool').output)
  spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
  return tf.function(lambda images: tf.cast(pooled(images, training=False), tf.float32), input_signature=[spec])


def extract(features, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  """The features (an `extractor`) of every image of `batches` ((uint8 images, labels) batches), in order."""
  parts = [(features(images).numpy(), labels.numpy()) for images, labels in batches]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclasses.dataclass(frozen=True)
class Cache:
  """The training and validation splits' pooled features, and what phase 1 needs of them."""

  train: tuple[np.ndarray, np.ndarray]  # (features, labels), in `data.train_examples`' order.
  validation: tuple[np.ndarray, np.ndarray]  # In `data.eval_dataset`'s order.
  head: keras.Model

  def dataset_fn(self, *, global_batch: int, seed: int | None, shuffle_buffer: int, skip_steps: int,
                 num_classes: int | None):
    """`steps.training_iterator`'s dataset function: the cached training features as the images would come.

    Every worker holds every feature, in one order, so each input pipeline keeps its share by position.
    """
    def dataset(input_context):
      ds = tf.data.Dataset.from_tensor_slices(self.train)
      if input_context and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
      return data.training_batches(ds, global_batch=global_batch, seed=seed, shuffle_buffer=shuffle_buffer,
                                   input_context=input_context, skip_steps=skip_steps, num_classes=num_classes)
    return dataset

  def predict_validation(self) -> dict[str, np.ndarray]:
    """The validation split's predictions, from its features: what `train`'s validation function returns."""
    features, labels = self.validation
    probs = self.head.predict_on_batch(features)
    return {'probs': np.asarray(probs, np.float32)[:, 0], 'labels': labels}


def build(model: keras.Model, builder, *, image_size: int, batch_size: int, seed: int | None) -> Cache:
  """Runs the training and validation splits through `model`'s frozen backbone once.

  With a seed, the training features come in the order a run without the cache reads its images, so both train the
  same head; without one, every worker of a multi-worker job still needs one order, the files' own.
  """
  start = time.time()
  train = data.train_examples(builder, image_size=image_size, seed=seed, shuffle_files=seed is not None)
  validation = data.eval_dataset(builder, 'validation', image_size=image_size, batch_size=batch_size, cache=False)
  features = extractor(model)
  cache = Cache(train=extract(features, train.batch(batch_size).prefetch(data.AUTOTUNE)),
                validation=extract(features, validation.map(lambda batch: (batch['image'], batch['label']))),
                head=head(model))
  logging.info('Feature cache: %d training and %d validation images through the frozen backbone in %.0f s; phase 1 '
               'trains the head on their %d features.', len(cache.train[1]), len(cache.validation[1]),
               time.time() - start, cache.train[0].shape[1])
  return cache
