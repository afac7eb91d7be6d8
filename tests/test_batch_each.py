"""hp.fit_batch of the models fitted dataset by dataset (hierpool.batch.fit_each, and nAGQ != 1): a relationship
matrix, spatial car() terms, adaptive quadrature.  Each row must be the single fit of its dataset, failures stay in
their rows, and what the batch cannot take is refused by name, once."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.errors import ArgumentError
from hierpool.spec.adjacency import lattice_edges

VALIDATION = Path(__file__).resolve().parents[1] / "validation"
ANIMAL = "y ~ sex + (1 | animal)"
AREAS = lattice_edges(4, 4)


def scaled(values):
    """A response transform over the whole dataset (the formula's own function)."""
    return values / np.max(values)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def pedigree_data():
    pedigree = pd.read_csv(VALIDATION / "relmat_pedigree.csv", dtype=str)
    phenotypes = pd.read_csv(VALIDATION / "relmat_phenotypes.csv", dtype={"animal": str, "sex": str})
    inverse = hp.pedigree.inverse_relationship_matrix(pedigree)
    rng = np.random.default_rng(5)
    sets = {f"trait{d}": phenotypes.assign(y=phenotypes["y"] + rng.normal(scale=2.0, size=len(phenotypes)))
            for d in range(3)}
    sets["trait1"] = sets["trait1"].iloc[40:]  # fewer animals with records
    sets["tiny"] = phenotypes.iloc[:3]  # 3 unrelated animals: the variances are not identifiable, its fit fails
    sets["noise"] = phenotypes.assign(y=rng.normal(size=len(phenotypes)))  # no genetic variance: a boundary fit
    founders = set(pedigree.id[pedigree.sire.isna() & pedigree.dam.isna()])
    unrelated = phenotypes[phenotypes["animal"].isin(founders)].drop_duplicates("animal")
    for label in ("flat1", "flat2"):  # unrelated animals, one record each: flat, on one shared design
        sets[label] = unrelated.assign(y=rng.normal(size=len(unrelated)))
    sets["stranger"] = phenotypes.iloc[:60].assign(animal=["stranger"] + list(phenotypes["animal"].iloc[1:60]))
    return sets, inverse


@pytest.fixture(scope="module")
def animal_batch(pedigree_data):
    sets, inverse = pedigree_data
    return _quiet(hp.fit_batch, ANIMAL, sets, by="trait", relmat_inverse={"animal": inverse}, progress=False)


# trait0, trait2 and noise share their rows (the spectral path, theta by its own search: to the optimum's
# tolerance, 1e-7 in log theta, like the single fit's Brent search); trait1 is fitted alone by hp.lmm (exact)
SHARED = ("trait0", "trait2", "noise")


@pytest.mark.parametrize("label", ["trait0", "trait1", "trait2", "noise"])
def test_an_animal_model_batch_is_each_datasets_lmm(pedigree_data, animal_batch, label):
    sets, inverse = pedigree_data
    batch = animal_batch
    single = _quiet(hp.lmm, ANIMAL, sets[label], relmat_inverse={"animal": inverse})
    rel = 1e-6 if label in SHARED else 1e-12
    assert batch.objective[label] == pytest.approx(single.objective, rel=1e-11)
    np.testing.assert_allclose(batch.fixef.loc[label], single.fixef, rtol=rel)
    np.testing.assert_allclose(batch.fixef_se.loc[label], single.fixef_se, rtol=rel)
    assert batch.sigma[batch.datasets.get_loc(label)] == pytest.approx(single.sigma, rel=rel)
    # (noise's theta sits at the lower bound, 1e-4, where the profile is flat: the two searches stop 2e-10 apart)
    assert batch.theta[batch.datasets.get_loc(label)][0] == pytest.approx(single.theta[0], rel=rel,
                                                                           abs=1e-6 if label in SHARED else 0.0)
    row = batch.varcorr.query("trait == @label and grp == 'animal'")
    assert row["sdcor"].iloc[0] == pytest.approx(single.sigma_a, rel=rel,
                                                  abs=1e-6 * single.sigma if label in SHARED else 0.0)
    # breeding values of every animal of the pedigree, with records or not, and their prediction error sds
    ranef = batch.ranef.query("trait == @label")
    assert len(ranef) == len(inverse[1])
    scale = 1e-5 * max(single.sigma_a, 1e-3 * single.sigma) if label in SHARED else 1e-12
    np.testing.assert_allclose(ranef["condval"], single.ranef["condval"], rtol=rel, atol=scale)
    np.testing.assert_allclose(ranef["condsd"], single.ranef["condsd"], rtol=rel, atol=scale)
    assert batch.converged[label] and not batch.refit[label]
    assert batch.is_singular[label] == single.is_singular


def test_datasets_sharing_their_rows_take_the_spectral_path(pedigree_data, animal_batch):
    from hierpool.batch.fit_each import each_model, spectral_fits

    sets, inverse = pedigree_data
    model = each_model(ANIMAL, sets, "trait", "fit_batch", spec=None, weights=None, offset=None, se=None,
                       relmat=None, relmat_inverse={"animal": inverse}, adjacency=None)
    labels = list(sets)
    shared = spectral_fits(model, ANIMAL, reml=True)
    assert sorted(labels[d] for d in shared) == sorted([*SHARED, "flat1", "flat2"])
    # its boundary and flat cases say what hp.lmm says
    assert animal_batch.is_singular["noise"] and "boundary (singular) fit" in animal_batch.messages["noise"]
    for label in ("flat1", "flat2"):
        assert "not identifiable" in animal_batch.messages[label] and np.isnan(animal_batch.objective[label])
    with pytest.raises(hp.DataError, match="not identifiable"):
        hp.lmm(ANIMAL, sets["flat1"], relmat_inverse={"animal": inverse})


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("slope", [False, True])
def test_the_spectral_criterion_and_solution_are_the_sparse_equations(pedigree_data, reml, slope):
    """A scalar slope (0 + x | animal) makes Z's entries x_i, not 1; an offset moves y."""
    from hierpool.closedform import relmat_spectral as spectral
    from hierpool.closedform.relmat import relationship_positions, relmat_equations

    sets, inverse = pedigree_data
    frame = sets["trait1"].assign(x=np.linspace(0.5, 2.0, len(sets["trait1"])), o=0.3)
    formula = "y ~ sex + offset(o) + (0 + x | animal)" if slope else ANIMAL
    fit = _quiet(hp.lmm, formula, frame, relmat_inverse={"animal": inverse}, reml=reml)
    design, term = fit.design, fit.design.terms[0]
    sd = spectral.spectral_design(relationship_positions(term, fit.relationship)[term.index],
                                  np.asarray(term.z[:, 0], float), np.asarray(design.X, float),
                                  spectral.relationship_parts(fit.relationship))
    y = (np.asarray(design.y, float) - design.offset) @ sd.vectors
    equations = relmat_equations(design, fit.relationship)[0]
    thetas = np.array([1e-3, 0.3, 1.0, 7.0, 300.0])
    mine = spectral.criterion(np.log(thetas)[None], y[None], sd, reml)[0]
    np.testing.assert_allclose(mine, [equations.evaluate(np.array([t]), reml)[0] for t in thetas], rtol=1e-10)
    # at the fit's own theta: its fixed effects, sigma, covariance, every BLUP and prediction error sd
    solved = spectral.solution(np.log(fit.theta), y[None], sd, reml)
    np.testing.assert_allclose(solved["beta"][0], fit.fixef, rtol=1e-10)
    assert solved["sigma"][0] == pytest.approx(fit.sigma, rel=1e-10)
    np.testing.assert_allclose(solved["vcov"][0], fit.vcov, rtol=1e-9)
    np.testing.assert_allclose(solved["b"][0], fit.ranef["condval"], rtol=1e-8, atol=1e-10 * fit.sigma)
    np.testing.assert_allclose(solved["condsd"][0], fit.ranef["condsd"], rtol=1e-8)


def test_shared_designs_in_chunks_and_the_cases_left_to_the_single_fit(pedigree_data, monkeypatch):
    """More traits than a chunk (the chunk forced to 2), ML; traits on one design that hp.lmm would refuse or warn
    about are left to it: an animal outside A, a covariate with a missing value, a constant trait, a design
    whose own columns differ (males only)."""
    import hierpool.batch.fit_each as fit_each

    sets, inverse = pedigree_data
    rng = np.random.default_rng(3)
    base = sets["trait0"]
    traits = {f"t{d}": base.assign(y=base["y"] + rng.normal(scale=2.0, size=len(base))) for d in range(5)}
    stranger = base.assign(animal=["stranger"] + list(base["animal"].iloc[1:]))
    traits |= {"stranger1": stranger, "stranger2": stranger.assign(y=stranger["y"] + 1.0)}
    missing = base.assign(sex=[None] + list(base["sex"].iloc[1:]))
    traits |= {"missing1": missing, "missing2": missing.assign(y=missing["y"] * 2.0)}
    traits |= {"constant": base.assign(y=3.0)}
    males = base.query("sex == 'M'")
    traits |= {"males1": males, "males2": males.assign(y=males["y"] + 1.0)}
    exact = base.assign(y=2.0 + 3.0 * (base["sex"] == "M"))  # the fixed effects fit it exactly: hp.lmm fails
    traits |= {"exact1": exact, "exact2": exact.assign(y=exact["y"] * 2.0)}
    offset = base.assign(y=3.0, o=rng.normal(size=len(base)))  # a constant response (a varying offset beside it)
    traits = {k: v.assign(o=0.0) for k, v in traits.items()} | {"offset1": offset, "offset2": offset.assign(o=1.0)}
    monkeypatch.setattr(fit_each, "host_chunk", lambda _: 2)
    model = _quiet(fit_each.each_model, ANIMAL, traits, "trait", "fit_batch", spec=None, weights=None, offset="o",
                   se=None, relmat=None, relmat_inverse={"animal": inverse}, adjacency=None)
    labels = list(traits)
    assert sorted(labels[d] for d in fit_each.spectral_fits(model, ANIMAL, reml=False)) == [f"t{d}" for d in range(5)]
    batch = _quiet(hp.fit_batch, ANIMAL, traits, by="trait", relmat_inverse={"animal": inverse}, reml=False,
                   offset="o", progress=False)
    for label in [f"t{d}" for d in range(5)] + ["missing1"]:
        single = _quiet(hp.lmm, ANIMAL, traits[label], relmat_inverse={"animal": inverse}, reml=False, offset="o")
        assert batch.objective[label] == pytest.approx(single.objective, rel=1e-11)
        np.testing.assert_allclose(batch.fixef.loc[label], single.fixef, rtol=1e-6)
        assert batch.sigma[batch.datasets.get_loc(label)] == pytest.approx(single.sigma, rel=1e-6)
    assert "dropped 1 of 330 rows" in batch.messages["missing1"]
    assert "not labels of its relationship matrix" in batch.messages["stranger1"]
    assert "constant" in batch.messages["constant"]
    assert "fixed effects are ['Intercept']" in batch.messages["males1"]
    assert np.isnan(batch.objective["exact1"]) and batch.messages["exact1"]  # hp.lmm's own failure
    with pytest.raises(hp.HierpoolError) as single_error:  # the row gives a refusal's words alone
        _quiet(hp.lmm, ANIMAL, exact, relmat_inverse={"animal": inverse}, reml=False)
    assert batch.messages["exact1"] == str(single_error.value)
    assert "constant" in batch.messages["offset1"] and np.isnan(batch.objective["offset2"])


def test_a_response_transform_leaves_each_dataset_to_its_single_fit(pedigree_data):
    """rel(y) = y / max(y) over each dataset is not the long frame's transform: no shared design for it.  Nor is
    scale(y) (a stateful transform, which fit_batch refused before)."""
    sets, inverse = pedigree_data
    traits = {k: sets[k] for k in ("trait0", "trait2")}
    for formula in ("scaled(y) ~ sex + (1 | animal)", "scale(y) ~ sex + (1 | animal)"):
        batch = _quiet(hp.fit_batch, formula, traits, by="trait", relmat_inverse={"animal": inverse},
                       progress=False)
        for label, frame in traits.items():
            single = _quiet(hp.lmm, formula, frame, relmat_inverse={"animal": inverse})
            assert batch.objective[label] == pytest.approx(single.objective, rel=1e-12)


def test_a_failing_dataset_keeps_its_reason_in_its_row(animal_batch):
    assert not animal_batch.converged["tiny"] and np.isnan(animal_batch.objective["tiny"])
    # a refusal's words alone, as the batched paths' rows give them (another error would carry its type's name)
    assert "not identifiable" in animal_batch.messages["tiny"] and "Error" not in animal_batch.messages["tiny"]
    assert np.isnan(animal_batch.fixef.loc["tiny"]).all()
    frame = animal_batch.to_frame()
    assert list(frame["trait"]) == ["trait0", "trait1", "trait2", "tiny", "noise", "flat1", "flat2", "stranger"]
    assert "not labels of its relationship matrix" in animal_batch.messages["stranger"]


@pytest.fixture(scope="module")
def area_counts():
    """Three count datasets on a 4 x 4 lattice, two rows per area, with exposures (an offset)."""
    rng = np.random.default_rng(11)
    areas = np.repeat([f"a{i}" for i in range(16)], 2)
    frames = []
    for _ in range(3):
        exposure = rng.uniform(5, 15, size=areas.size)
        x = rng.normal(size=areas.size)
        risk = np.exp(0.3 * x + np.repeat(rng.normal(scale=0.4, size=16), 2))
        frames.append(pd.DataFrame({"area": areas, "x": x, "exposure": exposure, "y": rng.poisson(exposure * risk)}))
    return frames


@pytest.mark.parametrize("family", [None, "poisson"])
def test_a_spatial_batch_is_each_datasets_single_fit(area_counts, family):
    formula = ("y ~ x + offset(log(exposure)) + car(area, type='bym2')" if family else
               "y ~ x + car(area, type='icar') + (1 | area)")
    frames = area_counts if family else [f.assign(y=np.log1p(f["y"] / f["exposure"])) for f in area_counts]
    batch = _quiet(hp.fit_batch, formula, frames, by="map", family=family, adjacency=AREAS, progress=False)
    single_fit = hp.glmm if family else hp.lmm
    extra = {"family": family} if family else {}
    for d, frame in enumerate(frames):
        single = _quiet(single_fit, formula, frame, adjacency=AREAS, **extra)
        assert batch.objective[d] == pytest.approx(single.objective, rel=1e-12)
        np.testing.assert_allclose(batch.fixef.loc[d], single.fixef, rtol=1e-10)
        np.testing.assert_allclose(batch.fixef_se.loc[d], single.fixef_se, rtol=1e-10)
        pd.testing.assert_series_equal(batch.hyperparameters.loc[d], single.hyperparameters(), check_names=False,
                                       rtol=1e-12)
        tables = single.ranef if isinstance(single.ranef, dict) else {"car(area, type='bym2')": single.ranef}
        spatial = batch.ranef.query("map == @d and grpvar == 'area' and term.str.startswith('car')")
        np.testing.assert_allclose(spatial["condval"], next(iter(tables.values()))["effect"], rtol=1e-10)
        assert batch.is_singular[d] == single.is_singular
    frame = batch.to_frame()
    assert list(batch.hyperparameters.columns) == [c for c in frame.columns if c in batch.hyperparameters.columns]
    with pytest.raises(ArgumentError, match="no VarCorr"):
        batch.varcorr


def test_an_empty_dataset_a_column_of_another_kind_and_an_infinite_response_keep_their_rows(area_counts):
    # an empty dataset vanished from a dataset-by-dataset batch (its labels came from the rows left), and a text
    # column in one dataset failed the whole batch in formulae without naming the column
    formula = "y ~ x + car(area, type='icar') + (1 | area)"
    frame = area_counts[0].assign(y=lambda f: np.log1p(f["y"] / f["exposure"]))
    infinite = frame.assign(y=np.where(np.arange(len(frame)) == 0, np.inf, frame["y"]))
    frames = {"a": frame, "empty": frame.iloc[:0], "text": frame.assign(x=frame["x"].astype(str)), "b": frame,
              "inf": infinite}  # an infinite response refused the whole batch
    batch = _quiet(hp.fit_batch, formula, frames, by="map", adjacency=AREAS, progress=False)
    assert list(batch.datasets) == ["a", "empty", "text", "b", "inf"]
    assert batch.messages["empty"] == "the dataset is empty: it has no rows"
    assert batch.messages["inf"] == "column 'y' has infinite values" and np.isnan(batch.objective["inf"])
    assert batch.messages["text"].startswith("column 'x' holds text or categories in this dataset but numbers in 3 "
                                             "other datasets")
    assert batch.objective[["empty", "text"]].isna().all() and not batch.converged[["empty", "text"]].any()
    single = _quiet(hp.lmm, formula, frame, adjacency=AREAS)
    assert batch.objective["a"] == batch.objective["b"] == pytest.approx(single.objective, rel=1e-12)
    # numbers outvoted by text in the response: fitted, the text refused in its rows (the whole batch raised)
    text = frame.assign(y=frame["y"].astype(str))
    batch = _quiet(hp.fit_batch, formula, [text, frame, text], adjacency=AREAS, progress=False)
    assert batch.objective[1] == single.objective and batch.messages[[0, 2]].str.startswith("response 'y'").all()


def test_adaptive_quadrature_fits_each_dataset_alone():
    rng = np.random.default_rng(2)
    frames = []
    for _ in range(2):
        herd = np.repeat(np.arange(12), 4)
        p = 1 / (1 + np.exp(-(-1.0 + np.repeat(rng.normal(size=12), 4))))
        frames.append(pd.DataFrame({"herd": herd, "size": 10, "k": rng.binomial(10, p)}))
    formula = "cbind(k, size - k) ~ 1 + (1 | herd)"
    batch = _quiet(hp.fit_batch, formula, frames, family="binomial", nAGQ=5, progress=False)
    for d, frame in enumerate(frames):
        single = _quiet(hp.glmm, formula, frame, family="binomial", nAGQ=5)
        assert batch.objective[d] == pytest.approx(single.optimum.deviance, rel=1e-12)
        assert batch.refit[d] and "nAGQ=5" in batch.messages[d]
    laplace = _quiet(hp.fit_batch, formula, frames, family="binomial", progress=False)
    assert not np.allclose(laplace.objective, batch.objective, rtol=1e-6)  # the quadrature is not Laplace's
    # the bootstrap refits at the fit's own quadrature
    boot = _quiet(hp.bootstrap, single, 2, seed=6, progress=False)
    replicate = frame.assign(k=np.rint(hp.simulate(single, 2, seed=6)["sim_2"].to_numpy() * 10).astype(int))
    again = _quiet(hp.glmm, formula, replicate, family="binomial", nAGQ=5)
    np.testing.assert_allclose(boot.replicates.iloc[1], [*again.fixef, np.sqrt(again.term_covariances()[0][0, 0])],
                               rtol=1e-10)


def test_what_the_batch_cannot_take_is_refused_by_name(pedigree_data, area_counts):
    sets, inverse = pedigree_data
    relmat = {"relmat_inverse": {"animal": inverse}}
    with pytest.raises(ArgumentError, match="correlation"):
        hp.fit_batch(ANIMAL, sets, correlation=hp.ar1("animal"), **relmat)
    with pytest.raises(ArgumentError, match="dtype"):
        hp.fit_batch(ANIMAL, sets, dtype="float32", **relmat)
    with pytest.raises(ArgumentError, match="Correlated"):  # hp.lmm's own check, once, on the long frame
        hp.fit_batch("y ~ 1 + (1 + sex | animal)", sets, **relmat)
    with pytest.raises(ArgumentError, match="spatial"):
        hp.fit_batch("y ~ 1 + car(area) + (1 | animal)", sets, adjacency=AREAS, **relmat)
    with pytest.raises(ArgumentError, match="nAGQ=3"):
        hp.fit_batch("y ~ x + car(area, type='bym2')", area_counts, family="poisson", nAGQ=3, adjacency=AREAS)
    with pytest.raises(ArgumentError, match="nAGQ=2 needs exactly one scalar"):
        hp.fit_batch("y ~ x + (1 | area) + (1 | x)", area_counts, family="poisson", nAGQ=2)
    with pytest.raises(ArgumentError, match="nAGQ=2 needs family"):
        hp.fit_batch("y ~ x + (1 | area)", area_counts, nAGQ=2)
    with pytest.raises(hp.HierpoolError, match="area"):  # an area outside the graph: once, for the batch
        hp.fit_batch("y ~ x + car(area, type='bym2')", [area_counts[0].assign(area="nowhere")], family="poisson",
                     adjacency=AREAS)


SAMPLER = dict(chains=2, draws=60, tune=60)


def test_an_animal_model_bayes_batch_is_each_datasets_bayes(pedigree_data):
    sets, inverse = pedigree_data
    chosen = {label: sets[label] for label in ("trait0", "trait1", "stranger")}
    batch = _quiet(hp.bayes_batch, ANIMAL, chosen, by="trait", relmat_inverse={"animal": inverse}, seed=7,
                   progress=False, **SAMPLER)
    for d, label in enumerate(("trait0", "trait1")):  # dataset d is hp.bayes with seed + d: the same draws
        single = _quiet(hp.bayes, ANIMAL, sets[label], relmat_inverse={"animal": inverse}, seed=7 + d, **SAMPLER)
        np.testing.assert_allclose(batch.fixef.query("trait == @label")["mean"], single.fixef["mean"], rtol=1e-12)
        np.testing.assert_allclose(batch.varcorr.query("trait == @label")["mean"], single.varcorr["mean"],
                                   rtol=1e-12)
        np.testing.assert_allclose(batch.ranef.query("trait == @label")["mean"], single.ranef["mean"], rtol=1e-12)
        assert batch.heritability.loc[label, "mean"] == pytest.approx(single.heritability["mean"].iloc[0],
                                                                      rel=1e-12)
        assert batch.diagnostics.loc[label, "divergences"] == single.divergences
    assert batch.messages[:2] == ["", ""] and "not labels of its relationship matrix" in batch.messages[2]
    assert np.isnan(batch.fixef.query("trait == 'stranger'")["mean"]).all()
    assert len(batch.ranef.query("trait == 'trait1'")) == len(inverse[1])  # every animal of the pedigree


def test_a_spatial_bayes_batch_is_each_datasets_bayes(area_counts):
    frames = [f.assign(y=np.log1p(f["y"] / f["exposure"])) for f in area_counts[:2]]
    formula = "y ~ x + car(area, type='bym2')"
    batch = _quiet(hp.bayes_batch, formula, frames, adjacency=AREAS, seed=3, progress=False, **SAMPLER)
    for d, frame in enumerate(frames):
        single = _quiet(hp.bayes, formula, frame, adjacency=AREAS, seed=3 + d, **SAMPLER)
        np.testing.assert_allclose(batch.fixef.query("dataset == @d")["mean"], single.fixef["mean"], rtol=1e-12)
        hyper = batch.hyperparameters.query("dataset == @d")
        assert list(hyper["parameter"]) == list(single.hyperparameters().index)
        np.testing.assert_allclose(hyper["mean"], single.hyperparameters()["mean"], rtol=1e-12)
        np.testing.assert_allclose(batch.ranef.query("dataset == @d")["mean"], single.ranef["mean"], rtol=1e-12)
    with pytest.raises(ArgumentError, match="no varcorr"):
        batch.varcorr
    with pytest.raises(ArgumentError, match="keep_draws"):
        hp.bayes_batch(formula, frames, adjacency=AREAS, keep_draws=True)


def test_an_animal_models_simulations_have_its_covariance(pedigree_data):
    sets, inverse = pedigree_data
    frame = sets["trait0"]
    fit = _quiet(hp.lmm, ANIMAL, frame, relmat_inverse={"animal": inverse})
    sims = hp.simulate(fit, 3000, seed=4).to_numpy()
    labels = list(inverse[1])
    A = np.linalg.inv(inverse[0].toarray())
    rows = [labels.index(a) for a in frame["animal"]]
    V = fit.sigma_a**2 * A[np.ix_(rows, rows)] + fit.sigma**2 * np.eye(len(rows))
    C = np.cov(sims)
    related = np.triu(A[np.ix_(rows, rows)] > 0.2, 1)  # relatives' records: covariance sigma_A^2 A_ij only
    # each entry's Monte-Carlo sd is about V_ii sqrt(2 / 3000); over hundreds of pairs their mean is within 1%
    assert C[related].mean() / V[related].mean() == pytest.approx(1.0, abs=0.05)
    assert np.diag(C).mean() / np.diag(V).mean() == pytest.approx(1.0, abs=0.03)
    np.testing.assert_allclose(sims.mean(axis=1), fit.design.X @ fit.fixef.to_numpy(), atol=5 * np.sqrt(V.max() / 3000))


def test_the_bootstrap_refits_an_animal_model_and_a_spatial_glmm(pedigree_data, area_counts):
    sets, inverse = pedigree_data
    fit = _quiet(hp.lmm, ANIMAL, sets["trait0"], relmat_inverse={"animal": inverse})
    boot = _quiet(hp.bootstrap, fit, 2, seed=8, progress=False)
    assert list(boot.estimate.index) == ["Intercept", "sex[M]", "sd_animal_Intercept", "sigma"]
    replicate = sets["trait0"].assign(y=hp.simulate(fit, 2, seed=8)["sim_2"].to_numpy())
    single = _quiet(hp.lmm, ANIMAL, replicate, relmat_inverse={"animal": inverse})
    # the replicates share their rows: the spectral path, to the optimum's tolerance
    np.testing.assert_allclose(boot.replicates.iloc[1], [*single.fixef, single.sigma_a, single.sigma], rtol=1e-6)
    assert boot.batch.objective.iloc[1] == pytest.approx(single.objective, rel=1e-11)

    formula = "y ~ x + offset(log(exposure)) + car(area, type='bym2')"
    spatial = _quiet(hp.glmm, formula, area_counts[0], family="poisson", adjacency=AREAS)
    boot = _quiet(hp.bootstrap, spatial, 2, seed=3, progress=False)
    assert list(boot.estimate.index) == ["Intercept", "x", "sd", "rho"]
    replicate = area_counts[0].assign(y=hp.simulate(spatial, 2, seed=3)["sim_1"].to_numpy())
    single = _quiet(hp.glmm, formula, replicate, family="poisson", adjacency=AREAS)
    np.testing.assert_allclose(boot.replicates.iloc[0], [*single.fixef, single.sd, single.mix], rtol=1e-10)


def test_terms_whose_order_differs_between_datasets_are_matched_by_name():
    """Two (1 | g) terms beside a spatial one, their level counts swapped between the datasets (each dataset's fit
    orders them by its own counts): every number must land under its own term's name."""
    rng = np.random.default_rng(21)
    areas = np.repeat([f"a{i}" for i in range(16)], 3)
    frames = []
    for levels_a, levels_b in ((8, 3), (3, 8)):
        a, b = rng.integers(levels_a, size=areas.size), rng.integers(levels_b, size=areas.size)
        y = (rng.normal(size=levels_a)[a] * 1.5 + rng.normal(size=levels_b)[b] * 0.5
             + np.repeat(rng.normal(size=16), 3) + rng.normal(scale=0.3, size=areas.size))
        frames.append(pd.DataFrame({"area": areas, "a": a.astype(str), "b": b.astype(str), "y": y}))
    formula = "y ~ 1 + car(area, type='icar') + (1 | a) + (1 | b)"
    batch = _quiet(hp.fit_batch, formula, frames, adjacency=AREAS, progress=False)
    assert [t.group for t in batch.terms] == ["area", "a", "b"]
    for d, frame in enumerate(frames):
        single = _quiet(hp.lmm, formula, frame, adjacency=AREAS)
        pd.testing.assert_series_equal(batch.hyperparameters.loc[d], single.hyperparameters()[
            batch.hyperparameters.columns], check_names=False, rtol=1e-12)
        for term in batch.terms[1:]:
            table = single.ranef[f"(1 | {term.group})"]
            np.testing.assert_allclose(term.b[d][:, 0], table["effect"], rtol=1e-12)
            np.testing.assert_allclose(term.cond_sd[d][:, 0], table["condsd"], rtol=1e-12)
            assert term.covariance[d][0, 0] == pytest.approx(single.hyperparameters()[f"sd_{term.group}"] ** 2)
        # theta: psi block by block in the batch's term order, then log sigma
        assert batch.theta[d][1:3] == pytest.approx(np.log([single.hyperparameters()["sd_a"],
                                                             single.hyperparameters()["sd_b"]]))
    posterior = _quiet(hp.bayes_batch, formula, frames, adjacency=AREAS, seed=2, progress=False, **SAMPLER)
    for d, frame in enumerate(frames):
        single = _quiet(hp.bayes, formula, frame, adjacency=AREAS, seed=2 + d, **SAMPLER)
        mine = posterior.hyperparameters.query("dataset == @d").set_index("parameter")["mean"]
        np.testing.assert_allclose(mine, single.hyperparameters()["mean"].reindex(mine.index), rtol=1e-12)


def test_a_dataset_whose_fixed_effects_differ_is_refused_in_its_row(pedigree_data):
    sets, inverse = pedigree_data
    males = sets["trait0"].query("sex == 'M'")  # no F: its intercept would be the males' mean
    weights = np.linspace(0.5, 2.0, len(sets["trait0"]))
    frame = pd.concat([sets["trait0"].assign(trait="all"), males.assign(trait="males")], ignore_index=True)
    batch = _quiet(hp.fit_batch, ANIMAL, frame, by="trait", weights=np.r_[weights, np.ones(len(males))],
                   relmat_inverse={"animal": inverse}, progress=False)
    assert "fixed effects are ['Intercept'], not the batch's" in batch.messages["males"]
    assert np.isnan(batch.fixef.loc["males"]).all()
    single = _quiet(hp.lmm, ANIMAL, sets["trait0"], weights=weights, relmat_inverse={"animal": inverse})
    assert batch.objective["all"] == pytest.approx(single.objective, rel=1e-12)  # an array's rows cut per dataset


def test_quadrature_rows_keep_the_batchs_checks_and_columns():
    rng = np.random.default_rng(8)
    herd = np.repeat(np.arange(10), 4)
    good = pd.DataFrame({"herd": herd, "x": rng.normal(size=40), "size": 8})
    good["k"] = rng.binomial(8, 0.3, size=40)
    frames = {"good": good, "none": good.assign(k=0), "flat": good.assign(x=1.0)}
    formula = "cbind(k, size - k) ~ x + (1 | herd)"
    batch = _quiet(hp.fit_batch, formula, frames, family="binomial", nAGQ=0, progress=False)
    single = _quiet(hp.glmm, formula, good, family="binomial", nAGQ=0)
    assert batch.refit["good"] and batch.objective["good"] == single.optimum.deviance
    np.testing.assert_array_equal(batch.fixef.loc["good"], single.fixef)
    assert "no successes" in batch.messages["none"] and np.isnan(batch.objective["none"])
    assert "rank" in batch.messages["flat"] and np.isnan(batch.objective["flat"])
    counts = {d: pd.DataFrame({"herd": herd, "x": rng.normal(size=40), "y": rng.negative_binomial(3, 0.4, 40)})
              for d in range(2)}
    nb = _quiet(hp.fit_batch, "y ~ x + (1 | herd)", counts, family="negative_binomial", nAGQ=0, progress=False)
    single = _quiet(hp.glmm, "y ~ x + (1 | herd)", counts[1], family="negative_binomial", nAGQ=0)
    assert nb.shape[1] == pytest.approx(single.shape, rel=1e-10) and "shape" in nb.to_frame().columns


def test_an_animal_models_simulations_can_keep_the_fitted_breeding_values(pedigree_data):
    sets, inverse = pedigree_data
    fit = _quiet(hp.lmm, ANIMAL, sets["trait0"], relmat_inverse={"animal": inverse})
    sims = hp.simulate(fit, 2000, seed=1, use_u=True).to_numpy()
    rows = pd.Index(fit.ranef["grp"]).get_indexer(sets["trait0"]["animal"])
    fitted = fit.design.X @ fit.fixef.to_numpy() + fit.ranef["condval"].to_numpy()[rows]
    np.testing.assert_allclose(sims.mean(axis=1), fitted, atol=5 * fit.sigma / np.sqrt(2000))


def test_fit_batch_fits_only_the_datasets_without_a_shared_design_one_by_one(pedigree_data, monkeypatch):
    """The spectral rows are used: hp.lmm runs for trait1 alone (its own rows), not for trait0 and trait2."""
    import hierpool.closedform as closedform

    sets, inverse = pedigree_data
    calls, lmm = [], closedform.lmm
    monkeypatch.setattr(closedform, "lmm", lambda formula, frame, **k: calls.append(len(frame)) or lmm(formula, frame,
                                                                                                           **k))
    chosen = {k: sets[k] for k in ("trait0", "trait1", "trait2")}
    batch = _quiet(hp.fit_batch, ANIMAL, chosen, by="trait", relmat_inverse={"animal": inverse}, progress=False)
    assert calls == [len(sets["trait1"])] and batch.converged.all()


def test_a_graphs_prior_is_built_once_for_every_fit():
    from hierpool.algebra.icar import car_prior
    from hierpool.spec.adjacency import graph

    g = graph(AREAS)
    assert car_prior(g, "bym2") is car_prior(g, "bym2") and car_prior(g, "icar") is not car_prior(g, "bym2")
    assert car_prior(graph(AREAS), "bym2") is not car_prior(g, "bym2")  # another Graph object: its own
