"""The test report: metrics at 0.5 and at the validation threshold with patient-level intervals, as report.json,
report.md, figures and TensorBoard images.

`build_report` turns predictions into the report (a JSON-serialisable dict), `write_report` writes its files, and
`report_predictions` does both for a split's predictions and adds the figures.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import figures as figures_lib
from trainer import files
from trainer import metrics
from trainer import version

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_FIGURE_NAME = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]*')


def build_report(*, test_labels, test_probs, test_groups, val_threshold, n_resamples=1000, seed=0,
                 extra: dict | None = None,
                 threshold_rule: str = metrics.RULES[metrics.TRAINING_RULE].text) -> dict:
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
    threshold_rule: how `val_threshold` was chosen, in words (the text of trainer.metrics.RULES' training rule
      unless another rule chose it).

  Returns:
    A JSON-serialisable dict: {'n_images', 'n_patients', 'positives', 'ranking': {roc_auc, pr_auc, 'ci95'},
    'calibration': {...}, 'at_0.5': {metrics..., 'ci95': {...}}, 'at_val_threshold': {metrics..., 'ci95': {...}},
    'threshold_rule', 'bootstrap': {how the intervals were made}, **extra}.

  Raises:
    ValueError: if the inputs are malformed, the test labels hold only one class, or `extra` is not
      JSON-serialisable or reuses a report key.
  """
  labels, probs = metrics.check_inputs(test_labels, test_probs)
  metrics.require_both_classes(labels, 'build_report (test labels)')
  val_threshold = metrics.check_threshold(val_threshold)
  confidence = 0.95
  (at_half, at_val), ranking_ci, n_used = metrics.bootstrap(labels, probs, test_groups, (0.5, val_threshold),
                                                     n_resamples=n_resamples, confidence=confidence, seed=seed)
  report = {
      'n_images': int(labels.size),
      'n_patients': int(np.unique(metrics.vector('test_groups', test_groups)).size),
      'positives': int(labels.sum()),
      'ranking': {**metrics.ranking_metrics(labels, probs), 'ci95': ranking_ci},
      'calibration': metrics.calibration(labels, probs),
      'at_0.5': {**metrics.metrics_at(labels, probs, 0.5), 'ci95': at_half},
      'at_val_threshold': {**metrics.metrics_at(labels, probs, val_threshold), 'ci95': at_val},
      'threshold_rule': threshold_rule,
      'cxr_trainer': version.provenance(),
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
  tf.io.gfile.makedirs(out_dir)
  for name, png in figures.items():
    files.write_atomic(os.path.join(out_dir, f'{name}.png'), png)
  json_path = os.path.join(out_dir, 'report.json')
  md_path = os.path.join(out_dir, 'report.md')
  files.write_atomic(json_path, report_json + '\n')
  files.write_atomic(md_path, report_markdown(report, figures=sorted(figures)))
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
  for name in metrics.THRESHOLD_METRICS:
    lines.append(f"| {name} | {half[name]:.3f} | {_interval(half['ci95'][name])} | {val[name]:.3f} | "
                 f"{_interval(val['ci95'][name])} |")
  ranking = report['ranking']
  lines += ['', '## Ranking', '', '| metric | value | 95% CI |', '|---|---|---|']
  for name in metrics.RANKING_METRICS:
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



def _interval(bounds):
  return f'{bounds[0]:.3f}-{bounds[1]:.3f}'


def _number(value):
  return '-' if value is None else f'{value:.3f}'


def report_predictions(split: dict[str, np.ndarray], *, threshold: float, out_dir: str,
                       tensorboard_dir: str | None = None, extra: dict | None = None, n_resamples: int = 1000,
                       threshold_rule: str = metrics.RULES[metrics.TRAINING_RULE].text) -> dict:
  """`trainer.inference.evaluate_model` for predictions already made: `split` as `predict_split` or `predict_runs` return it.

  The confusion matrix's title names the split and the threshold (with its rule, from extra's 'operating_point'),
  since TensorBoard shows it beside validation's, which training draws at each epoch's own threshold.
  """
  report = build_report(test_labels=split['labels'], test_probs=split['probs'], test_groups=split['groups'],
                        val_threshold=threshold, n_resamples=n_resamples, extra=extra, threshold_rule=threshold_rule)
  rule = (extra or {}).get('operating_point', {}).get('threshold_rule')
  title = f'{(extra or {}).get("split", "test").capitalize()}, threshold {threshold:.3f}{f" ({rule})" if rule else ""}'
  pngs = {
      'confusion_matrix': figures_lib.confusion_matrix_png(report['at_val_threshold']['confusion_matrix'], title=title),
      'roc_curve': figures_lib.roc_curve_png(split['labels'], split['probs'], threshold=threshold),
      'pr_curve': figures_lib.pr_curve_png(split['labels'], split['probs'], threshold=threshold),
      'reliability': figures_lib.reliability_png(report['calibration']),
  }
  write_report(report, out_dir, figures=pngs)
  if tensorboard_dir is not None:
    with tf.summary.create_file_writer(tensorboard_dir).as_default():
      for name, png in pngs.items():
        tf.summary.image(name, tf.image.decode_png(png)[None], step=0)
  return report
