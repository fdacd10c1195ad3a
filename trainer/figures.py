"""The pictures of an evaluation, each returned as PNG bytes.

PNG bytes let the caller write a file for report.md and put the very same picture into TensorBoard
(`tf.summary.image(name, tf.image.decode_png(png)[None])`). Figures are drawn on a `matplotlib.figure.Figure` with
the Agg canvas attached directly instead of through pyplot: a training loop that draws every epoch leaks nothing into
pyplot's global figure list, a headless node needs no GUI backend, and a notebook's own backend is left alone.
"""

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

from cxr_tfds.chest_xray_pneumonia import sources
from trainer import metrics

CLASS_NAMES = sources.LABELS  # The dataset's label names, indexed by class id: defined once, by the dataset.
_INCHES = 4
_DPI = 100


def confusion_matrix_png(cm, class_names=CLASS_NAMES, title='Confusion matrix') -> bytes:
  """The confusion matrix, each cell with its count and its share of the actual class (its row).

  Args:
    cm: square matrix of counts, rows = actual class, columns = predicted class, as `metrics_at` returns it
      ([[tn, fp], [fn, tp]] for two classes).
    class_names: one name per row/column.
    title: the figure title, e.g. 'Test, threshold 0.42'.

  Returns:
    PNG bytes.

  Raises:
    ValueError: if `cm` is not a square matrix of non-negative counts with one row per class name.
  """
  cm = np.asarray(cm)
  k = len(class_names)
  if cm.shape != (k, k) or not np.issubdtype(cm.dtype, np.number) or (cm < 0).any():
    raise ValueError(f'cm must be a {k}x{k} matrix of non-negative counts (one row per class in {class_names}), '
                     f'got {cm.tolist()}.')
  rows = cm.sum(axis=1, keepdims=True)
  shares = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
  fig = _figure()
  ax = fig.add_subplot()
  # Colour by row share, so the minority class (normal, about a quarter of the images) is as visible as the majority.
  ax.imshow(shares, cmap='Blues', vmin=0, vmax=1)
  for (i, j), count in np.ndenumerate(cm):
    ax.text(j, i, f'{count:g}\n{shares[i, j]:.0%}', ha='center', va='center',
            color='white' if shares[i, j] > 0.5 else 'black')
  ax.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
         xlabel='predicted', ylabel='actual', title=title)
  return _png(fig)


def roc_curve_png(labels, probs, *, threshold=None) -> bytes:
  """The ROC curve with its AUC, and the operating point of `threshold` if given.

  Args:
    labels: shape (n,) array of 0 (normal) / 1 (pneumonia), with both classes present.
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    threshold: the decision threshold to mark, or None.

  Returns:
    PNG bytes.

  Raises:
    ValueError: as `trainer.metrics.ranking_metrics` and `metrics_at`.
  """
  auc = metrics.ranking_metrics(labels, probs)['roc_auc']
  fpr, tpr, _ = sk_metrics.roc_curve(np.ravel(labels), np.ravel(probs))
  fig = _figure()
  ax = fig.add_subplot()
  ax.plot(fpr, tpr, label=f'ROC (AUC {auc:.3f})')
  ax.plot([0, 1], [0, 1], linestyle='--', color='grey', label='chance')
  if threshold is not None:
    at = metrics.metrics_at(labels, probs, threshold)
    ax.plot(1 - at['specificity'], at['sensitivity'], 'o', color='tab:red',
            label=f"threshold {threshold:.3f}: sens {at['sensitivity']:.2f}, spec {at['specificity']:.2f}")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect='equal', xlabel='1 - specificity (false positive rate)',
         ylabel='sensitivity (true positive rate)', title='ROC curve')
  ax.legend(loc='lower right', fontsize='small')
  return _png(fig)


def pr_curve_png(labels, probs, *, threshold=None) -> bytes:
  """The precision-recall curve with its average precision, and the operating point of `threshold` if given.

  Args:
    labels: shape (n,) array of 0 (normal) / 1 (pneumonia), with both classes present.
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    threshold: the decision threshold to mark, or None.

  Returns:
    PNG bytes.

  Raises:
    ValueError: as `trainer.metrics.ranking_metrics` and `metrics_at`.
  """
  ap = metrics.ranking_metrics(labels, probs)['pr_auc']
  labels = np.ravel(labels)
  precision, recall, _ = sk_metrics.precision_recall_curve(labels, np.ravel(probs))
  fig = _figure()
  ax = fig.add_subplot()
  # Steps, not lines: average precision is the area under these steps (as sklearn's PrecisionRecallDisplay draws it).
  ax.plot(recall, precision, drawstyle='steps-post', label=f'PR (AP {ap:.3f})')
  prevalence = float(np.mean(labels))
  ax.axhline(prevalence, linestyle='--', color='grey', label=f'chance (prevalence {prevalence:.2f})')
  if threshold is not None:
    at = metrics.metrics_at(labels, probs, threshold)
    ax.plot(at['sensitivity'], at['precision'], 'o', color='tab:red',
            label=f"threshold {threshold:.3f}: recall {at['sensitivity']:.2f}, prec {at['precision']:.2f}")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect='equal', xlabel='recall (sensitivity)', ylabel='precision',
         title='Precision-recall curve')
  ax.legend(loc='lower left', fontsize='small')
  return _png(fig)


def reliability_png(calibration_dict) -> bytes:
  """The reliability diagram: observed frequency against mean predicted probability per bin, over the bin counts.

  Args:
    calibration_dict: the dict `trainer.metrics.calibration` returns.

  Returns:
    PNG bytes.

  Raises:
    ValueError: if `calibration_dict` lacks the keys `calibration` returns.
  """
  keys = ('ece', 'bin_edges', 'mean_predicted', 'observed_frequency', 'count')
  if missing := [key for key in keys if key not in calibration_dict]:
    raise ValueError(f'calibration_dict lacks {missing}; pass the dict trainer.metrics.calibration returns.')
  edges = np.asarray(calibration_dict['bin_edges'], dtype=np.float64)
  count = np.asarray(calibration_dict['count'])
  filled = count > 0
  predicted = np.array([p for p, c in zip(calibration_dict['mean_predicted'], count) if c], dtype=np.float64)
  observed = np.array([o for o, c in zip(calibration_dict['observed_frequency'], count) if c], dtype=np.float64)
  fig = _figure()
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.plot([0, 1], [0, 1], linestyle='--', color='grey', label='perfectly calibrated')
  top.plot(predicted, observed, 'o-', label='model')
  top.set(xlim=(0, 1), ylim=(0, 1), ylabel='observed frequency',
          title=f"Reliability (ECE {calibration_dict['ece']:.3f})")
  top.legend(loc='upper left', fontsize='small')
  bottom.bar(edges[:-1][filled], count[filled], width=np.diff(edges)[filled], align='edge', edgecolor='white')
  bottom.set(xlabel='mean predicted probability', ylabel='images')
  return _png(fig)


def image_grid_png(images, labels=None, ncols=8, class_names=CLASS_NAMES) -> bytes:
  """A grid of images, e.g. a batch of augmented training images for TensorBoard.

  Args:
    images: uint8 array of shape (N, H, W, 1) or (N, H, W, 3).
    labels: None, or N labels shown as titles: class indices (into `class_names`) or strings.
    ncols: images per row.
    class_names: names of the class indices.

  Returns:
    PNG bytes.

  Raises:
    ValueError: if `images` is not a non-empty uint8 (N, H, W, 1 or 3) array, `labels` does not have N entries or
      holds an index outside `class_names`, or `ncols` is not positive.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not images.shape[0]:
    raise ValueError(f'images must be a non-empty uint8 array of shape (N, H, W, 1) or (N, H, W, 3), got '
                     f'{images.dtype} of shape {images.shape}.')
  if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
    raise ValueError(f'ncols must be a positive integer, got {ncols!r}.')
  n = images.shape[0]
  if labels is not None:
    labels = [_label_name(label, class_names) for label in np.asarray(labels).reshape(-1)]
    if len(labels) != n:
      raise ValueError(f'labels must have one entry per image: got {len(labels)} labels for {n} images.')
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  fig = _figure(width=1.25 * ncols, height=1.25 * nrows + (0.2 * nrows if labels else 0))
  for i, ax in enumerate(fig.subplots(nrows, ncols, squeeze=False).flat):
    ax.set_axis_off()
    if i < n:
      # Fixed 0..255 limits: an auto-scaled grayscale would hide what contrast augmentation did to the image.
      ax.imshow(images[i, ..., 0] if images.shape[-1] == 1 else images[i], cmap='gray', vmin=0, vmax=255)
      if labels:
        ax.set_title(labels[i], fontsize='small')
  return _png(fig)


def _label_name(label, class_names):
  if isinstance(label, bytes):
    return label.decode()
  if isinstance(label, (str, np.str_)):
    return str(label)
  if not 0 <= int(label) < len(class_names):
    raise ValueError(f'label {label} is not an index into class_names {class_names}.')
  return class_names[int(label)]


def _figure(width=_INCHES, height=_INCHES):
  fig = Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  return buffer.getvalue()
