"""torch_lamb.Lamb against keras.optimizers.Lamb (torch backend, float32), call by call."""

from __future__ import annotations

import warnings

import impls
import keras_oracle as ko
import pytest

import torch_lamb

keras = pytest.importorskip("keras")

NAMES = ["dense_kernel", "dense_bias", "scale", "embedding"]
SHAPES = [(3, 4), (5,), (), (6, 2)]

CONFIGS = {
    "defaults": {},
    "lr_and_decay": {"learning_rate": 0.5, "weight_decay": 0.1},
    "decay_excluded_by_name": {"learning_rate": 0.1, "weight_decay": 0.2, "exclude_names": ["bias", "^scale$"]},
    "decay_excluded_by_list": {"learning_rate": 0.1, "weight_decay": 0.2, "exclude_index": [0, 3]},
    "betas_epsilon": {"learning_rate": 0.05, "beta_1": 0.5, "beta_2": 0.67, "epsilon": 1e-3},
    "clipnorm": {"learning_rate": 0.1, "clipnorm": 0.5},
    "global_clipnorm_binding": {"learning_rate": 0.1, "global_clipnorm": 1.0},
    "global_clipnorm_loose": {"learning_rate": 0.1, "global_clipnorm": 100.0},
    "clipvalue": {"learning_rate": 0.1, "clipvalue": 0.3},
    "loss_scale_clipnorm": {"learning_rate": 0.1, "loss_scale_factor": 8.0, "clipnorm": 0.7},
    "ema": {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite": {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 3},
    "accumulation": {"learning_rate": 0.1, "gradient_accumulation_steps": 3},
    "accumulation_decay_global_clip": {
        "learning_rate": 0.1, "gradient_accumulation_steps": 3, "weight_decay": 0.05, "global_clipnorm": 1.0,
    },
    "accumulation_ema_overwrite": {
        "learning_rate": 0.1, "gradient_accumulation_steps": 2, "use_ema": True, "ema_momentum": 0.9,
        "ema_overwrite_frequency": 2,
    },
    "accumulation_loss_scale_clipvalue": {
        "learning_rate": 0.1, "gradient_accumulation_steps": 2, "loss_scale_factor": 4.0, "clipvalue": 0.2,
    },
    "everything": {
        "learning_rate": 0.05, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6, "weight_decay": 0.1,
        "global_clipnorm": 0.8, "use_ema": True, "ema_momentum": 0.95, "ema_overwrite_frequency": 4,
        "loss_scale_factor": 16.0, "gradient_accumulation_steps": 2, "exclude_names": ["bias"],
    },
}


def _compare(steps: int = 12, none_every: int = 0, seed: int = 0, **kwargs) -> None:
    init, grads = ko.make_problem(SHAPES, steps, seed=seed, none_every=none_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns about None gradients
        expected = ko.run_keras(NAMES, init, grads, **kwargs)
    for implementation in impls.available():  # every backend against the one Keras run
        actual = ko.run_torch(NAMES, init, grads, implementation=implementation, **kwargs)
        ko.assert_trajectories_close(actual, expected)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_keras(config):
    _compare(**CONFIGS[config])


@pytest.mark.parametrize("config", ["defaults", "lr_and_decay", "accumulation_decay_global_clip", "everything"])
def test_matches_keras_with_none_gradients(config):
    _compare(steps=15, none_every=3, seed=1, **CONFIGS[config])


def _schedules():
    ks = keras.optimizers.schedules
    return {
        "exponential": (
            torch_lamb.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5),
            ks.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5),
        ),
        "exponential_staircase": (
            torch_lamb.ExponentialDecay(0.1, 3, 0.5, staircase=True),
            ks.ExponentialDecay(0.1, 3, 0.5, staircase=True),
        ),
        "piecewise": (
            torch_lamb.PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]),
            ks.PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]),
        ),
        "polynomial_cycle": (
            torch_lamb.PolynomialDecay(0.1, 4, end_learning_rate=0.01, power=2.0, cycle=True),
            ks.PolynomialDecay(0.1, 4, end_learning_rate=0.01, power=2.0, cycle=True),
        ),
        "inverse_time": (
            torch_lamb.InverseTimeDecay(0.1, 2, 0.5),
            ks.InverseTimeDecay(0.1, 2, 0.5),
        ),
        "cosine_warmup": (
            torch_lamb.CosineDecay(0.0, 8, alpha=0.1, warmup_target=0.1, warmup_steps=3),
            ks.CosineDecay(0.0, 8, alpha=0.1, warmup_target=0.1, warmup_steps=3),
        ),
        "cosine_restarts": (
            torch_lamb.CosineDecayRestarts(0.1, 3, t_mul=2.0, m_mul=0.5, alpha=0.05),
            ks.CosineDecayRestarts(0.1, 3, t_mul=2.0, m_mul=0.5, alpha=0.05),
        ),
    }


@pytest.mark.parametrize("name", sorted(_schedules()))
@pytest.mark.parametrize("accumulate", [None, 2])
def test_schedules_match_keras(name, accumulate):
    ours, theirs = _schedules()[name]
    init, grads = ko.make_problem(SHAPES, 12, seed=2)
    extra = {"gradient_accumulation_steps": accumulate, "weight_decay": 0.1}
    expected = ko.run_keras(NAMES, init, grads, learning_rate=theirs, **extra)
    actual = ko.run_torch(NAMES, init, grads, learning_rate=ours, **extra)
    ko.assert_trajectories_close(actual, expected)


def test_callable_learning_rate_matches_keras():
    init, grads = ko.make_problem(SHAPES, 6, seed=3)
    expected = ko.run_keras(NAMES, init, grads, learning_rate=lambda: 0.07)
    actual = ko.run_torch(NAMES, init, grads, learning_rate=lambda: 0.07)
    ko.assert_trajectories_close(actual, expected)


@pytest.mark.parametrize("name", sorted(_schedules()))
def test_schedule_values_match_keras(name):
    ours, theirs = _schedules()[name]
    for step in range(40):
        expected = float(keras.ops.convert_to_numpy(theirs(step)))
        assert ours(step) == pytest.approx(expected, rel=1e-6, abs=1e-9), step


def test_zero_initialised_variable_matches_keras():
    init, grads = ko.make_problem(SHAPES, 8, seed=4)
    init[1][:] = 0.0  # a zero bias: ratio 1 on the first step
    expected = ko.run_keras(NAMES, init, grads, learning_rate=0.1, weight_decay=0.01)
    actual = ko.run_torch(NAMES, init, grads, learning_rate=0.1, weight_decay=0.01)
    ko.assert_trajectories_close(actual, expected)


def test_long_run_matches_keras():
    _compare(steps=60, seed=5, learning_rate=0.02, weight_decay=0.01, clipnorm=1.0)
