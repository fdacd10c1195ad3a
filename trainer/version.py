"""The project's version and, when the code runs from a git checkout, its commit: what every run records.

No TensorFlow here: `trainer/__init__.py` imports it, and `import trainer.metrics` must stay free of frameworks.
"""

import functools
import importlib.metadata
import os
import subprocess

DISTRIBUTION = 'cxr-trainer'
# The version of a checkout that was never installed (PYTHONPATH=. or a copied folder): setup.cfg's is the truth.
UNKNOWN = '0+unknown'


def version() -> str:
  """The installed distribution's version (setup.cfg's `version`), or UNKNOWN when the package is not installed."""
  try:
    return importlib.metadata.version(DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError:
    return UNKNOWN


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
  """The commit of the checkout this package's code is in, or None (an installed wheel, no git, any failure).

  Only a checkout whose top level holds this very package counts, so a wheel installed into a virtualenv that sits
  inside some other repository does not report that repository's commit.
  """
  top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(top, '.git')):  # A folder in a clone, a file in a worktree.
    return None
  try:
    done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=top, capture_output=True, text=True, timeout=10,
                          check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  commit = done.stdout.strip()
  return commit if done.returncode == 0 and len(commit) == 40 else None


def provenance() -> dict:
  """{'version', and 'git_commit' when running from a checkout}: run.json's, report.json's and the model card's."""
  commit = git_commit()
  return {'version': version(), **({'git_commit': commit} if commit else {})}
