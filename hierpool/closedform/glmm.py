"""``hp.glmm``: a generalized linear mixed model by the Laplace approximation or adaptive quadrature, as glmer.

The design is read with the family (:func:`hierpool.spec.design.build_design`), the model fitted
by glmer's two stages (:func:`hierpool.closedform.glmm_optimize.fit_laplace`) and its tables are a
:class:`~hierpool.closedform.glmm_results.GLMMResult`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd

from ..algebra.conditioning import CENTRE_RATIO, SPATIAL_REASON, condition_terms, far_fixed_columns, warn_far_fixed
from ..algebra.family import family as make_family
from ..algebra.laplace import deviance_gives_likelihood
from ..algebra.quadrature import MAX_NODES
from ..algebra.separation import distinct_rows, separating_columns
from ..errors import (
    ArgumentError,
    ConvergenceError,
    ConvergenceWarning,
    DataError,
    HierpoolWarning,
    boolean_argument,
)
from ..spec.design import build_design
from ..spec.family import binary_outcome_per_level, family_spec, unidentified_term_message
from ..spec.formula import has_spatial_term
from .glmm_convergence import check_convergence, singular_terms
from .glmm_optimize import fit_laplace
from .glmm_results import GLMMResult
from .optimize import is_singular

#: Distinct (row of X, response) pairs up to which the fixed-effect columns are checked for separation before
#: the fit (a linear programme over them, which at 200,000 cost twice the host's Laplace fit of that model:
#: benchmarks/RESULTS.md, "GLMMs on the host").  Beyond, the check runs after the fit when the fit looks like a separated one
#: (:data:`SEPARATION_SUSPECT_ETA`, or the convergence checks failed), on all the pairs.
SEPARATION_MAX_ROWS = 50_000
#: A fixed effect whose column moves the linear predictor by more than this (|beta_j| max |x_j|; a probability
#: of 3e-7 on the logit scale) marks a fit as possibly separated.
SEPARATION_SUSPECT_ETA = 15.0

#: Where a negative binomial's shape search starts (glmer.nb starts from a Poisson fit's estimate).
NB_START_SHAPE = 1.0


#: A negative binomial fit that ends singular is searched again from these multiples of its shape (the best kept).
NB_RESTART_FACTORS = (0.25, 4.0)
#: A negative binomial fit whose shape ends above NB_LIMIT_CHECK is compared with the Poisson GLMM, its limit, and
#: searched again from NB_LIMIT_SHAPE where that is lower (:func:`_negative_binomial_limit`).
NB_LIMIT_CHECK = 1e3
NB_LIMIT_SHAPE = 1e8


def _negative_binomial_restarts(design, spec, optimum, stages: int, nodes: int):
    """The lowest-deviance of ``optimum`` and, where it is singular (some variance 0), the searches started from
    :data:`NB_RESTART_FACTORS` times its shape.

    At theta = 0 the criterion's gradient in theta vanishes by symmetry, so the joint search in (theta, beta, log
    shape) can stop on that boundary with the overdispersion all in the shape, while a lower optimum lies inside
    (a bootstrap replicate of ``tests/test_bootstrap.py``: -2 log L 257.820 at theta = 0, shape 3.19, from the start
    shape 1; 257.196 at theta 0.259, shape 4.265 from starts 0.5 to 100, as glmer.nb gives)."""
    if not is_singular(optimum.theta, tuple(t.k for t in design.terms)):
        return optimum
    for factor in NB_RESTART_FACTORS:
        again = fit_laplace(design, make_family(spec, shape=optimum.shape * factor), stages=stages, nodes=nodes,
                            estimate_shape=True)
        if again.deviance < optimum.deviance - 1e-10 * abs(optimum.deviance):
            optimum = again
    return optimum


def _negative_binomial_limit(design, spec, optimum, stages: int, nodes: int):
    """``optimum``, or where its shape is above :data:`NB_LIMIT_CHECK` and the model's limit as the shape grows
    without end, the Poisson GLMM, fits lower, the search again from shape :data:`NB_LIMIT_SHAPE` (at the Poisson
    fit's theta and beta) where it is lower.

    Counts no more dispersed than Poisson's have their likelihood rising towards that limit, ever more slowly: the
    search stopped on the flat tail (shape 8,066, -2 log L 1.2e-3 above the limit, converged), where
    ``hp.fit_batch``'s went on to 1e8, 1e-9 from it; ``hp.bootstrap``'s replicates of such counts then differed from
    their single fits.  From :data:`NB_LIMIT_SHAPE` the search stays there, as the batch's does."""
    if not optimum.shape > NB_LIMIT_CHECK:
        return optimum
    try:  # a failure of either fit leaves the fit as it is
        poisson = fit_laplace(design, make_family(family_spec("poisson", spec.link)), stages=stages, nodes=nodes)
        if not poisson.deviance < optimum.deviance:
            return optimum  # an optimum inside, at a large shape
        at_limit = make_family(spec, shape=NB_LIMIT_SHAPE)
        exact = stages == 2 and nodes == 1 and deviance_gives_likelihood(design, at_limit)
        start = np.concatenate([poisson.theta, poisson.beta]) if exact else None
        again = fit_laplace(design, at_limit, stages=stages, nodes=nodes, estimate_shape=True, start=start)
    except (ConvergenceError, np.linalg.LinAlgError):
        return optimum
    return again if again.deviance < optimum.deviance else optimum


def poisson_limit_message(shape: float) -> str:
    """The warning of a negative binomial fit whose shape ran to its Poisson limit (at least
    :data:`NB_LIMIT_SHAPE`): the shape's value there is arbitrary (the likelihood still rises, ever more slowly;
    glmer.nb warns of its iteration limit, glmmTMB of its Hessian), the rest of the fit is the Poisson GLMM's."""
    return (f"the negative binomial's shape ran to {shape:.3g}, its Poisson limit: the counts are no more dispersed "
            "than Poisson's given the random effects, so the shape has no finite estimate (its value is where the "
            "search stopped) and the fit approaches the Poisson GLMM's, which family='poisson' fits directly")


def check_quadrature(nAGQ, terms=None, spatial: bool = False) -> None:
    """Refuse, by name, a quadrature ``hp.glmm`` cannot use: nAGQ not an integer from 0 to :data:`MAX_NODES`;
    adaptive quadrature (> 1) of a spatial model (``spatial``) or of random-effect ``terms`` other than one scalar
    term (glmer's rule)."""
    if isinstance(nAGQ, (bool, np.bool_)) or not isinstance(nAGQ, (int, np.integer)) or not 0 <= nAGQ <= MAX_NODES:
        raise ArgumentError(f"nAGQ must be an integer from 0 to {MAX_NODES}, got {nAGQ!r}")
    if nAGQ > 1 and spatial:
        raise ArgumentError(f"nAGQ={nAGQ}: a spatial model is fitted by the Laplace approximation (nAGQ 0 or 1)")
    if nAGQ > 1 and terms is not None and (len(terms) != 1 or terms[0].k != 1):
        described = ", ".join(f"({' + '.join(t.coef_names)} | {t.group})" for t in terms)
        raise ArgumentError(f"nAGQ={nAGQ} needs exactly one scalar random-effect term such as (1 | g); "
                            f"this model has {described}")


def glmm(formula: str, data: pd.DataFrame, family: str = "binomial", link: str | None = None, nAGQ: int = 1,
         weights=None, offset=None, adjacency=None, reml: bool = False) -> GLMMResult:
    """Fit a generalized linear mixed model (lme4's ``glmer``, ``glmer.nb``).

    The conditional modes u* of the spherical effects (b = Lambda(theta) u) are found by PIRLS, and
    -2 log L(theta, beta) is approximated by Laplace's method,

        -2 log p(y | u*) + |u*|^2 + log |Lambda^T Z^T W Z Lambda + I|,

    or, with ``nAGQ > 1`` and one scalar random-effect term, by adaptive Gauss-Hermite quadrature
    around u*.  theta and beta maximize it in glmer's two stages (Bates et al. 2015, sec. 5).

    Parameters
    ----------
    formula : str
        lme4-style, e.g. ``"cbind(incidence, size - incidence) ~ period + (1 | herd)"``.
    data : pandas.DataFrame
        Not modified.
    family : str
        ``"binomial"`` (0/1, a two-level factor, proportions with ``weights=`` as trials, or
        ``cbind(successes, failures)``), ``"bernoulli"``, ``"poisson"`` or ``"negative_binomial"``
        (NB2, ``glmer.nb``: its shape is estimated).
    link : str, optional
        The family's canonical link when None; the binomial also takes ``"probit"`` and ``"cloglog"``.
    nAGQ : int
        0: the joint mode of (beta, u) only (glmer's nAGQ = 0); 1: Laplace; 2-25: adaptive quadrature
        (one scalar random-effect term only).
    weights, offset : str or array-like, optional
        Prior weights (the binomial's trials for proportions) and a known part of the linear predictor.
    adjacency : optional
        The neighbourhood graph of a spatial term ``car(area, type='icar' | 'proper' | 'bym2')``, or a dict of graphs
        keyed by the area columns of several (:mod:`hierpool.spec.spatial`; ``(lhs | g)`` terms may stand beside
        them, as in the BYM model ``car(area, type='icar') + (1 | area)``): the model is then fitted by the Laplace
        approximation on the sparse precision of the effects (:mod:`hierpool.closedform.spatial`; binomial or
        Poisson; nAGQ 0 or 1),
        a :class:`~hierpool.closedform.spatial.SpatialFit`.
    reml : bool
        With a spatial term only: integrate beta out under a flat prior (glmmTMB's ``REML = TRUE``).

    Returns
    -------
    GLMMResult
    """
    spatial = adjacency is not None or has_spatial_term(formula)
    reml = boolean_argument("reml", reml)
    check_quadrature(nAGQ, spatial=spatial)
    spec = family_spec(family, link)
    if spatial:
        from ..spec.spatial import spatial_design  # SciPy's sparse LU: loaded only for this model
        from .spatial import fit_spatial

        sdesign = spatial_design(formula, data, adjacency, family=spec, weights=weights, offset=offset)
        _warn_if_unidentified(sdesign.design, spec.name)  # a (1 | area) beside car(area): BYM's iid part
        warn_far_fixed(sdesign.design.X, sdesign.design.fixed_names, SPATIAL_REASON, stacklevel=2,
                       limit=CENTRE_RATIO)
        return fit_spatial(sdesign, reml=bool(reml), stages=1 if nAGQ == 0 else 2)
    if reml:
        raise ArgumentError("reml=True is for a spatial model (adjacency=); glmer's GLMM fit is maximum likelihood")
    design = build_design(formula, data, weights=weights, offset=offset, family=spec)
    check_quadrature(nAGQ, terms=design.terms)
    separation_checked = _warn_if_separated(design, spec.name, SEPARATION_MAX_ROWS)
    _warn_if_unidentified(design, spec.name)
    negative_binomial = spec.name == "negative_binomial"
    fam = make_family(spec, shape=NB_START_SHAPE if negative_binomial else None)
    stages = 1 if nAGQ == 0 else 2
    try:
        optimum = _fit_conditioned(design, fam, negative_binomial) if nAGQ == 1 else None
        if optimum is None:
            optimum = fit_laplace(design, fam, stages=stages, nodes=max(nAGQ, 1), estimate_shape=negative_binomial)
        if negative_binomial:
            optimum = _negative_binomial_restarts(design, spec, optimum, stages, max(nAGQ, 1))
            optimum = _negative_binomial_limit(design, spec, optimum, stages, max(nAGQ, 1))
    except ConvergenceError as error:
        # PIRLS found no finite mode: put down to the offset only where its mean's square overflows a float
        # (exp(2 offset), the working weights' scale: PIRLS failed from an offset of about 355)
        wide = _wide_offset(design) if np.max(design.offset, initial=0.0) > np.log(np.finfo(float).max) / 2 else ""
        if not wide:
            raise
        raise DataError(f"{error}: {wide}") from None
    except np.linalg.LinAlgError:
        far = _far_term_columns(design)
        if far:  # the likelier cause: a covariate far from zero leaves the system's cross-products few digits
            raise DataError("the penalized system of a PIRLS step is not positive definite in float64: the "
                            f"{far}, so that its cross-products keep too few digits; centre them") from None
        wide = _wide_offset(design)
        if wide:  # or an offset whose rows' means a float64 system cannot hold together
            raise DataError(f"the penalized system of a PIRLS step is not positive definite in float64: {wide}") \
                from None
        # PIRLS's penalized system borders [X, Z] with the working response: with a zero working residual at every
        # row (the fixed effects fit the response exactly) its last pivot is 0, and rounding makes it negative
        raise DataError("the penalized system of a PIRLS step is not positive definite: do the fixed effects fit "
                        f"the response exactly (every row's mean equal to its {design.spec.response!r})? Then the "
                        "random effects have nothing to model") from None
    derivatives = (optimum.gradient, optimum.hessian)
    far = "" if all(d is None or np.all(np.isfinite(d)) for d in derivatives) else _far_term_columns(design)
    if far:  # its search ran conditioned, but the fit's derivatives on the user's columns lost every digit
        raise DataError(f"the deviance's derivatives at the optimum are not finite on the user's columns: the {far}; "
                        "centre them")
    if negative_binomial:
        fam = make_family(spec, shape=optimum.shape)
    report = _convergence_report(design, optimum)
    if negative_binomial and optimum.shape >= NB_LIMIT_SHAPE:  # kept with the checks' (fit.convergence.messages)
        report = replace(report, messages=report.messages + (poisson_limit_message(optimum.shape),))
    if not separation_checked and (not report.converged or _moves_eta_far(design, optimum.beta)):
        _warn_if_separated(design, spec.name, None)
    for message in report.messages:
        warnings.warn(message, ConvergenceWarning, stacklevel=2)
    return GLMMResult(design, fam, optimum, max(nAGQ, 1), stages, report)


#: The span of a log link's offset (its largest value less its smallest) beyond which a PIRLS failure is put down to
#: it: the rows' means then differ by more than a factor of e^23 (1e10), and their working weights so much more that
#: the penalized system's float64 cross-products lose their digits (a Poisson fit with one row's offset 35 above the
#: others' was fitted, 40 failed).
OFFSET_SPAN = 23.0


def _wide_offset(design) -> str:
    """The words for a log link's offset spanning more than :data:`OFFSET_SPAN` (or not finite in its means), or ""
    where it does not: an offset is the log of an exposure, and one given unlogged (800 people) put one row's mean
    at e^800, where PIRLS's working weights overflow."""
    if design.family is None or design.family.link != "log" or not np.any(design.offset):
        return ""
    low, high = float(np.min(design.offset)), float(np.max(design.offset))
    if high - low <= OFFSET_SPAN:
        return ""
    return (f"the offset spans {low:.4g} to {high:.4g}, so that on the log link the rows' means differ by a factor of "
            f"about e^{high - low:.0f}, beyond what its working weights hold together (an offset is the log of an "
            "exposure: was it given unlogged, or in other units than the rest?)")


def _far_term_columns(design) -> str:
    """"random-effect column(s) 'x' lie far from zero (in (1 + x | g))" for the columns of a random-effect term that lie
    more than :data:`~hierpool.algebra.conditioning.CENTRE_RATIO` sds from zero beside the term's intercept, or ""
    where none does.  A GLMM's search runs on such columns conditioned (:func:`_fit_conditioned`), its checks and
    derivatives on the user's: at ~1e7 those keep no digits (X's own are conditioned throughout:
    :func:`~hierpool.closedform.glmm_optimize.fit_laplace`)."""
    names, terms = [], []
    for term in design.terms:
        far = np.flatnonzero(far_fixed_columns(term.z, limit=CENTRE_RATIO)[0])
        names += [repr(term.coef_names[j]) for j in far]
        terms += [term.label] if far.size else []
    if not names:
        return ""
    return f"random-effect column(s) {', '.join(names)} lie far from zero (in {', '.join(terms)})"


def _fit_conditioned(design, fam, estimate_shape: bool):
    """The Laplace fit of a model whose random-effect columns are far from centred or unit scale (a slope on a
    calendar year: :mod:`hierpool.algebra.conditioning`), else None.  The search from lme4's start stops on the
    intercept-slope ridge there (-2 log L 0.14 above the optimum on a binomial model, reported converged), so it
    runs on the columns centred and scaled, and the fit on the user's columns then starts from that optimum mapped
    back (the same deviance), where its gradient, Hessian and checks are the user's parametrization's.  Where
    the criterion has no exact gradient (:func:`hierpool.algebra.laplace.deviance_gives_likelihood`) the search
    is lme4's, unconditioned.  (X's columns, where they are far from it, are conditioned by
    :func:`~hierpool.closedform.glmm_optimize.fit_laplace` itself, in both fits alike.)

    beta's covariance comes from the conditioned fit's Hessian where both fits end at the same point
    (``GLMMOptimum.beta_hessian``: the same in exact arithmetic); the user's, by differences in a theta whose
    intercept and slope are correlated near -1 on a slope around 2000, gave SEs 1.7e-4 (NumPy 2.4) to 1.1e-3
    (NumPy 2.5) off the well-scaled model's."""
    conditioned = condition_terms(design)
    if conditioned is None or not deviance_gives_likelihood(design, fam):
        return None
    inner = fit_laplace(conditioned.design, fam, estimate_shape=estimate_shape)
    if not np.all(np.isfinite(inner.theta)):
        return None
    fam = replace(fam, shape=inner.shape) if estimate_shape else fam
    start = np.concatenate([conditioned.theta_to_user(inner.theta), inner.beta])
    optimum = fit_laplace(design, fam, estimate_shape=estimate_shape, start=start)
    # (the fit on the user's columns may end below the conditioned one by rounding, 3.5e-6 on a slope at Days + 1e5,
    # and its Hessian there gave SE 0.095 for 0.279; or above it: its evaluations round at the columns' distance from
    # centre, 1.2e-5 there once the conditioned columns were formed without rounding of their own)
    same_point = (optimum.deviance - inner.deviance <= SAME_OPTIMUM * max(1.0, abs(optimum.deviance))
                  and np.allclose(optimum.beta, inner.beta, rtol=1e-4, atol=1e-6))
    if not same_point or inner.hessian is None:
        return optimum
    # inner.hessian is of (theta~, beta), or (theta~, beta~) on the same X A as optimum's (the same X)
    return replace(optimum, beta_hessian=inner.hessian, conditioned_fit=(conditioned.design, inner))


def _convergence_report(design, optimum):
    """lme4's checks of ``optimum`` (:func:`~hierpool.closedform.glmm_convergence.check_convergence`): on the
    derivatives of the conditioned fit at the same optimum where there is one (``optimum.conditioned_fit``:
    :func:`_fit_conditioned`), as ``hp.lmm``'s conditioned fits and ``hp.fit_batch``'s are checked, with lme4's
    singular rule on the user's theta.  On the user's columns a slope on a timestamp (~1.6e9, a range of 3e7) made
    the Hessian look indefinite along the intercept: "failed to converge" at the optimum that the same model on
    the timestamp centred and scaled reaches converged, and that fit_batch's row reported converged (the fifty-ninth
    session's probe)."""
    if optimum.conditioned_fit is None:
        return check_convergence(design, optimum.theta, optimum.gradient, optimum.hessian, optimum.mode.converged)
    checked_design, inner = optimum.conditioned_fit
    # (PIRLS's flag the reported fit's own, on the user's columns)
    report = check_convergence(checked_design, inner.theta, inner.gradient, inner.hessian, optimum.mode.converged)
    singular = singular_terms(design, optimum.theta)
    others = tuple(m for m in report.messages if m not in singular_terms(checked_design, inner.theta))
    return replace(report, singular=bool(singular), messages=tuple(singular) + others)


#: Two fits of one model end at the same optimum where their betas agree to 1e-4 and the fit on the user's columns
#: ends at most this much above the conditioned one (relative: its evaluations' rounding at columns far from centre,
#: 8e-8 at Days + 1e5; :func:`_fit_conditioned`).
SAME_OPTIMUM = 1e-6


def _moves_eta_far(design, beta) -> bool:
    """Whether some fixed effect moves the linear predictor by more than :data:`SEPARATION_SUSPECT_ETA`."""
    return bool(design.p and eta_moved_far(design.X, beta).any())


def eta_moved_far(X: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(N,) whether some fixed effect moves row i's linear predictor by more than :data:`SEPARATION_SUSPECT_ETA`,
    |beta_j x_ij| (``beta`` (p,), or each row's (N, p): a batch's datasets'): where a separation is suspected."""
    with np.errstate(invalid="ignore"):  # (a batch's datasets not fitted: NaN)
        return np.any(np.abs(X) * np.abs(beta) > SEPARATION_SUSPECT_ETA, axis=1)


def _warn_if_unidentified(design, family_name: str) -> None:
    """Warn, naming the term, where an intercept term's every level holds one 0/1 outcome
    (:func:`hierpool.spec.family.binary_outcome_per_level`): its variance is not identified, and fits from
    different starts end apart (glmer fits it silently)."""
    for term in design.terms:
        if binary_outcome_per_level(family_name, design.row_weights, term.index, term.z)[0]:
            warnings.warn(unidentified_term_message(term.label, term.group), HierpoolWarning, stacklevel=3)


def _warn_if_separated(design, family_name: str, max_rows: int | None) -> bool:
    """Warn, naming the columns, when X's columns separate the outcomes (:mod:`hierpool.algebra.separation`).

    Then the likelihood rises without end along those columns: their estimates are not finite, and
    what the optimizer returns for them is where it stopped (a "plausible wrong fit" if unannounced).
    Returns whether the check ran: not when there are more than ``max_rows`` distinct (X row, response)
    pairs (None: no limit).
    """
    if not design.p:
        return True
    message = separation_message(design.X, design.y, design.row_weights, design.fixed_names, family_name, max_rows)
    if message is None:
        return False
    if message:
        warnings.warn(message, HierpoolWarning, stacklevel=3)
    return True


def separation_message(X: np.ndarray, y: np.ndarray, row_weights: np.ndarray, names, family_name: str,
                       max_rows: int | None = None) -> str | None:
    """What to say where X's columns separate the outcomes of these rows (:mod:`hierpool.algebra.separation`): ""
    where they do not, None where the check did not run (more than ``max_rows`` distinct (X row, response) pairs).
    ``hp.glmm``'s warning, and a GLMM batch's row (:func:`hierpool.batch.fit_glmm.separation_notes`)."""
    rows = row_weights > 0
    pairs = distinct_rows(np.column_stack([X[rows], y[rows]]))
    if max_rows is not None and len(pairs) > max_rows:
        return None
    involved = separating_columns(pairs[:, :-1], pairs[:, -1], family_name)
    if not involved:
        return ""
    outcome = "0/1 outcomes" if family_name == "binomial" else "zero counts"
    return (f"complete separation: the fixed-effect column(s) {', '.join(names[j] for j in involved)} separate the "
            f"{outcome}, so their maximum-likelihood estimates are infinite and the values reported are where the "
            "optimizer stopped; drop or merge those columns (or levels), or give them a prior with hp.bayes")
