# The trainer's image: TensorFlow's own GPU image (CUDA and cuDNN inside) with this project installed at /app, the
# path the Kubernetes manifests and the Slurm script's container option use. From the repository root:
#
#     docker build -t cxr-trainer:0.2.0 .
#     docker run --gpus all -v ~/cxr_manual:/data/manual -v ~/cxr_runs:/runs cxr-trainer:0.2.0 \
#         python -m trainer.main --manual_dir=/data/manual --model_dir=/runs/resnet50 --model=resnet50
#
# TF_IMAGE picks another base of the same TensorFlow release (e.g. tensorflow/tensorflow:2.21.0 for CPU only).
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${TF_IMAGE}

WORKDIR /app
# The dependencies first, from setup.cfg alone, so that a code change rebuilds only the last layers. TensorFlow is the
# base image's: its version satisfies setup.cfg, so pip keeps it (the [gpu] extra would add a second CUDA from pip).
COPY setup.cfg pyproject.toml README.md ./
RUN mkdir trainer cxr_tfds && touch trainer/__init__.py cxr_tfds/__init__.py \
    && python -m pip install --no-cache-dir . \
    && python -m pip uninstall -y cxr-trainer
COPY . .
RUN python -m pip install --no-cache-dir --no-deps . \
    && python -c "import trainer.models, cxr_tfds"

# Built datasets and Keras's weight cache go to mounted volumes, not into the container's layer.
ENV TFDS_DATA_DIR=/data/tensorflow_datasets KERAS_HOME=/data/keras
CMD ["python", "-m", "trainer.main", "--helpfull"]
