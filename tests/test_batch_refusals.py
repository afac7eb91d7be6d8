"""hp.fit_batch: a dataset the batch cannot fit keeps its row and says why, and never stops the other datasets.

A perfectly separated Bernoulli dataset beside others, a dataset with no usable rows (empty, lacking a column, an
all-missing response) and one whose response is constant: each keeps its row, NaN where there is no number, with
the reason in ``messages``; every other dataset equals its single fit.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
import hierpool.batch.fit_glmm as fit_glmm_module
from hierpool.batch.glmm_search import beta_covariance

BERNOULLI = "bern ~ x + (1 | g)"
LINEAR = "y ~ x + (1 | g)"


def _bernoulli(seed: int, groups: int = 10, per: int = 5) -> pd.DataFrame:
    """0/1 outcomes of a logistic random-intercept model (the reviewer's draws, which the separated dataset's test
    needs: whether its Hessian comes out exactly singular depends on the bits of its chunk-mates')."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, 0.8, groups)
    rows = []
    for g in range(groups):
        for _ in range(per):
            x, trials = rng.normal(), rng.integers(1, 12)
            p = 1 / (1 + np.exp(-(-0.3 + 0.6 * x + effects[g])))
            rng.binomial(trials, p)  # the reviewer drew a binomial count too: the draws after it are theirs
            rows.append({"g": f"g{g}", "x": x, "bern": int(rng.uniform() < p)})
    return pd.DataFrame(rows)


def _gaussian(seed: int, groups: int = 6, per: int = 5) -> pd.DataFrame:
    """A linear random-intercept model's data."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    return pd.DataFrame({"g": [f"g{i}" for i in g], "x": x,
                         "y": 1 + 0.5 * x + rng.normal(0, 1, groups)[g] + rng.normal(size=g.size)})


def _quiet(fit, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(*args, **kwargs)


def test_an_exactly_singular_hessian_in_a_stack_gives_nan_for_its_dataset_alone():
    # NumPy's inv of a stack raised LinAlgError for every dataset when one Hessian was exactly singular
    regular = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    singular = np.array([[2e-14, 0.0, -4e-12], [0.0, 0.0, 0.0], [-4e-12, 0.0, 0.0]])
    covariance = beta_covariance(np.stack([regular, singular]), np.array([1.0, 1e-9]), n_theta=1, p=2)
    np.testing.assert_allclose(covariance[0], np.linalg.inv(regular / 2)[1:, 1:])
    assert np.isnan(covariance[1]).all()


def test_a_separated_dataset_in_a_chunk_with_others_is_not_converged_and_the_others_are_fitted(monkeypatch):
    # one thread and chunks of two, whatever the machine's cores: the separated dataset shares its chunk with the
    # first (its Hessian came out exactly singular there, and the batch raised numpy's LinAlgError)
    monkeypatch.setattr(fit_glmm_module, "thread_count", lambda *a, **k: 1)
    separated = _bernoulli(2).assign(bern=lambda f: (f.x > 0).astype(int))
    frames = [_bernoulli(0), separated, _bernoulli(3)]
    batch = hp.fit_batch(BERNOULLI, frames, by="rep", family="binomial", chunk_size=2, progress=False)
    assert not batch.converged.iloc[1] and batch.messages.iloc[1], batch.messages.tolist()
    without = hp.fit_batch(BERNOULLI, frames[::2], by="rep", family="binomial", progress=False)
    for d, alone in ((0, 0), (2, 1)):
        single = _quiet(hp.glmm, BERNOULLI, frames[d], family="binomial")
        assert batch.converged.iloc[d] and not batch.messages.iloc[d]
        assert batch.objective.iloc[d] == pytest.approx(single.optimum.deviance, rel=1e-8)
        # as fitted without the separated dataset (beta's optimum is flat to 1e-5 here: hp.glmm's stops as near)
        np.testing.assert_allclose(batch.beta[d], without.beta[alone], rtol=1e-8)
        np.testing.assert_allclose(batch.beta[d], single.fixef.to_numpy(), rtol=1e-4)

