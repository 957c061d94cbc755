"""Shared test setup: Keras runs on the torch backend (it is the numerical oracle)."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
