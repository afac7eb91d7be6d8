"""``hp.bayes_batch(..., correlation=hp.ar1(...) | hp.car1(...))``: hp.bayes's collapsed sampler of a model with
AR(1) residuals, vmapped over datasets and chains.

Each dataset's target is hp.bayes's (:func:`hierpool.bayesian.model.ar1_collapsed_model`): NUTS on the variance
parameters and phi (Uniform on its interval, per the dataset's median lag in continuous time, as hp.bayes's), the
data whitened at phi (:func:`hierpool.algebra.ar1.whitened_system`) giving the marginal likelihood, then exact
(beta, b) draws on the system whitened at each draw's phi (:func:`hierpool.algebra.ar1.draw_effects_whitened`);
:func:`hierpool.batch.bayes.bayes_batch` reports phi per the user's unit of time.  Series, padding and buckets are
``hp.fit_batch``'s (:func:`hierpool.batch.fit_ar1.batch_series`, :func:`hierpool.batch.fit_ar1.series_buckets`):
each dataset's series are its own, and a padded row is the first of its own series with zero values, so it adds
nothing.

Memory per dataset and chain: the draws, as :mod:`hierpool.batch.bayes_terms`' plus one phi per draw, and the
padded rows, ``8 x n x (4 + p + sum_j k_j)`` bytes, besides the whitened system.
"""

from __future__ import annotations

import jax
import numpy as np

from ..algebra.ar1 import draw_effects_whitened, in_search_units
from ..algebra.marginal import draw_batch_size, theta_from_components
from ..bayesian.model import SeriesData, ar1_collapsed_model, variance_draws
from ..bayesian.nuts import chain_function
from .bayes_terms import DRAW_BUDGET, correlation_matrices, effect_key
from .fit_ar1 import batch_series, series_buckets, too_large, warn_even_steps
from .fit_terms import take, term_problems
from .plan import BatchPlan, chunks


def ar1_chunks(plan: BatchPlan, structure, size_of, n_devices: int):
    """The chunks of an AR(1) batch: ``(messages, [(chunk, padded members, (pattern, previous, lag, y, n)), ...],
    units)``.

    ``messages``: hp.lmm's checks (:func:`~hierpool.batch.fit_terms.term_problems`) and each refused dataset's
    series message (:func:`~hierpool.batch.fit_ar1.batch_series`).  The lags are in each dataset's ``units``
    (:func:`hierpool.algebra.ar1.in_search_units`, hp.bayes's): the draws of phi are per that unit.
    """
    series, problems = batch_series(plan, structure)
    series, units = in_search_units(series, plan.dataset, plan.n_datasets, structure.continuous)
    messages = [message or problems.get(d, "") for d, message in enumerate(term_problems(plan))]
    warn_even_steps(plan, series, structure, messages)
    for d, reason in too_large(plan, messages).items():
        messages[d] = f"{reason}: sample it with hp.bayes"
    usable = np.array([d for d, message in enumerate(messages) if not message], dtype=int)
    out = []
    for members, data in series_buckets(plan, series, usable):
        for chunk in chunks(0, members, size_of(len(members)), n_devices):  # chunk.index: rows of the bucket
            out.append((chunk, members[chunk.index], take(data, chunk.index)))
    return messages, out, units


def chain_and_draw_ar1(ks: tuple, phi_bounds: tuple, tune: int, draws: int, target_accept: float,
                       max_tree_depth: int, rows: int):
    """One (dataset, chain) of an AR(1) model: NUTS on (variance parameters, phi), then exact (beta, b) draws;
    vmapped over both.  The arguments are ``(pattern, previous, lag, y - offset, n, loc, scale, priors)``; the draws
    are :func:`hierpool.batch.bayes_terms.chain_and_draw_terms`' with ``phi``; ``rows`` as there (each draw
    whitens the padded rows again, which counts against the budget too)."""
    def model(pattern, series, loc, scale, priors, n):
        return ar1_collapsed_model(pattern, series, loc, scale, priors, n, phi_bounds=phi_bounds)

    one_chain = chain_function(model, tune=tune, draws=draws, target_accept=target_accept,
                               max_tree_depth=max_tree_depth, dense_mass=True)

    def run(seed, chain, args):
        pattern, previous, lag, y, n, loc, scale, priors = args
        series = SeriesData(previous=previous, lag=lag, y_less_offset=y)
        constrained, sample_stats = one_chain(seed, chain, (pattern, series, loc, scale, priors, n))
        sds, cors, sigma = variance_draws(constrained, ks, False)
        thetas = theta_from_components(sds, cors, sigma)
        budget = DRAW_BUDGET / rows
        whitening = 24.0 * y.shape[0] * (sum(ks) + loc.shape[0] + 1)  # bytes per draw: the whitened rows
        size = max(1, min(draws, draw_batch_size(pattern.layout, budget), int(budget // whitening)))
        beta, b = draw_effects_whitened(thetas, sigma, constrained["phi"], pattern, previous, lag, y, loc, scale,
                                        effect_key(seed, chain), size)
        return {"beta": beta, "b": list(b), "sd": sds, "sigma": sigma, "phi": constrained["phi"],
                "diverging": sample_stats["diverging"],
                "cor": correlation_matrices(cors)}

    return jax.vmap(run, in_axes=(None, 0, 0))
