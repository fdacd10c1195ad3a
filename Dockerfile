# The trainer's image: TensorFlow's own GPU image (CUDA and cuDNN inside) with this project installed at /app, the
# path the Kubernetes manifests and the Slurm script's container option use. From the repository root:
#
#     docker build -t cxr-trainer:0.2.0 .
#     docker run --gpus all -v ~/cxr_manual:/data/manual -v ~/cxr_runs:/runs cxr-trainer:0.2.0 \
#         python -m trainer.main --manual_dir=/data/manual --model_dir=/runs/resnet50 --model=resnet50
#
# TF_IMAGE picks another base of the same TensorFlow release (e.g. tensorflow/tensorflow:2.21.0 for CPU only).
#
# The `serve` target runs `python -m trainer.serve` (TF Serving's REST API and the page, port 8501) on the export
# mounted at /models/cxr; a CPU base is enough:
#
#     docker build --target serve --build-arg TF_IMAGE=tensorflow/tensorflow:2.21.0 -t cxr-serve:0.2.0 .
#     docker run --rm -p 127.0.0.1:8501:8501 -v ~/cxr_runs/ensemble:/models/cxr:ro cxr-serve:0.2.0
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${TF_IMAGE} AS base

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

# The server: the serve extra on top, the model read-only from a volume; 0.0.0.0 inside the container, published
# by `docker run -p`.
FROM base AS serve
RUN python -m pip install --no-cache-dir ".[serve]" && python -c "import trainer.serve.app"
EXPOSE 8501
ENTRYPOINT ["python", "-m", "trainer.serve", "--host=0.0.0.0", "--port=8501"]
CMD ["--model_dir=/models/cxr"]

# The trainer (the default target: the last stage).
FROM base AS trainer
# Built datasets and Keras's weight cache go to mounted volumes, not into the container's layer.
ENV TFDS_DATA_DIR=/data/tensorflow_datasets KERAS_HOME=/data/keras
CMD ["python", "-m", "trainer.main", "--helpfull"]
