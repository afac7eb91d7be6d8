"""The design of a disease-mapping model: a formula with spatial terms ``car(area, type=...)``, their graphs, and
any ``(... | g)`` terms beside them.

    y_i ~ family(mu_i),   g(mu_i) = x_i' beta + offset_i + sum_t b_t[area_t(i)] + sum_j z_ij' u_j[g_j(i)],

b_t one effect per area of term t's neighbourhood graph (:class:`hierpool.spec.adjacency.Graph`), every area of the
graph (areas without rows get an effect too, predicted from their neighbours), with the prior of the term's type
(:mod:`hierpool.algebra.icar`); u_j the ``(... | g)`` terms' effects, N(0, Sigma_j) per level (``design.terms``).
``adjacency=`` is what :func:`hierpool.spec.adjacency.graph` reads (an edge list, a labelled 0/1 matrix, polygons)
or a :class:`~hierpool.spec.adjacency.Graph` already built (a batch's, built once for all its datasets), or a dict
keyed by the terms' area columns (needed when the model has several spatial terms), or None when ``data``
is a geopandas GeoDataFrame (neighbours by queen contiguity of its geometry, one row per area).

A BYM model in the 1991 form is ``car(area, type='icar') + (1 | area)``; BYM2's one term is that model
reparametrized (a share rho of one sd).

Refused by name: an area of the data that is not in the graph; an island (an area without neighbours) under an
intrinsic CAR unless ``islands='independent'``, or under a proper CAR; two spatial terms on one area column;
several spatial terms with one graph that is not a dict keyed by their columns; adjacency= without a spatial term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse

from ..errors import ArgumentError, DataError, FormulaError
from .adjacency import Graph, graph
from .design import Design, build_design
from .family import FamilySpec
from .formula import SpatialTermSpec, parse_formula
from .labels import column_labels


@dataclass(frozen=True)
class AreaTerm:
    """One spatial term with its graph.

    Attributes
    ----------
    term : SpatialTermSpec
    graph : Graph
    area : numpy.ndarray of int
        Each row's area, an index into ``graph.labels``.
    """

    term: SpatialTermSpec
    graph: Graph
    area: np.ndarray

    @property
    def n_areas(self) -> int:
        return self.graph.n

    @property
    def islands(self) -> np.ndarray:
        """Areas without neighbours."""
        return self.graph.degree == 0

    def area_rows(self) -> np.ndarray:
        """Number of data rows of each area."""
        return np.bincount(self.area, minlength=self.graph.n)


@dataclass(frozen=True)
class SpatialDesign:
    """A spatial model's design.

    Attributes
    ----------
    design : Design
        The fixed part, offsets, weights and family, and the ``(... | g)`` terms (``design.terms``).
    areas : tuple of AreaTerm
        The spatial terms, in the formula's order.

    ``term``, ``graph``, ``area``, ``n_areas``, ``islands`` and ``area_rows()`` are those of the model's one spatial
    term (:meth:`area_term` picks one of several).
    """

    design: Design
    areas: tuple[AreaTerm, ...]

    @property
    def single(self) -> bool:
        """Whether the model's random part is one spatial term (no other spatial or ``(... | g)`` term)."""
        return len(self.areas) == 1 and not self.design.terms

    def area_term(self, term: str | None = None) -> AreaTerm:
        """The spatial term on area column ``term`` (or written ``term``); None: the model's only one."""
        if term is None:
            if len(self.areas) > 1:
                raise ArgumentError(f"the model has {len(self.areas)} spatial terms "
                                    f"{[a.term.label for a in self.areas]}: say which by term= (its area column)")
            return self.areas[0]
        for candidate in self.areas:
            if term in (candidate.term.factor, candidate.term.label):
                return candidate
        raise ArgumentError(f"term={term!r} is none of the model's spatial terms "
                            f"{[a.term.factor for a in self.areas]}")

    @property
    def term(self) -> SpatialTermSpec:
        return self.area_term().term

    @property
    def graph(self) -> Graph:
        return self.area_term().graph

    @property
    def area(self) -> np.ndarray:
        return self.area_term().area

    @property
    def n_areas(self) -> int:
        return self.area_term().n_areas

    @property
    def islands(self) -> np.ndarray:
        return self.area_term().islands

    def area_rows(self) -> np.ndarray:
        return self.area_term().area_rows()

    def suffix(self, area_term: AreaTerm) -> str:
        """The suffix of a spatial term's parameter names (both engines): none where the model's one random term is
        spatial (``sd``, ``rho``, ``b``), else ``_car_<area column>`` (``sd_car_county``, ``b_car_county``)."""
        return "" if self.single else f"_car_{area_term.term.factor}"


def group_parameter_names(term) -> tuple[list[str], dict[tuple[int, int], str]]:
    """A ``(lhs | g)`` term's parameter names beside spatial terms (both engines): its sds (``sd_<group>`` for one
    coefficient, else ``sd_<group>_<coefficient>``) and its correlations (``cor_<group>_<a>_<b>`` keyed by (i, j),
    i > j)."""
    names, group = term.coef_names, term.group
    sds = [f"sd_{group}"] if term.k == 1 else [f"sd_{group}_{name}" for name in names]
    cors = {(i, j): f"cor_{group}_{names[j]}_{names[i]}" for i, j in zip(*np.tril_indices(term.k, -1))}
    return sds, cors


def group_effect_index(term) -> pd.Index:
    """The index of a ``(lhs | g)`` term's effects, level-major: its levels (one coefficient), or (level, term)."""
    if term.k == 1:
        return pd.Index(term.levels, name=term.group)
    return pd.MultiIndex.from_product([term.levels, list(term.coef_names)], names=[term.group, "term"])


def _geometry_of(frame, factor: str, what: str) -> dict:
    """Area label -> geometry of a GeoDataFrame (anything with a ``geometry`` column of ``__geo_interface__``)."""
    if factor not in frame.columns:
        raise DataError(f"{what} has no column {factor!r} of area labels")
    shapes = {}
    for label, shape in zip(column_labels(frame[factor]), frame.geometry):
        shapes.setdefault(label, shape)  # one area may have several rows (strata): its geometry once
    return shapes


def _has_geometry(frame) -> bool:
    return isinstance(frame, pd.DataFrame) and hasattr(frame, "geometry") and "geometry" in frame.columns


def resolve_graph(adjacency, data: pd.DataFrame, term: SpatialTermSpec) -> Graph:
    """The term's :class:`Graph` from ``adjacency=`` (module docstring)."""
    if isinstance(adjacency, dict) and term.factor in adjacency and _is_graph(adjacency[term.factor]):
        adjacency = adjacency[term.factor]
    elif isinstance(adjacency, dict) and any(_is_graph(v) for v in adjacency.values()):
        raise ArgumentError(f"adjacency is a dict of graphs keyed by {sorted(map(str, adjacency))}, but the spatial "
                            f"term's area column is {term.factor!r}")
    if isinstance(adjacency, Graph):  # built already (a batch's, once for all its datasets)
        return adjacency
    if adjacency is None:
        if not _has_geometry(data):
            raise ArgumentError(f"{term.label} needs the areas' neighbourhood graph: give adjacency= (an edge list, a "
                                "labelled 0/1 matrix or polygons), or data as a GeoDataFrame")
        return graph(_geometry_of(data, term.factor, "data"), name="data's geometry")
    if _has_geometry(adjacency):
        return graph(_geometry_of(adjacency, term.factor, "adjacency"), name="adjacency")
    return graph(adjacency, name="adjacency")


def _is_graph(value) -> bool:
    """Whether a dict value is a whole graph (an edge list, a 0/1 matrix or a GeoDataFrame, a dict of polygons or of
    neighbours; or a bare matrix, which :func:`graph` refuses by name for its missing labels), so that the dict is
    area column -> graph, not area label -> polygons or neighbours (a list, a 1-d array, a geometry)."""
    return (isinstance(value, (pd.DataFrame, dict, Graph)) or scipy.sparse.issparse(value)
            or (isinstance(value, np.ndarray) and value.ndim == 2))


def spatial_design(formula: str, data: pd.DataFrame, adjacency, *, family: FamilySpec | None = None,
                   weights=None, offset=None, datasets: str | None = None) -> SpatialDesign:
    """Check a spatial formula, its data and its graphs; build the :class:`SpatialDesign`.  ``datasets``: a batch's
    column of dataset labels, where ``data`` is its long frame (:func:`~hierpool.spec.design.build_design`'s)."""
    binomial = family is not None and family.name == "binomial"
    spec = parse_formula(formula, binomial_counts=binomial, random_optional=True)
    if not spec.spatial:
        raise ArgumentError(f"adjacency= is given but {formula!r} has no spatial term such as car(area, type='bym2')")
    factors = [term.factor for term in spec.spatial]
    repeated = sorted({f for f in factors if factors.count(f) > 1})
    if repeated:
        raise FormulaError(f"{formula!r} has two spatial terms on area column {repeated[0]!r}: one car(...) term per "
                           "column (BYM2's one term mixes a spatial and an unstructured effect; or add (1 | "
                           f"{repeated[0]}))")
    if len(factors) > 1 and not (isinstance(adjacency, dict) and all(f in adjacency for f in factors)):
        raise ArgumentError(f"{formula!r} has spatial terms on columns {factors}: give adjacency= as a dict keyed by "
                            "those columns, each its term's graph")
    for term in spec.spatial:
        if term.islands != "error" and term.type != "icar":
            raise FormulaError(f"islands={term.islands!r} is for type='icar'; {term.label} gives an island the "
                               + ("an independent N(0, sd^2) effect" if term.type == "bym2"
                                  else "no prior: it is refused"))
        if isinstance(data, pd.DataFrame) and term.factor not in data.columns:
            raise DataError(f"{term.label}: data has no column {term.factor!r}")
    if isinstance(data, pd.DataFrame) and not data.index.is_unique:
        data = data.reset_index(drop=True)  # rows are matched to areas by label: a repeated label would repeat rows
    keyed = isinstance(adjacency, dict) and any(f in adjacency and _is_graph(adjacency[f]) for f in factors)
    if keyed and set(map(str, adjacency)) - set(factors):
        raise ArgumentError(f"adjacency is a dict of graphs keyed by area column, but "
                            f"{sorted(set(map(str, adjacency)) - set(factors))} name no car() term of {formula!r} "
                            f"(its area columns: {factors})")
    graphs = [resolve_graph(adjacency, data, term) for term in spec.spatial]
    design = build_design(formula, data, weights=weights, offset=offset, family=family, random_optional=True,
                          spatial=True, datasets=datasets)
    groups = [term.group for term in design.terms]
    repeated = sorted({g for g in groups if groups.count(g) > 1})
    if repeated:
        raise FormulaError(f"{formula!r}: (x || {repeated[0]}), or several (... | {repeated[0]}) terms on one group, "
                           f"is not built beside a spatial term ((1 + x | {repeated[0]}) fits them correlated)")
    areas = tuple(_area_term(term, area_graph, data.loc[design.rows, term.factor])
                  for term, area_graph in zip(spec.spatial, graphs))
    return SpatialDesign(design=design, areas=areas)


def areas_in_graph(term: SpatialTermSpec, area_graph: Graph, column: pd.Series, what: str = "") -> np.ndarray:
    """Each row's area as an index into ``area_graph.labels`` (met by the labels' text); an area not in the graph
    refused by name (``what``: the data it is in, for the message)."""
    labels = column_labels(column)
    area = pd.Index(area_graph.labels).get_indexer(labels)
    if np.any(area < 0):
        missing = [str(v) for v in pd.unique(labels[area < 0])[:5]]
        raise DataError(f"areas {missing} of column {term.factor!r}{what} are not in the adjacency graph "
                        f"({area_graph.n} areas; an edge list names only areas with neighbours: give an island by a "
                        "0/1 matrix or polygons)")
    return area


def _area_term(term: SpatialTermSpec, area_graph: Graph, column: pd.Series) -> AreaTerm:
    """Each row's area in the term's graph, with the refusals of the module docstring."""
    area = areas_in_graph(term, area_graph, column)
    islands = area_graph.labels[area_graph.degree == 0]
    if islands.size and term.type == "proper":
        raise DataError(f"area {str(islands[0])!r} of column {term.factor!r} has no neighbours: a proper CAR "
                        "gives it no prior (its precision row is zero); use type='bym2' or give its neighbours")
    if islands.size and term.type == "icar" and term.islands == "error":
        raise DataError(f"area {str(islands[0])!r} of column {term.factor!r} has no neighbours (an island, "
                        f"{islands.size} in all): an intrinsic CAR gives it no prior; use "
                        f"car({term.factor}, type='icar', islands='independent') for an independent effect "
                        "(Freni-Sterrantino et al. 2018), type='bym2', or give its neighbours")
    return AreaTerm(term=term, graph=area_graph, area=area.astype(np.int64))
