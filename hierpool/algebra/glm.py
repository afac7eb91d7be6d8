"""The generalized linear model without random effects, by iteratively reweighted least squares (R's ``glm.fit``).

One home for IRLS, which four callers need: ``hp.pooling``'s complete- and no-pooling GLMs (to convergence),
``hp.glmm``'s restart from glm.fit's first step, ``hp.bayes``'s pilot of the centering weights, and
``hp.fit_batch``'s starting beta of every dataset (the same step on the grouped cross-products, one solve per
dataset: :func:`working_response` is the piece it shares).

At the linear predictor eta, with mu = g^-1(eta), prior weights a_i and the family's variance V, the step
regresses the working response z_i = eta_i - o_i + (y_i - mu_i) / (d mu / d eta) on X with the working weights
w_i = a_i (d mu / d eta)^2 / V(mu_i) (McCullagh & Nelder 1989, sec. 2.5; Fisher scoring, Newton's method for a
canonical link).  It starts at R's ``mustart`` (:meth:`Family.starting_mean`).
"""

from __future__ import annotations

import numpy as np

from .conditioning import fixed_coefficients, fixed_conditioning

#: IRLS has settled when R's glm.fit rule, |deviance change| / (|deviance| + 0.1) < IRLS_TOL, holds and no
#: coefficient moved by more than IRLS_TOL * (1 + max |beta|) (Fisher scoring converges only linearly for a
#: non-canonical link such as the probit, where the deviance settles long before the coefficients).  glm.fit's
#: ``epsilon`` is 1e-8; tighter, as the no-pooling fits are compared with the mixed model's to many digits.
IRLS_TOL = 1e-12
#: Steps before IRLS is reported unsettled (glm.fit's ``maxit`` is 25; a fit from far off takes more).
IRLS_MAX_STEPS = 100
#: Halvings of a step that raised the deviance (glm.fit halves without a bound until it is finite).
IRLS_MAX_HALVINGS = 30


def starting_eta(family, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The linear predictor at R's ``mustart``, where IRLS (and lme4's PIRLS) begins, shape (n,)."""
    return family.link(family.starting_mean(y, weights))


def working_response(family, y: np.ndarray, eta: np.ndarray, weights: np.ndarray,
                     offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(working weights w, working response z without the offset) at the linear predictor ``eta``, each (n,).

    w_i = a_i (d mu / d eta)^2 / V(mu_i) and z_i = eta_i - o_i + (y_i - mu_i) / (d mu / d eta): IRLS's next beta
    is the weighted least-squares fit of z on X with weights w.
    """
    _, working_weights, residual = family.working(y, eta, weights)
    return working_weights, eta - offset + residual


def irls_step(X: np.ndarray, y: np.ndarray, eta: np.ndarray, weights: np.ndarray, offset: np.ndarray,
              family) -> np.ndarray:
    """IRLS's next beta from the linear predictor ``eta``, shape (p,): the weighted least-squares fit of the
    working response (:func:`working_response`), by ``numpy.linalg.lstsq`` (minimum norm where X is rank
    deficient)."""
    working_weights, z = working_response(family, y, eta, weights, offset)
    root = np.sqrt(working_weights)
    return np.linalg.lstsq(X * root[:, None], z * root, rcond=None)[0]


def glm_irls(X: np.ndarray, y: np.ndarray, weights: np.ndarray, offset: np.ndarray, family, *,
             max_steps: int = IRLS_MAX_STEPS) -> tuple[np.ndarray, bool]:
    """Maximum-likelihood coefficients of a GLM by iteratively reweighted least squares (R's ``glm.fit``).

    Each step is :func:`irls_step`; a step that raises the deviance is halved towards the previous beta, as
    glm.fit's (McCullagh & Nelder 1989, sec. 2.5).  Starts from R's ``mustart`` (:func:`starting_eta`).

    Parameters
    ----------
    X : numpy.ndarray, shape (n, p)
        Full column rank.
    y, weights, offset : numpy.ndarray, shape (n,)
        The response as the family reads it (proportions for the binomial), the prior weights
        (binomial trials) and the offset.
    family : hierpool.algebra.family.Family
    max_steps : int
        Steps before giving up (``max_steps=1`` is glm.fit's first step).

    Returns
    -------
    (numpy.ndarray, bool)
        The coefficients and whether they settled (:data:`IRLS_TOL`).
    """
    def deviance(eta):
        return float(np.sum(family.unit_deviances(y, family.link.inverse(eta), weights)))

    # on X's columns conditioned where they are far from centred or unit scale (a covariate ~1e7: the steps' least
    # squares lost the slope and IRLS ran out of steps), the coefficients mapped back at the end
    conditioned = fixed_conditioning(X)
    factors, X = ((), X) if conditioned is None else conditioned[:2]
    eta = starting_eta(family, y, weights)
    beta, previous = None, np.inf
    for _ in range(max_steps):
        proposal = irls_step(X, y, eta, weights, offset, family)
        current = deviance(offset + X @ proposal)
        for _ in range(IRLS_MAX_HALVINGS):  # step halving, as glm.fit's (only once there is a step to halve)
            if beta is None or (np.isfinite(current) and current <= previous * (1 + 1e-12) + 1e-12):
                break
            proposal = 0.5 * (proposal + beta)
            current = deviance(offset + X @ proposal)
        moved = np.inf if beta is None else np.max(np.abs(proposal - beta), initial=0.0)
        beta, eta = proposal, offset + X @ proposal
        settled = (abs(current - previous) / (abs(current) + 0.1) < IRLS_TOL
                   and moved <= IRLS_TOL * (1.0 + np.max(np.abs(beta), initial=0.0)))
        previous = current
        if settled:
            return fixed_coefficients(factors, beta), True
    return fixed_coefficients(factors, beta), False
