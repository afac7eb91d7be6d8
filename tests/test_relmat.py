"""hp.lmm(..., relmat= / relmat_inverse=): the animal model against lme4 fitted with A's Cholesky factor pushed into Z
(validation/relmat_reference.R and its JSON), and its bad input refused by name."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hierpool as hp

VALIDATION = Path(__file__).resolve().parents[1] / "validation"
REFERENCE = json.loads((VALIDATION / "relmat_reference.json").read_text())
FORMULA = "y ~ sex + (1 | animal)"


@pytest.fixture(scope="module")
def pedigree():
    return pd.read_csv(VALIDATION / "relmat_pedigree.csv", dtype=str)


@pytest.fixture(scope="module")
def phenotypes():
    return pd.read_csv(VALIDATION / "relmat_phenotypes.csv", dtype={"animal": str, "sex": str})


@pytest.fixture(scope="module")
def A(pedigree):
    return hp.pedigree.relationship_matrix(pedigree)


@pytest.fixture(scope="module")
def fits(pedigree, phenotypes, A):
    inverse = hp.pedigree.inverse_relationship_matrix(pedigree)
    return {(reml, form): hp.lmm(FORMULA, phenotypes, reml=reml, **({"relmat": {"animal": A}} if form == "A" else
                                                                   {"relmat_inverse": {"animal": inverse}}))
            for reml in (True, False) for form in ("A", "inverse")}


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("form", ["A", "inverse"])
def test_matches_lme4_with_the_cholesky_factor_in_z(fits, reml, form):
    fit, ref = fits[(reml, form)], REFERENCE["fits"]["REML" if reml else "ML"]
    assert fit.objective == pytest.approx(ref["criterion"], rel=1e-8)
    assert fit.sigma_a**2 == pytest.approx(ref["sigma2_A"], rel=1e-5)
    assert fit.sigma**2 == pytest.approx(ref["sigma2_E"], rel=1e-5)
    names = {"Intercept": "(Intercept)", "sex[M]": "sexM"}
    for name, value in fit.fixef.items():
        assert value == pytest.approx(ref["fixef"][names[name]], rel=1e-6)
        assert fit.fixef_se[name] == pytest.approx(ref["fixef_se"][names[name]], rel=1e-5)
    assert fit.heritability().estimate.iloc[0] == pytest.approx(ref["h2"], rel=1e-5)
    # breeding values of every animal of the pedigree, with records or without, in units of sigma_A
    bv = pd.DataFrame(ref["breeding_values"]).set_index("id")
    ranef = fit.ranef.set_index("grp")
    assert set(ranef.index) == set(bv.index) and (~ranef.recorded).sum() == REFERENCE["data"]["n_unrecorded_animals"]
    sigma_a = np.sqrt(ref["sigma2_A"])
    assert np.max(np.abs(ranef.loc[bv.index, "condval"] - bv["value"])) < 1e-4 * sigma_a
    assert np.max(np.abs(ranef.loc[bv.index, "condsd"] - np.sqrt(bv["pev"]))) < 1e-4 * sigma_a


def test_heritability_interval_is_the_profile_likelihoods(fits):
    fit = fits[(True, "inverse")]
    h2 = fit.heritability(level=0.9)
    assert 0 < h2.lower.iloc[0] < h2.estimate.iloc[0] < h2.upper.iloc[0] < 1
    # at each end the profiled criterion is the chi-square(1) 90% quantile above its minimum
    for end in (h2.lower.iloc[0], h2.upper.iloc[0]):
        theta = np.sqrt(end / (1 - end))
        value = fit._equations.evaluate(theta, True)[0]
        assert value - fit.objective == pytest.approx(2.705543454095404, abs=1e-5)
    assert "Heritability" in fit.summary() and "with records" in fit.summary()
    # one term: the repeatability is h^2, with the same interval
    pd.testing.assert_frame_equal(fit.repeatability(level=0.9).reset_index(drop=True), h2.reset_index(drop=True),
                                  rtol=1e-6)
    with pytest.raises(hp.ArgumentError, match="groups must be among"):
        fit.share(["sire"])


def test_bad_relationships_are_refused_by_name(phenotypes, A):
    missing = phenotypes.assign(animal=phenotypes["animal"].where(phenotypes.index != 0, "stranger"))
    with pytest.raises(hp.DataError, match="stranger"):
        hp.lmm(FORMULA, missing, relmat={"animal": A})
    singular = A.copy()
    singular.iloc[:, 1] = singular.iloc[:, 0]
    singular.iloc[1, :] = singular.iloc[0, :]
    with pytest.raises(hp.DataError, match="not positive definite"):
        hp.lmm(FORMULA, phenotypes, relmat={"animal": singular})
    skew = A.copy()
    skew.iloc[0, 1] += 0.1
    with pytest.raises(hp.DataError, match="not symmetric"):
        hp.lmm(FORMULA, phenotypes, relmat={"animal": skew})
    labels = list(A.index[:-1]) + [A.index[0]]
    twice = pd.DataFrame(A.to_numpy(), index=labels, columns=labels)
    with pytest.raises(hp.DataError, match="duplicated labels"):
        hp.lmm(FORMULA, phenotypes, relmat={"animal": twice})
    with pytest.raises(hp.ArgumentError, match=r"one scalar random-effect term of .animal.*Correlated \(vector\) terms"):
        hp.lmm("y ~ 1 + (1 + sex | animal)", phenotypes, relmat={"animal": A})
    with pytest.raises(hp.ArgumentError, match="dict keyed by grouping factor"):
        hp.lmm(FORMULA, phenotypes, relmat=A)
    with pytest.raises(hp.ArgumentError, match="correlation"):
        hp.lmm(FORMULA, phenotypes, relmat={"animal": A}, correlation=hp.ar1("animal"))


def test_unidentifiable_and_misnamed_relationships_are_refused(phenotypes, A):
    # unrelated animals with one record each: sigma_A^2 and sigma^2 cannot be told apart
    rng = np.random.default_rng(3)
    data = pd.DataFrame({"animal": [f"u{i}" for i in range(60)], "y": rng.normal(size=60)})
    identity = pd.DataFrame(np.eye(60), index=data.animal, columns=data.animal)
    with pytest.raises(hp.DataError, match="cannot tell the variance of 'animal' from the residual"):
        hp.lmm("y ~ 1 + (1 | animal)", data, relmat={"animal": identity})
    with pytest.raises(hp.ArgumentError, match="'aminal', which is not a grouping factor"):
        hp.lmm(FORMULA, phenotypes, relmat={"aminal": A})
    # an indefinite inverse with a zero pivot (SuperLU would swap rows and show positive pivots)
    import scipy.sparse

    swapped = scipy.sparse.csc_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(hp.DataError, match="not positive definite"):
        hp.lmm("y ~ 1 + (1 | animal)", data.iloc[:2], relmat_inverse={"animal": (swapped, ["u0", "u1"])})


def test_integer_ids_with_missing_parents(pedigree, phenotypes):
    # ids 1..400: read back from CSV, a parent column with blanks is floats (12.0), which must still be animal 12
    number = {label: i + 1 for i, label in enumerate(pedigree["id"])}
    numeric = pd.DataFrame({"id": pedigree["id"].map(number),
                            "sire": pedigree["sire"].map(number).astype(float),
                            "dam": pedigree["dam"].map(number).astype(float).fillna(0.0)})  # 0.0: unknown too
    assert numeric["sire"].dtype == float
    ped = hp.pedigree.prepare(numeric)
    assert ped.n == 400 and set(ped.ids) == {str(i) for i in range(1, 401)}
    fit = hp.lmm(FORMULA, phenotypes.assign(animal=phenotypes["animal"].map(number)),
                 relmat_inverse={"animal": hp.pedigree.inverse_relationship_matrix(numeric)})
    assert fit.heritability().estimate.iloc[0] == pytest.approx(REFERENCE["fits"]["REML"]["h2"], rel=1e-5)


@pytest.mark.parametrize("reml", [True, False])
def test_permanent_environment_beside_the_relationship_term(pedigree, phenotypes, reml):
    # lme4 with the same two terms (validation/relmat_reference.R, "fits_pe"): sigma_PE^2 is at its bound 0 there
    ref = REFERENCE["fits_pe"]["REML" if reml else "ML"]
    with pytest.warns(hp.ConvergenceWarning, match="'pe' is \\(near\\) zero"):
        fit = hp.lmm("y ~ sex + (1 | animal) + (1 | pe)", phenotypes.assign(pe=phenotypes["animal"]), reml=reml,
                     relmat_inverse={"animal": hp.pedigree.inverse_relationship_matrix(pedigree)})
    assert fit.objective == pytest.approx(ref["criterion"], rel=1e-8)
    variances = fit.varcorr.set_index("grp")["vcov"]
    assert variances["animal"] == pytest.approx(ref["sigma2_A"], rel=1e-5)
    assert variances["Residual"] == pytest.approx(ref["sigma2_E"], rel=1e-5)
    assert variances["pe"] < 1e-6 * ref["sigma2_E"]
    shares = fit.variance_shares()
    assert shares["animal"] + shares["pe"] == pytest.approx(ref["repeatability"], rel=1e-5)
    bv = pd.DataFrame(ref["breeding_values"]).set_index("id")["value"]
    ranef = fit.ranef[fit.ranef.grpvar == "animal"].set_index("grp")["condval"]
    assert np.max(np.abs(ranef.loc[bv.index] - bv)) < 1e-4 * np.sqrt(ref["sigma2_A"])


def test_two_terms_at_an_interior_optimum_equal_the_dense_likelihood(pedigree, A):
    # a permanent environment that is there (sigma_PE^2 = 1): the criterion at the fit equals the dense REML one
    # from V = sigma_A^2 Z_a A Z_a' + sigma_PE^2 Z_p Z_p' + sigma^2 I, and the dense criterion is at its minimum
    rng = np.random.default_rng(11)
    animals = rng.choice(A.index, 150, replace=False)
    a = pd.Series(np.linalg.cholesky(A.to_numpy()) @ rng.normal(0, 1.2, len(A)), index=A.index)
    pe = pd.Series(rng.normal(0, 1.0, 150), index=animals)
    data = pd.DataFrame({"animal": np.repeat(animals, 3)})
    data["y"] = 5 + a.loc[data.animal].to_numpy() + pe.loc[data.animal].to_numpy() + rng.normal(0, 1.0, len(data))
    data["pe"] = data["animal"]
    fit = hp.lmm("y ~ 1 + (1 | animal) + (1 | pe)", data,
                 relmat_inverse={"animal": hp.pedigree.inverse_relationship_matrix(pedigree)})
    Za = (data.animal.to_numpy()[:, None] == A.index.to_numpy()[None, :]).astype(float)
    Zp = (data.animal.to_numpy()[:, None] == animals[None, :]).astype(float)
    X, y, n = np.ones((len(data), 1)), data.y.to_numpy(), len(data)

    def dense(log_ratios):  # REML criterion with sigma^2 profiled, at (sigma_A / sigma, sigma_PE / sigma)
        ra, rp = np.exp(2 * np.asarray(log_ratios))
        V0 = ra * Za @ A.to_numpy() @ Za.T + rp * Zp @ Zp.T + np.eye(n)
        Vi = np.linalg.inv(V0)
        beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
        r = y - X @ beta
        return ((n - 1) * (1 + np.log(2 * np.pi * (r @ Vi @ r) / (n - 1))) + np.linalg.slogdet(V0)[1]
                + np.linalg.slogdet(X.T @ Vi @ X)[1])

    theta = fit.theta[[t.group for t in fit.design.terms].index("animal")], \
        fit.theta[[t.group for t in fit.design.terms].index("pe")]
    at = np.log(theta)
    assert fit.objective == pytest.approx(dense(at), rel=1e-10)
    for step in (np.array([1e-3, 0]), np.array([0, 1e-3])):
        assert (dense(at + step) - dense(at - step)) / 2e-3 == pytest.approx(0, abs=2e-3)
    assert fit.variance_shares()["pe"] > 0.1
    # the repeatability (animal + permanent environment) with its profile interval: at each end the criterion,
    # minimized over how the two variances split, is the chi-square(1) quantile above its minimum
    rep = fit.repeatability()
    shares = fit.variance_shares()
    assert rep.estimate.iloc[0] == pytest.approx(shares["animal"] + shares["pe"], rel=1e-12)
    assert 0 < rep.lower.iloc[0] < rep.estimate.iloc[0] < rep.upper.iloc[0] < 1


def test_share_profiles_leave_a_variance_estimated_at_zero():
    # 12 animals, a permanent environment estimated at 0 and a herd term: at h^2 near 0 the profile (over pe, herd
    # and the residual) is below the cut once pe is let off its bound (a dense profile: 1.29 below), so the h^2
    # interval reaches 0; a descent started at pe's bound stayed there and reported 0.20
    rng = np.random.default_rng(1)
    ids = [f"a{i:02d}" for i in range(12)]
    ped = pd.DataFrame({"id": ids, "sire": [None] * 4 + [ids[rng.integers(0, 2)] for _ in ids[4:]],
                        "dam": [None] * 4 + [ids[rng.integers(2, 4)] for _ in ids[4:]]})
    A = hp.pedigree.relationship_matrix(ped)
    rec = rng.choice(ids[2:], 60)
    d = pd.DataFrame({"animal": rec, "pe": rec, "herd": [f"h{i}" for i in rng.integers(0, 4, 60)],
                      "pen": [f"p{i:02d}" for i in rng.integers(0, 30, 60)], "x": rng.normal(size=60)})
    a = pd.Series(np.linalg.cholesky(A.to_numpy()) @ rng.normal(size=12) * 1.2, index=A.index)
    herd = dict(zip([f"h{i}" for i in range(4)], rng.normal(0, 1, 4)))
    pen = dict(zip([f"p{i:02d}" for i in range(30)], rng.normal(0, 0.8, 30)))
    pe = dict(zip(ids, rng.normal(0, 0.7, 12)))
    d["y"] = (2 + 0.5 * d.x + a.loc[d.animal].to_numpy() + d.herd.map(herd) + d.pen.map(pen) + d.pe.map(pe)
              + rng.normal(0, 1, 60))
    with pytest.warns(hp.ConvergenceWarning, match="'pe' is \\(near\\) zero"):
        fit = hp.lmm("y ~ x + (1 | animal) + (1 | pe) + (1 | herd)", d, relmat={"animal": A})
    h2 = fit.heritability()
    assert h2.lower.iloc[0] == 0.0 and h2.estimate.iloc[0] < h2.upper.iloc[0] < 1


# --- hp.bayes(..., relmat=): the collapsed posterior and its exact effect draws -----------------------------------

@pytest.fixture(scope="module")
def inverse(pedigree):
    return hp.pedigree.inverse_relationship_matrix(pedigree)


@pytest.fixture(scope="module")
def posterior(phenotypes, inverse):
    return hp.bayes(FORMULA, phenotypes, relmat_inverse={"animal": inverse}, chains=2, draws=600, seed=3)


def test_the_collapsed_density_is_the_dense_marginal_likelihood(phenotypes, A):
    import scipy.stats

    from hierpool.bayesian.priors import resolve_priors
    from hierpool.bayesian.relmat import AnimalPosterior
    from hierpool.closedform.relmat import relmat_equations
    from hierpool.spec.design import build_design
    from hierpool.spec.relationship import relationships

    data = phenotypes.iloc[:60]
    rel = relationships({"animal": A}, None)["animal"]
    design = build_design(FORMULA, data, related=("animal",))
    priors = resolve_priors(design, None)
    post = AnimalPosterior(relmat_equations(design, rel)[0], priors)
    loc, scale = priors.beta_gaussian()
    # y ~ N(X m, sigma^2 I + sigma_A^2 Z A Z' + X diag(s^2) X'), every level of A in Z's columns
    Z = np.zeros((design.n, len(rel.labels)))
    Z[np.arange(design.n), pd.Index(rel.labels).get_indexer(design.terms[0].levels[design.terms[0].index])] = 1.0
    dense_a = A.loc[rel.labels, rel.labels].to_numpy()
    for psi in ([0.1, 0.5], [-1.0, 0.2], [0.8, -0.3]):
        sd_a, sigma = np.exp(psi)
        cov = sigma**2 * np.eye(design.n) + sd_a**2 * Z @ dense_a @ Z.T + design.X @ np.diag(scale**2) @ design.X.T
        dense = scipy.stats.multivariate_normal(design.X @ loc, cov).logpdf(design.y)
        assert post.evaluate(psi).log_pi - float(post.log_prior(np.asarray(psi))) == pytest.approx(dense, abs=1e-8)


def test_with_variances_held_the_posterior_is_the_blups(phenotypes, inverse, fits):
    # flat priors on beta and the REML variances held: the exact draws' means and sds are the BLUPs and their
    # prediction error sds (Monte-Carlo units), for every animal of A, recorded or not
    fit = fits[(True, "inverse")]
    held = hp.bayes(FORMULA, phenotypes, relmat_inverse={"animal": inverse}, variance=fit, chains=2, draws=1000,
                    priors={"Intercept": "flat", "b": "flat"}, seed=4)
    assert held.method == "exact" and "sd_animal" not in held.idata.posterior
    ours, closed = held.ranef.set_index("grp"), fit.ranef.set_index("grp")
    assert len(ours) == len(closed) == 400
    z = (ours["mean"] - closed.loc[ours.index, "condval"]) / ours["mcse_mean"]
    assert np.max(np.abs(z)) < 4.5
    np.testing.assert_allclose(ours["sd"], closed.loc[ours.index, "condsd"], rtol=0.12)
    zf = (held.fixef["mean"] - fit.fixef) / held.fixef["mcse_mean"]
    assert np.max(np.abs(zf)) < 4.0
    np.testing.assert_allclose(held.fixef["sd"], fit.fixef_se, rtol=0.08)


def test_the_collapsed_sampler_draws_the_posterior_of_psi(posterior, phenotypes, inverse, A):
    # the sampler's mean of (log sd_A, log sigma) against a quadrature of the same density on a fine grid
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.bayesian.relmat import AnimalPosterior
    from hierpool.closedform.relmat import relmat_equations
    from hierpool.spec.design import build_design
    from hierpool.spec.relationship import relationships

    rel = relationships(None, {"animal": inverse})["animal"]
    design = build_design(FORMULA, phenotypes, related=("animal",))
    post = AnimalPosterior(relmat_equations(design, rel)[0], resolve_priors(design, None))
    psi_a = np.log(posterior.idata.posterior["sd_animal"].values[..., 0]).ravel()
    psi_e = np.log(posterior.idata.posterior["sigma"].values).ravel()
    grid_a = np.linspace(psi_a.mean() - 6 * psi_a.std(), psi_a.mean() + 6 * psi_a.std(), 61)
    grid_e = np.linspace(psi_e.mean() - 6 * psi_e.std(), psi_e.mean() + 6 * psi_e.std(), 41)
    log_pi = np.array([[post.log_density([a, e]) for e in grid_e] for a in grid_a])
    weight = np.exp(log_pi - log_pi.max())
    weight /= weight.sum()
    exact_a, exact_e = (weight.sum(axis=1) @ grid_a), (weight.sum(axis=0) @ grid_e)
    import arviz as az

    for draws, exact in ((psi_a, exact_a), (psi_e, exact_e)):
        mcse = float(az.mcse(draws.reshape(2, -1)))
        assert abs(draws.mean() - exact) < 4 * mcse
    summary = posterior.diagnostics()
    assert summary["max_r_hat"].max() < 1.01 and summary.loc["sd_animal", "min_ess_bulk"] > 300
    h2 = posterior.idata.posterior["heritability"].values
    sd_a, sigma = posterior.idata.posterior["sd_animal"].values[..., 0], posterior.idata.posterior["sigma"].values
    np.testing.assert_allclose(h2, sd_a**2 / (sd_a**2 + sigma**2))
    # every animal of the pedigree has a posterior, those without records too
    assert posterior.ranef.shape[0] == 400 and posterior.method == "collapsed"


def test_bayes_relmat_refuses_what_it_does_not_sample(phenotypes, inverse, fits):
    import numpyro.distributions as dist

    for kwargs, message in (({"method": "independence"}, "collapsed sampler"),
                            ({"family": "poisson"}, "Gaussian response"),
                            ({"variance": 1.0}, "RelmatResult"),
                            ({"priors": {"b": dist.StudentT(3.0, 0.0, 1.0)}}, "Normal or 'flat'")):
        with pytest.raises(hp.HierpoolError, match=message):
            hp.bayes(FORMULA, phenotypes, relmat_inverse={"animal": inverse}, chains=1, draws=10, **kwargs)


def test_blup_agreement_with_a_relationship_matrix(pedigree, phenotypes):
    # NUTS on the plain model (b = sd L_A z, A's dense Cholesky factor) with the REML variances held reproduces the
    # sparse equations' BLUPs and prediction error sds of every animal of a 150-animal sub-pedigree (the first 100's
    # REML fit is singular, theta 1e-4: every breeding value was its prior, and no BLUP informed by the data was
    # compared; here theta is 0.54)
    sub = pedigree.iloc[:150]
    data = phenotypes[phenotypes.animal.isin(sub.id)]
    inverse = hp.pedigree.inverse_relationship_matrix(sub)
    # tune 500: a dense mass matrix of ~100 dimensions needs the longer windows (with 300, ~900 leapfrog steps a draw)
    report = hp.validate.blup_agreement(FORMULA, data, relmat_inverse={"animal": inverse}, chains=2, draws=200,
                                        tune=500, seed=5)
    assert report.passed, report.summary()
    assert (report.table.effect == "ranef").sum() == 150 and not report.fit.is_singular
    # method="full" samples the animal model and reports h2: a short chain shows it
    post = hp.bayes(FORMULA, data, relmat_inverse={"animal": inverse}, method="full", chains=1, draws=40, tune=40,
                    seed=6)
    assert post.method == "full" and "heritability" in post.idata.posterior


def test_sbc_of_the_animal_model_passes():
    """validation/relmat_validation.json (200 replications) passed, sd_animal and sigma ranked with the rest; and a
    short live run of the same study on the same design."""
    import json

    from validation.relmat_validation import SETTINGS, sbc_data

    study = json.loads((VALIDATION / "relmat_validation.json").read_text())["sbc"]
    assert study["n_reps"] >= 200 and study["passed"]
    assert {"sigma", "sd[animal:Intercept]", "b[animal:Intercept:f000]"} <= {row["parameter"] for row in study["tests"]}
    data, inverse = sbc_data()
    live = hp.validate.sbc("y ~ x + (1 | animal)", data, n_reps=3, relmat_inverse={"animal": inverse},
                           **{**SETTINGS, "bins": 3})
    # f000 is a founder without a record: its breeding value is drawn over all of A and ranked all the same
    assert live.ranks["b[animal:Intercept:f000]"].between(0, SETTINGS["n_draws"]).all()


def test_coverage_study_of_the_animal_model():
    """validation/relmat_validation.json's coverage section (200 replications): the heritability's intervals (profile
    and posterior), the fixed effect's and the posterior's breeding-value intervals are near nominal; the BLUP's
    intervals, which take the estimated variances as known (h^2 from 100 records), fall short, by less than 0.1;
    and a short live run."""
    import json

    study = json.loads((VALIDATION / "relmat_validation.json").read_text())["coverage"]
    assert study["n_reps"] >= 200
    table = {row["interval"]: row for row in study["table"]}
    assert len(table) == 5
    for name, row in table.items():
        if name != "breeding value (BLUP)":
            assert abs(row["coverage"] - 0.95) < max(3 * row["mcse"], 0.025), (name, row["coverage"])
    assert 0.85 < table["breeding value (BLUP)"]["coverage"] < table["breeding value (posterior)"]["coverage"]
    live = hp.validate.relmat_coverage(n_reps=2, seed=4).set_index("interval")
    assert live.loc["breeding value (BLUP)", "n"] == 220 and 0.85 <= live.loc["breeding value (BLUP)", "coverage"]


def test_a_scalar_slope_with_an_identity_relationship_is_the_ordinary_mixed_model():
    # (0 + x | g) with A = I beside (1 | h): the sparse equations' fit equals the blocked algebra's, REML and ML
    rng = np.random.default_rng(8)
    g, h = rng.integers(0, 30, 400), rng.integers(0, 12, 400)
    x = rng.normal(size=400)
    data = pd.DataFrame({"g": [f"g{i:02d}" for i in g], "h": [f"h{i:02d}" for i in h], "x": x,
                         "y": 1 + 0.5 * x + rng.normal(0, 0.8, 30)[g] * x + rng.normal(0, 0.6, 12)[h]
                         + rng.normal(size=400)})
    labels = sorted(set(data.g))
    identity = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels)
    formula = "y ~ x + (0 + x | g) + (1 | h)"
    for reml in (True, False):
        ours = hp.lmm(formula, data, reml=reml, relmat={"g": identity})
        plain = hp.lmm(formula, data, reml=reml)
        assert ours.objective == pytest.approx(plain.objective, rel=1e-8)
        np.testing.assert_allclose(ours.fixef.to_numpy(), plain.fixef.to_numpy(), rtol=1e-6)
        ours_ranef = ours.ranef.set_index(["grpvar", "grp"])
        plain_ranef = plain.ranef.set_index(["grpvar", "grp"])
        np.testing.assert_allclose(ours_ranef.loc[plain_ranef.index, "condval"], plain_ranef.condval, atol=1e-5)
        assert set(ours.ranef.term) == {"x", "Intercept"}
    with pytest.raises(hp.HierpoolError, match="scalar"):
        hp.lmm("y ~ x + (x | g)", data, relmat={"g": identity})


def test_the_animal_model_sampler_with_an_identity_relationship_is_the_collapsed_samplers_posterior():
    # A = I: hp.bayes(relmat=) (independence MH on the sparse equations' marginal) and hp.bayes without it (NUTS on
    # the blocked algebra's marginal) sample one posterior: their means agree in Monte-Carlo units
    import arviz as az

    rng = np.random.default_rng(9)
    g = rng.integers(0, 25, 200)
    x = rng.normal(size=200)
    data = pd.DataFrame({"g": [f"g{i:02d}" for i in g], "x": x,
                         "y": 1 + 0.5 * x + rng.normal(0, 1.0, 25)[g] + rng.normal(size=200)})
    labels = sorted(set(data.g))
    identity = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels)
    formula = "y ~ x + (1 | g)"
    ours = hp.bayes(formula, data, relmat={"g": identity}, chains=2, draws=1000, seed=1)
    theirs = hp.bayes(formula, data, chains=2, draws=1000, seed=2)
    for name in ("beta", "sd_g", "sigma"):
        a, b = ours.idata.posterior[name], theirs.idata.posterior[name]
        se = np.sqrt(np.asarray(az.mcse(ours.idata, var_names=[name])[name]) ** 2
                     + np.asarray(az.mcse(theirs.idata, var_names=[name])[name]) ** 2)
        z = (a.mean(("chain", "draw")).values - b.mean(("chain", "draw")).values) / se
        assert np.all(np.abs(z) < 4.5), (name, z)


def test_a_response_the_fixed_effects_fit_exactly_is_refused_by_name(phenotypes, A):
    exact = phenotypes.assign(y=2.0 + 3.0 * (phenotypes["sex"] == "M"))  # SuperLU's RuntimeError before
    with pytest.raises(hp.DataError, match="fit the response exactly"):
        hp.lmm(FORMULA, exact, relmat={"animal": A})


def test_a_covariate_far_from_zero_is_the_centred_models_fit(phenotypes, A):
    """The animal model's equations were of the user's X: a covariate at 3e6 + x (x ~ N(0, 1)) moved REML's
    criterion by 9.7 and the slope by 5%, reported converged.  They are now of X A (algebra.conditioning), the
    criterion and beta mapped back."""
    data = phenotypes.assign(x=np.random.default_rng(4).normal(size=len(phenotypes)))
    formula = "y ~ sex + x + (1 | animal)"
    centred = hp.lmm(formula, data, relmat={"animal": A})
    moved = hp.lmm(formula, data.assign(x=data.x + 3e6), relmat={"animal": A})
    assert moved.objective == pytest.approx(centred.objective, rel=1e-11)
    assert moved.fixef["x"] == pytest.approx(centred.fixef["x"], rel=1e-8)
    assert moved.fixef_se["x"] == pytest.approx(centred.fixef_se["x"], rel=1e-7)
    assert moved.heritability().estimate.iloc[0] == pytest.approx(centred.heritability().estimate.iloc[0], rel=1e-6)
    # predictions' se from the equations of X A (x' Cov(beta) x at x ~ 3e6 would cancel most digits)
    new = data.iloc[:4]
    for interval in ("confidence", "prediction"):
        for re in (True, False):
            np.testing.assert_allclose(moved.predict(new.assign(x=new.x + 3e6), re=re, interval=interval),
                                       centred.predict(new, re=re, interval=interval), rtol=1e-6)


def test_a_relationship_labelled_by_floats_meets_its_levels(pedigree, phenotypes, A):
    """A relationship matrix whose labels are whole-number floats (an id column read with a blank) was labelled
    '12.0' where the data's levels (and the pedigree's ids) are '12': refused, listing every level as missing."""
    number = {label: float(i + 1) for i, label in enumerate(A.index)}
    floats = A.set_axis([number[i] for i in A.index], axis=0).set_axis([number[i] for i in A.columns], axis=1)
    fit = hp.lmm(FORMULA, phenotypes.assign(animal=phenotypes["animal"].map(number)), relmat={"animal": floats})
    assert fit.heritability().estimate.iloc[0] == pytest.approx(REFERENCE["fits"]["REML"]["h2"], rel=1e-5)


def test_fitted_coef_and_predictions_with_an_identity_relationship_are_the_ordinary_mixed_models():
    """With A = I (and a level of A without records) the animal model's fitted values, residuals, coef and predictions
    (confidence and prediction intervals, a level of A without records, a level of neither, re=False) are the
    blocked algebra's: an animal of A without records predicts as a new level does (its BLUP 0, its variance
    sigma_A^2), and so does a level outside A."""
    rng = np.random.default_rng(9)
    g, h = rng.integers(0, 20, 300), rng.integers(0, 8, 300)
    x = rng.normal(size=300)
    data = pd.DataFrame({"g": [f"g{i:02d}" for i in g], "h": [f"h{i:02d}" for i in h], "x": x,
                         "y": 1 + 0.5 * x + rng.normal(0, 0.8, 20)[g] + rng.normal(0, 0.6, 8)[h]
                         + rng.normal(size=300)})
    labels = sorted(set(data.g)) + ["g98"]
    identity = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels)
    formula = "y ~ x + (1 | g) + (1 | h)"
    ours = hp.lmm(formula, data, relmat={"g": identity})
    plain = hp.lmm(formula, data)
    assert ours.objective == pytest.approx(plain.objective, rel=1e-8)
    np.testing.assert_allclose(ours.fitted, plain.fitted, atol=1e-5)
    np.testing.assert_allclose(ours.residuals, data["y"] - ours.fitted, atol=1e-12)
    for group in ("g", "h"):
        np.testing.assert_allclose(ours.coef[group].loc[plain.coef[group].index], plain.coef[group], atol=1e-5)
    assert ours.coef["g"].loc["g98", "Intercept"] == pytest.approx(ours.fixef["Intercept"], abs=1e-12)
    new = pd.DataFrame({"g": ["g03", "g98", "g99", "g07"], "h": ["h01", "h02", "h05", "h99"],
                        "x": [0.2, -1.0, 2.0, 0.5]}, index=list("abcd"))
    new_level = new.replace({"g98": "g97"})  # the plain model has no g98: a new level, as for the animal model
    for re in (True, False):
        for interval in ("confidence", "prediction"):
            got = ours.predict(new, re=re, interval=interval, level=0.9)
            want = plain.predict(new_level, re=re, interval=interval, level=0.9)
            assert list(got.index) == list("abcd")
            np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.predict(), ours.fitted, atol=1e-12)
    with pytest.raises(hp.HierpoolError, match="interval"):
        ours.predict(new, interval="credible")
    with pytest.raises(hp.HierpoolError, match="re must be"):
        ours.predict(new, re=None)


def test_predictions_of_animals_are_the_dense_mixed_model_equations(pedigree, phenotypes, A, fits):
    """A prediction's se is sigma sqrt(v' C^-1 v) of the dense mixed-model equations over every animal of the
    pedigree (v = [x; z e_animal]): for an animal with records, one without (its BLUP from its relatives') and one
    outside the pedigree (b = 0 and sigma_A^2 added); the prediction interval adds sigma_A^2 A_ll for the last and
    the noise; at re=False, x' Cov(beta) x plus sigma_A^2 A_ll and the noise for every row."""
    fit = fits[(True, "A")]
    ranef = fit.ranef
    inbred = ranef["grp"].map(pd.Series(np.diag(A.to_numpy()), index=A.index)) > 1  # A_ll = 1 + F is not 1
    recorded = ranef.loc[ranef.recorded & inbred, "grp"].iloc[3]
    unrecorded = ranef.loc[~ranef.recorded & inbred, "grp"].iloc[-1]
    new = pd.DataFrame({"animal": [recorded, unrecorded, "nobody"], "sex": ["M", "F", "F"]})
    labels = list(A.index)
    Z = (phenotypes["animal"].to_numpy()[:, None] == np.array(labels)[None, :]).astype(float)
    X = np.column_stack([np.ones(len(phenotypes)), phenotypes["sex"] == "M"]).astype(float)
    a = A.to_numpy()
    C = np.block([[X.T @ X, X.T @ Z], [Z.T @ X, Z.T @ Z + np.linalg.inv(a) / fit.theta[0] ** 2]])
    c_inv = np.linalg.inv(C)
    sigma2, sigma2_a = fit.sigma**2, fit.sigma_a**2
    bv = ranef.set_index("grp")["condval"]
    confidence = fit.predict(new, interval="confidence")
    prediction = fit.predict(new, interval="prediction")
    population = fit.predict(new, re=False, interval="prediction")
    for i, row in new.iterrows():
        x = np.array([1.0, row["sex"] == "M"])
        v = np.concatenate([x, np.array(labels) == row["animal"]]).astype(float)
        a_ll = a[labels.index(row["animal"]), labels.index(row["animal"])] if row["animal"] in labels else 1.0
        unknown = sigma2_a * a_ll * (row["animal"] not in labels)
        assert confidence["fit"][i] == pytest.approx(x @ fit.fixef + bv.get(row["animal"], 0.0), rel=1e-10)
        assert confidence["se"][i] ** 2 == pytest.approx(sigma2 * v @ c_inv @ v + unknown, rel=1e-7)
        assert prediction["se"][i] ** 2 == pytest.approx(sigma2 * v @ c_inv @ v + unknown + sigma2, rel=1e-7)
        assert population["se"][i] ** 2 == pytest.approx(sigma2 * x @ c_inv[:2, :2] @ x + sigma2_a * a_ll + sigma2,
                                                          rel=1e-7)
    np.testing.assert_allclose(fit.residuals, phenotypes["y"] - fit.fitted, atol=1e-12)
