"""hierpool.algebra.varcorr.varcorr_table: lme4's VarCorr layout, and the one builder every engine's table comes from."""

import warnings

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.algebra.varcorr import VARCORR_COLUMNS, varcorr_table
from hierpool.bayesian.posterior import build_inference_data
from hierpool.bayesian.results import BayesResult

SLEEP = "Reaction ~ Days + (Days | Subject)"


def test_two_by_two_covariance_in_lme4s_layout():
    # as.data.frame(VarCorr(fit)) of lme4: per term the variances, then the covariances (sdcor holds the
    # correlations), then the residual; var2 empty on variance rows, var1 and var2 on the residual row
    cov = np.array([[4.0, -1.2], [-1.2, 9.0]])
    table = varcorr_table([("Subject", ["(Intercept)", "Days"], cov)], sigma=2.5)
    assert list(table.columns) == VARCORR_COLUMNS == ["grp", "var1", "var2", "vcov", "sdcor"]
    keys = table[["grp", "var1", "var2"]].fillna("").to_numpy().tolist()
    assert keys == [["Subject", "(Intercept)", ""], ["Subject", "Days", ""], ["Subject", "(Intercept)", "Days"],
                    ["Residual", "", ""]]
    np.testing.assert_array_equal(table.vcov, [4.0, 9.0, -1.2, 6.25])
    np.testing.assert_allclose(table.sdcor, [2.0, 3.0, -1.2 / 6.0, 2.5], rtol=1e-15)


def test_pairs_in_rs_lower_tri_order_zero_variances_and_known_sigma():
    cov = np.diag([1.0, 0.0, 4.0])
    table = varcorr_table([("g", ["a", "b", "c"], cov), ("h", ["(Intercept)"], [[0.25]])], sigma=None)
    assert "Residual" not in set(table.grp)  # sigma known: no residual row
    pairs = table.dropna(subset=["var2"])
    assert list(zip(pairs.var1, pairs.var2)) == [("a", "b"), ("a", "c"), ("b", "c")]
    # no correlation with a zero-variance coefficient; 0 between two that vary independently
    np.testing.assert_array_equal(pairs.sdcor, [np.nan, 0.0, np.nan])
    assert table.iloc[-1][["grp", "var1", "vcov", "sdcor"]].tolist() == ["h", "(Intercept)", 0.25, 0.5]


def test_sdcor_form_and_stacked_fits():
    rng = np.random.default_rng(1)
    factor = np.tril(rng.normal(size=(5, 2, 2)))
    cov = factor @ np.swapaxes(factor, 1, 2)
    sigma = rng.uniform(1, 2, 5)
    terms = [("g", ["(Intercept)", "x"], cov)]
    stacked = varcorr_table(terms, sigma, by=("dataset", list("abcde")))
    # stacked fits: one full table after another, each labelled
    singles = pd.concat([varcorr_table([("g", ["(Intercept)", "x"], cov[d])], sigma[d]) for d in range(5)],
                        ignore_index=True)
    pd.testing.assert_frame_equal(stacked.drop(columns="dataset"), singles)
    assert list(stacked.dataset) == list(np.repeat(list("abcde"), 4))
    # the sd/correlation form (as a sampler draws them) gives the same table
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    sdcor = cov / (sd[:, :, None] * sd[:, None, :])
    sdcor[:, [0, 1], [0, 1]] = sd
    from_sdcor = varcorr_table([("g", ["(Intercept)", "x"], sdcor)], sigma, form="sdcor", by=("dataset", list("abcde")))
    pd.testing.assert_frame_equal(from_sdcor, stacked, rtol=1e-12)
    with pytest.raises(ValueError, match="form"):
        varcorr_table(terms, sigma, form="corr")
    with pytest.raises(ValueError, match="coefficients"):
        varcorr_table([("g", ["a"], cov)], sigma)


def test_closed_form_and_bayesian_tables_come_from_the_one_builder(sleepstudy, monkeypatch):
    fit = hp.lmm(SLEEP, sleepstudy)
    term, cov = fit.design.terms[0], fit.term_covariances()[0]
    pd.testing.assert_frame_equal(fit.varcorr, varcorr_table([("Subject", term.coef_names, cov)], fit.sigma))
    # a posterior whose every draw holds the fit's variance parameters: its varcorr rows are the fit's,
    # its draws the fit's sds, correlation and sigma
    chains, draws = 2, 50
    sd = np.sqrt(np.diag(cov))
    cor_factor = np.linalg.cholesky(cov / np.outer(sd, sd))
    idata = build_inference_data(
        fit.design, beta=np.broadcast_to(fit.fixef.to_numpy(), (chains, draws, 2)),
        b=[np.zeros((chains, draws, term.n_levels, 2))], sds=[np.broadcast_to(sd, (chains, draws, 2))],
        cor_factors=[np.broadcast_to(cor_factor, (chains, draws, 2, 2))], sigma=np.full((chains, draws), fit.sigma),
        sample_stats=None, log_likelihood=None)
    post = BayesResult(idata, fit.design, priors=None, method="collapsed", level=0.9)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("form", "cov"))
        return varcorr_table(*args, **kwargs)

    monkeypatch.setattr("hierpool.closedform.results.varcorr_table", spy)
    monkeypatch.setattr("hierpool.bayesian.results.varcorr_table", spy)
    fit = hp.lmm(SLEEP, sleepstudy)
    table, posterior_draws = fit.varcorr, post.varcorr_draws()
    assert calls == ["cov", "sdcor"]
    assert posterior_draws.shape == (chains, draws, len(table))
    for draw in posterior_draws.reshape(-1, len(table)):
        np.testing.assert_allclose(draw, table.sdcor.to_numpy(), rtol=1e-12)
    with warnings.catch_warnings():  # constant draws: no R-hat or ESS
        warnings.simplefilter("ignore")
        keys = post.varcorr[["grp", "var1", "var2"]]
    pd.testing.assert_frame_equal(keys, table[["grp", "var1", "var2"]])
