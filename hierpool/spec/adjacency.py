"""The neighbourhood graph of areas (``adjacency=`` of a spatial term), read and checked.

Accepted forms (issue 19):

* an edge list: a pandas DataFrame of two columns of area labels, one row per neighbouring pair (either order,
  each pair once or twice);
* a labelled 0/1 matrix: a square pandas DataFrame whose index and columns are the same labels, symmetric, zero
  on the diagonal;
* polygons: a dict of area label -> polygons (each a list of rings, each ring an (m, 2) array of coordinates, as
  :func:`hierpool.datasets.nc_sids` gives them), or objects with a ``__geo_interface__`` (shapely geometries, a
  geopandas GeoSeries' values): neighbours by queen contiguity (:func:`queen_contiguity`);
* a neighbour list: a dict of area label -> its neighbours' labels (a flat list, tuple, set or 1-d array; empty
  for an island), as libpysal's ``W.neighbors`` gives it (:func:`neighbour_list_edges`; spdep's ``nb`` holds
  positions, 0 for an island: give its areas' labels).

Each is refused by name where it is not a graph of areas: a self-neighbour, an asymmetric matrix, values other
than 0 and 1, labels of the matrix's rows and columns that differ, duplicated labels, a missing label.
Labels are strings (as the design's levels are).  The graph keeps its connected components, which the
intrinsic CAR's constraints and the BYM2 scaling need (:mod:`hierpool.algebra.icar`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph

from ..errors import ArgumentError, DataError
from .labels import column_labels


@dataclass(frozen=True)
class Graph:
    """An undirected graph of labelled areas.

    Attributes
    ----------
    labels : numpy.ndarray of str
        The areas, in the order of every per-area array.
    edges : numpy.ndarray of int, shape (m, 2)
        Each neighbouring pair once, i < j.
    component : numpy.ndarray of int
        Each area's connected component (0, 1, ...).
    """

    labels: np.ndarray
    edges: np.ndarray
    component: np.ndarray

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def degree(self) -> np.ndarray:
        """Number of neighbours of each area (0: an island)."""
        return np.bincount(self.edges.ravel(), minlength=self.n)

    def adjacency_matrix(self) -> scipy.sparse.csr_matrix:
        """W: w_ij = 1 for neighbours, sparse and symmetric."""
        i, j = self.edges[:, 0], self.edges[:, 1]
        ones = np.ones(2 * len(i))
        return scipy.sparse.csr_matrix((ones, (np.r_[i, j], np.r_[j, i])), shape=(self.n, self.n))


def _unique_labels(labels, name: str) -> np.ndarray:
    labels = column_labels(labels)
    values, counts = np.unique(labels, return_counts=True)
    if np.any(counts > 1):
        raise DataError(f"{name}: duplicated area labels {[str(v) for v in values[counts > 1][:5]]}")
    return labels


def graph(adjacency, labels=None, name: str = "adjacency") -> Graph:
    """The :class:`Graph` of an edge list or a labelled 0/1 matrix (module docstring).

    ``labels``: the areas in the order wanted (e.g. every area of a map, some with no data); by default the
    matrix's labels, or the edge list's in sorted order.  Every label of the edges must be among them.
    """
    if isinstance(adjacency, dict):
        areas = list(adjacency) if labels is None else labels
        if is_neighbour_list(adjacency):
            return graph(neighbour_list_edges(adjacency, name), labels=areas, name=name)
        return graph(queen_contiguity(adjacency), labels=areas, name=name)
    if not isinstance(adjacency, pd.DataFrame):
        raise ArgumentError(f"{name} must be a pandas DataFrame (an edge list of two columns of area labels, or a "
                            f"labelled 0/1 matrix) or a dict of area polygons or of neighbours, got "
                            f"{type(adjacency).__name__}")
    # a matrix is labelled alike on both sides; an edge list has two columns of labels (and a row index: a 2 x 2
    # frame with default integer index and columns is read as an edge list of two pairs)
    default = isinstance(adjacency.index, pd.RangeIndex) and isinstance(adjacency.columns, pd.RangeIndex)
    if (adjacency.shape[0] == adjacency.shape[1] and set(map(str, adjacency.index)) == set(map(str, adjacency.columns))
            and not (default and adjacency.shape == (2, 2))):
        return _from_matrix(adjacency, labels, name)
    if adjacency.shape[1] != 2:
        raise ArgumentError(f"{name}: an edge list has two columns of area labels, this one has {adjacency.shape[1]}")
    a, b = (column_labels(adjacency.iloc[:, k]) for k in (0, 1))
    if adjacency.isna().to_numpy().any():
        raise DataError(f"{name}: the edge list has missing labels")
    selves = a == b
    if np.any(selves):
        raise DataError(f"{name}: area {str(a[selves][0])!r} is listed as its own neighbour")
    names = np.unique(np.r_[a, b]) if labels is None else _unique_labels(labels, f"{name} labels")
    index = pd.Index(names)
    i, j = index.get_indexer(a), index.get_indexer(b)
    unknown = np.r_[a[i < 0], b[j < 0]]
    if unknown.size:
        missing = [str(v) for v in np.unique(unknown)[:5]]
        raise DataError(f"{name}: areas {missing} of the edge list are not among the labels")
    return _graph(names, i, j)


def is_neighbour_list(adjacency: dict) -> bool:
    """Whether a dict of areas holds each area's neighbours (flat collections of labels), not its polygons (rings
    of (x, y) points, or geometries): a neighbour list (module docstring)."""
    def flat(value):
        if isinstance(value, (set, frozenset)):
            return True
        if isinstance(value, np.ndarray):
            return value.ndim == 1
        return isinstance(value, (list, tuple)) and all(np.ndim(v) == 0 and not hasattr(v, "__geo_interface__")
                                                        for v in value)
    return bool(adjacency) and all(flat(v) for v in adjacency.values())


def neighbour_list_edges(adjacency: dict, name: str = "adjacency") -> pd.DataFrame:
    """The edge list of a neighbour list (area -> its neighbours), each pair once; refused by name where an area is
    its own neighbour, a neighbour is not an area of the list, or a pair is listed one way only (a CAR prior's
    graph is undirected: a k-nearest-neighbours list is not one)."""
    areas = [str(area) for area in column_labels(list(adjacency))]  # (plain str: np.str_ prints as np.str_('x'))
    known = set(areas)
    pairs = set()
    for area, neighbours in zip(areas, adjacency.values()):
        for other in map(str, column_labels(list(neighbours))):
            if other == area:
                raise DataError(f"{name}: area {area!r} is listed as its own neighbour")
            if other not in known:
                raise DataError(f"{name}: area {area!r} has neighbour {other!r}, which is not an area of the list")
            pairs.add((area, other))
    one_way = [(a, b) for a, b in pairs if (b, a) not in pairs]
    if one_way:
        raise DataError(f"{name}: area {one_way[0][1]!r} is a neighbour of {one_way[0][0]!r} but not the other way: "
                        "a neighbourhood graph is symmetric")
    unique = sorted((a, b) for a, b in pairs if a < b)
    return pd.DataFrame({"a": [a for a, _ in unique], "b": [b for _, b in unique]}, dtype=object)


def _from_matrix(matrix: pd.DataFrame, labels, name: str) -> Graph:
    rows, columns = _unique_labels(matrix.index, name), _unique_labels(matrix.columns, name)  # the same set
    values = matrix.loc[:, matrix.columns[pd.Index(columns).get_indexer(rows)]].to_numpy(dtype=float)
    if not np.all(np.isin(values, (0.0, 1.0))):
        raise DataError(f"{name}: a 0/1 adjacency matrix has entries other than 0 and 1")
    diagonal = np.flatnonzero(np.diag(values))
    if diagonal.size:
        raise DataError(f"{name}: area {str(rows[diagonal[0]])!r} is its own neighbour (a 1 on the diagonal)")
    i, j = np.nonzero(values != values.T)
    if i.size:
        first, second = str(rows[i[0]]), str(rows[j[0]])
        raise DataError(f"{name}: the matrix is not symmetric: {first!r} -> {second!r} is "
                        f"{values[i[0], j[0]]:g} but {second!r} -> {first!r} is {values[j[0], i[0]]:g}")
    i, j = np.nonzero(np.triu(values))
    if labels is None:
        return _graph(rows, i, j)
    names = _unique_labels(labels, f"{name} labels")
    position = pd.Index(names).get_indexer(rows)
    if np.any(position < 0):
        missing = [str(v) for v in rows[position < 0][:5]]
        raise DataError(f"{name}: areas {missing} of the matrix are not among the labels")
    return _graph(names, position[i], position[j])


def _graph(labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> Graph:
    low, high = np.minimum(i, j), np.maximum(i, j)
    edges = np.unique(np.stack([low, high], axis=1), axis=0) if len(low) else np.zeros((0, 2), dtype=int)
    n = len(labels)
    w = scipy.sparse.csr_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = scipy.sparse.csgraph.connected_components(w, directed=False)
    return Graph(labels=np.asarray(labels, dtype=str), edges=edges.astype(np.int64), component=component)


def shape_polygons(shape) -> list[list[np.ndarray]]:
    """An area's polygons, each a list of rings (the outer ring first, then its holes) of (x, y) points: from nested
    lists/arrays of polygons, or an object with a ``__geo_interface__`` (Polygon or MultiPolygon)."""
    if hasattr(shape, "__geo_interface__"):
        interface = shape.__geo_interface__
        kind, coordinates = interface["type"], interface["coordinates"]
        if kind not in ("Polygon", "MultiPolygon"):
            raise DataError(f"an area's geometry is a {kind}, not a Polygon or MultiPolygon")
        shape = [coordinates] if kind == "Polygon" else coordinates
    polygons = []
    for polygon in shape:
        rings = []
        for ring in polygon:
            ring = np.asarray(ring, dtype=float)
            if ring.ndim != 2 or ring.shape[1] < 2:
                raise DataError("an area's polygon ring is not a list of (x, y) points")
            rings.append(ring[:, :2])
        polygons.append(rings)
    return polygons


def shape_rings(shape) -> list[np.ndarray]:
    """Every ring of an area's shape (:func:`shape_polygons`, flattened)."""
    return [ring for polygon in shape_polygons(shape) for ring in polygon]


def queen_contiguity(geometry: dict, tolerance: float = 1e-7) -> pd.DataFrame:
    """The edge list (columns a, b) of areas whose boundaries share a point: queen contiguity.

    Two areas are neighbours when a vertex of one's boundary coincides with a vertex of the other's, coordinates
    snapped to a grid of ``tolerance`` (1e-7: about a centimetre in degrees of lon/lat).  This is the contiguity
    of polygons digitised on a common topology (a shapefile's counties: it reproduces the shipped North Carolina
    edge list exactly); a vertex of one area lying inside an edge of another, without a vertex there, is not seen.
    """
    if not geometry:
        raise ArgumentError("geometry: no areas")
    owners: dict = {}
    for label, shape in zip(column_labels(list(geometry)), geometry.values()):  # (as graph() labels the areas)
        for ring in shape_rings(shape):
            for key in map(tuple, np.round(ring / tolerance).astype(np.int64)):
                owners.setdefault(key, set()).add(str(label))
    pairs = set()
    for areas in owners.values():
        if len(areas) > 1:
            ordered = sorted(areas)
            pairs.update((ordered[i], ordered[j]) for i in range(len(ordered)) for j in range(i + 1, len(ordered)))
    pairs = sorted(pairs)
    return pd.DataFrame({"a": [p[0] for p in pairs], "b": [p[1] for p in pairs]})


def lattice_edges(rows: int, cols: int, labels=None) -> pd.DataFrame:
    """The edge list of a rows x cols lattice with rook neighbours (spdep's ``cell2nb``): area i = r cols + c
    neighbours its right and lower cells, each pair once.  ``labels``: a function of i giving each area's label
    (default ``a<i>``).  A graph for simulation studies and tests, in the form :func:`graph` reads."""
    label = (lambda i: f"a{i}") if labels is None else labels
    n = rows * cols
    pairs = [(i, i + 1) for i in range(n) if (i + 1) % cols] + [(i, i + cols) for i in range(n - cols)]
    return pd.DataFrame({"a": [label(i) for i, _ in pairs], "b": [label(j) for _, j in pairs]})

