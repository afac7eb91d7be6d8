"""Adaptive Gauss-Hermite quadrature of a GLMM with one scalar random-effect term (glmer's ``nAGQ > 1``).

With one scalar term the likelihood factorizes over its groups g, each a one-dimensional integral

    L_g = integral prod_{i in g} p(y_i | eta_i + z_i theta u) phi(u) du,

which adaptive quadrature centres at the conditional mode u*_g and scales by the curvature there,
s_g = (1 + theta^2 sum_{i in g} w_i z_i^2)^(-1/2) (w the PIRLS working weights at the mode: the
diagonal of lme4's L), with Gauss-Hermite nodes x_k and weights a_k:

    L_g ~= sqrt(2) s_g sum_k a_k exp(x_k^2) prod_i p(y_i | u_k) phi(u_k),   u_k = u*_g + sqrt(2) s_g x_k

(Liu & Pierce 1994; Pinheiro & Bates 1995; lme4's ``glmerAGQ``).  One node is the Laplace
approximation (:mod:`hierpool.algebra.laplace`), whose mode and weights this reuses.  The result is
the full -2 log-likelihood, normalizing constants included (lme4's nAGQ > 1 deviance leaves out the
saturated model's term).
"""

from __future__ import annotations

import numpy as np

from ..spec.design import Design
from .family import Family
from .laplace import ConditionalMode, conditional_mode

#: glmer's limit on the nodes.
MAX_NODES = 25


def quadrature_deviance(theta, beta, design: Design, family: Family, nodes: int,
                        mode: ConditionalMode | None = None) -> tuple[float, ConditionalMode]:
    """-2 log L(theta, beta) by adaptive Gauss-Hermite quadrature with ``nodes`` nodes, and the mode it centred on.

    ``design`` must have exactly one random-effect term, of one column (``(1 | g)`` or ``(0 + x | g)``).
    """
    if len(design.terms) != 1 or design.terms[0].k != 1:
        raise ValueError("adaptive quadrature needs one scalar random-effect term")
    (term,) = design.terms
    if mode is None:
        mode = conditional_mode(theta, beta, design, family)
    theta = float(np.asarray(theta).reshape(-1)[0])
    z = term.z[:, 0]
    ell = term.n_levels
    curvature = 1.0 + theta**2 * np.bincount(term.index, weights=mode.working_weights * z**2, minlength=ell)
    scale = 1.0 / np.sqrt(curvature)
    x, a = np.polynomial.hermite.hermgauss(nodes)
    centre = np.asarray(mode.u[0])[:, 0]
    fixed = mode.eta - theta * z * centre[term.index]  # eta without the term
    terms = np.empty((nodes, ell))
    trials = design.row_weights
    for k in range(nodes):
        u = centre + np.sqrt(2.0) * scale * x[k]
        mu = family.link.inverse(fixed + theta * z * u[term.index])
        log_p = np.bincount(term.index, weights=family.log_likelihood(design.y, mu, trials), minlength=ell)
        terms[k] = np.log(a[k]) + x[k] ** 2 + log_p - 0.5 * u**2 - 0.5 * np.log(2.0 * np.pi)
    top = terms.max(axis=0)
    log_integrals = 0.5 * np.log(2.0) + np.log(scale) + top + np.log(np.exp(terms - top).sum(axis=0))
    return -2.0 * float(log_integrals.sum()), mode
