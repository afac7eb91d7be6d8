"""hp.lmm's search off a singular (boundary) optimum: where it ends on one face of a vector term's boundary, a
lower singular optimum on another face (found by hp.fit_batch's search) is reached from restarts inside."""

import warnings

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.closedform import optimize


def _slopes(seed: int) -> pd.DataFrame:
    """y ~ x + (1 + x | g) data, 5 groups of 4-5 rows (the reviewer's sweep's generator)."""
    rng = np.random.default_rng(seed)
    sd, slope_sd, b_sd = rng.choice([0.0, 0.1, 0.5, 1.0]), rng.choice([0.0, 0.2]), rng.choice([0.0, 0.3])
    b_effects = rng.normal(0, b_sd, 3)
    rows = []
    for g in range(5):
        intercept, slope = rng.normal(0, sd), rng.normal(0, slope_sd)
        for _ in range(4 + g % 2):
            x, f, b = rng.normal(), rng.choice(["p", "q", "r"]), rng.integers(3)
            rows.append({"g": f"g{g}", "x": x, "o": rng.normal(), "w": 10.0 ** rng.uniform(-4, 4),
                         "y": 1 + 0.5 * x + (0.3 if f == "q" else 0) + intercept + slope * x + b_effects[b]
                         + rng.normal()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed,reml,formula,optimum", [
    (41, False, "y ~ x + (1 + x | g)", 64.61217475704727),  # the batch's fit of this dataset
    (36, True, "y ~ x + offset(o) + (1 + x | g)", 74.01796377039891),
])
def test_a_singular_fit_on_the_intercepts_face_restarts_inside_and_finds_the_lower_face(monkeypatch, seed, reml,
                                                                                         formula, optimum):
    data = _slopes(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm(formula, data, reml=reml)
        assert fit.objective == pytest.approx(optimum, rel=1e-10)
        assert fit.theta[0] > 0.01 and fit.theta[2] < 1e-4  # a correlation of +-1, not a zero intercept variance
        monkeypatch.setattr(optimize, "FULL_RANK_CORRELATIONS", ())
        stuck = hp.lmm(formula, data, reml=reml)
    # the intercept's variance at 0 (T_11 = 0), 1.8e-3 and 0.49 above, both reported converged
    assert stuck.theta[0] < 1e-6 and stuck.objective > optimum + 1e-3
