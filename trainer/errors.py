"""The user's errors, and how an error reads on one line. No dependencies: every layer may import it.

`UserError` is raised where the code knows the fault is the user's to fix (a bad flag or setting, a file or folder
the user named that is missing or unreadable, a full disk while writing the user's outputs, a bad image); each
program's edge (`trainer.cli.run`, which every trainer program runs through) prints it on one line. Any other
exception is a bug and keeps its traceback.

Two other edges keep a one-line policy of their own, on purpose: `python -m cxr_tfds.build`, because cxr_tfds is a
TFDS dataset package that must not import the trainer (`trainer.data.prepare` turns its errors into UserErrors at the
boundary); and the launchers in launch/, argparse programs whose `parser.error` is argparse's own one-line form.
"""

import re
import sys


class UserError(Exception):
  """An error the user fixes: its message is printed on one line, without a traceback."""


# The same errors as the built-in types a caller may already catch (a notebook's `except FileNotFoundError`).
class InvalidValue(UserError, ValueError):
  """A bad flag, setting, argument or file content given by the user."""


class MissingPath(UserError, FileNotFoundError):
  """A file or folder the user named is not there."""


class InUse(UserError, FileExistsError):
  """Another live process holds a folder or file the user named (a model_dir, a cache)."""


class Diverged(UserError, FloatingPointError):
  """The training loss became NaN or infinite: a lower learning rate (or another setting) is the user's choice."""


class WriteFailed(UserError, OSError):
  """An output could not be written (a full disk, a read-only folder); nothing half-written is left."""


# TF wraps an I/O error's reason in the op's and the device's names: '{{function_node ...}} <path>; <reason> [Op:..]'.
_TF_OP_CONTEXT = re.compile(r'{{.*?}}|\[Op:.*?]')


def _is_op_error(error: BaseException) -> bool:
  # Only a process that imported TensorFlow can hold one of its errors.
  tf = sys.modules.get('tensorflow')
  return tf is not None and isinstance(error, tf.errors.OpError)


def error_message(error: BaseException) -> str:
  """An error's message on one line, without the op and device names TF wraps around it."""
  message = error.message if _is_op_error(error) else str(error)
  return _TF_OP_CONTEXT.sub('', message).strip().split('\n', 1)[0] or type(error).__name__


def error_reason(error: BaseException) -> str:
  """What a user acts on in a failed write: 'No space left on device', without the temporary file's name."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  # TF's file errors read '<path>; <reason>'.
  return error_message(error).rsplit('; ', 1)[-1]
