"""A tf.data-native trainer for pneumonia detection on chest X-rays."""

import os

# TensorFlow's C++ start-up INFO lines (oneDNN, CPU features, CUDA probes) outnumber a short run's own log and say
# nothing a user acts on. Set before any module of the package imports TensorFlow; warnings and errors still show,
# and a TF_CPP_MIN_LOG_LEVEL of the user's own wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from trainer.version import version as _version

__version__ = _version()
