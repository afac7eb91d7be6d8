"""``hp.bayes_batch(..., family=)``: hp.bayes's NUTS sampler of a binomial, Poisson or negative binomial GLMM, vmapped
over datasets and chains.

Each dataset's target is hp.bayes's (:func:`hierpool.bayesian.glmm.glmm_model`): every parameter sampled, each
level's effect partially non-centered with the weight of the pilot GLM fit (:func:`hierpool.bayesian.glmm.
level_centering`, computed dataset by dataset at the batch's GLM start, :func:`hierpool.batch.fit_glmm.glm_start`),
a dense mass matrix up to hp.bayes's dimension.  (A binomial or Poisson model with one scalar term is sampled
dataset by dataset by ``hp.bayes``'s independence sampler first, :func:`hierpool.bayesian.fit.bayes_independence`,
as ``hp.bayes`` samples it; only the datasets it declines come here, and with ``method="full"`` all.)

Rows and levels are padded as ``hp.fit_batch``'s GLMM batch pads them (:class:`hierpool.batch.fit_glmm.BucketRows`):
a padded row has zero trials (weight), so it adds nothing to the likelihood; a padded level has no rows, so its
effect is drawn from its prior alone and is cut from the results.  The posterior of the rest is the dataset's own.

Memory per dataset and chain: the draws, ``8 x draws x (sum_j ell_j k_j + p + sum_j k_j (k_j + 1) / 2)`` bytes,
the padded rows, ``8 x n x (4 + p + sum_j k_j)``, and the dense mass matrix, ``8 x d^2`` with d the number of
sampled coefficients (padded levels included).
"""

from __future__ import annotations

import jax
import numpy as np

from ..algebra.family import Family, Link
from ..algebra.family import family as make_family
from ..bayesian.glmm import DENSE_MASS_MAX_DIMENSION, PARAMETERIZATION, GLMMData, glmm_model, level_centering
from ..bayesian.model import variance_draws
from ..bayesian.nuts import chain_function
from .bayes_terms import correlation_matrices
from .fit_glmm import BucketRows, glm_start, padded_terms
from .fit_terms import row_buckets, take
from .plan import BatchPlan, chunks


def _centering(plan: BatchPlan, family: Family, eta: np.ndarray, members: np.ndarray, widths) -> list[np.ndarray]:
    """Per term, (datasets, padded levels, k) centering weights of ``members``: each dataset's pilot at ``eta``."""
    design = plan.design
    _, weights, residual = family.working(design.y, eta, design.row_weights)
    out = [np.zeros((len(members), int(width), term.k)) for term, width in zip(design.terms, widths)]
    positions = plan.dataset_rows()
    for row, d in enumerate(members):
        rows = positions[d]
        for j, (term, (level, n_levels, _)) in enumerate(zip(design.terms, plan.term_levels)):
            if PARAMETERIZATION == "auto":
                out[j][row, : n_levels[d]] = level_centering(level[rows], term.z[rows], int(n_levels[d]),
                                                             weights[rows], residual[rows])
            else:
                out[j][row] = float(PARAMETERIZATION == "centered")
    return out


def glmm_chunks(plan: BatchPlan, size_of, n_devices: int, messages: list[str], sampled=frozenset()):
    """The chunks of a GLMM batch: ``[(chunk, padded members, (GLMMData,)), ...]`` of the datasets without a
    message (:func:`~hierpool.batch.fit_glmm.glmm_problems`) and not ``sampled`` otherwise."""
    design = plan.design
    spec = design.family
    negative_binomial = spec.name == "negative_binomial"
    # the pilot of a negative binomial is its Poisson GLM, as hp.bayes's (centering_weights)
    family = Family("poisson", Link(spec.link)) if negative_binomial else make_family(spec)
    usable = np.array([d for d, message in enumerate(messages) if not message and d not in sampled], dtype=int)
    out = []
    if not usable.size:
        return out
    _, eta = glm_start(plan, family)
    empty = np.zeros((0,))
    for key, members in row_buckets(plan, usable).items():
        # the rows padded as fit_batch's GLMM batch pads them, without its working systems' pattern (NUTS has none)
        layout_rows = BucketRows.of(plan, members, int(key[-1]))
        term_rows, pad = padded_terms(plan, layout_rows), layout_rows.pad
        y, trials = pad(plan.design.y), pad(plan.design.row_weights)
        count = len(members)
        # a negative binomial's log Gamma terms row by row (count values the rows' own, weighted by theirs: a
        # padded row's weight is 0); hp.bayes groups them by distinct count, the same sum
        values, weights = (y, trials) if negative_binomial else (np.tile(empty, (count, 1)),) * 2
        data = GLMMData(y=y, weights=trials, offset=pad(plan.design.offset), X=pad(plan.design.X),
                        index=tuple(level for level, _ in term_rows),
                        z=tuple(z for _, z in term_rows),
                        centering=tuple(_centering(plan, family, eta, members, key[:-1])),
                        count_values=values, count_weights=weights,
                        count_steps=np.tile(empty, (count, 1)), count_above=np.tile(empty, (count, 1)))
        for chunk in chunks(0, members, size_of(count), n_devices):  # chunk.index: rows of the bucket
            out.append((chunk, members[chunk.index], (take(data, chunk.index),)))
    return out


def chain_and_draw_glmm(ks: tuple, family: str, link: str, p: int, tune: int, draws: int, target_accept: float,
                        max_tree_depth: int):
    """One (dataset, chain) of a GLMM: NUTS on every parameter of :func:`~hierpool.bayesian.glmm.glmm_model`;
    vmapped over both.  The arguments are ``(GLMMData, priors)`` (the padded level counts are the centering
    weights' shapes); the draws are :func:`hierpool.batch.bayes_terms.chain_and_draw_terms`' without sigma."""
    def run(seed, chain, args):
        n_levels = tuple(int(w.shape[0]) for w in args[0].centering)
        dimension = p + sum(k * ell for k, ell in zip(ks, n_levels)) + sum(k * (k + 1) // 2 for k in ks)

        def model(data, priors):
            return glmm_model(data, priors, None, ks=ks, n_levels=n_levels, family=family, link=link)

        one_chain = chain_function(model, tune=tune, draws=draws, target_accept=target_accept,
                                   max_tree_depth=max_tree_depth, dense_mass=dimension <= DENSE_MASS_MAX_DIMENSION)
        constrained, sample_stats = one_chain(seed, chain, args)
        if "beta" in constrained or not p:  # one vector site, or one site per column (glmm_model's fixed_effects)
            beta = constrained["beta"] if p else jax.numpy.zeros((draws, 0))
        else:
            beta = jax.numpy.stack([constrained[f"beta__{i}"] for i in range(p)], axis=-1)
        sds, cors, _ = variance_draws(constrained, ks, True)
        out = {"beta": beta, "b": [constrained[f"b__{j}"] for j in range(len(ks))], "sd": sds,
               "diverging": sample_stats["diverging"],
               "cor": correlation_matrices(cors)}
        if family == "negative_binomial":
            out["shape"] = constrained["shape"]
        return out

    return jax.vmap(run, in_axes=(None, 0, 0))
