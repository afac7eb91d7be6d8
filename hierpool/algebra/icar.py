"""The intrinsic CAR (ICAR) precision of a graph of areas and the BYM2 scaling factor.

An ICAR effect phi over the areas of a graph (:class:`hierpool.spec.adjacency.Graph`) has the improper density
exp(-sum over neighbours (phi_i - phi_j)^2 / 2), i.e. precision Q = D - W, the graph Laplacian (D the degrees,
W the adjacency), of rank n - (connected components): one sum-to-zero constraint per component (Besag, York &
Mollie 1991; Rue & Held 2005, sec. 3.3).

BYM2 (Riebler, Sorbye, Simpson & Rue 2016) mixes a scaled ICAR and an unstructured effect,
b = sigma (sqrt(rho / s) phi + sqrt(1 - rho) theta), with s the *scaling factor*: the geometric mean of the
marginal variances of the ICAR under its constraints, diag(Q^-) with Q^- the generalised inverse, so that the
structured part has unit typical variance and rho is the share of spatial variance.  It is computed per connected
component (Freni-Sterrantino, Ventrucci & Rue 2018): for a component of n_c > 1 areas,
Q_c^- = (Q_c + 1 1' / n_c)^-1 - 1 1' / n_c (the inverse on the complement of the constant vector); an island
(n_c = 1) has no ICAR part, and its effect is the unstructured one alone (its scaling factor is reported as 1).
Dense per component: O(n_c^3); only the scaling needs it, never the fitted path.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from ..spec.adjacency import Graph


def icar_precision(graph: Graph) -> scipy.sparse.csr_matrix:
    """Q = D - W, the ICAR precision (the graph Laplacian), sparse."""
    w = graph.adjacency_matrix()
    return (scipy.sparse.diags(np.asarray(w.sum(axis=1)).ravel()) - w).tocsr()


def scaling_factors(graph: Graph) -> np.ndarray:
    """Each area's BYM2 scaling factor: the geometric mean of diag(Q_c^-) over its component c (1 for an island)."""
    q = icar_precision(graph).toarray()
    out = np.ones(graph.n)
    for c in np.unique(graph.component):
        members = np.flatnonzero(graph.component == c)
        size = members.size
        if size == 1:
            continue
        block = q[np.ix_(members, members)] + 1.0 / size
        variances = np.diag(np.linalg.inv(block)) - 1.0 / size
        out[members] = np.exp(np.mean(np.log(variances)))
    return out
