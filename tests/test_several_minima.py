"""Small models whose criterion has several minima (a term of three or four coefficients on 6 groups of 6 rows):
``hp.lmm`` reaches lmer's optimum or a lower one, and ``hp.fit_batch`` the same as ``hp.lmm``
(validation/several_minima_reference.R; :func:`hierpool.algebra.search.terms.lowest_from_identity`,
``MixedModel._lowest_of_batch_search``)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hierpool as hp

ROOT = Path(__file__).resolve().parents[1] / "validation"
REFERENCE = json.loads((ROOT / "several_minima_reference.json").read_text())["fits"]
FORMULAS = {"spline_193": "y ~ 1 + (0 + b0 + b1 + b2 + b3 | g)", "spline_88": "y ~ 1 + (0 + b0 + b1 + b2 + b3 | g)",
            "slopes_14": "y ~ 1 + x1 + x2 + (1 + x1 + x2 | g)"}


def _data(name: str) -> pd.DataFrame:
    data = pd.read_csv(ROOT / "several_minima_data.csv", dtype={"g": str})
    return data[data["dataset"] == name].drop(columns="dataset").dropna(axis=1).reset_index(drop=True)


@pytest.fixture(scope="module")
def fits():
    """Each dataset's single fit and its batch fit (the two spline datasets in one batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # (boundary fits)
        single = {name: hp.lmm(FORMULAS[name], _data(name)) for name in FORMULAS}
        splines = hp.fit_batch(FORMULAS["spline_193"], [_data("spline_193"), _data("spline_88")])
        slopes = hp.fit_batch(FORMULAS["slopes_14"], [_data("slopes_14")])
    batch = {"spline_193": (splines, 0), "spline_88": (splines, 1), "slopes_14": (slopes, 0)}
    return single, batch


@pytest.mark.parametrize("name", list(FORMULAS))
def test_single_fit_reaches_lmer_or_below(fits, name):
    single = fits[0][name]
    reference = REFERENCE[name]["reml_criterion"]
    assert single.converged
    assert single.objective <= reference + 1e-6 * abs(reference)


@pytest.mark.parametrize("name", list(FORMULAS))
def test_batch_equals_single_fit(fits, name):
    single = fits[0][name]
    batch, row = fits[1][name]
    assert bool(batch.converged.iloc[row]) and not bool(batch.refit.iloc[row])
    np.testing.assert_allclose(batch.objective.iloc[row], single.objective, rtol=1e-8)
    np.testing.assert_allclose(batch.theta[row], single.theta, rtol=1e-3, atol=1e-3)
