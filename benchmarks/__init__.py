"""Throughput measurements of the trainer's input pipeline and training step, against their peers.

Run from the repository root as `python -m benchmarks` (benchmarks/__main__.py); not part of the installed package.
`python -m benchmarks.serve` and `python -m benchmarks.tflite` measure the server and the TFLite models.
"""
