"""The gallery of mistakes: a split's false positives, false negatives and least certain correct cases, each with its
image, Grad-CAM, probability and threshold, as an HTML page beside the report (gallery.html) and as TensorBoard images.

Radiologists look before they read: the cases a model gets wrong, and where it looked in them, say more about what
it learnt than a confusion matrix does (a model that reads the hospital's text markers or the image's border, not the
lungs, shows it here). Each group is sorted by how wrong: false positives from the highest probability down, false
negatives from the lowest up, correct cases from the closest to the threshold out. `trainer.evaluate` writes it.
"""

import base64
import html
import io
import os

import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import data
from trainer import files
from trainer import gradcam as gradcam_lib

GALLERY_FILE = 'gallery.html'
PER_GROUP = 12  # Cases shown per group: a screen's worth.
GROUPS = ('false_positives', 'false_negatives', 'least_certain_correct')
TITLES = {'false_positives': 'False positives (normal, called pneumonia)',
           'false_negatives': 'False negatives (pneumonia, called normal)',
           'least_certain_correct': 'Least certain correct cases'}


def select(labels: np.ndarray, probs: np.ndarray, threshold: float, per_group: int = PER_GROUP) -> dict[str, list]:
  """The indices of each group's cases, most wrong (or least certain) first.

  Args:
    labels: 0 normal, 1 pneumonia.
    probs: the pneumonia probabilities.
    threshold: the decision threshold (pneumonia when probs >= threshold).
    per_group: at most this many per group.

  Returns:
    {group: [index, ...]} for each of GROUPS.
  """
  called = probs >= threshold
  margin = np.abs(probs - threshold)
  order = {'false_positives': np.flatnonzero((labels == 0) & called), 'false_negatives': np.flatnonzero(
      (labels == 1) & ~called), 'least_certain_correct': np.flatnonzero((labels == 1) == called)}
  # Stable sorts, so ties keep the split's order.
  return {group: [int(i) for i in indices[np.argsort(-margin[indices] if group != 'least_certain_correct'
                                                      else margin[indices], kind='stable')][:per_group]]
          for group, indices in order.items()}


def _images(builder, split: str, sizes, indices) -> dict[int, np.ndarray]:
  """The split's images at `indices` (in file order, as `trainer.runs.predict_runs` reads it), at each size."""
  wanted, out = sorted(set(indices)), {}
  for size in sizes:
    found, start = {}, 0
    for batch in data.eval_dataset(builder, split, image_size=size, batch_size=256, cache=False):
      images = batch['image'].numpy()
      for i in wanted:
        if start <= i < start + len(images):
          found[i] = images[i - start]
      start += len(images)
      if start > wanted[-1]:
        break
    out[size] = np.stack([found[i] for i in indices])
  return out


def _data_url(png: bytes) -> str:
  return 'data:image/png;base64,' + base64.b64encode(png).decode()


def write(out_dir: str, runs, builder, split: str, predictions: dict, threshold: float, *,
          tensorboard_dir: str | None = None, title: str = '') -> str | None:
  """Writes out_dir/gallery.html (images inline: one file to copy or mail), and the same cases to TensorBoard.

  Args:
    out_dir: the report's folder.
    runs: the `trainer.runs.TrainedRun`s that made the predictions (several: an ensemble, its mean Grad-CAM).
    builder: their dataset (`trainer.data.prepare`).
    split: the split predicted.
    predictions: `trainer.runs.predict_runs`'s result on it.
    threshold: the threshold the report uses.
    tensorboard_dir: if given, each group goes there as a `gallery/<group>` image summary.
    title: the page's heading.

  Returns:
    The page's path, or None if the split has no case at all.
  """
  labels, probs = predictions['labels'], predictions['probs']
  groups = select(labels, probs, threshold)
  indices = [i for group in GROUPS for i in groups[group]]
  if not indices:
    return None
  sizes = sorted({run.image_size for run in runs})
  images = _images(builder, split, sizes, indices)
  maps = gradcam_lib.make_ensemble_gradcam([(run.model, run.image_size) for run in runs])(images)
  overlays = {i: gradcam_lib.overlay_png(images[sizes[-1]][k], maps[k]) for k, i in enumerate(indices)}
  plain = {i: _png(images[sizes[-1]][k]) for k, i in enumerate(indices)}
  path = os.path.join(out_dir, GALLERY_FILE)
  files.write_atomic(path, _page(groups, labels, probs, threshold, plain, overlays, title))
  if tensorboard_dir is not None:
    with tf.summary.create_file_writer(tensorboard_dir).as_default():
      for group in GROUPS:
        if groups[group]:
          tf.summary.image(f'gallery/{group}', np.stack([np.asarray(Image.open(io.BytesIO(overlays[i])))
                                                         for i in groups[group]]), step=0, max_outputs=PER_GROUP,
                           description=_caption(group, groups[group], labels, probs, threshold))
  return path


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image[..., 0]).save(out, format='PNG')
  return out.getvalue()


def _caption(group, indices, labels, probs, threshold) -> str:
  return (f'{TITLES[group]} at threshold {threshold:.3f}, most wrong first: '
          + ', '.join(f'#{i} ({"pneumonia" if labels[i] else "normal"}, p={probs[i]:.3f})' for i in indices))


def _page(groups, labels, probs, threshold, plain, overlays, title) -> str:
  sections = []
  for group in GROUPS:
    cells = [f'<figure><img src="{_data_url(plain[i])}" alt="image {i}"><img src="{_data_url(overlays[i])}" '
             f'alt="Grad-CAM of image {i}"><figcaption>#{i}: {"pneumonia" if labels[i] else "normal"}, '
             f'p = {probs[i]:.3f} (threshold {threshold:.3f})</figcaption></figure>' for i in groups[group]]
    sections.append(f'<h2>{TITLES[group]}: {len(groups[group])}</h2>\n'
                    + ('\n'.join(cells) if cells else '<p>None.</p>'))
  style = ('body{font-family:system-ui,sans-serif;margin:2em}figure{display:inline-block;margin:.5em;'
           'text-align:center}img{width:160px;height:160px;image-rendering:pixelated;margin:1px}')
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'<style>{style}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>Each case: the image as the model '
          'saw it, and its Grad-CAM (the mean over an ensemble\'s members; each map scaled to its own maximum). '
          f'Threshold {threshold:.3f}; # is the image\'s index in the split\'s file order.</p>\n'
          + '\n'.join(sections) + '\n</body></html>\n')


def link_from_report(out_dir: str) -> None:
  """Adds the gallery's link to out_dir/report.md (written by `trainer.report.write_report`)."""
  path = os.path.join(out_dir, 'report.md')
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  files.write_atomic(path, text.rstrip('\n') + f'\n\n## Gallery of mistakes\n[{GALLERY_FILE}]({GALLERY_FILE}): the '
                     'false positives, false negatives and least certain correct cases, with their Grad-CAM.\n')
