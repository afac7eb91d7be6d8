"""``hp.bayes_batch`` for models with several random-effect terms (crossed, nested): hp.bayes's collapsed
sampler on the general algebra, vmapped over datasets and chains.

With one term each dataset's collapsed target is written on its per-level sufficient statistics
(:mod:`hierpool.batch.bayes`); with several, the levels of one term meet those of another, so the target is
hp.bayes's own general one, :func:`hierpool.bayesian.model.collapsed_model` (the marginal likelihood of
:func:`hierpool.algebra.marginal.log_marginal_likelihood`), on each dataset's system of cross-products.  The
systems of a batch are built at once and padded to common level counts per bucket, as ``hp.fit_batch``'s
(:func:`hierpool.algebra.batched_systems.batched_systems`: a padded level adds log 1 to the marginal likelihood
and couples to nothing, so the target is the dataset's own, exactly); the exact draws of (beta, b) given each
variance draw are :func:`hierpool.algebra.marginal.draw_effects`, hp.bayes's.

Memory per dataset and chain: the draws, ``8 x draws x (sum_j ell_j k_j + p + sum_j k_j (k_j + 1) / 2 + 1)``
bytes, and the system, ``8 x (ell0 k0^2 + ell0 k0 m + m^2)`` with ``m = sum_(j>0) ell_j k_j + p + 1`` (the padded
levels); the exact draws factor ``min(draws, draw_batch_size)`` rest matrices (m^2 each) at a time.
"""

from __future__ import annotations

import jax

from ..algebra.marginal import draw_batch_size, draw_effects, theta_from_components
from ..bayesian.model import collapsed_model, variance_draws
from ..bayesian.nuts import chain_function
from .fit_terms import take, term_problems, too_large
from .plan import BatchPlan, chunks

#: Bytes the exact (beta, b) draws of one program may hold at once, over all its (dataset, chain) pairs.
DRAW_BUDGET = 2e8


def term_chunks(plan: BatchPlan, size_of, n_devices: int):
    """The chunks of a several-term batch: ``(messages, [(chunk, padded members, (systems, n)), ...])``.

    ``messages``: why a dataset is not sampled ("" when it is): hp.lmm's checks (:func:`term_problems`), or a
    dense coupling too large to batch.  ``size_of(count)``: datasets per chunk for a bucket of ``count``.
    """
    messages = term_problems(plan)
    for d, reason in too_large(plan, messages).items():
        messages[d] = f"{reason}: sample it with hp.bayes"
    out = []
    for members, systems, n in plan.term_systems([d for d, message in enumerate(messages) if not message]):
        for chunk in chunks(0, members, size_of(len(members)), n_devices):  # chunk.index: rows of the bucket
            out.append((chunk, members[chunk.index], take((systems, n), chunk.index)))
    return messages, out


def effect_key(seed, chain):
    """The key of a chain's exact (beta, b) draws: folded from the chain's own, so that it is none of its keys."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), chain), 1)


def correlation_matrices(cors) -> list:
    """Per term, the correlation matrices R R^T of its Cholesky-factor draws (None for a one-coefficient term)."""
    return [None if cor is None else cor @ jax.numpy.swapaxes(cor, -1, -2) for cor in cors]


def chain_and_draw_terms(ks: tuple, sigma_known: bool, tune: int, draws: int, target_accept: float,
                         max_tree_depth: int, rows: int):
    """One (dataset, chain) of a several-term model: NUTS on the variance parameters of
    :func:`~hierpool.bayesian.model.collapsed_model`, then exact (beta, b) draws; vmapped over both.

    The arguments are ``(systems, n, loc, scale, priors)``; the draws are those of the one-term path
    (:mod:`hierpool.batch.bayes`), with one entry per term in ``b``, ``sd`` and ``cor`` (None where k = 1).
    ``rows``: the (dataset, chain) pairs the program vmaps over on one device, which share the exact draws' memory
    budget.
    """
    one_chain = chain_function(collapsed_model, tune=tune, draws=draws, target_accept=target_accept,
                               max_tree_depth=max_tree_depth, dense_mass=True)

    def run(seed, chain, args):
        system, n, loc, scale, priors = args
        constrained, sample_stats = one_chain(seed, chain, (system, loc, scale, priors, n))
        sds, cors, sigma = variance_draws(constrained, ks, sigma_known)
        thetas = theta_from_components(sds, cors, sigma)
        beta, b = draw_effects(thetas, sigma, system, loc, scale, effect_key(seed, chain),
                               batch_size=min(draws, draw_batch_size(system.layout, DRAW_BUDGET / rows)))
        out = {"beta": beta, "b": list(b), "sd": sds, "diverging": sample_stats["diverging"],
               "cor": correlation_matrices(cors)}
        if not sigma_known:
            out["sigma"] = sigma
        return out

    return jax.vmap(run, in_axes=(None, 0, 0))

