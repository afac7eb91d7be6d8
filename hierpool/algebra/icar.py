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
Q_c^- the inverse on the complement of the constant vector (the constrained covariance), whose diagonal comes from
one sparse LU of the bordered matrix [[Q, C], [C', 0]]; an island (n_c = 1) has no ICAR part, and its effect is the
unstructured one alone (its scaling factor is reported as 1).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ..spec.adjacency import Graph
from .linalg import inverse_diagonal


def icar_precision(graph: Graph) -> scipy.sparse.csr_matrix:
    """Q = D - W, the ICAR precision (the graph Laplacian), sparse."""
    w = graph.adjacency_matrix()
    return (scipy.sparse.diags(np.asarray(w.sum(axis=1)).ravel()) - w).tocsr()


def scaling_factors(graph: Graph) -> np.ndarray:
    """Each area's BYM2 scaling factor: the geometric mean of diag(Q_c^-) over its component c (1 for an island).

    diag(Q^-) under the constraints is the diagonal of the x block of the bordered matrix's inverse
    (:func:`bordered_factor`, :func:`inverse_diagonal`): one sparse LU and n solves, no dense n x n matrix."""
    factor = bordered_factor(island_completed_precision(graph), constraint_matrix(graph))
    variances = inverse_diagonal(factor.solve, factor.shape[0], 0, graph.n)
    out = np.ones(graph.n)
    sizes = np.bincount(graph.component)
    for c in np.flatnonzero(sizes > 1):
        members = graph.component == c
        out[members] = np.exp(np.mean(np.log(variances[members])))
    return out


def constraint_matrix(graph: Graph) -> scipy.sparse.csc_matrix:
    """C (n x k): one column per connected component of more than one area, its members' indicator; the ICAR's
    sum-to-zero constraints are C' phi = 0.  An island has none: its ICAR row is empty, and its effect is given
    another prior (the BYM2's unstructured one, or an independent one)."""
    sizes = np.bincount(graph.component)
    kept = np.flatnonzero(sizes > 1)
    column = np.full(sizes.size, -1)
    column[kept] = np.arange(kept.size)
    rows = np.flatnonzero(sizes[graph.component] > 1)
    return scipy.sparse.csc_matrix((np.ones(rows.size), (rows, column[graph.component[rows]])),
                                   shape=(graph.n, kept.size))


def island_completed_precision(graph: Graph) -> scipy.sparse.csc_matrix:
    """Q~ = Q + diag(islands): the ICAR precision with each island given a unit-variance normal of its own
    (Freni-Sterrantino et al. 2018), so that Q~ is positive definite on {C' phi = 0}."""
    islands = (graph.degree == 0).astype(float)
    return (icar_precision(graph) + scipy.sparse.diags(islands)).tocsc()


def log_constrained_determinant(matrix, constraints) -> float:
    """log det(V' M V), V an orthonormal basis of {x : C' x = 0}, for M symmetric and positive definite there.

    With C = U R (U orthonormal; R = diag(sqrt(n_c)) for indicators of disjoint sets, :func:`constraint_matrix`)
    the bordered matrix B = [[M, C], [C', 0]] has |det B| = det(V' M V) det(R)^2 (in the basis [V, U]), so
    log det(V' M V) = log |det B| - sum log n_c: one sparse LU of B (SuperLU, partial pivoting: B is indefinite),
    never a dense basis V (Rue & Held 2005, sec. 2.3.3, condition on a linear constraint).  With C of no columns,
    log det M.  Also the log pseudo-determinant of the ICAR precision (its product of non-zero eigenvalues) when M
    is a graph Laplacian and C its component indicators.
    """
    factor = bordered_factor(matrix, constraints)
    sizes = np.asarray(constraints.sum(axis=0)).ravel() if constraints.shape[1] else np.zeros(0)
    return factor_log_abs_det(factor) - float(np.sum(np.log(sizes)))


def bordered_matrix(matrix, constraints) -> scipy.sparse.csc_matrix:
    """[[M, C], [C', 0]] (sparse): the KKT matrix of a quadratic form under C' x = 0."""
    if constraints.shape[1] == 0:
        return scipy.sparse.csc_matrix(matrix)
    return scipy.sparse.bmat([[matrix, constraints], [constraints.T, None]], format="csc")


def bordered_factor(matrix, constraints):
    """SuperLU factor of :func:`bordered_matrix`."""
    import scipy.sparse.linalg

    # minimum degree on the symmetric pattern, diagonal pivots preferred (the matrix is symmetric): a fraction of
    # the fill of SuperLU's default column ordering with partial pivoting on a map's Laplacian
    return scipy.sparse.linalg.splu(bordered_matrix(matrix, constraints), permc_spec="MMD_AT_PLUS_A",
                                    diag_pivot_thresh=1e-3, options={"SymmetricMode": True})


def factor_log_abs_det(factor) -> float:
    """log |det| of a SuperLU factor (L has a unit diagonal; the permutations change only the sign)."""
    return float(np.sum(np.log(np.abs(factor.U.diagonal()))))


#: Graphs whose priors :func:`car_prior` keeps (the most recent ones; a batch hands one Graph to every dataset).
PRIOR_CACHE_GRAPHS = 8
_PRIOR_CACHE: dict = {}  # id(graph) -> (weak reference to the graph, {type: CarPrior})


def car_prior(graph: Graph, type: str) -> "CarPrior":
    """The :class:`CarPrior` of ``graph`` and ``type``, built once per Graph object: its BYM2 scaling factors and
    constrained log-determinant cost a sparse factorization of the whole graph, the same for every dataset of a
    batch (``hp.fit_batch``, ``hp.bayes_batch`` with ``adjacency=``, each dataset's fit given the batch's Graph).
    A CarPrior is not modified after it is built, so one may serve every fit of its graph."""
    key = id(graph)
    entry = _PRIOR_CACHE.get(key)
    if entry is None or entry[0]() is not graph:  # a new graph, or another object at a recycled address
        while len(_PRIOR_CACHE) >= PRIOR_CACHE_GRAPHS:
            _PRIOR_CACHE.pop(next(iter(_PRIOR_CACHE)))
        entry = _PRIOR_CACHE[key] = (weakref.ref(graph), {})
    priors = entry[1]
    if type not in priors:
        priors[type] = CarPrior(graph, type)
    return priors[type]


class CarPrior:
    """The prior of a spatial term's latent vector x, as a sparse precision under linear constraints.

    For each type, with sd = sigma and mix the type's second parameter (:data:`hierpool.spec.formula.CAR_TYPES`),
    b = x[:n] the area effects:

    * ``icar``: x = b, precision Q~ / sigma^2, constraints C' b = 0 (Q~ = Q with islands given unit variance:
      :func:`island_completed_precision`; C: :func:`constraint_matrix`);
    * ``proper``: x = b, precision (D - alpha W) / sigma^2, alpha = mix in (0, 1), no constraint (brms's and
      CARBayes's proper CAR; positive definite for alpha < 1 when no area is an island);
    * ``bym2``: x = (b, v), v the scaled-to-be ICAR part, b | v ~ N(sigma sqrt(rho) S v, sigma^2 (1 - rho) I), v with
      precision Q~ under C' v = 0, S = diag(1 / sqrt(scaling factor)), rho = mix: b = sigma (sqrt(1 - rho) u +
      sqrt(rho) S v) with u ~ N(0, I) (Riebler et al. 2016), the joint precision of (b, v)
      [[I / (sigma^2 (1 - rho)), -sqrt(rho) S / (sigma (1 - rho))], [., rho S^2 / (1 - rho) + Q~]] (sparse: INLA's
      latent representation of bym2).

    :meth:`latent` gives (precision, constraints, log det_c(precision)) with det_c the determinant on the
    constrained subspace (:func:`log_constrained_determinant`), the prior's normalizing constant.
    """

    def __init__(self, graph: Graph, type: str):
        self.graph, self.type, self.n = graph, type, graph.n
        self.q = island_completed_precision(graph)
        self.constraints = constraint_matrix(graph)
        self.log_det_q = log_constrained_determinant(self.q, self.constraints) if type != "proper" else 0.0
        self.scaling = scaling_factors(graph) if type == "bym2" else np.ones(graph.n)
        self.degree = graph.degree.astype(float)
        self.adjacency = graph.adjacency_matrix().tocsc()
        n, q = self.n, self.q.tocoo()
        diagonal = np.arange(n)
        edges = graph.edges
        if type == "icar":
            self._rows, self._cols = q.row, q.col
        elif type == "proper":  # D, then -W (both triangles)
            self._rows = np.r_[diagonal, edges[:, 0], edges[:, 1]]
            self._cols = np.r_[diagonal, edges[:, 1], edges[:, 0]]
        else:  # the unstructured diagonal, the coupling (both triangles), Q~ shifted, the structured diagonal
            self._rows = np.r_[diagonal, diagonal, n + diagonal, n + q.row, n + diagonal]
            self._cols = np.r_[diagonal, n + diagonal, diagonal, n + q.col, n + diagonal]
        self._q_values = q.data

    @property
    def n_latent(self) -> int:
        return 2 * self.n if self.type == "bym2" else self.n

    @property
    def latent_constraints(self) -> scipy.sparse.csc_matrix:
        if self.type == "proper":
            return scipy.sparse.csc_matrix((self.n, 0))
        if self.type == "icar":
            return self.constraints
        return scipy.sparse.vstack([scipy.sparse.csc_matrix(self.constraints.shape), self.constraints]).tocsc()

    @property
    def has_mix(self) -> bool:
        """Whether the type has a second parameter (proper's alpha, bym2's rho)."""
        return self.type != "icar"

    def precision_entries(self, sd: float, mix: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, values) of the precision at (sd, mix), duplicates summed; rows and columns are the same
        arrays at every (sd, mix), so that a caller can place the values into a fixed sparse pattern."""
        n, variance = self.n, sd * sd
        if self.type == "icar":
            values = self._q_values / variance
        elif self.type == "proper":
            m = self.graph.edges.shape[0]
            values = np.r_[self.degree, np.full(2 * m, -mix)] / variance
        else:
            root = 1.0 / np.sqrt(self.scaling)
            coupling = -np.sqrt(mix) * root / (sd * (1.0 - mix))
            values = np.r_[np.full(n, 1.0 / (variance * (1.0 - mix))), coupling, coupling, self._q_values,
                           (mix / (1.0 - mix)) * root**2]
        return self._rows, self._cols, values

    def latent(self, sd: float, mix: float = 0.0):
        """(precision, log det_c(precision)) of x at (sd, mix) (class docstring)."""
        rows, cols, values = self.precision_entries(sd, mix)
        precision = scipy.sparse.csc_matrix((values, (rows, cols)), shape=(self.n_latent, self.n_latent))
        return precision, self.log_det(sd, mix, precision)

    def log_det(self, sd: float, mix: float = 0.0, precision=None) -> float:
        """log det_c of the precision at (sd, mix): closed form for ICAR and BYM2, one sparse LU for a proper CAR."""
        n, variance = self.n, sd * sd
        if self.type == "icar":
            return self.log_det_q - (n - self.constraints.shape[1]) * np.log(variance)
        if self.type == "bym2":
            return self.log_det_q - n * np.log(variance * (1.0 - mix))
        if precision is None:
            precision = self.latent(sd, mix)[0]
        return log_constrained_determinant(precision, self.latent_constraints)

    def precision_root_draw(self, sd: float, mix: float, normal: np.ndarray) -> np.ndarray:
        """R' e for e = ``normal`` (the first :meth:`root_size` standard normals), with R' R the precision at
        (sd, mix): a draw of N(0, precision), from the Laplacian's factorization Q~ = B'B + diag(islands) (B the
        edge incidence matrix, a row e_i - e_j per edge), without factoring anything:

        * ``icar``: (B' e_E + islands e_n) / sd;
        * ``proper``: D - alpha W = (1 - alpha) D + alpha B'B: (sqrt((1 - alpha) d) e_n + sqrt(alpha) B' e_E) / sd;
        * ``bym2``: the precision of (b, v) is A'A + blockdiag(0, Q~), A = [I, -sd sqrt(rho) S] /
          (sd sqrt(1 - rho)): A' e_n + (0, B' e_E + islands e_n').

        With it, N(mode, H^-1) under the constraints is drawn by one solve of the bordered system (Rue & Held 2005,
        sec. 2.3.3: the right-hand side J'W^(1/2) e + R' e has covariance H)."""
        n, edges = self.n, self.graph.edges
        e_edges, e_areas = normal[: edges.shape[0]], normal[edges.shape[0]:edges.shape[0] + n]

        def incidence_transpose(values):  # B' e: +e at an edge's first area, -e at its second
            return (np.bincount(edges[:, 0], weights=values, minlength=n)
                    - np.bincount(edges[:, 1], weights=values, minlength=n))

        island = (self.degree == 0).astype(float)
        if self.type == "icar":
            return (incidence_transpose(e_edges) + island * e_areas) / sd
        if self.type == "proper":
            return (np.sqrt((1.0 - mix) * self.degree) * e_areas + np.sqrt(mix) * incidence_transpose(e_edges)) / sd
        e_unstructured = normal[edges.shape[0] + n:edges.shape[0] + 2 * n]
        scaled = e_unstructured / (sd * np.sqrt(1.0 - mix))
        structured = -sd * np.sqrt(mix) / np.sqrt(self.scaling) * scaled
        return np.r_[scaled, structured + incidence_transpose(e_edges) + island * e_areas]

    def root_size(self) -> int:
        """How many standard normals :meth:`precision_root_draw` takes."""
        return self.graph.edges.shape[0] + (2 if self.type == "bym2" else 1) * self.n

    def proper_eigenvalues(self) -> np.ndarray:
        """Eigenvalues lambda of D^-1/2 W D^-1/2, so that log det(D - alpha W) = sum log d_i + sum log(1 - alpha
        lambda) (brms's and Jin, Carlin & Banerjee's (2005) device for the sampler); dense, once per graph."""
        root = 1.0 / np.sqrt(self.degree)
        scaled = self.adjacency.multiply(root[:, None]).multiply(root[None, :]).toarray()
        return np.linalg.eigvalsh(scaled)


@dataclass(frozen=True)
class SumToZeroLayout:
    """Where the free coordinates z of a constrained ICAR vector go (:func:`sum_to_zero`): the areas of each
    component of more than one area contiguous in ``order``, islands after them.

    Attributes
    ----------
    order : numpy.ndarray of int
        Areas, components of more than one area first (contiguous), then islands.
    inverse : numpy.ndarray of int
        order's inverse permutation.
    slots : numpy.ndarray of int
        For each z of the constrained part, its position in ``order`` (every member of a component but its first).
    coefficient : numpy.ndarray
        1 / sqrt(j (j + 1)) for the member at position j (0-based) of its component.
    position : numpy.ndarray
        Each constrained area's position j in its component.
    last : numpy.ndarray of int
        Each constrained area's component's last position in ``order``.
    n_islands : int
    """

    order: np.ndarray
    inverse: np.ndarray
    slots: np.ndarray
    coefficient: np.ndarray
    position: np.ndarray
    last: np.ndarray
    n_islands: int

    @property
    def n_free(self) -> int:
        """Free coordinates: n - (components of more than one area)."""
        return self.slots.size + self.n_islands


def sum_to_zero_layout(graph: Graph) -> SumToZeroLayout:
    """The :class:`SumToZeroLayout` of a graph's components."""
    sizes = np.bincount(graph.component)
    constrained = sizes[graph.component] > 1
    order = np.r_[np.flatnonzero(constrained)[np.argsort(graph.component[constrained], kind="stable")],
                  np.flatnonzero(~constrained)]
    n_constrained = int(constrained.sum())
    component = graph.component[order[:n_constrained]]
    starts = np.r_[0, np.flatnonzero(np.diff(component)) + 1]
    lengths = np.diff(np.r_[starts, n_constrained])
    position = np.arange(n_constrained) - np.repeat(starts, lengths)
    last = np.repeat(starts + lengths - 1, lengths)
    slots = np.flatnonzero(position > 0)
    coefficient = 1.0 / np.sqrt(np.maximum(position, 1) * (position + 1.0))
    return SumToZeroLayout(order=order, inverse=np.argsort(order), slots=slots, coefficient=coefficient,
                           position=position.astype(float), last=last, n_islands=graph.n - n_constrained)


def sum_to_zero(z, layout: SumToZeroLayout):
    """phi = H z: the free coordinates z (``layout.n_free``,) mapped isometrically onto {C' phi = 0}, islands' own.

    Within a component of areas 0 .. n_c - 1, H's columns are Helmert's contrasts h_k (ones on areas 0 .. k - 1,
    -k on area k, over sqrt(k (k + 1))), orthonormal and orthogonal to the constant: so phi_j =
    sum_{k > j} a_k - j a_j with a_k = z_k / sqrt(k (k + 1)), a reverse cumulative sum (O(n)).  H is an isometry,
    so a density of phi under the constraint is the same density of z (no Jacobian): NUTS samples z, the ICAR's
    exact sum-to-zero constraint without a dense basis and without brms's soft constraint.  Runs on NumPy arrays
    and in compiled JAX programs (:func:`~hierpool.algebra.linalg.array_namespace`); z may have leading axes.
    """
    from .linalg import array_namespace

    xp = array_namespace(z)
    n_constrained = layout.position.size
    free = z[..., : layout.slots.size]
    a = xp.zeros(z.shape[:-1] + (n_constrained,), dtype=z.dtype)
    a = a.at[..., layout.slots].set(free) if xp is not np else _set(a, layout.slots, free)
    a = a * layout.coefficient
    total = xp.cumsum(a, axis=-1)
    phi = xp.take(total, layout.last, axis=-1) - total - layout.position * a
    phi = xp.concatenate([phi, z[..., layout.slots.size:]], axis=-1)
    return xp.take(phi, layout.inverse, axis=-1)


def _set(array: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = array.copy()
    out[..., index] = values
    return out


def compose_bym2(sd, rho, u, phi, scaling):
    """b = sd (sqrt(1 - rho) u + sqrt(rho / s) phi): a BYM2 term's area effects from its unstructured part u and its
    ICAR part phi (s the per-area scaling factor); on NumPy arrays or traced ones, with leading draw axes (sd and
    rho then carry a trailing axis of 1).  Returns (b, spatial part, unstructured part)."""
    from .linalg import array_namespace

    xp = array_namespace(sd, rho, u, phi)
    spatial = sd * xp.sqrt(rho) * phi / xp.sqrt(scaling)
    unstructured = sd * xp.sqrt(1.0 - rho) * u
    return spatial + unstructured, spatial, unstructured


def constrained_square_root(prior: CarPrior, layout: SumToZeroLayout) -> np.ndarray:
    """M (n x n_free) with M M' the ICAR's covariance under its constraints (Q~'s inverse on {C' phi = 0}): the
    symmetric square root H V L^-1/2 V' of (H' Q~ H)^-1 in the Helmert coordinates H (:func:`sum_to_zero`), so that
    phi = M z with z ~ N(0, I) is ICAR-distributed.  Dense, O(n^3): for small maps (the sampler's whitened
    coordinates, the calibration study's draws)."""
    basis = sum_to_zero(np.eye(layout.n_free), layout).T
    values, vectors = np.linalg.eigh(basis.T @ prior.q.toarray() @ basis)
    return basis @ (vectors / np.sqrt(values)) @ vectors.T
