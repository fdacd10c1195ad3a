#!/usr/bin/env bash
# What both recipes share (sourced by launch/recipe.sh and launch/recipe_transfer.sh, not run): build the dataset from
# the manual download, train the recipe's model once per seed (the sourcing script's `train_command`), export the
# seeds' ensemble with its threshold chosen on validation, and stress-test the export on validation. The sourcing
# script sets `default_threshold_rule` and defines `train_command SEED MODEL_DIR FAMILIES [extra flags]`, which sets
# the array `train` (it may read `config` and `data_dir_flag`, set by `main`).

# Prints the comma-separated list $2 without the item $1.
without() {
  local item kept=()
  IFS=, read -r -a items <<< "$2"
  for item in "${items[@]}"; do
    [[ ${item} == "$1" ]] || kept+=("${item}")
  done
  (IFS=,; echo "${kept[*]}")
}

# One function, called on the last line: bash reads a script as it runs it, so editing this file during a 30-minute
# run would otherwise change the lines still to come (seen here: the final message went missing). `exit` on the same
# line, so nothing after it is read either.
main() {
  if [[ $# -lt 2 ]]; then
    echo "usage: $0 MANUAL_DIR OUTPUT_DIR [extra trainer flags]" >&2
    exit 2
  fi
  manual_dir=$1
  output_dir=$2
  shift 2

  config=${CONFIG:-224}
  if [[ ${config} != synthetic && ! -e ${manual_dir} ]]; then
    echo "error: MANUAL_DIR=${manual_dir} does not exist: put the Kaggle or Mendeley download there (see BUILD.md)." >&2
    exit 1
  fi

  data_dir_flag=()
  if [[ -n ${DATA_DIR:-} ]]; then
    data_dir_flag=(--data_dir="${DATA_DIR}")
  fi

  build=(python -m cxr_tfds.build --config="${config}" --manual_dir="${manual_dir}" "${data_dir_flag[@]}")

  # One training run per seed, each in OUTPUT_DIR/seed-N; their ensemble (the mean probability) is the recipe's model.
  # No --manual_dir here: the build above made the dataset, so the trainer only loads it.
  # The test split is only reported: each run picks its best epoch by validation ROC-AUC, and the ensemble's threshold
  # is chosen on the validation split and its shifted copies (trainer.shift.THRESHOLD_RULE): the official test split
  # is shifted, and every simulated shift pushes normal images towards pneumonia (EXPERIMENTS.md).
  read -r -a seeds <<< "${SEEDS-1 2}"
  if [[ ${#seeds[@]} -eq 0 ]]; then
    echo "error: SEEDS is empty: give one seed or more, e.g. SEEDS='1 2'." >&2
    exit 1
  fi
  run_dirs=()
  for seed in "${seeds[@]}"; do
    run_dirs+=("${output_dir}/seed-${seed}")
  done
  members=$(IFS=,; echo "${run_dirs[*]}")
  families=${AUGMENT_FAMILIES:-rotation,fov,translation,gamma,contrast,brightness,blur,noise,jpeg}
  # LEAVE_ONE_OUT=1: also one run of the first seed per stress-test family, trained without that family, so that
  # trainer.shift scores each family with a model that never saw it (--leave_one_out). Six more trainings: outside
  # the 30-minute budget, for choosing between recipes.
  lofo_families=()
  if [[ -n ${LEAVE_ONE_OUT:-} ]]; then
    read -r -a lofo_families <<< "$(python -c \
      'from trainer import shift; print(*shift.FAMILIES)')"
  fi
  # The export stores the threshold with the model; every later command (this stress test, predict, evaluate) uses it.
  report=(python -m trainer.export --model_dir="${members}" --out_dir="${output_dir}/model"
    --threshold_rule="${THRESHOLD_RULE:-${default_threshold_rule}}")
  stress=(python -m trainer.shift --model_dir="${output_dir}/model" --split=validation
    --out="${output_dir}/shift_validation.json")
  if [[ ${#lofo_families[@]} -gt 0 ]]; then
    stress+=(--leave_one_out="${output_dir}/lofo")
  fi

  if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${build[@]}"; echo
    for seed in "${seeds[@]}"; do
      train_command "${seed}" "${output_dir}/seed-${seed}" "${families}" "$@"
      printf '%q ' "${train[@]}"; echo
    done
    for family in "${lofo_families[@]}"; do
      train_command "${seeds[0]}" "${output_dir}/lofo/without-${family}" "$(without "${family}" "${families}")" "$@"
      printf '%q ' "${train[@]}"; echo
    done
    printf '%q ' "${report[@]}"; echo
    printf '%q ' "${stress[@]}"; echo
    exit 0
  fi

  start=${SECONDS}
  "${build[@]}"
  for seed in "${seeds[@]}"; do
    train_command "${seed}" "${output_dir}/seed-${seed}" "${families}" "$@"
    "${train[@]}"
  done
  for family in "${lofo_families[@]}"; do
    train_command "${seeds[0]}" "${output_dir}/lofo/without-${family}" "$(without "${family}" "${families}")" "$@"
    "${train[@]}"
  done
  "${report[@]}"
  "${stress[@]}" > "${output_dir}/shift_validation.md"
  echo "recipe: $(( (SECONDS - start) / 60 )) min; model: ${output_dir}/model (report.md: the test split at its" \
    "validation threshold; model_card.md), robustness: ${output_dir}/shift_validation.md"
}

