"""How the project's commands end: a user's error in one line and exit code 1, a bug with its traceback.

`trainer.main`, `trainer.evaluate`, `trainer.predict`, `trainer.shift` and `trainer.export` all run through `run`.
"""

import errno
import logging as py_logging
import math
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from trainer import config
from trainer import errors
from trainer import progress as progress_lib

# INFO lines are shown from these folders only (the project's own); other libraries' INFO lines (TFDS's "Constructing
# tf.data.Dataset", TF's saver) are kept for --verbosity=1. Their warnings and errors always show.
_PROJECT_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + name + os.sep
                      for name in ('trainer', 'cxr_tfds', 'launch'))


# What the machine says of a folder the user named: read-only, full, over quota, or not theirs to write. Raised from
# any write (an output, a cache, a dataset build), they are the user's to fix wherever they come from.
_USER_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with a bad flag or value reported on one line like every other user error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise errors.InvalidValue(f'{e} (see --helpfull).') from None
  except UnicodeDecodeError:  # absl reads a --flagfile as text.
    flagfile = next((arg for arg in argv if arg.startswith(('--flagfile=', '-flagfile='))), '--flagfile')
    raise errors.InvalidValue(f'--{flagfile.lstrip("-")} is not a text file of flags (it does not decode as '
                              'UTF-8): give a file with one --flag=value a line.') from None


def _user_errors() -> tuple[type[Exception], ...]:
  """The errors that are the user's to fix: `errors.UserError`, raised where the code knows it; and TensorFlow's
  errors of the machine and the files a run reads, which TF raises from deep inside an op."""
  user_errors = (errors.UserError,)
  if 'tensorflow' in sys.modules:  # The commands import it only once their flags are good.
    tf = sys.modules['tensorflow']
    # Files missing, unreadable or corrupt in --data_dir or --cache_dir; out of memory (a smaller --batch_size); a
    # peer of a multi-worker job that died or cannot be reached (its message names the task, whose log says why).
    user_errors += (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.DataLossError,
                    tf.errors.ResourceExhaustedError, tf.errors.UnavailableError)
  return user_errors


def _os_error(error: BaseException) -> OSError | None:
  """The OSError of the user's folders (`_USER_ERRNOS`) behind `error`, itself or a cause TF or TFDS wrapped it in."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
      return error
    error = error.__cause__ or error.__context__
  return None


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is the user's to fix (one line) rather than a bug (a traceback)."""
  return isinstance(error, _user_errors()) or _os_error(error) is not None


def _message(error: BaseException) -> str:
  os_error = None if isinstance(error, errors.UserError) else _os_error(error)
  if os_error is not None:
    return f'{os_error.filename}: {os_error.strerror}.' if os_error.filename else f'{os_error.strerror}.'
  return peer_message(error) or errors.error_message(error)


def _quiet_other_libraries(record: py_logging.LogRecord) -> bool:
  return (record.levelno >= py_logging.WARNING or logging.get_verbosity() >= logging.DEBUG
          or record.pathname.startswith(_PROJECT_DIRS))


def _readable_logs(argv: list[str]) -> list[str]:
  """Parses the flags, then keeps the log to the project's own INFO lines, and plain text outside a terminal."""
  argv = _parse_flags(argv)
  logging.get_absl_handler().addFilter(_quiet_other_libraries)
  if not sys.stderr.isatty():
    # TFDS's tqdm bars redraw with carriage returns and escape codes: noise in a Slurm log or `kubectl logs`. tqdm
    # reads TQDM_DISABLE when it is imported; a TFDS imported already is told directly.
    os.environ.setdefault('TQDM_DISABLE', '1')
    if 'tensorflow_datasets' in sys.modules:
      sys.modules['tensorflow_datasets'].disable_progress_bar()
  return argv
# Where TensorFlow names the peer behind an UnavailableError of a multi-worker job: the gRPC target that reset the
# connection, the task that reported the error, or the tasks that stopped sending heartbeats.
_PEER = re.compile(r'(?:remote target|Error reported from|unhealthy[^/]*?)\s*/job:(\w+)/(?:replica:\d+/)?task:(\d+)')


def peer_message(error: Exception) -> str | None:
  """One line for a multi-worker job whose peer died: TF's message is a 'Graph execution error:' and 60 lines."""
  match = _PEER.search(getattr(error, 'message', '') or str(error))
  if not match:
    return None
  return (f'{match.group(1)} {match.group(2)} of this multi-worker job stopped or cannot be reached: see its log for '
          'why, then start the job again to resume from its last checkpoint.')


def run(main, *, progress: bool = False) -> None:
  """Runs an absl `main`; the user's errors end in one `error:` line on stderr and exit code 1, any other exception
  (a bug) in its traceback. With `progress`, the library's long tasks report on stderr (`trainer.progress`)."""
  if progress:
    progress_lib.report_to(sys.stderr)
  try:
    app.run(main, flags_parser=_readable_logs)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    # --verbosity=1 adds the traceback, for bug reports.
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {_message(e)}', file=sys.stderr)
    sys.exit(1)


def define_run_flags(model_dir_help: str, *, required: bool = True, report: bool = False) -> None:
  """The flags of the programs that take runs (evaluate, export, predict, shift), each declared here once.

  --model_dir, --threshold_rule, --tta, --data_dir, --manual_dir, --batch_size; with `report`, --n_resamples.
  `trainer.runs.Runs` takes their values.

  Args:
    model_dir_help: what --model_dir names in this program.
    required: whether absl itself insists on --model_dir (a program may check it with a message of its own).
    report: whether the program writes a report with bootstrap intervals.
  """
  # Here, not at the top: trainer.main imports this module before its flags are checked, and tta imports TensorFlow.
  from trainer import metrics  # pylint: disable=import-outside-toplevel
  from trainer import tta  # pylint: disable=import-outside-toplevel
  flags.DEFINE_list('model_dir', None, model_dir_help, required=required)
  flags.DEFINE_enum('threshold_rule', None, metrics.THRESHOLD_RULES,
                    'Choose the threshold again on validation by this rule: '
                    'youden (Youden\'s J) or youden_with_shifts (Youden\'s J on validation and its shifted copies, '
                    'trainer.shift). Default: the threshold stored with the run or export (run.json names its rule); '
                    'for several runs, youden. `python -m trainer.export` stores an ensemble with its threshold.')
  define_integer('tta', 1, 'Test-time augmentation: average each image\'s probability over its first N fixed '
                 f'views ({", ".join(tta.VIEWS)}); 1: none. The threshold is then chosen again on validation, with the '
                 'same views, by the run\'s rule (or --threshold_rule).', config.Range(1, tta.MAX_VIEWS))
  flags.DEFINE_string('data_dir', None, 'Where TFDS keeps built datasets (default: the first run\'s --data_dir).')
  flags.DEFINE_string('manual_dir', None, 'The downloaded data, if the dataset is not built yet (default: the first '
                      'run\'s --manual_dir).')
  define_integer('batch_size', 32, 'Images per prediction batch.', config.POSITIVE)
  if report:
    define_integer('n_resamples', 1000, 'Bootstrap resamples (of patients) for the 95% intervals.', config.POSITIVE)


def define_integer(name: str, default: int, help_text: str, allowed: 'config.Range') -> None:
  """A program's integer flag, checked by `config.check_range` as every training setting is.

  absl is given the bounds too: a bad value then fails while the flags are parsed, before the program starts, in
  absl's words ("flag --batch_size=0: 0 is not a positive integer").
  """
  lower = None if allowed.lower is None else math.floor(allowed.lower) + 1 if allowed.lower_open else allowed.lower
  upper = None if allowed.upper is None else math.ceil(allowed.upper) - 1 if allowed.upper_open else allowed.upper
  flags.DEFINE_integer(name, default, help_text, lower_bound=lower, upper_bound=upper)

  def check(value: int | None) -> bool:
    try:
      config.check_range(name, value, allowed)
    except config.ConfigError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  flags.register_validator(name, check)
