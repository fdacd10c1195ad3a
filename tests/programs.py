"""Runs a program's `python -m` entry point in the test's own process: no second TensorFlow import (~6 s a process).

For tests of what a program computes and prints; a test of a real process (a signal, a fresh import, a launcher)
starts one.
"""

import importlib
import sys

from absl import flags
from absl import logging
import pytest

from trainer import cli
from trainer import progress

FLAGS = flags.FLAGS


def run(capsys, module: str, *argv: str) -> tuple[int, str, str]:
  """Runs `python -m MODULE ARGV` here, through its `run()` (absl's flag parsing, `trainer.cli`'s error lines).

  Every program defines its flags when imported, and several define the same names (--model_dir), as do other
  programs the test process imported (trainer.main): those are set aside while MODULE is imported afresh and runs,
  then put back.

  Returns:
    (exit code, stdout, stderr).
  """
  own = dict(FLAGS._flags())  # pylint: disable=protected-access
  by_module = {name: list(defined) for name, defined in FLAGS.flags_by_module_dict().items()}
  was_parsed = FLAGS.is_parsed()
  removed = [name for name in own if _is_program_flag(name, by_module)]
  for name in removed:
    delattr(FLAGS, name)
  sys.modules.pop(module, None)
  capsys.readouterr()
  try:
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
      patch.setattr(sys, 'argv', [module, *argv])
      patch.delenv('TQDM_DISABLE', raising=False)  # cli sets it; put back as it was.
      importlib.import_module(module).run()
    out, err = capsys.readouterr()
  finally:
    progress.report_to(None)
    logging.get_absl_handler().removeFilter(cli._quiet_other_libraries)  # pylint: disable=protected-access
    sys.modules.pop(module, None)
    FLAGS.unparse_flags()
    for name in list(FLAGS._flags()):  # pylint: disable=protected-access
      if name not in own or FLAGS._flags()[name] is not own[name]:  # pylint: disable=protected-access
        delattr(FLAGS, name)
    for name in removed:
      FLAGS[name] = own[name]
    for module_name, defined in by_module.items():
      for flag in defined:
        if flag.name in removed:
          FLAGS.register_flag_by_module(module_name, flag)
    if was_parsed:
      FLAGS.mark_as_parsed()
  return exit_info.value.code or 0, out, err


def _is_program_flag(name: str, by_module: dict) -> bool:
  """Whether flag `name` was defined by the project (not absl's own --verbosity and the like)."""
  return any(module.startswith(('trainer', 'cxr_tfds', 'benchmarks')) and any(
      name in (flag.name, flag.short_name) for flag in defined) for module, defined in by_module.items())
