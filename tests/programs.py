"""Runs the project's commands (`python -m trainer.export ARGS`, ...) inside the test process.

A process of their own costs the import of TensorFlow and the tracing of their models again, seconds each. Tests about
a real process (a signal, a kill, a resource limit, absl's exit status, a fresh import) start one; the others call
`run` here.
"""

import contextlib
import importlib
import importlib.util
import io
import sys

from absl import app
from absl import flags

# The parts of absl's FlagValues that hold the defined flags (the others hold their parsing state).
_DEFINED = ('__flags', '__flags_by_module', '__flags_by_module_id', '__key_flags_by_module')


def _copy(state):
  """A copy of FlagValues' dicts deep enough to restore: absl edits their lists of flags in place."""
  return {key: {k: list(v) if isinstance(v, list) else v for k, v in state[key].items()} for key in _DEFINED}


def _module(program: str):
  """The module `python -m program` runs (a package's __main__), imported anew so that it defines its flags."""
  spec = importlib.util.find_spec(program)
  name = f'{program}.__main__' if spec.submodule_search_locations is not None else program
  if name in sys.modules:
    return importlib.reload(sys.modules[name])
  return importlib.import_module(name)


def run(program: str, *argv: str) -> tuple[int, str, str]:
  """Runs `python -m PROGRAM ARGV` in this process, as its console script does.

  Every program defines the shared run flags (trainer.cli.define_run_flags) on absl's one FLAGS, as trainer.main
  defines its own, so a process can hold one program's flags only. For the call, the flags the test process has
  (another program's) are set aside; the program's module is imported again to define its own; after it, the flags
  before the call are back as they were.

  Args:
    program: the module `python -m` would run, e.g. 'trainer.export'.
    *argv: its arguments.

  Returns:
    (exit code, stdout, stderr): the code as the process would exit with it (0, or 1 for a user's error).
  """
  from trainer import progress  # pylint: disable=import-outside-toplevel
  app.define_help_flags()  # Here, not in the call: absl defines them once a process.
  state = flags.FLAGS.__dict__
  saved, parsed = _copy(state), state['__flags_parsed']
  absl_own = {name: flag for name, flag in saved['__flags'].items()
              if (flags.FLAGS.find_module_defining_flag(name) or '').startswith('absl.')}
  state['__flags'].clear()
  state['__flags'].update(absl_own)
  state['__flags_parsed'] = False
  argv_before = sys.argv
  sys.argv = [program, *argv]
  out, err = io.StringIO(), io.StringIO()
  try:
    module = _module(program)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        module.run()
        code = 0
      except SystemExit as exit_info:
        code = exit_info.code or 0
  finally:
    sys.argv = argv_before
    progress.report_to(None)  # The program reported on its stderr, this call's.
    for key in _DEFINED:
      state[key].clear()
      state[key].update(saved[key])
    state['__flags_parsed'] = parsed
  return code, out.getvalue(), err.getvalue()
