"""Spatial terms at the model level: the formula term, the design's checks (bad input refused by name), the
constrained ICAR's coordinates, and the log density the Bayesian sampler uses against the closed form's sparse
precision (one algebra: the same quadratic form)."""

import warnings

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from numpyro.infer.util import log_density

import hierpool as hp
from hierpool.algebra.icar import CarPrior, constrained_square_root, constraint_matrix, sum_to_zero, sum_to_zero_layout
from hierpool.bayesian import spatial as spatial_module
from hierpool.bayesian.priors import resolve_priors
from hierpool.bayesian.spatial import car_priors, spatial_data, spatial_model
from hierpool.errors import ArgumentError, DataError, FormulaError
from hierpool.spec.adjacency import graph
from hierpool.spec.family import family_spec
from hierpool.spec.formula import parse_formula
from hierpool.spec.spatial import spatial_design

FORMULA = "sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type='{}')"


@pytest.fixture(scope="module")
def nc():
    return hp.datasets.nc_sids()


@pytest.fixture(scope="module")
def toy():
    """A path a-b-c-d, a triangle e-f-g and an island h, one row per area."""
    edges = pd.DataFrame({"a": list("abcefe"), "b": list("bcdfgg")})
    labels = list("abcdefgh")
    adjacency = pd.DataFrame(0, index=labels, columns=labels)
    for a, b in zip(edges.a, edges.b):
        adjacency.loc[a, b] = adjacency.loc[b, a] = 1
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"area": labels, "x": rng.normal(size=8), "expected": rng.uniform(2, 6, size=8),
                         "y": rng.poisson(4, size=8)})
    return data, edges, adjacency


def test_the_car_term_is_parsed_with_its_type_and_island_treatment():
    spec = parse_formula("y ~ x + car(area, type='icar', islands='independent')")
    assert spec.random == () and spec.fixed == "y ~ x", "the car term is neither fixed nor a bar term"
    term = spec.spatial[0]
    assert (term.factor, term.type, term.islands) == ("area", "icar", "independent"), "parsed arguments"
    assert parse_formula("y ~ car(area)").spatial[0].type == "bym2", "BYM2 is the default type"
    assert "area" in spec.variables, "the area column is a variable of the formula"


@pytest.mark.parametrize("formula,message", [
    ("y ~ x + car(area, type='besag')", "is not one of"),
    ("y ~ x + car(area, kind='icar')", "unknown argument 'kind'"),
    ("y ~ x + car(area, type=icar)", "quoted string"),
    ("y ~ x + car('area')", "one column of area labels"),
    ("y ~ x - car(area)", "cannot be subtracted"),
])
def test_a_malformed_car_term_is_refused_by_name(formula, message):
    with pytest.raises(FormulaError, match=message):
        parse_formula(formula)


def test_bad_spatial_input_is_refused_by_name(nc, toy):
    data, edges, adjacency = toy
    poisson = family_spec("poisson")
    f = "y ~ x + offset(log(expected)) + car(area, type='{}')"
    with pytest.raises(DataError, match=r"areas \['h'\] of column 'area' are not in the adjacency graph"):
        spatial_design(f.format("bym2"), data, edges, family=poisson)  # h is in no edge: not in the edge list's graph
    with pytest.raises(DataError, match="'h' of column 'area' has no neighbours .*islands='independent'"):
        spatial_design(f.format("icar"), data, adjacency, family=poisson)
    with pytest.raises(DataError, match="'h' of column 'area' has no neighbours: a proper CAR"):
        spatial_design(f.format("proper"), data, adjacency, family=poisson)
    negative = data.assign(expected=data.expected.where(data.area != "c", -1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's log of a negative number, before the check
        with pytest.raises(DataError, match=r"offset\(log\(expected\)\).*not finite in 1 row.*must be positive"):
            hp.glmm(f.format("bym2"), negative, family="poisson", adjacency=adjacency)
    asymmetric = adjacency.copy()
    asymmetric.loc["a", "b"] = 0
    with pytest.raises(DataError, match="not symmetric: 'a' -> 'b'"):
        hp.glmm(f.format("bym2"), data, family="poisson", adjacency=asymmetric)
    selfish = pd.concat([edges, pd.DataFrame({"a": ["d"], "b": ["d"]})])
    with pytest.raises(DataError, match="'d' is listed as its own neighbour"):
        hp.bayes(f.format("bym2"), data, family="poisson", adjacency=selfish)
    with pytest.raises(ArgumentError, match="needs the areas' neighbourhood graph: give adjacency="):
        hp.glmm(f.format("bym2"), data, family="poisson")
    with pytest.raises(ArgumentError, match="needs the areas' neighbourhood graph: give adjacency="):
        hp.fit_batch("x ~ car(area)", data.assign(dataset=1))  # once for the batch, on its long frame
    with pytest.raises(ArgumentError, match="has no spatial term"):
        hp.glmm("y ~ x + (1 | area)", data, family="poisson", adjacency=edges)
    with pytest.raises(ArgumentError, match=r"spatial terms on columns \['area', 'x'\]: give adjacency= as a dict"):
        spatial_design("y ~ car(area) + car(x)", data, adjacency, family=poisson)
    with pytest.raises(ArgumentError, match="prior 'alpha' given, but car\\(area, type='bym2'\\) has 'rho'"):
        car_priors(spatial_design(f.format("bym2"), data, adjacency, family=poisson), {"alpha": dist.Beta(2, 2)})
    with pytest.raises(ArgumentError, match="support in \\(0, 1\\)"):
        car_priors(spatial_design(f.format("bym2"), data, adjacency, family=poisson), {"rho": dist.HalfNormal(1)})
    with pytest.raises(ArgumentError, match="se= is not supported with a spatial term"):
        hp.lmm("x ~ car(area)", data, se="expected", adjacency=adjacency)
    assert spatial_design(f.format("icar").replace("'icar'", "'icar', islands='independent'"), data, adjacency,
                          family=poisson).islands.sum() == 1, "with the island treatment the island is accepted"


def test_the_sum_to_zero_coordinates_are_an_isometry_onto_the_constraints(toy):
    _, _, adjacency = toy
    g = graph(adjacency)
    layout = sum_to_zero_layout(g)
    basis = sum_to_zero(np.eye(layout.n_free), layout).T
    assert basis.shape == (8, 6), "8 areas less one constraint per component of more than one area (2)"
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-14, err_msg="orthonormal columns")
    np.testing.assert_allclose(constraint_matrix(g).T @ basis, 0, atol=1e-14, err_msg="each component sums to 0")
    assert np.allclose(basis[list(g.labels).index("h")], np.eye(6)[-1]), "the island is a free coordinate of its own"
    whitening = constrained_square_root(CarPrior(g, "bym2"), layout)
    q = np.diag(g.degree) - g.adjacency_matrix().toarray() + np.diag(g.degree == 0)
    np.testing.assert_allclose(whitening @ whitening.T, np.linalg.pinv(q, hermitian=True), atol=1e-12,
                               err_msg="M M' is the constrained ICAR covariance (per component; the island's 1)")


@pytest.mark.parametrize("type_,whiten", [("icar", False), ("icar", True), ("bym2", False), ("bym2", True),
                                          ("proper", False)])
def test_the_samplers_log_density_is_the_sparse_precisions(nc, type_, whiten, monkeypatch):
    """NumPyro's log joint of the spatial model at a random point equals the priors plus -x' P x / 2 with P the
    closed form's sparse precision (CarPrior), log det included for the proper CAR, plus the Poisson likelihood;
    in the Helmert coordinates of large maps and the whitened ones of small maps (with z's N(0, I) constant)."""
    monkeypatch.setattr(spatial_module, "WHITEN_MAX_AREAS", 1000 if whiten else 0)
    sdesign = spatial_design(FORMULA.format(type_), nc.data, nc.adjacency, family=family_spec("poisson"))
    others, (car,) = car_priors(sdesign, None)
    priors = resolve_priors(sdesign.design, others)
    prior = CarPrior(sdesign.graph, type_)
    layout = sum_to_zero_layout(sdesign.graph)
    rng = np.random.default_rng(1)
    beta, sd, mix = np.array([-0.5, 1.5]), 0.3, 0.4
    params = {"beta": beta, "sd": sd}
    if type_ == "proper":
        field = rng.normal(size=100)
        params.update(alpha=mix, w=field)
        b = sd * field
    else:
        z = rng.normal(size=layout.n_free)
        field = constrained_square_root(prior, layout) @ z if whiten else sum_to_zero(z, layout)
        params["z"] = z
        b = sd * field
        if type_ == "bym2":
            u = rng.normal(size=100)
            params.update(rho=mix, u=u)
            b = sd * (np.sqrt(1 - mix) * u + np.sqrt(mix) * field / np.sqrt(prior.scaling))
    value, _ = log_density(spatial_model, (spatial_data(sdesign, [prior], [layout]), (layout,), priors, (car,)),
                           dict(types=(type_,), family="poisson", link="log", n_areas=(100,), n_free=(layout.n_free,),
                                suffixes=("",)), params)
    # BYM2: x = (b, phi), whose quadratic form at (sd, rho) is |u|^2 + phi' Q phi
    x, at = (np.r_[b, field], (sd, mix)) if type_ == "bym2" else (field, (1.0, mix if type_ == "proper" else 0.0))
    rows, cols, values = prior.precision_entries(*at)
    quadratic = float(np.sum(values * x[rows] * x[cols]))
    expected = float(np.sum(priors.beta[0].log_prob(beta[0]) + priors.beta[1].log_prob(beta[1]))
                     + car.sd.log_prob(sd)) - 0.5 * quadratic
    if type_ == "proper":  # the normalizing constant's alpha part: log det(D - alpha W) less sum log d
        expected += float(car.mix.log_prob(mix)) + 0.5 * (prior.log_det(1.0, mix) - np.sum(np.log(prior.degree)))
    if type_ == "bym2":
        expected += float(car.mix.log_prob(mix)) - 50 * np.log(2 * np.pi)  # u's normalizing constant
    if whiten:
        expected -= 0.5 * layout.n_free * np.log(2 * np.pi)  # z's
    eta = sdesign.design.offset + sdesign.design.X @ beta + b[sdesign.area]
    y = sdesign.design.y
    expected += float(np.sum(y * eta - np.exp(eta)))
    assert float(value) == pytest.approx(expected, rel=1e-10), f"{type_}: the sampler's density is not the model's"


class _Shape:
    """A stand-in for a shapely (Multi)Polygon: only its __geo_interface__, as geopandas's geometries have."""

    def __init__(self, polygons):
        self.__geo_interface__ = {"type": "MultiPolygon",
                                  "coordinates": [[ring.tolist() for ring in polygon] for polygon in polygons]}


def test_a_geodataframe_as_data_gives_the_graph_by_queen_contiguity(nc):
    """data with a geometry column (a geopandas GeoDataFrame's shape) needs no adjacency=: the graph is its
    polygons' queen contiguity, the shipped edge list's."""
    frame = nc.data.assign(geometry=[_Shape(nc.geometry[c]) for c in nc.data.county])
    f = FORMULA.format("icar")
    from_geometry = spatial_design(f, frame, None, family=family_spec("poisson")).graph
    from_edges = spatial_design(f, nc.data, nc.adjacency, family=family_spec("poisson")).graph
    order = np.argsort(from_geometry.labels)
    assert list(from_geometry.labels[order]) == list(from_edges.labels), "the same areas"
    same = {frozenset(from_geometry.labels[e]) for e in from_geometry.edges}
    assert same == {frozenset(from_edges.labels[e]) for e in from_edges.edges}, "the same neighbours"
    with pytest.raises(ArgumentError, match="needs the areas' neighbourhood graph"):
        spatial_design(f, nc.data, None, family=family_spec("poisson"))


def test_the_model_functions_take_a_geodataframe_without_adjacency(nc):
    frame = nc.data.assign(geometry=[_Shape(nc.geometry[c]) for c in nc.data.county])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm(FORMULA.format("icar"), frame, family="poisson")
        same = hp.glmm(FORMULA.format("icar"), nc.data, family="poisson", adjacency=nc.adjacency)
    assert fit.objective == pytest.approx(same.objective, rel=1e-10), "the same model from the polygons"


def test_more_refusals_by_name_and_a_repeated_index(toy):
    data, edges, adjacency = toy
    poisson = family_spec("poisson")
    f = "y ~ x + offset(log(expected)) + car(area, type='{}')"
    with pytest.raises(FormulaError, match="islands='independent' is for type='icar'"):
        spatial_design("y ~ car(area, type='bym2', islands='independent')", data, adjacency, family=poisson)
    with pytest.raises(ArgumentError, match="dict of graphs keyed by \\['county'\\].*area column is 'area'"):
        spatial_design(f.format("bym2"), data, {"county": edges}, family=poisson)
    assert spatial_design(f.format("bym2"), data, {"area": adjacency}, family=poisson).n_areas == 8, "keyed right"
    with pytest.raises(ArgumentError, match="prior 'cor' given"):
        car_priors(spatial_design(f.format("bym2"), data, adjacency, family=poisson), {"cor": 5.0})
    two = spatial_design("y ~ x + offset(log(expected)) + car(area, type='bym2') + (1 | x)", data.assign(
        x=np.repeat([0, 1], 4)), adjacency, family=poisson)
    for key in ("rho", "sd_area"):  # a one-term model's keys: in a model of several terms they would name nothing
        with pytest.raises(ArgumentError, match=rf"prior '{key}'.*end in _car_<area column>: \['sd_car_area', "
                                                r"'rho_car_area'\]"):
            car_priors(two, {key: dist.Beta(2, 2)})
    assert car_priors(two, {"rho_car_area": dist.Beta(2, 2)})[1][0].mix.concentration1 == 2, "the suffixed key"
    repeated = data.set_index(pd.Index([0, 0, 1, 1, 2, 2, 3, 3]))
    design = spatial_design(f.format("bym2"), repeated, adjacency, family=poisson)
    assert design.design.n == 8 and list(design.graph.labels[design.area]) == list(data.area), \
        "a repeated index does not repeat rows: each row keeps its own area"


def test_variance_must_be_a_fit_of_the_same_model(toy):
    data, _, adjacency = toy
    f = "y ~ x + offset(log(expected)) + car(area, type='bym2')"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        poisson = hp.glmm(f, data, family="poisson", adjacency=adjacency, nAGQ=0)
        other = hp.glmm(f, data.assign(y=data.y + 1), family="poisson", adjacency=adjacency, nAGQ=0)
        gaussian = hp.lmm("x ~ car(area, type='bym2')", data, adjacency=adjacency)
    with pytest.raises(ArgumentError, match="differs from this model in its family"):
        hp.bayes("x ~ car(area, type='bym2')", data, adjacency=adjacency, variance=poisson)
    with pytest.raises(ArgumentError, match="differs from this model in its data"):
        hp.bayes(f, data, family="poisson", adjacency=adjacency, variance=other)
    with pytest.raises(ArgumentError, match="differs from this model in its weights"):
        hp.bayes(f, data.assign(w=2.0), family="poisson", adjacency=adjacency, variance=poisson, weights="w")
    with pytest.raises(ArgumentError, match="must be an hp.lmm / hp.glmm fit with adjacency="):
        hp.bayes(f, data, family="poisson", adjacency=adjacency, variance=gaussian.design)
    assert gaussian.sigma > 0, "the Gaussian fit itself is fine"


def test_the_calibration_check_runs_live():
    """A short live run of spatial_sbc (the 200-replication study is validation/spatial_validation.json's): every
    rank lies in 0..L, the fields are drawn from the prior (sums to zero per component), the tests are reported."""
    from hierpool.validate.spatial_sbc import draw_field

    edges = pd.DataFrame({"a": ["a", "b", "c", "e"], "b": ["b", "c", "d", "f"]})
    data = pd.DataFrame({"area": list("abcdef"), "x": np.linspace(-1, 1, 6), "expected": np.full(6, 5.0),
                         "y": [3, 5, 4, 6, 2, 7]})
    result = hp.validate.spatial_sbc("y ~ x + offset(log(expected)) + car(area, type='icar')", data, edges,
                                     priors={"Intercept": dist.Normal(0, 1), "b": dist.Normal(0, 1),
                                             "sd": dist.HalfNormal(1)}, n_reps=5, n_draws=19, chains=1,
                                     draws_per_chain=100, tune=100, bins=5, seed=1)
    assert list(result.ranks.columns) == ["beta[Intercept]", "beta[x]", "sd", "b[a]", "b[f]"]
    assert result.ranks.to_numpy().min() >= 0 and result.ranks.to_numpy().max() <= 19, "ranks in 0..L"
    assert len(result.tests) == 5, "a uniformity test per parameter"
    g = graph(edges)
    field = draw_field(CarPrior(g, "icar"), 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose([field[:4].sum(), field[4:].sum()], 0, atol=1e-12, err_msg="zero sum per component")


def test_the_maps_take_a_fit(nc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm(FORMULA.format("bym2"), nc.data, family="poisson", adjacency=nc.adjacency, nAGQ=0)
    figure = hp.plots.risk_map(fit, nc.geometry)
    assert len(figure.axes) == 3, "raw SIR, smoothed risk and one colour bar"
    figure = hp.plots.shrinkage_map(fit, nc.geometry)
    moved = figure.axes[1].collections[0].get_offsets()
    assert len(moved) == 100, "one point per county in the shrinkage panel"
    with pytest.raises(ArgumentError, match="exceedance probabilities are a posterior's"):
        hp.plots.exceedance_map(fit, nc.geometry)
    with pytest.raises(ArgumentError, match="shrinkage_map draws a spatial fit"):
        hp.plots.shrinkage_map(nc.data, nc.geometry)
