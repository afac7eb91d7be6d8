"""``hp.bayes_batch`` of the models whose posterior has no batched sampler here: a relationship matrix
(``relmat=``) and spatial ``car()`` terms, each dataset sampled by ``hp.bayes`` itself.

``hp.bayes`` samples them on the host's sparse algebra (:mod:`hierpool.bayesian.relmat`'s collapsed sampler with
exact (beta, b) draws from SuperLU factors; :mod:`hierpool.bayesian.spatial_exact` for a Gaussian spatial model) or
by NUTS on the spatial model (:mod:`hierpool.bayesian.spatial`), none of which is written over a leading dataset
axis.  So each dataset's posterior is ``hp.bayes(formula, dataset, seed=seed + d, ...)``'s, dataset ``d`` in order
of first appearance: the same code, and any row can be reproduced alone.  The model is checked, and its
relationship or graphs built, once on the long frame (:func:`hierpool.batch.fit_each.each_model`); each dataset's
summaries are taken out of its result, which is then dropped (one posterior is held at a time); a dataset whose
sampling raises keeps the error in its message, its summaries NaN.  Sampler warnings are not repeated in the
messages: ``diagnostics`` gives each dataset's divergences, R-hat and ESS.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pandas as pd

from ..algebra.varcorr import varcorr_table
from ..bayesian.results import SUMMARY_COLUMNS, summarize_draws
from ..closedform.results import term_rows
from ..errors import HierpoolWarning
from .bayes_results import BayesBatchResult, BayesBatchTerm
from .fit_each import by_coefficient, check_fixed_effects, each_model, failure_words, run_each

_WIDTH = len(SUMMARY_COLUMNS)


def sample_summary(sampler, formula: str, frame: pd.DataFrame, arguments: dict, settings: dict, seed: int,
                   fixed_names, terms, levels, template: pd.DataFrame, scalars, level: float,
                   keep_draws: bool) -> tuple[dict | None, str]:
    """(one dataset's summaries as the batch's arrays, "") from ``sampler(formula, frame, seed=seed, **settings,
    **arguments)`` (``hp.bayes``, or its independence sampler), (None, why) where it raised (kept in its row, never
    raised), or (None, "") where ``sampler`` returned None (declined).  Its hierpool warnings are not repeated: its
    diagnostics are judged with the batch's.  Pure in its arguments, so that a worker process can run it
    (``hp.bayes_batch``'s independence pass)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HierpoolWarning)
            single = sampler(formula, frame, seed=seed, **settings, **arguments)
        if single is None:
            return None, ""
        summary = single_summaries(single, fixed_names, terms, levels, template, scalars, level)
        summary["method"] = single.method
        if keep_draws:
            summary["draws"] = single_draws(single, fixed_names, terms, levels)
        return summary, ""
    except Exception as exc:  # noqa: BLE001 - reported in the dataset's row
        return None, failure_words(exc)


def single_summaries(result, fixed_names, terms, levels, template: pd.DataFrame, scalars, level: float) -> dict:
    """One dataset's ``hp.bayes`` posterior of an ordinary model (a :class:`~hierpool.bayesian.results.BayesResult`)
    as the batched sampler's arrays (``hp.bayes_batch`` samples alone a dataset that lacks a factor's level): fixef
    by name (NaN for a column the dataset lacks), varcorr's rows matched by (grp, var1, var2) to ``template`` (the
    batch's), each of ``terms``' (group, coef_names) effects at ``levels`` (per term, the dataset's level labels in
    the batch's order: (k, ell, 7)), and the ``scalars`` named (phi, shape), all by name: the dataset's own fit may
    order its terms otherwise."""
    def keys(frame):  # (grp, var1, var2), an empty var1 or var2 as "" (None and NaN alike)
        return list(zip(frame["grp"], *(frame[c].where(frame[c].notna(), "") for c in ("var1", "var2"))))

    varcorr = result.varcorr.set_axis(pd.MultiIndex.from_tuples(keys(result.varcorr)))[SUMMARY_COLUMNS]
    effects = []
    for (group, coef_names), labels in zip(terms, levels):
        effects.append(np.stack([term_rows(result.ranef, group, coef).set_index("grp").reindex(list(labels))
                                 [SUMMARY_COLUMNS].to_numpy() for coef in coef_names]))
    draws = {"phi": result.phi_draws, "shape": result.shape_draws}
    return {"fixef": result.fixef.reindex(list(fixed_names))[SUMMARY_COLUMNS].to_numpy(),
            "varcorr": varcorr.reindex(keys(template)).to_numpy(), "terms": effects,
            "divergences": result.divergences,
            "scalars": {name: _one_summary(summarize_draws(draws[name][..., None], level)) for name in scalars}}


def _one_summary(stats: dict) -> np.ndarray:
    """The summary columns of one parameter's :func:`summarize_draws` (computed once, diagnostics included)."""
    return np.array([stats[c][0] for c in SUMMARY_COLUMNS], dtype=float)


def single_draws(result, fixed_names, terms, levels) -> dict:
    """One dataset's ``hp.bayes`` draws as ``hp.bayes_batch(keep_draws=True)`` keeps a batch dataset's, by name
    (:func:`single_summaries`' matching): ``beta`` (chain, draw, p) on the batch's columns (NaN for one the dataset
    lacks), per term of ``terms`` its effects ``b`` (chain, draw, ell, k) at the dataset's ``levels`` in the batch's
    order, ``sd`` (chain, draw, k) and, where k > 1, ``cor`` (chain, draw, k, k); ``sigma``, ``phi`` and ``shape``
    where the model has them.  Lists per term (the batch gives one term's arrays bare: the caller's)."""
    own = list(result.design.fixed_names)
    beta = np.full(result.beta_draws.shape[:2] + (len(fixed_names),), np.nan)
    for j, name in enumerate(fixed_names):
        if name in own:
            beta[..., j] = result.beta_draws[..., own.index(name)]
    out = {"beta": beta, "b": [], "sd": [], "cor": []}
    keys = [(t.group, tuple(t.coef_names)) for t in result.design.terms]
    for (group, coef_names), labels in zip(terms, levels):
        i = keys.index((group, tuple(coef_names)))
        where = pd.Index([str(v) for v in result.design.terms[i].levels]).get_indexer([str(v) for v in labels])
        out["b"].append(result.term_draws(i)[:, :, where, :])
        cov = result.term_covariance_draws(i)
        sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
        out["sd"].append(sd)
        out["cor"].append(cov / (sd[..., :, None] * sd[..., None, :]) if len(coef_names) > 1 else None)
    for name, values in (("sigma", result.sigma_draws), ("phi", result.phi_draws), ("shape", result.shape_draws)):
        if values is not None:
            out[name] = values
    return out


def _relmat_summaries(result, keys: list, fixed_names, template: pd.DataFrame) -> dict:
    """An animal model's posterior (a :class:`~hierpool.bayesian.results.BayesResult`) as the batch's arrays:
    ``template`` the batch's varcorr rows (grp, var1, var2), matched by name (the dataset's own fit may order its
    terms otherwise)."""
    varcorr = result.varcorr.set_index(["grp", "var1"])[SUMMARY_COLUMNS]
    terms = []
    for group, coefs in keys:
        part = term_rows(result.ranef, group, coefs[0])
        terms.append((part["grp"].to_numpy(), part[SUMMARY_COLUMNS].to_numpy()[None]))
    return {"fixef": result.fixef.reindex(list(fixed_names))[SUMMARY_COLUMNS].to_numpy(),
            "varcorr": varcorr.loc[list(zip(template["grp"], template["var1"]))].to_numpy(),
            "terms": terms, "divergences": result.divergences,
            "scalars": {"heritability": result.heritability[SUMMARY_COLUMNS].to_numpy()[0]}}


def _spatial_summaries(result, keys: list, fixed_names) -> dict:
    """A spatial posterior (:class:`~hierpool.bayesian.spatial.SpatialBayesResult`) as the batch's arrays: its
    hyperparameters in place of varcorr's rows, each term's effects (a ``(lhs | g)`` term's table is level-major)."""
    tables = result.ranef
    if not isinstance(tables, dict):
        tables = {keys[0][1][0]: tables}
    n_spatial = len(result.sdesign.areas)
    group_terms = {(t.group, tuple(t.coef_names)): t for t in result.design.terms}
    terms = []
    for t, key in enumerate(keys):
        # a spatial term's key carries its label; a (lhs | g) term's table is keyed by the term's label
        label, k = (key[1][0], 1) if t < n_spatial else (group_terms[key].label, group_terms[key].k)
        table = tables[label]
        values = by_coefficient(table[SUMMARY_COLUMNS].to_numpy(), k).transpose(1, 0, 2)
        terms.append((table.index.get_level_values(0).to_numpy()[::k], values))
    # by name: a (lhs | g) term's rows may come in another order in another dataset
    return {"fixef": result.fixef.reindex(list(fixed_names))[SUMMARY_COLUMNS].to_numpy(),
            "hyperparameters": result.hyperparameters()[SUMMARY_COLUMNS],
            "terms": terms, "divergences": result.divergences, "scalars": {}}


def dataset_posterior(bayes, formula: str, seed: int, settings: dict, spatial: bool, keys, fixed_names, template,
                      index: int, frame: pd.DataFrame, arguments: dict) -> dict:
    """Dataset ``index``'s ``hp.bayes`` posterior (seed + index) summarized: a module-level function, so that a worker
    process can run it (:func:`~hierpool.batch.fit_each.run_each`'s ``portable``)."""
    result = bayes(formula, frame, seed=seed + index, **settings, **arguments)
    check_fixed_effects(result, fixed_names)
    if spatial:
        return _spatial_summaries(result, keys, fixed_names)
    return _relmat_summaries(result, keys, fixed_names, template)


def bayes_batch_each(formula: str, data, by: str, *, chains: int, draws: int, tune: int, seed: int, priors,
                     level: float, target_accept: float, progress, weights, offset, se, family, link, relmat,
                     relmat_inverse, adjacency) -> BayesBatchResult:
    """Each dataset's ``hp.bayes`` posterior (module notes), summarized as :class:`BayesBatchResult`'s."""
    from ..bayesian.fit import bayes
    from ..spec.family import optional_family_spec

    spec = optional_family_spec(family, link)
    model = each_model(formula, data, by, "bayes_batch", spec=spec, weights=weights, offset=offset, se=se,
                       relmat=relmat, relmat_inverse=relmat_inverse, adjacency=adjacency)
    keys, fixed_names = model.keys, model.fixed_names
    template = varcorr_table([(group, coefs, np.full((len(coefs),) * 2, np.nan)) for group, coefs in keys], np.nan)
    settings = dict(chains=chains, draws=draws, tune=tune, priors=priors, level=level, target_accept=target_accept,
                    progress=False, family=family, link=link, **model.shared)

    sample = partial(dataset_posterior, bayes, formula, seed, settings, model.spatial, keys, fixed_names, template)
    # a Gaussian model's posterior is hp.bayes's exact sampler (NumPy and SciPy: the same draws in a worker process);
    # NUTS (a GLMM's spatial posterior) is not sent, its draws in a worker differed from this process's
    labels, out, messages = run_each(model, sample, progress, "bayes_batch", keep_warnings=False,
                                     portable=sample if spec is None else None, formula=formula)
    n, p = len(labels), len(fixed_names)
    done = [o for o in out if o is not None]
    names = tuple(dict.fromkeys(name for o in done for name in o["hyperparameters"].index)) if model.spatial else None
    rows = len(names) if model.spatial else len(template)
    fixef = np.full((n, p, _WIDTH), np.nan)
    varcorr = np.full((n, rows, _WIDTH), np.nan)
    divergences = np.zeros(n, dtype=int)
    scalars = {} if model.spatial else {"heritability": np.full((n, _WIDTH), np.nan)}
    term_levels = [[np.array([], dtype=object)] * n for _ in keys]
    term_summaries = [[np.zeros((len(coefs), 0, _WIDTH))] * n for _, coefs in keys]
    for d, summary in enumerate(out):
        if summary is None:
            continue
        fixef[d], divergences[d] = summary["fixef"], summary["divergences"]
        varcorr[d] = summary["hyperparameters"].reindex(list(names)).to_numpy() if model.spatial else summary["varcorr"]
        for name, value in summary["scalars"].items():
            scalars[name][d] = value
        for t, (levels, values) in enumerate(summary["terms"]):
            term_levels[t][d], term_summaries[t][d] = levels, values
    terms = tuple(BayesBatchTerm(group=group, coef_names=tuple(coefs), levels=levels, ranef_summary=summaries)
                  for (group, coefs), levels, summaries in zip(keys, term_levels, term_summaries))
    return BayesBatchResult(datasets=labels, fixed_names=tuple(fixed_names), terms=terms, fixef_summary=fixef,
                            varcorr_summary=varcorr, divergences=divergences, messages=messages, chains=chains,
                            draws_per_chain=draws, level=level, sigma_known=spec is not None, scalars=scalars,
                            hyperparameter_names=names)
