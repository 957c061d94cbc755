"""The schedules refuse bad arguments when made (naming the argument and its range), and keep Keras's numbers
for every valid configuration, edge values included."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from torch_lamb import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

keras = pytest.importorskip("keras")
ks = keras.optimizers.schedules
NAN, INF = float("nan"), float("inf")

# (the constructor call, the argument the error must name, the range it must state)
REFUSED = {
    "exponential_decay_steps_zero": (lambda: ExponentialDecay(0.1, 0, 0.5), "decay_steps", "> 0"),
    "exponential_decay_steps_negative": (lambda: ExponentialDecay(0.1, -3, 0.5), "decay_steps", "> 0"),
    "exponential_decay_steps_inf": (lambda: ExponentialDecay(0.1, INF, 0.5), "decay_steps", "> 0"),
    "exponential_decay_steps_nan": (lambda: ExponentialDecay(0.1, NAN, 0.5), "decay_steps", "> 0"),
    "exponential_decay_steps_bool": (lambda: ExponentialDecay(0.1, True, 0.5), "decay_steps", "> 0"),
    "exponential_decay_steps_str": (lambda: ExponentialDecay(0.1, "10", 0.5), "decay_steps", "> 0"),
    "exponential_decay_rate_negative": (lambda: ExponentialDecay(0.1, 3, -0.5), "decay_rate", ">= 0"),
    "exponential_decay_rate_none": (lambda: ExponentialDecay(0.1, 3, None), "decay_rate", ">= 0"),
    "exponential_lr_negative": (lambda: ExponentialDecay(-0.1, 3, 0.5), "initial_learning_rate", ">= 0"),
    "exponential_lr_inf": (lambda: ExponentialDecay(INF, 3, 0.5), "initial_learning_rate", ">= 0"),
    "exponential_staircase_int": (lambda: ExponentialDecay(0.1, 3, 0.5, staircase=1), "staircase", "bool"),
    "exponential_name": (lambda: ExponentialDecay(0.1, 3, 0.5, name=None), "name", "str"),
    "polynomial_power_negative": (lambda: PolynomialDecay(0.1, 4, power=-1.0), "power", ">= 0"),
    "polynomial_power_nan": (lambda: PolynomialDecay(0.1, 4, power=NAN), "power", ">= 0"),
    "polynomial_end_negative": (lambda: PolynomialDecay(0.1, 4, end_learning_rate=-1e-4), "end_learning_rate",
                                ">= 0"),
    "polynomial_decay_steps_zero": (lambda: PolynomialDecay(0.1, 0), "decay_steps", "> 0"),
    "polynomial_cycle_str": (lambda: PolynomialDecay(0.1, 4, cycle="yes"), "cycle", "bool"),
    "inverse_decay_rate_negative": (lambda: InverseTimeDecay(0.1, 2, -0.5), "decay_rate", ">= 0"),
    "inverse_decay_steps_zero": (lambda: InverseTimeDecay(0.1, 0.0, 0.5), "decay_steps", "> 0"),
    "cosine_alpha_negative": (lambda: CosineDecay(0.1, 10, alpha=-0.5), "alpha", ">= 0"),
    "cosine_alpha_nan": (lambda: CosineDecay(0.1, 10, alpha=NAN), "alpha", ">= 0"),
    "cosine_warmup_steps_negative": (lambda: CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=-2),
                                     "warmup_steps", ">= 0"),
    "cosine_warmup_steps_str": (lambda: CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps="2"),
                                "warmup_steps", ">= 0"),
    "cosine_warmup_target_negative": (lambda: CosineDecay(0.0, 10, warmup_target=-0.1), "warmup_target", ">= 0"),
    "cosine_lr_str": (lambda: CosineDecay("0.1", 10), "initial_learning_rate", ">= 0"),
    "cosine_decay_steps_zero": (lambda: CosineDecay(0.1, 0), "decay_steps", "> 0"),
    "restarts_t_mul_below_one": (lambda: CosineDecayRestarts(0.1, 2, t_mul=0.5), "t_mul", ">= 1"),
    "restarts_t_mul_zero": (lambda: CosineDecayRestarts(0.1, 2, t_mul=0.0), "t_mul", ">= 1"),
    "restarts_t_mul_negative": (lambda: CosineDecayRestarts(0.1, 2, t_mul=-1.0), "t_mul", ">= 1"),
    "restarts_m_mul_negative": (lambda: CosineDecayRestarts(0.1, 2, m_mul=-0.5), "m_mul", ">= 0"),
    "restarts_alpha_negative": (lambda: CosineDecayRestarts(0.1, 2, alpha=-0.1), "alpha", ">= 0"),
    "restarts_first_decay_steps_zero": (lambda: CosineDecayRestarts(0.1, 0), "first_decay_steps", "> 0"),
    "piecewise_unsorted": (lambda: PiecewiseConstantDecay([5, 2], [0.1, 0.05, 0.01]), "boundaries",
                           "strictly increasing"),
    "piecewise_duplicate": (lambda: PiecewiseConstantDecay([2, 2], [0.1, 0.05, 0.01]), "boundaries",
                            "strictly increasing"),
    "piecewise_too_few_values": (lambda: PiecewiseConstantDecay([2, 5], [0.1, 0.05]), "boundaries",
                                 "exactly one less than `values`"),
    "piecewise_too_many_values": (lambda: PiecewiseConstantDecay([2], [0.1, 0.05, 0.01]), "boundaries",
                                  "exactly one less than `values`"),
    "piecewise_no_boundaries": (lambda: PiecewiseConstantDecay([], [0.1]), "boundaries", "at least one"),
    "piecewise_boundary_negative": (lambda: PiecewiseConstantDecay([-0.5, 2], [0.1, 0.05, 0.01]),
                                    "boundaries[0]", ">= 0"),
    "piecewise_boundary_nan": (lambda: PiecewiseConstantDecay([2, NAN], [0.1, 0.05, 0.01]), "boundaries[1]",
                               ">= 0"),
    "piecewise_value_negative": (lambda: PiecewiseConstantDecay([2], [0.1, -0.05]), "values[1]", ">= 0"),
    "piecewise_value_bool": (lambda: PiecewiseConstantDecay([2], [True, 0.05]), "values[0]", ">= 0"),
    "piecewise_boundaries_number": (lambda: PiecewiseConstantDecay(2, [0.1, 0.05]), "boundaries", "list"),
    "piecewise_values_str": (lambda: PiecewiseConstantDecay([2], "ab"), "values", "list"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_argument_is_refused_when_the_schedule_is_made_naming_it_and_its_range(case):
    make, argument, accepted = REFUSED[case]
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert message.startswith(f"`{argument}` must"), message
    assert accepted in message, message
    assert f"Received: {argument}=" in message, message


def test_the_ranges_say_why():
    with pytest.raises(ValueError, match=re.escape("`t_mul` must be a finite number >= 1 (each period's length")):
        CosineDecayRestarts(0.1, 2, t_mul=0.99)
    with pytest.raises(ValueError, match=re.escape("boundaries[0]=5 >= boundaries[1]=2")):
        PiecewiseConstantDecay([5, 2], [0.1, 0.05, 0.01])


# Valid configurations at the edges of the ranges above: the same numbers as Keras.
EDGES = {
    "polynomial_power_zero": (PolynomialDecay(0.1, 4, power=0.0), ks.PolynomialDecay(0.1, 4, power=0.0)),
    "polynomial_power_half_cycle": (PolynomialDecay(0.1, 3, 0.0, power=0.5, cycle=True),
                                    ks.PolynomialDecay(0.1, 3, 0.0, power=0.5, cycle=True)),
    "polynomial_rising": (PolynomialDecay(0.01, 5, end_learning_rate=0.1), ks.PolynomialDecay(0.01, 5, 0.1)),
    "exponential_rate_zero": (ExponentialDecay(0.1, 3, 0.0), ks.ExponentialDecay(0.1, 3, 0.0)),
    "exponential_float_steps": (ExponentialDecay(0.1, 2.5, 0.5), ks.ExponentialDecay(0.1, 2.5, 0.5)),
    "exponential_growth": (ExponentialDecay(0.01, 4, 1.5, staircase=True),
                           ks.ExponentialDecay(0.01, 4, 1.5, staircase=True)),
    "exponential_lr_zero": (ExponentialDecay(0, 3, 0.5), ks.ExponentialDecay(0.0, 3, 0.5)),
    "inverse_rate_zero": (InverseTimeDecay(0.1, 2, 0.0), ks.InverseTimeDecay(0.1, 2, 0.0)),
    "inverse_staircase": (InverseTimeDecay(0.1, 3, 2.0, staircase=True),
                          ks.InverseTimeDecay(0.1, 3, 2.0, staircase=True)),
    "cosine_alpha_one": (CosineDecay(0.1, 6, alpha=1.0), ks.CosineDecay(0.1, 6, alpha=1.0)),
    "cosine_alpha_above_one": (CosineDecay(0.1, 6, alpha=2.0), ks.CosineDecay(0.1, 6, alpha=2.0)),
    "cosine_warmup_no_steps": (CosineDecay(0.0, 6, warmup_target=0.1, warmup_steps=0),
                               ks.CosineDecay(0.0, 6, warmup_target=0.1, warmup_steps=0)),
    "cosine_warmup_down": (CosineDecay(0.1, 6, warmup_target=0.0, warmup_steps=3),
                           ks.CosineDecay(0.1, 6, warmup_target=0.0, warmup_steps=3)),
    "restarts_t_mul_one": (CosineDecayRestarts(0.1, 3, t_mul=1.0), ks.CosineDecayRestarts(0.1, 3, t_mul=1.0)),
    "restarts_m_mul_zero": (CosineDecayRestarts(0.1, 3, m_mul=0.0, alpha=0.1),
                            ks.CosineDecayRestarts(0.1, 3, m_mul=0.0, alpha=0.1)),
    # first_decay_steps=3, not 2: with 2, step 5 starts the third period exactly, and Keras's float32
    # log(2.25) / log(1.5) comes out just under 2, so it returns the end of the second period there (lr 0, not
    # 0.144); in float64 Keras and these schedules restart at step 5
    "restarts_m_mul_above_one": (CosineDecayRestarts(0.1, 3, t_mul=1.5, m_mul=1.2),
                                 ks.CosineDecayRestarts(0.1, 3, t_mul=1.5, m_mul=1.2)),
    "piecewise_zero_and_fractional_boundaries": (PiecewiseConstantDecay([0, 2.5, 7], [0.3, 0.1, 0.05, 0.0]),
                                                 ks.PiecewiseConstantDecay([0, 2.5, 7], [0.3, 0.1, 0.05, 0.0])),
    "piecewise_tuples": (PiecewiseConstantDecay((3,), (0.1, 0.01)), ks.PiecewiseConstantDecay((3,), (0.1, 0.01))),
    "numpy_scalars": (CosineDecay(np.float64(0.1), np.int64(8), alpha=np.float32(0.25)),
                      ks.CosineDecay(np.float64(0.1), np.int64(8), alpha=np.float32(0.25))),
}


def _keras_values(schedule, steps: int, floatx: str) -> list[float]:
    previous = keras.backend.floatx()
    keras.backend.set_floatx(floatx)  # Keras computes a schedule in floatx (a Python float lr becomes floatx)
    try:
        return [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(steps)]
    finally:
        keras.backend.set_floatx(previous)


@pytest.mark.parametrize("case", sorted(EDGES))
def test_valid_edge_values_match_keras(case):
    """Our schedules compute in double: Keras in float64 gives the same numbers to the last bits, and in float32
    (its default) within its own rounding (a few float32 ulps of the step's fraction)."""
    ours, theirs = EDGES[case]
    values = [ours(step) for step in range(30)]
    assert all(math.isfinite(v) and v >= 0 for v in values), values
    assert values == pytest.approx(_keras_values(theirs, 30, "float64"), rel=1e-12, abs=1e-15)
    assert values == pytest.approx(_keras_values(theirs, 30, "float32"), rel=1e-6, abs=1e-7)
    constant = {"polynomial_power_zero", "exponential_lr_zero", "cosine_alpha_one", "inverse_rate_zero"}
    assert (len(set(values)) == 1) == (case in constant), values  # the others move, as Keras's do


def test_numpy_scalars_are_kept_as_python_numbers_and_the_config_remakes_the_schedule():
    schedule = CosineDecay(np.float64(0.1), np.int64(8), alpha=np.float32(0.25))
    assert type(schedule.decay_steps) is float and type(schedule.alpha) is float and schedule.alpha == 0.25
    again = CosineDecay(**schedule.get_config())
    assert [again(s) for s in range(12)] == [schedule(s) for s in range(12)]
    piecewise = PiecewiseConstantDecay(np.array([2, 5]), np.array([0.1, 0.05, 0.01]))
    assert piecewise.boundaries == [2.0, 5.0] and [piecewise(s) for s in (2, 3, 6)] == [0.1, 0.05, 0.01]


KERAS_GARBAGE = {
    "polynomial_power_negative": lambda: ks.PolynomialDecay(0.1, 4, power=-1.0),
    "inverse_decay_rate_negative": lambda: ks.InverseTimeDecay(0.1, 2, -0.5),
    "exponential_decay_rate_negative": lambda: ks.ExponentialDecay(0.1, 3, -0.5),
    "cosine_alpha_negative": lambda: ks.CosineDecay(0.1, 10, alpha=-0.5),
    "restarts_t_mul_below_one": lambda: ks.CosineDecayRestarts(0.1, 2, t_mul=0.5),
    "restarts_m_mul_negative": lambda: ks.CosineDecayRestarts(0.1, 2, m_mul=-0.5),
}


@pytest.mark.parametrize("case", sorted(KERAS_GARBAGE))
def test_what_is_refused_beyond_keras_is_where_keras_gives_an_unusable_learning_rate(case):
    """Each range stricter than Keras's refuses only what Keras turns into an inf, NaN or negative lr within 20
    steps (which Lamb would refuse at that step, minutes into a run)."""
    assert case in REFUSED
    keras_values = [float(keras.ops.convert_to_numpy(KERAS_GARBAGE[case]()(step))) for step in range(20)]
    assert any(not math.isfinite(v) or v < 0 for v in keras_values), keras_values
