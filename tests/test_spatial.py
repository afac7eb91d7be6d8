"""Areal data for disease mapping (issue 19), first pieces: the North Carolina SIDS data set, the neighbourhood graph
read and checked (hierpool.spec.adjacency), the ICAR precision and the BYM2 scaling factor (hierpool.algebra.icar)
against an independent R computation (validation/spatial_reference.R and its JSON)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import hierpool as hp
from hierpool.algebra.icar import icar_precision, scaling_factors
from hierpool.spec.adjacency import graph

REFERENCE = json.loads((Path(__file__).resolve().parents[1] / "validation" / "spatial_reference.json").read_text())


@pytest.fixture(scope="module")
def nc():
    return hp.datasets.nc_sids()


def test_nc_sids_loads_counts_expected_counts_adjacency_and_polygons(nc):
    data = nc.data
    assert len(data) == 100 and data.county.is_unique
    assert data.sid74.sum() == 667 and data.births74.sum() == 329962
    assert data.expected.sum() == pytest.approx(data.sid74.sum())  # internally standardised
    np.testing.assert_allclose(data.sir, data.sid74 / data.expected)
    assert len(nc.adjacency) == REFERENCE["nc_sids"]["n_edges"] == 245
    assert set(nc.geometry) == set(data.county)
    ring = nc.geometry["Ashe"][0][0]
    assert ring.shape[1] == 2 and -85 < ring[:, 0].min() < -75 and 33 < ring[:, 1].min() < 37  # lon/lat


def test_the_icar_precision_and_bym2_scaling_equal_rs(nc):
    g = graph(nc.adjacency, labels=nc.data.county)
    q = icar_precision(g).toarray()
    np.testing.assert_allclose(q.sum(axis=1), 0.0, atol=1e-12)  # each row: degree minus its neighbours
    assert np.linalg.matrix_rank(q) == REFERENCE["nc_sids"]["rank"] == 99  # one component: one constraint
    degree = pd.Series(REFERENCE["nc_sids"]["degree"])
    np.testing.assert_array_equal(pd.Series(g.degree, index=g.labels)[degree.index], degree)
    np.testing.assert_allclose(scaling_factors(g), REFERENCE["nc_sids"]["scaling_factor"], rtol=1e-10)


def test_the_scaling_is_per_connected_component_and_an_island_has_none():
    toy = REFERENCE["toy"]
    g = graph(pd.DataFrame({"a": toy["a"], "b": toy["b"]}), labels=toy["labels"])
    assert len(np.unique(g.component)) == 3 and g.degree[-1] == 0
    s = scaling_factors(g)
    np.testing.assert_allclose(s[:4], toy["scaling_path"], rtol=1e-10)
    np.testing.assert_allclose(s[4:7], toy["scaling_triangle"], rtol=1e-10)
    assert s[7] == 1.0


def test_an_edge_list_and_a_labelled_matrix_are_the_same_graph(nc):
    g = graph(nc.adjacency)
    w = pd.DataFrame(g.adjacency_matrix().toarray().astype(int), index=g.labels, columns=g.labels)
    shuffled = w.sample(frac=1.0, random_state=1)  # rows in another order than the columns
    h = graph(shuffled, labels=g.labels)
    np.testing.assert_array_equal(h.edges, g.edges)
    both_ways = pd.concat([nc.adjacency, nc.adjacency.rename(columns={"a": "b", "b": "a"})], ignore_index=True)
    np.testing.assert_array_equal(graph(both_ways).edges, g.edges)


def test_a_neighbour_list_is_the_same_graph_and_a_one_way_pair_is_refused(nc):
    """libpysal's W.neighbors and spdep's nb give {area: [neighbours]}: it was read as polygons (a TypeError for
    integer labels, a "polygon ring" error naming nothing for text ones); and {area column: sparse matrix} raised
    SciPy's ValueError."""
    g = graph(nc.adjacency)
    neighbours = {label: [] for label in g.labels}
    for i, j in g.edges:
        neighbours[g.labels[i]].append(g.labels[j])
        neighbours[g.labels[j]].append(g.labels[i])
    np.testing.assert_array_equal(graph(neighbours, labels=g.labels).edges, g.edges)
    numbered = {k + 1: np.array([int(np.flatnonzero(g.labels == b)[0]) + 1 for b in v])
                for k, (_, v) in enumerate(neighbours.items())}  # integer labels, 1-d arrays
    assert len(graph(numbered).edges) == len(g.edges)
    with pytest.raises(hp.DataError, match="'y' is a neighbour of 'x' but not the other way"):
        graph({"x": ["y"], "y": [], "z": []})
    with pytest.raises(hp.DataError, match="neighbour 'w', which is not an area of the list"):
        graph({"x": ["w"], "y": []})
    data = pd.DataFrame({"area": ["x", "y", "z"] * 2, "y": np.arange(6.0)})
    with pytest.raises(hp.ArgumentError, match="adjacency must be a pandas DataFrame"):
        hp.lmm("y ~ 1 + car(area, type='icar')", data, adjacency={"area": scipy.sparse.eye(3, format="csr")})


def test_bad_adjacency_is_refused_by_name():
    labels = ["x", "y", "z"]
    with pytest.raises(hp.DataError, match="'x' is listed as its own neighbour"):
        graph(pd.DataFrame({"a": ["x"], "b": ["x"]}))
    with pytest.raises(hp.DataError, match="not among the labels"):
        graph(pd.DataFrame({"a": ["x"], "b": ["w"]}), labels=labels)
    asymmetric = pd.DataFrame([[0, 1, 0], [0, 0, 1], [0, 1, 0]], index=labels, columns=labels)
    with pytest.raises(hp.DataError, match="not symmetric: 'x' -> 'y'"):
        graph(asymmetric)
    with pytest.raises(hp.DataError, match="own neighbour"):
        graph(pd.DataFrame(np.eye(3, dtype=int), index=labels, columns=labels))
    with pytest.raises(hp.DataError, match="other than 0 and 1"):
        graph(pd.DataFrame([[0, 2, 0], [2, 0, 0], [0, 0, 0]], index=labels, columns=labels))
    with pytest.raises(hp.ArgumentError, match="pandas DataFrame"):
        graph(np.zeros((3, 3)))


def test_polygons_keyed_by_whole_number_floats_are_labelled_as_the_graph_labels_them(nc):
    """Polygons keyed by a float column's values (37001.0): the contiguity's areas were '37001.0' where the graph's
    are '37001', and every edge was refused (review)."""
    numbered = {float(i + 1): shape for i, shape in enumerate(nc.geometry.values())}
    assert len(graph(numbered).edges) == len(graph(nc.adjacency).edges)


def test_queen_contiguity_of_the_polygons_is_the_shipped_edge_list(nc):
    from hierpool.spec.adjacency import queen_contiguity

    computed = queen_contiguity(nc.geometry)
    as_pairs = {tuple(sorted(row)) for row in computed.itertuples(index=False)}
    assert as_pairs == {tuple(sorted(row)) for row in nc.adjacency.itertuples(index=False)}
    np.testing.assert_array_equal(graph(nc.geometry, labels=nc.data.county).edges,
                                  graph(nc.adjacency, labels=nc.data.county).edges)

    class Shape:  # a shapely-like geometry: only __geo_interface__
        def __init__(self, coordinates):
            self.__geo_interface__ = {"type": "Polygon", "coordinates": coordinates}

    squares = {"left": Shape([[(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)]]),
               "right": Shape([[(1, 0), (2, 0), (2, 1), (1, 1), (1, 0)]]),
               "corner": Shape([[(2, 1), (3, 1), (3, 2), (2, 2), (2, 1)]]),
               "far": Shape([[(5, 5), (6, 5), (6, 6), (5, 5)]])}
    g = graph(squares)
    assert {tuple(g.labels[e]) for e in g.edges} == {("left", "right"), ("right", "corner")}  # a corner is queen
    assert g.degree[list(g.labels).index("far")] == 0  # an island


def test_the_risk_map_draws_every_county_on_one_colour_scale(nc):
    sir = nc.data.set_index("county").sir
    smoothed = 0.5 + 0.5 * sir  # any shrunk ratio
    fig = hp.plots.risk_map(smoothed, nc.geometry, raw=sir)
    raw_axes, smooth_axes = fig.axes[:2]
    (raw,), (shrunk,) = raw_axes.collections, smooth_axes.collections
    assert len(raw.get_paths()) == len(shrunk.get_paths()) == 100
    assert raw.norm is shrunk.norm  # one scale for both maps
    assert raw.norm.vmin == pytest.approx(1 / raw.norm.vmax) and raw.norm.vmax >= sir.max()
    counties = list(nc.geometry)
    # a county with no case is drawn at the scale's low end, not left empty
    zero = counties.index(sir[sir == 0].index[0])
    assert raw.get_array()[zero] == pytest.approx(raw.norm.vmin)
    assert shrunk.get_array()[counties.index("Ashe")] == pytest.approx(smoothed["Ashe"])
    with pytest.raises(hp.DataError, match="Atlantis.*no polygon"):
        hp.plots.risk_map(pd.Series({"Atlantis": 1.0}), {"Atlantis_": nc.geometry["Ashe"]})


def test_the_exceedance_map_is_on_a_fixed_probability_scale(nc):
    probability = (nc.data.set_index("county").sir > 1).astype(float) * 0.9 + 0.05
    fig = hp.plots.exceedance_map(probability, nc.geometry)
    (collection,) = fig.axes[0].collections
    assert (collection.norm.vmin, collection.norm.vmax) == (0.0, 1.0) and len(collection.get_paths()) == 100
    with pytest.raises(hp.DataError, match="between 0 and 1"):
        hp.plots.exceedance_map(probability * 2, nc.geometry)


def test_maps_cut_holes_whatever_their_winding_and_read_any_labels():
    from hierpool.plots import _area_patches

    outer = [(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)]  # counter-clockwise
    hole = [(1, 1), (3, 1), (3, 3), (1, 3)]  # counter-clockwise too (wrong for GeoJSON), and not closed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    def centre_and_corner(paths):  # rendered (matplotlib fills by the non-zero winding rule): is (2, 2) painted?
        fig = Figure(figsize=(1, 1), dpi=40)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.add_collection(PathCollection(paths, facecolor="k", edgecolor="none"))
        ax.set_xlim(0, 4), ax.set_ylim(0, 4), ax.set_axis_off()
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())[..., 0]
        return pixels[20, 20] < 128, pixels[35, 5] < 128

    assert centre_and_corner(_area_patches([[[outer, hole]]])) == (False, True)
    fig = hp.plots.exceedance_map(pd.Series({37001: 0.2}), {37001: [[outer]]})  # integer area codes
    assert len(fig.axes[0].collections[0].get_paths()) == 1
    edges = graph(pd.DataFrame([[1, 0], [0, 1]]), labels=[0, 1])  # two pairs 1-0 and 0-1 of a 2 x 2 edge list
    assert edges.edges.tolist() == [[0, 1]]
