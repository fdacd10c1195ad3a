"""The export's model card: what the model is for and not for, its data, operating point, test metrics, stress test,
TFLite models, known failure modes and how it was made (`model_card`)."""

import numpy as np


_EXIF_FAILURE = ('- **EXIF orientation** is not applied by the SavedModel\'s bytes-in signature (TensorFlow '
                 'cannot read EXIF): an image stored on its side with an Orientation tag, as phones store photos, is '
                 'scored on its side. trainer.predict turns such images the way up; a server that calls the '
                 'SavedModel turns them first with `trainer.data.upright`.')


def _made_with(provenance: dict) -> str:
  """The model card's line naming the project's version and commit (`trainer.version.provenance`)."""
  commit = provenance.get('git_commit')
  version_name = provenance.get('version', '(version not recorded)')
  return f'cxr-trainer {version_name}' + (f', commit {commit}.' if commit else '.')


_FAILURE_MODES = (
    '## Known failure modes',
    '- **Acquisition shift.** The official test folder\'s normal images are a separate acquisition batch from the '
    'train folder\'s, so validation (a patient split of the train folder) overstates what to expect on them: a '
    'CNN at ~97% on a validation split made by image scores ~73% on the official test split (trainer.shift). Every '
    'simulated shift of the stress test pushes normal images\' probabilities up (EXPERIMENTS.md): on images from '
    'other machines, exposures or post-processing, expect normal images called pneumonia (specificity) first.',
    '- Adults, other views, other hospitals and other lung diseases were never seen in training.',
    _EXIF_FAILURE,
    '- The label is at a fixed threshold; a site with another prevalence or other costs needs its own, chosen on '
    'its own validation data.',
)


_KERMANY = ('chest_xray_pneumonia/original', 'chest_xray_pneumonia/224', 'chest_xray_pneumonia/512')


def model_card(report: dict, run: dict, *, stress: dict | None = None) -> str:
  """The export's model card (Markdown): what the model is for and not for, its data, operating point, test metrics
  with patient-bootstrap intervals, calibration, stress test, known failure modes, and how it was made.

  Args:
    report: the test report, from `trainer.report.build_report`.
    run: the export's run.json.
    stress: a `trainer.shift.stress` result, if one was made.
  """
  config = run.get('config', {})
  members = run.get('members')
  lines = [
      '# Model card: pneumonia on paediatric chest X-rays '
      f'({"an ensemble of " + str(len(members)) + " runs" if members else config.get("model", "?")})',
      '',
      '## Intended use',
      'Research and teaching: a baseline for pneumonia vs normal on frontal chest radiographs of young children, and '
      'a worked example of training, evaluating and serving such a model.',
      '',
      '## Not intended for',
      '**This is not a medical device.** It has not been cleared or validated for clinical use, and must not be used '
      'to diagnose, triage or treat anyone. It was not tested on adults, on other hospitals\' machines, on lateral '
      'views, or on diseases other than pneumonia (it answers "pneumonia" or "normal" for any image it is given).',
      '',
      '## Training population and data',
      *_population(config.get('dataset', '?')),
      *_test_lines(report, run),
      '',
      '## Stress test (simulated acquisition shifts)',
      *_stress_lines(stress),
      '',
      '## TensorFlow Lite',
      *tflite_card(run.get('tflite')),
      '',
      *_FAILURE_MODES,
      '',
      '## How it was made',
      f'Command: `{run["command"]}`' if run.get('command') else 'Command: not recorded.',
  ]
  if members:
    lines.append(f'Members (their probabilities averaged): {", ".join(members)}.')
  lines += [_made_with(run.get('cxr_trainer', {})),
            f'Versions: {", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())}.',
            f'Training settings: see run.json\'s `config` (model {config.get("model")}, image size '
            f'{run.get("image_size")}, {config.get("epochs")}+{config.get("fine_tune_epochs")} epochs).', '']
  return '\n'.join(lines)


def _population(dataset: str) -> list[str]:
  if dataset in _KERMANY:
    return [
        f'`{dataset}`: the chest X-rays of Kermany et al. (2018, Cell; Mendeley data v2 / Kaggle '
        '"chest-xray-pneumonia"): '
        'anterior-posterior radiographs of children aged 1 to 5 from Guangzhou Women and Children\'s Medical Center, '
        'labelled normal or pneumonia (bacterial or viral) by physicians. One hospital, one population.',
        'Split: the official train folder is split by patient (no patient in both) into train and validation; the '
        'official test folder is the test split. The threshold and the best epoch were chosen on validation only.']
  return [f'`{dataset}`: not the Kermany et al. data (e.g. the procedural `synthetic` config, made for tests); '
          'this model says nothing about real radiographs.']


def _test_lines(report: dict, run: dict) -> list[str]:
  """The card's test split, operating point, test metrics and calibration."""
  at, ci = report['at_val_threshold'], report['at_val_threshold']['ci95']
  ranking = report['ranking']

  def row(name, value, bounds):
    return f'| {name} | {value:.3f} | {bounds[0]:.3f}-{bounds[1]:.3f} |'

  return [
      f'Test split: {report["n_images"]} images of {report["n_patients"]} patients, {report["positives"]} with '
      'pneumonia.',
      '',
      '## Operating point',
      f'Threshold **{run["threshold"]:.4f}**, rule `{run["threshold_rule"]}`: {report["threshold_rule"]} Every '
      'command (trainer.predict, trainer.evaluate, trainer.shift, the SavedModel\'s `pneumonia` output) uses this one '
      'threshold.',
      '',
      '## Test metrics (95% intervals: percentile bootstrap over patients, '
      f'{report["bootstrap"]["n_resamples_used"]} resamples)',
      '| metric | value | 95% CI |',
      '|---|---|---|',
      row('ROC-AUC', ranking['roc_auc'], ranking['ci95']['roc_auc']),
      row('PR-AUC', ranking['pr_auc'], ranking['ci95']['pr_auc']),
      *(row(name, at[name], ci[name]) for name in ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1')),
      '',
      f'Confusion matrix at the threshold ([[TN, FP], [FN, TP]]): {at["confusion_matrix"]}.',
      '',
      '## Calibration',
      f'Expected calibration error {report["calibration"]["ece"]:.3f} ({report["calibration"]["n_bins"]} equal-width '
      f'bins), Brier score {report["calibration"]["brier"]:.3f}, on the test split. The probabilities of a model '
      'trained with class weights are not the prevalence of pneumonia in another population.',
  ]


def _stress_lines(stress: dict | None) -> list[str]:
  """The model card's stress-test section: the worst over the shifts, and the specificity to expect under a shift."""
  if not stress:
    return ['Not run for this export (`python -m trainer.shift --model_dir=THIS_FOLDER` runs it).']
  worst = stress['worst']
  lines = [f'On the {stress["split"]} split at the threshold above, the worst over trainer.shift.SHIFTS: '
           f'ROC-AUC {worst["roc_auc"]:.3f}, accuracy {worst["accuracy"]:.3f}, sensitivity '
           f'{worst["sensitivity"]:.3f}, specificity {worst["specificity"]:.3f}.',
           f'With only the normal images shifted (as if they came from another machine than the pneumonia '
           f'images), the worst ROC-AUC is {worst["roc_auc_normals_shifted"]:.3f}.']
  if stress.get('shifts'):
    specificities = [row['specificity'] for row in stress['shifts'].values()]  # 'none' first.
    lines.append(f'**Specificity to expect on normal images from another machine:** about '
                 f'{np.mean(specificities[1:]):.2f} (the mean over the shifts; the worst {min(specificities):.2f}), '
                 f'against {specificities[0]:.2f} on the unshifted {stress["split"]} split. Why: the threshold is '
                 'fixed on validation, and a shift of the normal images moves their probabilities towards pneumonia '
                 'while the pneumonia images keep theirs, so specificity is what a new site loses first; an '
                 "independent run on the official test split (whose normals are such a batch) found the transfer "
                 "models' specificity 0.78-0.80 at validation-chosen thresholds (README, results).")
  return lines


def tflite_card(entry: dict | None) -> list[str]:
  """The model card's lines on the export's TFLite models (run.json's 'tflite', from `trainer.tflite.write`)."""
  if not entry:
    return ['No TFLite model in this export.']
  if 'error' in entry:
    return [f'No TFLite model in this export: {entry["error"]}.']
  float32, int8 = entry['float32'], entry['int8']
  ops = float32['select_tf_ops']
  lines = [f'`{float32["file"]}` (float32, {float32["bytes"]:,} bytes): uint8 grayscale images in, as the Keras model; '
           + (f'it needs the TensorFlow ops {", ".join(ops)} (SELECT_TF_OPS: a runtime with the Flex delegate).'
              if ops else 'TFLite\'s built-in ops only.')]
  if 'max_difference' in float32:
    lines.append(f'Its probabilities differ from the Keras model\'s by at most {float32["max_difference"]:.1e} on '
                 'validation images.')
  if int8.get('file'):
    lines.append(f'`{int8["file"]}` (dynamic-range int8 weights, {int8["bytes"]:,} bytes): at most '
                 f'{int8["max_difference"]:.4f} from the Keras model\'s probabilities on {int8["sample_images"]} '
                 'validation images.')
  else:
    lines.append(f'No int8 variant: {int8["why"]}.')
  return lines
