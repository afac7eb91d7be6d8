"""Convergence checks of a GLMM fit, as lme4's ``checkConv`` makes them, each naming what to simplify.

glmer checks its optimum with finite-difference derivatives of the deviance in (theta, beta)
(``calc.derivs``, lme4's ``deriv12``) and reports (Bates et al. 2015; ``?convergence``,
``?lmerControl``):

* the gradient: max |H^-1 g| (the Newton step, "relative gradient"), or |g| where smaller,
  above 0.002 — "Model failed to converge with max|grad| ... (component k)";
* the Hessian: negative eigenvalues ("degenerate Hessian"), eigenvalues near zero, a very large
  eigenvalue or eigenvalue ratio ("nearly unidentifiable: rescale variables?");
* a singular fit: a T_j with a (near) zero diagonal, a variance at zero or a correlation at +-1
  (``isSingular``);
* PIRLS that did not reach the conditional mode (lme4's ``pwrssUpdate`` errors).

Here every message names the parameter or term concerned (the random-effect term to simplify, or
the fixed-effect column to rescale), and the fit's ``converged`` is False when the gradient or
Hessian check fails or PIRLS did not converge.  Parameters on the boundary (a zero diagonal of
T_j) are left out of the gradient and Hessian checks: the singular-fit message covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..algebra.checks import SINGULAR_TOL, diagonal_mask, lme4_gradient_measure
from ..algebra.linalg import tril_positions
from ..spec.design import Design

#: lme4's ``check.conv.grad`` tolerance (on the relative gradient).
GRADIENT_TOL = 2e-3
#: lme4's ``check.conv.hess`` tolerance (eigenvalues near zero, the eigenvalue ratio).
HESSIAN_TOL = 1e-6
#: Relative step of the finite differences in (theta, beta) (lme4's ``deriv12`` step is 1e-4).
DERIVATIVE_STEP = 1e-4


def term_label(term) -> str:
    """A random-effect term as the formula writes it: ``(1 + x | g)`` (:attr:`RandomEffectTerm.label`)."""
    return term.label


def parameter_labels(design: Design) -> list[str]:
    """Names of (theta, beta) in their order: each T_j entry by its term and coefficients, then X's columns."""
    labels = []
    for term in design.terms:
        rows, cols = tril_positions(term.k)
        for r, c in zip(rows, cols):
            what = (f"sd of {term.coef_names[r]}" if r == c
                    else f"correlation of {term.coef_names[r]} with {term.coef_names[c]}")
            labels.append(f"{what} in {term_label(term)}")
    return labels + [f"fixed effect {name}" for name in design.fixed_names]


def finite_differences(deviance, point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gradient, Hessian) of ``deviance`` at ``point`` by central differences (lme4's ``deriv12``).

    Steps are :data:`DERIVATIVE_STEP` times max(|x|, 1); 1 + 2 m + 2 m (m - 1) evaluations for m
    parameters.
    """
    size = len(point)
    steps = DERIVATIVE_STEP * np.maximum(np.abs(point), 1.0)
    centre = deviance(point)
    plus = np.array([deviance(point + np.eye(size)[i] * steps[i]) for i in range(size)])
    minus = np.array([deviance(point - np.eye(size)[i] * steps[i]) for i in range(size)])
    gradient = (plus - minus) / (2.0 * steps)
    hessian = np.diag((plus - 2.0 * centre + minus) / steps**2)
    for i in range(size):
        ei = np.eye(size)[i] * steps[i]
        for j in range(i):
            ej = np.eye(size)[j] * steps[j]
            hessian[i, j] = hessian[j, i] = (
                deviance(point + ei + ej) - deviance(point + ei - ej) - deviance(point - ei + ej)
                + deviance(point - ei - ej)) / (4.0 * steps[i] * steps[j])
    return gradient, hessian


@dataclass(frozen=True)
class ConvergenceReport:
    """What the checks found.

    Attributes
    ----------
    converged : bool
        False when the gradient or Hessian check failed or PIRLS did not reach the mode.
    singular : bool
    messages : tuple of str
        One per finding, each naming the parameter, term or column concerned.
    gradient, hessian : numpy.ndarray or None
        The derivatives of the deviance the checks read, in (theta, beta) (None when not computed); where ``hp.glmm``
        conditioned the random-effect columns, the conditioned fit's, in (theta~, beta)
        (:func:`hierpool.closedform.glmm._convergence_report`).
    """

    converged: bool
    singular: bool
    messages: tuple[str, ...]
    gradient: np.ndarray | None = None
    hessian: np.ndarray | None = None


def singular_terms(design: Design, theta: np.ndarray, tol: float = SINGULAR_TOL) -> list[str]:
    """Messages for the terms whose T_j has a diagonal below ``tol``: a zero variance or a +-1 correlation."""
    out = []
    offset = 0
    for term in design.terms:
        size = term.k * (term.k + 1) // 2
        piece = np.asarray(theta[offset : offset + size])
        rows, cols = tril_positions(term.k)
        small = [term.coef_names[r] for r, c, value in zip(rows, cols, piece) if r == c and value < tol]
        if small:
            if term.k == 1:
                out.append(f"boundary (singular) fit: the variance of {term_label(term)} is (near) zero; "
                           f"consider dropping the term")
            else:
                out.append(f"boundary (singular) fit: in {term_label(term)} the covariance matrix is singular "
                           f"(at {', '.join(small)}: a variance at zero or a correlation at +-1); consider "
                           f"dropping {', '.join(n for n in small if n != 'Intercept') or 'a coefficient'} "
                           "or the correlation ((... || ...))")
        offset += size
    return out


def check_convergence(design: Design, theta: np.ndarray, gradient: np.ndarray | None, hessian: np.ndarray | None,
                      pirls_converged: bool) -> ConvergenceReport:
    """lme4's ``checkConv`` at the optimum (theta, beta) of a GLMM, with messages that name what to simplify.

    Parameters
    ----------
    design : Design
    theta : numpy.ndarray
    gradient, hessian : numpy.ndarray or None
        The deviance's derivatives at the optimum in (theta, beta), or in (theta, beta~) where the fit conditioned X
        (``GLMMOptimum.conditioning``; beta~_j, on X's j-th column orthogonalised against the ones before, is named
        as that column, and the user's ill-scaled beta, whose "very large eigenvalue: rescale" lme4 would report,
        is not checked); None skips the derivative checks (glmer's nAGQ = 0).
    pirls_converged : bool
        Whether PIRLS reached the conditional mode at the optimum.
    """
    ks = tuple(t.k for t in design.terms)
    labels = parameter_labels(design)
    messages = singular_terms(design, theta)
    singular = bool(messages)
    failed = False
    if not pirls_converged:
        failed = True
        messages.append("PIRLS did not reach the conditional modes at the optimum (the penalized deviance kept "
                        "changing): the likelihood is unreliable; simplify the random effects or rescale the "
                        "fixed-effect columns")
    if gradient is not None and hessian is not None:
        # parameters at the boundary (a zero diagonal of T_j) are the singular-fit message's, not these checks'
        keep = np.ones(len(gradient), dtype=bool)
        keep[: len(theta)] = ~(diagonal_mask(ks) & (np.asarray(theta) < SINGULAR_TOL))
        names = [label for label, k in zip(labels, keep) if k]
        g, h = gradient[keep], hessian[np.ix_(keep, keep)]
        if not np.all(np.isfinite(h)) or not np.all(np.isfinite(g)):
            failed = True
            messages.append("problem with the Hessian check: infinite or missing values in the derivatives")
        else:
            eigenvalues, vectors = np.linalg.eigh(h)
            # lme4's min(|g|, |R^-1 g|), H = R^T R (it read L^-1 g: 1.75e-3 passed where lme4's 2.47e-3 warns)
            smallest = lme4_gradient_measure(h, g)
            worst = int(np.argmax(smallest)) if smallest.size else 0
            if smallest.size and smallest[worst] > GRADIENT_TOL:
                failed = True
                messages.append(f"Model failed to converge with max|grad| = {smallest[worst]:.4g} "
                                f"(tol = {GRADIENT_TOL}) at the {names[worst]}")
            negative = eigenvalues < -HESSIAN_TOL
            if negative.any():
                failed = True
                involved = names[int(np.argmax(np.abs(vectors[:, int(np.argmin(eigenvalues))])))]
                messages.append(f"Model failed to converge: degenerate Hessian with {int(negative.sum())} negative "
                                f"eigenvalue(s), mostly along the {involved}; simplify the model there")
            elif eigenvalues.size and (np.abs(eigenvalues) < HESSIAN_TOL).any():
                failed = True
                involved = names[int(np.argmax(np.abs(vectors[:, int(np.argmin(np.abs(eigenvalues)))])))]
                messages.append(f"Model may not have converged: an eigenvalue of the Hessian is close to zero, mostly "
                                f"along the {involved} (not identified by the data)")
            elif eigenvalues.size and eigenvalues.max() * HESSIAN_TOL > 1:
                involved = names[int(np.argmax(np.abs(vectors[:, -1])))]
                messages.append(f"Model is nearly unidentifiable: very large eigenvalue along the {involved}; "
                                "rescale that variable")
            elif eigenvalues.size and eigenvalues.min() / eigenvalues.max() < HESSIAN_TOL:
                involved = names[int(np.argmax(np.abs(vectors[:, 0])))]
                messages.append(f"Model is nearly unidentifiable: large eigenvalue ratio, the flattest direction "
                                f"mostly along the {involved}; rescale variables")
    return ConvergenceReport(not failed, singular, tuple(messages), gradient, hessian)
