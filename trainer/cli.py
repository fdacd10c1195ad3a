"""How the project's commands end: a user's error in one line and exit code 1, a bug with its traceback.

`trainer.main`, `trainer.evaluate` and `trainer.predict` all run through `run`.
"""

import re
import sys

from absl import app
from absl import flags
from absl import logging


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with a bad flag or value reported on one line like every other user error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise ValueError(f'{e} (see --helpfull).') from None


def _user_errors() -> tuple[type[Exception], ...]:
  """The errors that are the user's to fix: a bad setting, missing or bad data, a full disk, a diverged run."""
  # TFDS reports missing manual data with an AssertionError.
  errors = (ValueError, OSError, FloatingPointError, AssertionError)
  if 'tensorflow' in sys.modules:  # The commands import it only once their flags are good.
    tf = sys.modules['tensorflow']
    # Files missing, unreadable or corrupt in --data_dir or --cache_dir; out of memory (a smaller --batch_size); a
    # peer of a multi-worker job that died or cannot be reached (its message names the task, whose log says why).
    errors += (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.DataLossError,
               tf.errors.ResourceExhaustedError, tf.errors.UnavailableError)
  return errors


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


def run(main) -> None:
  """Runs an absl `main`; the user's errors end in one `error:` line on stderr and exit code 1."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, _user_errors()):
      raise
    # --verbosity=1 adds the traceback, for bug reports.
    logging.debug('Traceback of the error below:', exc_info=True)
    if 'tensorflow' in sys.modules and isinstance(e, sys.modules['tensorflow'].errors.OpError):
      from trainer import export  # pylint: disable=import-outside-toplevel  (TensorFlow is loaded by now)
      message = peer_message(e) or export.error_message(e)
    else:
      message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)
