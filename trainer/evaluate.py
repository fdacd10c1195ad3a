"""Evaluation: the threshold rule, metrics, patient-level bootstrap intervals, calibration, report files.

Everything here takes numpy arrays of labels (0 = normal, 1 = pneumonia) and predicted probabilities of pneumonia, so
the training loop can call it at the end of every epoch and a CLI can call it on a saved model. A probability at or
above the threshold is called pneumonia (`probs >= threshold`), the same rule `sklearn.metrics.roc_curve` uses, so a
threshold chosen on the ROC curve gives on the same data exactly the sensitivity and specificity it was chosen for.

The test report resamples patients, not images: the Kermany et al. (2018) data has several images of some patients,
and those images are not independent, so an image-level bootstrap would give intervals that are too narrow.

At the bottom, `evaluate_model` runs a model over a split and writes its report, figures and TensorBoard images (the
end of training and the CLI both use it), and the CLI evaluates a finished run again, e.g. on another split:

    python -m trainer.evaluate --model_dir=runs/resnet50 --split=test
    python -m trainer.evaluate --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble   # their mean probability
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import re

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
from sklearn import metrics as sk_metrics
import tensorflow as tf

from trainer import cli
from trainer import config as config_lib
from trainer import data
from trainer import export

THRESHOLD_RULE = (
    'The decision threshold is chosen on the validation split only: the ROC-curve threshold that maximises '
    "Youden's J (sensitivity + specificity - 1), ties going to the threshold closest to 0.5; "
    'an image is called pneumonia when its probability is at or above the threshold.')

# youden: THRESHOLD_RULE; youden_with_shifts: trainer.shift.THRESHOLD_RULE (validation and its shifted copies).
THRESHOLD_RULES = ('youden', 'youden_with_shifts')
# Training chooses each epoch's threshold by this rule.
TRAINING_RULE = 'youden'

# The metrics of `metrics_at` that get a bootstrap interval (the confusion matrix and threshold do not).
THRESHOLD_METRICS = ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1')
RANKING_METRICS = ('roc_auc', 'pr_auc')

# Youden's J of two thresholds that cut the data the same way can differ in the last bits (tp/P - fp/N is computed
# from different counts); anything closer than this is a tie.
_TIE_TOLERANCE = 1e-12
# Resamples are processed in chunks of at most this many (resample, image) weights (16 MB of float64 each), so a
# large test set does not need a (n_resamples, n_images) matrix in memory at once.
_CHUNK_ELEMENTS = 1 << 21
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_FIGURE_NAME = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]*')

FLAGS = flags.FLAGS


def choose_threshold(labels, probs) -> float:
  """Chooses the decision threshold on validation data.

  The rule: among the thresholds of the ROC curve (every distinct probability in `probs`), take the one that
  maximises Youden's J = sensitivity + specificity - 1. Several thresholds can reach the same J (a plateau of the
  curve); the one closest to 0.5 wins, and of two equally close the higher one. An image is then called pneumonia
  when its probability is >= the threshold. Use validation data only: a threshold chosen on the test split makes the
  test metrics optimistic.

  Args:
    labels: shape (n,) (or (n, 1)) array of 0 (normal) / 1 (pneumonia).
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].

  Returns:
    The threshold, a float in [0, 1] that is one of the values of `probs`.

  Raises:
    ValueError: if the inputs are malformed, or the labels hold only one class (J is then undefined).
  """
  labels, probs = _check_inputs(labels, probs)
  _require_both_classes(labels, 'choose_threshold (validation labels)')
  fpr, tpr, thresholds = sk_metrics.roc_curve(labels, probs, drop_intermediate=False)
  # roc_curve starts at threshold=inf (nothing called positive); it is not a usable threshold.
  finite = np.isfinite(thresholds)
  fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
  youden = tpr - fpr
  best = np.flatnonzero(youden >= youden.max() - _TIE_TOLERANCE)
  # thresholds are in decreasing order, so argmin's first-hit rule makes the higher of two equidistant ones win.
  return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def metrics_at(labels, probs, threshold) -> dict:
  """Threshold metrics: an image is called pneumonia when its probability is >= `threshold`.

  A ratio whose denominator is 0 (e.g. precision when nothing is called positive, specificity when there are no
  normal images) is defined as 0.0, without a warning, so that every value is a plain float.

  Args:
    labels: shape (n,) (or (n, 1)) array of 0 (normal) / 1 (pneumonia).
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    threshold: the decision threshold, in [0, 1].

  Returns:
    {'accuracy', 'sensitivity' (= recall), 'specificity', 'precision', 'f1', 'confusion_matrix': [[tn, fp], [fn, tp]]
    (lists of ints), 'threshold'}.

  Raises:
    ValueError: if the inputs are malformed or the threshold is outside [0, 1].
  """
  labels, probs = _check_inputs(labels, probs)
  threshold = _check_threshold(threshold)
  tn, fp, fn, tp = _counts(np.ones((1, labels.size)), labels, probs >= threshold)
  values = _threshold_metrics(tn, fp, fn, tp)
  return {
      **{name: float(values[name][0]) for name in THRESHOLD_METRICS},
      'confusion_matrix': [[int(tn[0]), int(fp[0])], [int(fn[0]), int(tp[0])]],
      'threshold': threshold,
  }


def ranking_metrics(labels, probs) -> dict:
  """Threshold-free metrics.

  Args:
    labels: shape (n,) (or (n, 1)) array of 0 (normal) / 1 (pneumonia), with both classes present.
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].

  Returns:
    {'roc_auc': area under the ROC curve, 'pr_auc': average precision (the step-wise area under the
    precision-recall curve, as `sklearn.metrics.average_precision_score`; no optimistic trapezoids)}.

  Raises:
    ValueError: if the inputs are malformed or the labels hold only one class.
  """
  labels, probs = _check_inputs(labels, probs)
  _require_both_classes(labels, 'ranking_metrics')
  return {
      'roc_auc': float(sk_metrics.roc_auc_score(labels, probs)),
      'pr_auc': float(sk_metrics.average_precision_score(labels, probs)),
  }


def calibration(labels, probs, n_bins=10) -> dict:
  """Calibration with equal-width probability bins, for the ECE and the reliability diagram.

  Bin i holds the probabilities in [i / n_bins, (i + 1) / n_bins), the last bin also holds 1.0.
  ECE = sum over bins of (count / n) * |mean predicted probability - observed frequency of pneumonia|.

  Args:
    labels: shape (n,) (or (n, 1)) array of 0 (normal) / 1 (pneumonia).
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    n_bins: number of equal-width bins on [0, 1].

  Returns:
    {'n_bins', 'ece', 'brier' (mean squared error of the probabilities), 'bin_edges' (n_bins + 1 floats), and per
    bin 'mean_predicted', 'observed_frequency' (None for an empty bin) and 'count'}.

  Raises:
    ValueError: if the inputs are malformed or n_bins is not a positive integer.
  """
  labels, probs = _check_inputs(labels, probs)
  if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
    raise ValueError(f'n_bins must be a positive integer, got {n_bins!r}.')
  edges = np.arange(n_bins + 1) / n_bins  # i / n_bins is exact where linspace gives 0.30000000000000004.
  # digitize against the inner edges puts 1.0 into the last bin instead of a bin of its own.
  bins = np.digitize(probs, edges[1:-1])
  count = np.bincount(bins, minlength=n_bins)
  sum_predicted = np.bincount(bins, weights=probs, minlength=n_bins)
  sum_observed = np.bincount(bins, weights=labels, minlength=n_bins)
  # count * |mean_predicted - frequency| == |sum_predicted - sum_observed|, so empty bins need no special case.
  ece = float(np.abs(sum_predicted - sum_observed).sum() / labels.size)

  def per_bin(sums):
    return [float(s / c) if c else None for s, c in zip(sums, count)]

  return {
      'n_bins': int(n_bins),
      'ece': ece,
      'brier': float(sk_metrics.brier_score_loss(labels, probs)),
      'bin_edges': edges.tolist(),
      'mean_predicted': per_bin(sum_predicted),
      'observed_frequency': per_bin(sum_observed),
      'count': count.tolist(),
  }


def bootstrap_ci(labels, probs, groups, threshold, *, n_resamples=1000, confidence=0.95, seed=0) -> dict:
  """Percentile bootstrap intervals that resample patients, not images.

  Each resample draws as many patients as there are, with replacement, and takes all images of every drawn patient
  (a patient drawn twice counts twice). Resamples that hold only one class are skipped, since AUC, sensitivity and
  specificity are undefined on them; at least half of the resamples must be usable.

  Args:
    labels: shape (n,) (or (n, 1)) array of 0 (normal) / 1 (pneumonia).
    probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    groups: shape (n,) patient ids (any comparable values, e.g. strings), one per image.
    threshold: the decision threshold for the threshold metrics, in [0, 1].
    n_resamples: number of bootstrap resamples.
    confidence: coverage of the intervals, in (0, 1).
    seed: seed of the resampling, so a report can be reproduced.

  Returns:
    {metric: [lower, upper]} for every metric of `metrics_at` except the confusion matrix and threshold, and for
    `roc_auc` and `pr_auc`.

  Raises:
    ValueError: if the inputs are malformed or too few resamples hold both classes.
  """
  (at_threshold,), ranking, _ = _bootstrap(labels, probs, groups, (threshold,), n_resamples=n_resamples,
                                           confidence=confidence, seed=seed)
  return {**at_threshold, **ranking}


def build_report(*, test_labels, test_probs, test_groups, val_threshold, n_resamples=1000, seed=0,
                 extra: dict | None = None, threshold_rule: str = THRESHOLD_RULE) -> dict:
  """The test report: metrics at 0.5 and at the validation threshold, with patient-level 95% intervals.

  Both thresholds are evaluated on the same bootstrap resamples, so their intervals can be compared.

  Args:
    test_labels: shape (n,) array of 0 (normal) / 1 (pneumonia) of the test images.
    test_probs: the same shape, predicted probabilities of pneumonia in [0, 1].
    test_groups: shape (n,) patient id of every test image.
    val_threshold: the threshold chosen on validation by `choose_threshold`.
    n_resamples: number of bootstrap resamples.
    seed: seed of the resampling.
    extra: more JSON-serialisable entries for the report (e.g. model, dataset, checkpoint); their keys must not
      collide with the report's own.
    threshold_rule: how `val_threshold` was chosen, in words (THRESHOLD_RULE unless another rule chose it).

  Returns:
    A JSON-serialisable dict: {'n_images', 'n_patients', 'positives', 'ranking': {roc_auc, pr_auc, 'ci95'},
    'calibration': {...}, 'at_0.5': {metrics..., 'ci95': {...}}, 'at_val_threshold': {metrics..., 'ci95': {...}},
    'threshold_rule', 'bootstrap': {how the intervals were made}, **extra}.

  Raises:
    ValueError: if the inputs are malformed, the test labels hold only one class, or `extra` is not
      JSON-serialisable or reuses a report key.
  """
  labels, probs = _check_inputs(test_labels, test_probs)
  _require_both_classes(labels, 'build_report (test labels)')
  val_threshold = _check_threshold(val_threshold)
  confidence = 0.95
  (at_half, at_val), ranking_ci, n_used = _bootstrap(labels, probs, test_groups, (0.5, val_threshold),
                                                     n_resamples=n_resamples, confidence=confidence, seed=seed)
  report = {
      'n_images': int(labels.size),
      'n_patients': int(np.unique(_vector('test_groups', test_groups)).size),
      'positives': int(labels.sum()),
      'ranking': {**ranking_metrics(labels, probs), 'ci95': ranking_ci},
      'calibration': calibration(labels, probs),
      'at_0.5': {**metrics_at(labels, probs, 0.5), 'ci95': at_half},
      'at_val_threshold': {**metrics_at(labels, probs, val_threshold), 'ci95': at_val},
      'threshold_rule': threshold_rule,
      'bootstrap': {
          'method': 'percentile',
          'unit': 'patient',
          'confidence': confidence,
          'n_resamples': int(n_resamples),
          'n_resamples_used': n_used,
          'seed': None if seed is None else int(seed),
      },
  }
  extra = dict(extra or {})
  if clash := sorted(set(extra) & set(report)):
    raise ValueError(f'extra reuses report keys {clash}; rename them.')
  try:
    json.dumps(extra, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f'extra must be JSON-serialisable (plain str/int/float/list/dict, no NaN): {e}') from None
  # A model of the procedural images is one whatever split it is scored on.
  if warning := config_lib.data_warning(extra.get('trained_on', extra.get('dataset'))):
    report['warning'] = warning
  return {**report, **extra}


def rule_text(name: str) -> str:
  """The rule named `name` (one of THRESHOLD_RULES), in words."""
  if name == 'youden_with_shifts':
    from trainer import shift  # pylint: disable=import-outside-toplevel  (it imports this module)
    return shift.THRESHOLD_RULE
  if name != 'youden':
    raise ValueError(f'Unknown threshold rule {name!r}: choose one of {", ".join(THRESHOLD_RULES)}.')
  return THRESHOLD_RULE


def write_report(report: dict, out_dir: str, *, figures: dict[str, bytes] | None = None) -> tuple[str, str]:
  """Writes report.json, report.md and the figures into `out_dir`, each file atomically.

  Figures are written first and report.md last, so a report.md that exists has all the pictures it links to. A killed
  process leaves either the old file or the new one, never half of one.

  Args:
    report: a dict from `build_report`.
    out_dir: the directory to write into; created if missing.
    figures: {name: PNG bytes} (e.g. from `trainer.figures`), each written as out_dir/<name>.png and linked from
      report.md.

  Returns:
    (path of report.json, path of report.md).

  Raises:
    ValueError: if a figure name is not a plain file name, a figure is not PNG bytes, or the report holds values
      JSON cannot represent (NaN, numpy arrays).
  """
  figures = dict(figures or {})
  for name, png in figures.items():
    if not isinstance(name, str) or not _FIGURE_NAME.fullmatch(name):
      raise ValueError(f'Figure name {name!r} must be a plain file name (letters, digits, _ - .), without ".png".')
    if not isinstance(png, bytes) or not png.startswith(_PNG_SIGNATURE):
      raise ValueError(f'Figure {name!r} must be PNG bytes (as returned by trainer.figures).')
  try:
    report_json = json.dumps(report, indent=2, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f'The report is not JSON-serialisable: {e}') from None
  os.makedirs(out_dir, exist_ok=True)
  for name, png in figures.items():
    _write_atomic(os.path.join(out_dir, f'{name}.png'), png)
  json_path = os.path.join(out_dir, 'report.json')
  md_path = os.path.join(out_dir, 'report.md')
  _write_atomic(json_path, (report_json + '\n').encode())
  _write_atomic(md_path, report_markdown(report, figures=sorted(figures)).encode())
  return json_path, md_path


def report_markdown(report: dict, *, figures=()) -> str:
  """The report as Markdown: tables of metrics with 95% CIs at both thresholds, ranking, calibration, confusion
  matrices, links to `<name>.png` for every name in `figures`, and the extra entries."""
  half, val = report['at_0.5'], report['at_val_threshold']
  boot = report['bootstrap']
  lines = [
      '# Test report',
      '',
      *([f"**Warning: {report['warning']}**", ''] if report.get('warning') else []),
      f"{report['n_images']} images of {report['n_patients']} patients, {report['positives']} with pneumonia.",
      '',
      f"Thresholds: 0.5 and the validation threshold {val['threshold']:.4f}. {report['threshold_rule']}",
      '',
      f"95% CI: {boot['method']} bootstrap over {boot['unit']}s ({boot['n_resamples_used']} of "
      f"{boot['n_resamples']} resamples held both classes; seed {boot['seed']}).",
      '',
      '## Metrics at both thresholds',
      '',
      f"| metric | at 0.5 | 95% CI | at {val['threshold']:.4f} (validation) | 95% CI |",
      '|---|---|---|---|---|',
  ]
  for name in THRESHOLD_METRICS:
    lines.append(f"| {name} | {half[name]:.3f} | {_interval(half['ci95'][name])} | {val[name]:.3f} | "
                 f"{_interval(val['ci95'][name])} |")
  ranking = report['ranking']
  lines += ['', '## Ranking', '', '| metric | value | 95% CI |', '|---|---|---|']
  for name in RANKING_METRICS:
    lines.append(f"| {name} | {ranking[name]:.3f} | {_interval(ranking['ci95'][name])} |")
  cal = report['calibration']
  lines += [
      '', '## Calibration', '',
      f"ece: {cal['ece']:.3f} ({cal['n_bins']} equal-width bins); brier: {cal['brier']:.3f}", '',
      '| bin | mean predicted | observed frequency | count |', '|---|---|---|---|',
  ]
  for i, count in enumerate(cal['count']):
    lo, hi = cal['bin_edges'][i], cal['bin_edges'][i + 1]
    lines.append(f"| {lo:.1f}-{hi:.1f} | {_number(cal['mean_predicted'][i])} | "
                 f"{_number(cal['observed_frequency'][i])} | {count} |")
  lines += ['', '## Confusion matrices']
  for title, m in (('at 0.5', half), (f"at {val['threshold']:.4f} (validation)", val)):
    (tn, fp), (fn, tp) = m['confusion_matrix']
    lines += [
        '', f'### {title}', '',
        '| actual \\ predicted | normal | pneumonia |', '|---|---|---|',
        f'| normal | {tn} | {fp} |', f'| pneumonia | {fn} | {tp} |',
    ]
  if figures:
    lines += ['', '## Figures', '']
    lines += [f'![{name}]({name}.png)' for name in figures]
  own = {'n_images', 'n_patients', 'positives', 'ranking', 'calibration', 'at_0.5', 'at_val_threshold',
         'threshold_rule', 'bootstrap'}
  if extra := {k: v for k, v in report.items() if k not in own}:
    lines += ['', '## Run', '', '| key | value |', '|---|---|']
    # A '|' inside a value would end its table cell.
    lines += [f"| {k} | {(v if isinstance(v, str) else json.dumps(v)).replace('|', '&#124;')} |"
              for k, v in extra.items()]
  return '\n'.join(lines) + '\n'


def _bootstrap(labels, probs, groups, thresholds, *, n_resamples, confidence, seed):
  """Patient-level bootstrap of the threshold metrics at each of `thresholds` and of the ranking metrics.

  Drawing n patients with replacement is the same as giving patient j a weight k_j ~ Multinomial(n, 1/n each): the
  number of times it is drawn. Every metric is then a function of weighted counts, so one matrix product per chunk
  of resamples replaces a Python loop over resamples.

  Returns:
    ([{metric: [lo, hi]} per threshold], {'roc_auc': [lo, hi], 'pr_auc': [lo, hi]}, number of resamples used).
  """
  labels, probs = _check_inputs(labels, probs)
  groups = _vector('groups', groups)
  if groups.size != labels.size:
    raise ValueError(f'groups must have one patient id per image: got {groups.size} ids for {labels.size} images.')
  thresholds = [_check_threshold(t) for t in thresholds]
  if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
    raise ValueError(f'n_resamples must be a positive integer, got {n_resamples!r}.')
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), e.g. 0.95, got {confidence!r}.')
  _, patient = np.unique(groups, return_inverse=True)
  n_patients = int(patient.max()) + 1
  rng = np.random.default_rng(seed)
  chunk = max(1, _CHUNK_ELEMENTS // labels.size)
  draws = {name: [] for name in (*[(i, m) for i in range(len(thresholds)) for m in THRESHOLD_METRICS],
                                 *RANKING_METRICS)}
  for start in range(0, n_resamples, chunk):
    size = min(chunk, n_resamples - start)
    times_drawn = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=size)
    weights = times_drawn[:, patient].astype(np.float64)
    positives = weights @ labels
    usable = (positives > 0) & (positives < weights.sum(axis=1))
    weights = weights[usable]
    for i, threshold in enumerate(thresholds):
      values = _threshold_metrics(*_counts(weights, labels, probs >= threshold))
      for name in THRESHOLD_METRICS:
        draws[(i, name)].append(values[name])
    for name, values in zip(RANKING_METRICS, _weighted_ranking(weights, labels, probs)):
      draws[name].append(values)
  draws = {key: np.concatenate(parts) for key, parts in draws.items()}
  n_used = int(draws[RANKING_METRICS[0]].size)
  if n_used < n_resamples / 2:
    raise ValueError(f'Only {n_used} of {n_resamples} bootstrap resamples hold both classes: the data has too few '
                     f'patients of one class ({n_patients} patients, {int(labels.sum())} positive images).')
  tails = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])

  def interval(key):
    return [float(v) for v in np.percentile(draws[key], tails)]

  per_threshold = [{name: interval((i, name)) for name in THRESHOLD_METRICS} for i in range(len(thresholds))]
  ranking = {name: interval(name) for name in RANKING_METRICS}
  return per_threshold, ranking, n_used


def _counts(weights, labels, predicted):
  """Weighted (tn, fp, fn, tp), each of shape (n_resamples,), for weights of shape (n_resamples, n_images)."""
  positive = labels.astype(bool)
  return tuple(weights @ ((positive == actual) & (predicted == called)).astype(np.float64)
               for actual, called in ((False, False), (False, True), (True, False), (True, True)))


def _threshold_metrics(tn, fp, fn, tp):
  """The metrics of `metrics_at` from (weighted) counts, elementwise; 0/0 is 0.0."""
  return {
      'accuracy': _ratio(tp + tn, tp + tn + fp + fn),
      'sensitivity': _ratio(tp, tp + fn),
      'specificity': _ratio(tn, tn + fp),
      'precision': _ratio(tp, tp + fp),
      # 2tp / (2tp + fp + fn) is the harmonic mean of precision and recall without their 0/0 cases.
      'f1': _ratio(2 * tp, 2 * tp + fp + fn),
  }


def _weighted_ranking(weights, labels, probs):
  """ROC AUC and average precision of every row of `weights` (n_resamples, n_images), as sklearn computes them with
  `sample_weight` (ties in `probs` count half for AUC and form one step for average precision)."""
  order = np.argsort(-probs, kind='stable')
  sorted_probs, sorted_labels = probs[order], labels[order].astype(np.float64)
  # One column per distinct probability, from the highest down: the weight of positives and negatives at that value.
  starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])
  w = weights[:, order]
  pos = np.add.reduceat(w * sorted_labels, starts, axis=1)
  neg = np.add.reduceat(w * (1 - sorted_labels), starts, axis=1)
  tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
  total_pos, total_neg = tp[:, -1], fp[:, -1]
  # Each negative is outranked by the positives above it, and half of those tied with it.
  roc_auc = (neg * (tp - 0.5 * pos)).sum(axis=1) / (total_pos * total_neg)
  # AP = sum over steps of (recall gained) * (precision there).
  average_precision = (pos * _ratio(tp, tp + fp)).sum(axis=1) / total_pos
  return roc_auc, average_precision


def _ratio(numerator, denominator):
  numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _vector(name, values):
  """`values` as a 1-D array; (n, 1) model outputs are accepted as (n,)."""
  array = np.asarray(values)
  if array.ndim == 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.ndim != 1:
    raise ValueError(f'{name} must be a vector of shape (n,) or (n, 1), got shape {np.shape(values)}.')
  return array


def _check_inputs(labels, probs):
  labels, probs = _vector('labels', labels), _vector('probs', probs)
  if labels.size != probs.size:
    raise ValueError(f'labels and probs must have the same length, got {labels.size} and {probs.size}.')
  if labels.size == 0:
    raise ValueError('labels and probs are empty: there is nothing to evaluate.')
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f'labels must be 0 (normal) or 1 (pneumonia), got values {np.unique(labels)[:6].tolist()}.')
  if not np.issubdtype(probs.dtype, np.number):
    raise ValueError(f'probs must be numbers, got dtype {probs.dtype}.')
  probs = probs.astype(np.float64)
  if not ((probs >= 0) & (probs <= 1)).all():  # False for NaN too.
    raise ValueError(f'probs must be probabilities in [0, 1] (sigmoid outputs, not logits), got values from '
                     f'{np.nanmin(probs)} to {np.nanmax(probs)}{" and NaN" if np.isnan(probs).any() else ""}.')
  return labels.astype(np.int64), probs


def _check_threshold(threshold):
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) or not (
      0 <= threshold <= 1):
    raise ValueError(f'threshold must be a number in [0, 1], got {threshold!r}.')
  return float(threshold)


def _require_both_classes(labels, what):
  positives = int(labels.sum())
  if positives in (0, labels.size):
    only = 'pneumonia (1)' if positives else 'normal (0)'
    raise ValueError(f'{what} needs both classes, but all {labels.size} labels are {only}.')


def _interval(bounds):
  return f'{bounds[0]:.3f}-{bounds[1]:.3f}'


def _number(value):
  return '-' if value is None else f'{value:.3f}'


def _write_atomic(path, data: bytes):
  """Writes `data` beside `path` and renames it over `path`, so a reader never sees half a file."""
  with export.replacing(path) as partial, open(partial, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


# The model on a split, and the CLI.


def make_predict(model: keras.Model):
  """A traced function: uint8 images (batch, side, side, 1) -> float32 pneumonia probabilities (batch,).

  Traced once for every batch size, so build it once and call it for every batch and every epoch.
  """
  side = model.inputs[0].shape[1]

  @tf.function(input_signature=[tf.TensorSpec([None, side, side, 1], tf.uint8)])
  def predict(images):
    return tf.cast(model(images, training=False), tf.float32)[:, 0]

  return predict


def predict_split(model: keras.Model, dataset: tf.data.Dataset, *, predict=None) -> dict[str, np.ndarray]:
  """Runs `model` over a whole split, on this worker alone.

  Args:
    model: a model from `trainer.models.build_model` (uint8 images in, probabilities out).
    dataset: batches of dicts with 'image', 'label' and 'patient_id', as `trainer.data.eval_dataset` yields them.
    predict: `make_predict(model)`, for a caller that predicts many times (each epoch); made here if None.

  Returns:
    {'probs', 'labels', 'groups' (patient ids)}: one entry per image, in the dataset's order.
  """
  predict = predict or make_predict(model)
  probs, labels, groups = [], [], []
  for batch in dataset:
    probs.append(predict(batch['image']).numpy())
    labels.append(batch['label'].numpy())
    groups.append(batch['patient_id'].numpy())
  return {'probs': np.concatenate(probs), 'labels': np.concatenate(labels), 'groups': np.concatenate(groups)}


def evaluate_model(model: keras.Model, dataset: tf.data.Dataset, *, threshold: float, out_dir: str,
                   tensorboard_dir: str | None = None, extra: dict | None = None, n_resamples: int = 1000) -> dict:
  """Reports a model on one split: report.json, report.md and the figures in `out_dir`, and the figures in TensorBoard.

  Args:
    model: a model from `trainer.models.build_model`.
    dataset: the split, as `trainer.data.eval_dataset` yields it.
    threshold: the decision threshold chosen on validation (run.json's 'threshold').
    out_dir: where the report files and PNGs go; created if missing.
    tensorboard_dir: if given, the same PNGs are written there as TensorBoard images, at step 0.
    extra: more entries for the report, as in `build_report`.
    n_resamples: bootstrap resamples of the 95% intervals.

  Returns:
    The report, as `build_report` returns it.

  Raises:
    ValueError: as `build_report`, e.g. if the split holds only one class.
  """
  return report_predictions(predict_split(model, dataset), threshold=threshold, out_dir=out_dir,
                            tensorboard_dir=tensorboard_dir, extra=extra, n_resamples=n_resamples)


def report_predictions(split: dict[str, np.ndarray], *, threshold: float, out_dir: str,
                       tensorboard_dir: str | None = None, extra: dict | None = None, n_resamples: int = 1000,
                       threshold_rule: str = THRESHOLD_RULE) -> dict:
  """`evaluate_model` for predictions already made: `split` as `predict_split` or `predict_runs` return it.

  The confusion matrix's title names the split and the threshold (with its rule, from extra's 'operating_point'),
  since TensorBoard shows it beside validation's, which training draws at each epoch's own threshold.
  """
  # Here, not at the top: trainer.figures imports this module.
  from trainer import figures

  report = build_report(test_labels=split['labels'], test_probs=split['probs'], test_groups=split['groups'],
                        val_threshold=threshold, n_resamples=n_resamples, extra=extra, threshold_rule=threshold_rule)
  rule = (extra or {}).get('operating_point', {}).get('threshold_rule')
  title = f'{(extra or {}).get("split", "test").capitalize()}, threshold {threshold:.3f}{f" ({rule})" if rule else ""}'
  pngs = {
      'confusion_matrix': figures.confusion_matrix_png(report['at_val_threshold']['confusion_matrix'], title=title),
      'roc_curve': figures.roc_curve_png(split['labels'], split['probs'], threshold=threshold),
      'pr_curve': figures.pr_curve_png(split['labels'], split['probs'], threshold=threshold),
      'reliability': figures.reliability_png(report['calibration']),
  }
  write_report(report, out_dir, figures=pngs)
  if tensorboard_dir is not None:
    with tf.summary.create_file_writer(tensorboard_dir).as_default():
      for name, png in pngs.items():
        tf.summary.image(name, tf.image.decode_png(png)[None], step=0)
  return report


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished training run, as `load_run` reads it from its model_dir."""

  model_dir: str
  model: keras.Model
  image_size: int
  threshold: float
  config: dict
  # The name of the rule that chose `threshold` (THRESHOLD_RULES); None for an ensemble not chosen yet.
  threshold_rule: str | None = TRAINING_RULE


def load_run(model_dir: str) -> TrainedRun:
  """Loads the model and the validation threshold a training run (or `trainer.export`) left in its model_dir.

  Both are read from one export (`trainer.export.current_dir`), so a new export committed meanwhile cannot pair this
  model with its threshold. The model is read with Keras's safe mode: no Lambda layer or pickled code runs on loading.

  Args:
    model_dir: the --model_dir of a finished run, or the --out_dir of `trainer.export` (it holds model.keras and
      run.json).

  Returns:
    The run's folder, model, input side, threshold, the name of the rule that chose it, and training config (a dict
    of trainer.config.Config's fields).

  Raises:
    FileNotFoundError: if model.keras or run.json is missing.
    ValueError: if run.json is not a run.json the trainer wrote.
  """
  folder = export.current_dir(model_dir)
  paths = {name: os.path.join(folder, name) for name in ('model.keras', 'run.json')}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file; give the --model_dir of a finished training run '
                              '(it holds model.keras and run.json).')
  try:
    with open(paths['run.json']) as f:
      run = json.load(f)
    image_size, threshold, config = int(run['image_size']), float(run['threshold']), dict(run['config'])
    if not 0 <= threshold <= 1:  # NaN too, which would label every image normal.
      raise ValueError(f'its threshold {threshold} is not a probability')
    # Runs written before the rule was stored were all chosen by the training rule.
    rule = str(run.get('threshold_rule', TRAINING_RULE))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{paths["run.json"]} is not a run.json written by the trainer ({type(e).__name__}: {e}).'
                     ) from None
  model = export.load_model(paths['model.keras'])
  return TrainedRun(model_dir=model_dir, model=model, image_size=image_size, threshold=threshold, config=config,
                    threshold_rule=rule)


def predict_runs(runs: Sequence[TrainedRun], builder, split: str, *, batch_size: int = 32,
                 transform=None) -> dict[str, np.ndarray]:
  """The mean probability of one or more runs on a split, each run at its own input size.

  Args:
    runs: from `load_run`.
    builder: the split's dataset, from `trainer.data.prepare`.
    split: its name.
    batch_size: images per prediction batch.
    transform: if given, a function applied to every batch of uint8 images before the models see it (e.g. a
      `trainer.shift` perturbation).

  Returns:
    As `predict_split`, with 'probs' the mean over the runs and 'member_probs' (runs, images).
  """
  members = []
  for run in runs:
    # eval_dataset reads the split in file order, so the i-th prediction of every run is the same image.
    dataset = data.eval_dataset(builder, split, image_size=run.image_size, batch_size=batch_size, cache=False)
    if transform is not None:
      dataset = dataset.map(lambda batch: {**batch, 'image': transform(batch['image'])})
    members.append(predict_split(run.model, dataset))
  return {**members[0], 'probs': np.mean([m['probs'] for m in members], axis=0),
          'member_probs': np.stack([m['probs'] for m in members])}


def operating_point(runs: Sequence[TrainedRun], rule: str | None = None, **kwargs) -> dict:
  """The one decision threshold of a run, an export or an ensemble of runs, and the name of the rule that chose it.

  A run or export keeps the threshold stored with it, unless `rule` names another rule; several runs get theirs
  chosen on validation by `rule` (youden if None), as `ensemble_threshold` does. Every command goes through here, so
  the same models given the same way get the same threshold everywhere.

  Args:
    runs: from `load_run`.
    rule: None, or one of THRESHOLD_RULES.
    **kwargs: for `ensemble_threshold` (data_dir, manual_dir, batch_size, shifted).

  Returns:
    {'threshold', 'threshold_rule', 'chosen' ('stored' or 'now')}, and `ensemble_threshold`'s entries if chosen now.
  """
  if rule is not None and rule not in THRESHOLD_RULES:
    raise ValueError(f'Unknown threshold rule {rule!r}: choose one of {", ".join(THRESHOLD_RULES)}.')
  if len(runs) == 1 and runs[0].threshold_rule is not None and rule in (None, runs[0].threshold_rule):
    return {'threshold': runs[0].threshold, 'threshold_rule': runs[0].threshold_rule, 'chosen': 'stored'}
  return {**ensemble_threshold(runs, rule=rule or TRAINING_RULE, **kwargs), 'chosen': 'now'}


def ensemble_threshold(runs: Sequence[TrainedRun], *, rule: str = TRAINING_RULE, data_dir: str | None = None,
                       manual_dir: str | None = None, batch_size: int = 32, shifted: dict | None = None) -> dict:
  """The decision threshold of an ensemble (or of one run, again), chosen on validation by the rule named `rule`.

  Every member predicts the validation split of the dataset it was trained on (the same one for all), each at its
  own input size; the probabilities are averaged image by image.

  Args:
    runs: the members, from `load_run`.
    rule: one of THRESHOLD_RULES: youden (`choose_threshold`) or youden_with_shifts
      (`trainer.shift.pooled_threshold`).
    data_dir: where TFDS keeps built datasets (None: the first member's --data_dir).
    manual_dir: the downloaded data, if the dataset must be built (None: the first member's).
    batch_size: images per prediction batch.
    shifted: for youden_with_shifts, the validation predictions under every shift if already made
      (`trainer.shift.predict_shifted`).

  Returns:
    {'threshold', 'threshold_rule', 'dataset', 'validation_images', 'validation_roc_auc' (of the average), 'members'
    (model_dirs), 'member_thresholds', 'member_validation_roc_auc'}, and for youden_with_shifts 'stress'
    (`trainer.shift.stress` on validation at the threshold).

  Raises:
    ValueError: if the members were trained on different datasets.
  """
  dataset = run_dataset(runs)
  builder = data.prepare(dataset, data_dir=data_dir or runs[0].config.get('data_dir'),
                         manual_dir=manual_dir or runs[0].config.get('manual_dir'))
  stress = {}
  if rule == 'youden_with_shifts':
    from trainer import shift  # pylint: disable=import-outside-toplevel  (it imports this module)
    shifted = shifted or shift.predict_shifted(runs, builder, 'validation', batch_size=batch_size)
    split, threshold = shifted['none'], shift.pooled_threshold(shifted)
    stress = {'stress': shift.stress(shifted, threshold=threshold, split='validation')}
  else:
    split = predict_runs(runs, builder, 'validation', batch_size=batch_size)
    threshold = choose_threshold(split['labels'], split['probs'])
  labels = split['labels']
  return {
      'threshold': threshold,
      'threshold_rule': rule,
      **stress,
      'dataset': dataset,
      'validation_images': int(labels.size),
      'validation_roc_auc': ranking_metrics(labels, split['probs'])['roc_auc'],
      'members': [run.model_dir for run in runs],
      'member_thresholds': [run.threshold for run in runs],
      'member_validation_roc_auc': [ranking_metrics(labels, probs)['roc_auc'] for probs in split['member_probs']],
  }


def run_dataset(runs: Sequence[TrainedRun]) -> str:
  """The dataset the runs were trained on.

  Raises:
    ValueError: if they were trained on different ones (an ensemble's threshold is chosen on one validation split).
  """
  datasets = sorted({run.config['dataset'] for run in runs})
  if len(datasets) != 1:
    raise ValueError(f'The runs were trained on different datasets ({", ".join(datasets)}); an ensemble\'s threshold '
                     'is chosen on one validation split, so train them on the same one.')
  return datasets[0]


def _define_flags():
  # Defined only when this module runs as the program: trainer.main imports it (through trainer.train), and absl
  # refuses a second --model_dir.
  flags.DEFINE_list('model_dir', None, 'The --model_dir of a finished training run; or several, DIR1,DIR2,..., to '
                    'report their ensemble (the mean probability, at a threshold chosen on the validation split for '
                    'that mean).', required=True)
  flags.DEFINE_string('split', 'test', 'The split to report on: train, validation or test.')
  flags.DEFINE_string('dataset', None, 'A TFDS name with its config to evaluate on, e.g. '
                      'chest_xray_pneumonia/original (default: the run\'s dataset); images are resized to the '
                      'run\'s input size.')
  flags.DEFINE_string('data_dir', None, 'Where TFDS keeps built datasets (default: the run\'s).')
  flags.DEFINE_string('manual_dir', None, 'The downloaded data, if the dataset is not built yet (default: the '
                      'run\'s).')
  flags.DEFINE_string('out_dir', None, 'Where the report, the PNGs and their TensorBoard event file go (default for '
                      'one run: MODEL_DIR/eval_SPLIT; required for an ensemble).')
  flags.DEFINE_integer('batch_size', 32, 'Images per prediction batch.', lower_bound=1)
  flags.DEFINE_integer('n_resamples', 1000, 'Bootstrap resamples (of patients) for the 95% intervals.')
  define_threshold_rule_flag()


def define_threshold_rule_flag():
  """--threshold_rule, the same in every command that takes runs (evaluate, predict, shift, export)."""
  flags.DEFINE_enum('threshold_rule', None, THRESHOLD_RULES, 'Choose the threshold again on validation by this rule: '
                    'youden (Youden\'s J) or youden_with_shifts (Youden\'s J on validation and its shifted copies, '
                    'trainer.shift). Default: the threshold stored with the run or export (run.json names its rule); '
                    'for several runs, youden. `python -m trainer.export` stores an ensemble with its threshold.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  model_dirs = [os.path.expanduser(d) for d in FLAGS.model_dir]
  if len(model_dirs) > 1 and not FLAGS.out_dir:
    raise ValueError(f'--model_dir names {len(model_dirs)} runs: give the ensemble\'s report a folder with --out_dir.')
  runs = [load_run(d) for d in model_dirs]
  data_dir = os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else runs[0].config.get('data_dir')
  manual_dir = os.path.expanduser(FLAGS.manual_dir) if FLAGS.manual_dir else runs[0].config.get('manual_dir')
  # The split is checked first: the thresholds below take a pass (or, with shifts, ten) over validation.
  dataset = FLAGS.dataset or run_dataset(runs)
  builder = data.prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  if FLAGS.split not in builder.info.splits:
    raise ValueError(f'--split={FLAGS.split} is not a split of {dataset}: choose one of '
                     f'{", ".join(sorted(builder.info.splits))}.')
  point = operating_point(runs, FLAGS.threshold_rule, data_dir=data_dir, manual_dir=manual_dir,
                          batch_size=FLAGS.batch_size)
  threshold = point['threshold']
  extra = {'model': runs[0].config['model'], 'image_size': runs[0].image_size}
  if len(runs) > 1:
    extra = {'models': [run.config['model'] for run in runs], 'image_sizes': [run.image_size for run in runs],
             'ensemble': {k: point[k] for k in ('members', 'member_thresholds', 'validation_roc_auc',
                                                 'member_validation_roc_auc')}}
  out_dir = os.path.expanduser(FLAGS.out_dir or os.path.join(model_dirs[0], f'eval_{FLAGS.split}'))
  predictions = predict_runs(runs, builder, FLAGS.split, batch_size=FLAGS.batch_size)
  operating = {'threshold': threshold, 'threshold_rule': point['threshold_rule'], 'chosen': point['chosen']}
  report = report_predictions(predictions, threshold=threshold, out_dir=out_dir, tensorboard_dir=out_dir,
                              n_resamples=FLAGS.n_resamples,
                              extra={**extra, 'dataset': dataset, 'trained_on': run_dataset(runs), 'split': FLAGS.split,
                                     'operating_point': operating},
                              threshold_rule=rule_text(point['threshold_rule']))
  at = report['at_val_threshold']
  logging.info('%s at the threshold %.3f (%s, %s): ROC AUC %.3f, sensitivity %.3f, specificity %.3f. Report: %s',
               FLAGS.split, threshold, point['threshold_rule'], 'stored with the run' if point['chosen'] == 'stored'
               else 'chosen now on validation', report['ranking']['roc_auc'], at['sensitivity'], at['specificity'],
               os.path.join(out_dir, 'report.md'))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
