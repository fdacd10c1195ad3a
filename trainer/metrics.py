"""Pure numpy metrics of a binary classifier: the threshold rule, metrics at a threshold, ranking, calibration, and
the patient-level bootstrap.

Everything here takes numpy arrays of labels (0 = normal, 1 = pneumonia) and predicted probabilities of pneumonia, so
the training loop can call it at the end of every epoch and a program can call it on a saved model; nothing here
imports TensorFlow. A probability at or above the threshold is called pneumonia (`probs >= threshold`), the same rule
`sklearn.metrics.roc_curve` uses, so a threshold chosen on the ROC curve gives on the same data exactly the
sensitivity and specificity it was chosen for.

The bootstrap resamples patients, not images: the Kermany et al. (2018) data has several images of some patients,
and those images are not independent, so an image-level bootstrap would give intervals that are too narrow.
"""

from collections.abc import Callable
import dataclasses

import numpy as np
from sklearn import metrics as sk_metrics

from trainer import errors

# The metrics of `metrics_at` that get a bootstrap interval (the confusion matrix and threshold do not).
THRESHOLD_METRICS = ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1')
RANKING_METRICS = ('roc_auc', 'pr_auc')

# Youden's J of two thresholds that cut the data the same way can differ in the last bits (tp/P - fp/N is computed
# from different counts); anything closer than this is a tie.
_TIE_TOLERANCE = 1e-12
# Resamples are processed in chunks of at most this many (resample, image) weights (16 MB of float64 each), so a
# large test set does not need a (n_resamples, n_images) matrix in memory at once.
_CHUNK_ELEMENTS = 1 << 21


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
  labels, probs = check_inputs(labels, probs)
  require_both_classes(labels, 'choose_threshold (validation labels)')
  fpr, tpr, thresholds = sk_metrics.roc_curve(labels, probs, drop_intermediate=False)
  # roc_curve starts at threshold=inf (nothing called positive); it is not a usable threshold.
  finite = np.isfinite(thresholds)
  fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
  youden = tpr - fpr
  best = np.flatnonzero(youden >= youden.max() - _TIE_TOLERANCE)
  # thresholds are in decreasing order, so argmin's first-hit rule makes the higher of two equidistant ones win.
  return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def pooled_threshold(shifted: dict[str, dict]) -> float:
  """Youden's J on the validation split's predictions under every shift (`trainer.runs.predict_shifted`).

  Youden's J on the validation split alone puts the threshold just above its normal images; every shift in
  trainer.shift.SHIFTS pushes normal images' probabilities up (measured in EXPERIMENTS.md), so that threshold loses
  specificity first on shifted data. Pooling the shifted copies moves it up, and weighting the unshifted copy as much
  as all shifted ones keeps the sensitivity on unshifted images from paying for all of it.
  """
  copies = len(shifted) - 1  # The unshifted copy weighs as much as all shifted ones.
  weighted = [shifted['none']] * copies + [split for name, split in shifted.items() if name != 'none']
  return choose_threshold(np.concatenate([split['labels'] for split in weighted]),
                          np.concatenate([split['probs'] for split in weighted]))


def sensitivity_threshold(labels, probs, target: float) -> float:
  """The highest threshold at which at least `target` of the pneumonia images are called pneumonia.

  Under the shift the official test split shows, the normal images' probabilities rise while the pneumonia images
  keep theirs (EXPERIMENTS.md: each recipe's official sensitivity stayed at or above its validation one, while its
  specificity fell by 0.2-0.4). Youden's J puts the threshold just above the validation normals, where a shift of the
  normals costs the most specificity; this rule instead puts it as high as the sensitivity target allows, which is
  the threshold that keeps the most normals below it however far they move.

  Args:
    labels, probs: as `choose_threshold`'s; validation data only.
    target: the sensitivity to keep, in (0, 1].

  Returns:
    The threshold: one of the pneumonia images' probabilities.

  Raises:
    ValueError: if the inputs are malformed or hold no pneumonia image.
  """
  labels, probs = check_inputs(labels, probs)
  positives = np.sort(probs[labels == 1])
  if not positives.size:
    raise ValueError('sensitivity_threshold: the validation labels hold no pneumonia image.')
  # Calling the k lowest-scored pneumonia images normal keeps a sensitivity of 1 - k / n.
  return float(positives[int(np.floor((1 - target) * positives.size + 1e-9))])


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
  """A way to choose the decision threshold on the validation split: the one declaration of a rule.

  Attributes:
    name: how --threshold_rule and run.json's 'threshold_rule' name it.
    text: the rule in words, as the reports state it.
    shifted: whether it reads validation's predictions under every shift of trainer.shift.SHIFTS ({shift name:
      predictions}, 'none' the unshifted ones) rather than validation's predictions alone.
    choose: those predictions ({'labels', 'probs'} each) -> the threshold.
  """

  name: str
  text: str
  shifted: bool
  choose: Callable[[dict], float]


RULES = {rule.name: rule for rule in (
    ThresholdRule(
        'youden',
        'The decision threshold is chosen on the validation split only: the ROC-curve threshold that maximises '
        "Youden's J (sensitivity + specificity - 1), ties going to the threshold closest to 0.5; "
        'an image is called pneumonia when its probability is at or above the threshold.',
        shifted=False, choose=lambda split: choose_threshold(split['labels'], split['probs'])),
    ThresholdRule(
        'youden_with_shifts',
        "The decision threshold is chosen on the validation split only: the threshold that maximises Youden's J "
        '(sensitivity + specificity - 1) over the validation images as they are and their copies under every shift '
        'of trainer.shift.SHIFTS, the unshifted images weighing as much as all the shifted ones together; an image '
        'is called pneumonia when its probability is at or above the threshold.',
        shifted=True, choose=pooled_threshold),
    ThresholdRule(
        'sensitivity_at_0.95',
        'The decision threshold is chosen on the validation split only: the highest threshold at which at least 95% '
        'of its pneumonia images (the sensitivity goal) are called pneumonia, so that normal images shifted towards '
        'pneumonia stay below it as long as they can; an image is called pneumonia when its probability is at or '
        'above the threshold.',
        # Chosen on the unshifted split alone; it reads the shifted copies so that the export's model card can say
        # what specificity to expect under a shift (trainer.shift.stress at this threshold).
        shifted=True, choose=lambda shifted: sensitivity_threshold(shifted['none']['labels'],
                                                                   shifted['none']['probs'], 0.95)),
)}
THRESHOLD_RULES = tuple(RULES)
# Training chooses each epoch's threshold by this rule.
TRAINING_RULE = 'youden'


def threshold_rule(name: str) -> ThresholdRule:
  """The rule named `name`.

  Raises:
    errors.InvalidValue: no rule has that name.
  """
  if name not in RULES:
    raise errors.InvalidValue(f'Unknown threshold rule {name!r}: choose one of {", ".join(THRESHOLD_RULES)}.')
  return RULES[name]


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
  labels, probs = check_inputs(labels, probs)
  threshold = check_threshold(threshold)
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
  labels, probs = check_inputs(labels, probs)
  require_both_classes(labels, 'ranking_metrics')
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
  labels, probs = check_inputs(labels, probs)
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
  (at_threshold,), ranking, _ = bootstrap(labels, probs, groups, (threshold,), n_resamples=n_resamples,
                                           confidence=confidence, seed=seed)
  return {**at_threshold, **ranking}



def bootstrap(labels, probs, groups, thresholds, *, n_resamples, confidence, seed):
  """Patient-level bootstrap of the threshold metrics at each of `thresholds` and of the ranking metrics, all on the
  same resamples (so the intervals at two thresholds can be compared).

  Drawing n patients with replacement is the same as giving patient j a weight k_j ~ Multinomial(n, 1/n each): the
  number of times it is drawn. Every metric is then a function of weighted counts, so one matrix product per chunk
  of resamples replaces a Python loop over resamples.

  Returns:
    ([{metric: [lo, hi]} per threshold], {'roc_auc': [lo, hi], 'pr_auc': [lo, hi]}, number of resamples used).
  """
  labels, probs = check_inputs(labels, probs)
  groups = vector('groups', groups)
  if groups.size != labels.size:
    raise ValueError(f'groups must have one patient id per image: got {groups.size} ids for {labels.size} images.')
  thresholds = [check_threshold(t) for t in thresholds]
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


def vector(name, values):
  """`values` as a 1-D array; (n, 1) model outputs are accepted as (n,)."""
  array = np.asarray(values)
  if array.ndim == 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.ndim != 1:
    raise ValueError(f'{name} must be a vector of shape (n,) or (n, 1), got shape {np.shape(values)}.')
  return array


def check_inputs(labels, probs):
  """(labels, probs) as int64 and float64 vectors, or a ValueError saying what is wrong with them."""
  labels, probs = vector('labels', labels), vector('probs', probs)
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


def check_threshold(threshold):
  """`threshold` as a float, or a ValueError if it is not a number in [0, 1]."""
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) or not (
      0 <= threshold <= 1):
    raise ValueError(f'threshold must be a number in [0, 1], got {threshold!r}.')
  return float(threshold)


def require_both_classes(labels, what):
  """A ValueError naming `what` if `labels` (from `check_inputs`) hold one class only."""
  positives = int(labels.sum())
  if positives in (0, labels.size):
    only = 'pneumonia (1)' if positives else 'normal (0)'
    raise errors.InvalidValue(f'{what} needs both classes, but all {labels.size} labels are {only}.')

