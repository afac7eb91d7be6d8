"""hp.fit_batch(formula, data, responses=Y): many responses on one design (hierpool.batch.shared_design), each
dataset's row equal to the long frame's (data repeated, its response the column's) and so to hp.lmm's fit."""

import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_fits

import hierpool as hp
from hierpool.algebra.statistics import shared_design_statistics, sufficient_statistics
from hierpool.batch import fit as fit_module
from hierpool.batch.shared_design import Responses, one_design_in_long_frame, responses_long_frame

SLEEP = "Reaction ~ Days + (Days | Subject)"
N_RESPONSES = 12


@pytest.fixture(scope="module")
def design():
    """One sleepstudy-shaped dataset's rows (the design), with weights and an offset (noisy: not aliased with X)."""
    rng = np.random.default_rng(7)
    data = hp.datasets.sleepstudy_replicates(1, seed=3).drop(columns="dataset")
    return data.assign(w=rng.uniform(0.3, 3.0, len(data)), off=2.0 * data.Days + rng.normal(0, 3, len(data)))


@pytest.fixture(scope="module")
def responses(design):
    """N_RESPONSES responses simulated from the design's fit, as a DataFrame labelled by text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fit = hp.lmm(SLEEP, design)
    simulated = hp.simulate(fit, N_RESPONSES, seed=11).to_numpy()
    return pd.DataFrame(simulated, index=design.index, columns=[f"r{j}" for j in range(N_RESPONSES)])


def long_frame(design, responses):
    """The datasets stacked: the design once per response, its Reaction the response's, labelled by ``dataset``."""
    frame = design.iloc[np.tile(np.arange(len(design)), responses.shape[1])].reset_index(drop=True)
    frame["Reaction"] = responses.to_numpy().T.ravel()
    frame["dataset"] = np.repeat(np.asarray(responses.columns), len(design))
    return frame


def fit_stacked(formula, frame, **kwargs):
    """hp.fit_batch on the long frame's own path (each dataset's statistics from its rows of the frame): a long frame
    whose datasets share one design would otherwise be fitted as responses on it (``one_design_in_long_frame``)."""
    with mock.patch.object(fit_module, "_shared_design_of_long_frame", lambda *args: None):
        return hp.fit_batch(formula, frame, **kwargs)


def assert_rows_equal(shared, stacked):
    """Two batches of the same datasets: the same rows (the statistics' sums differ in order alone)."""
    assert list(shared.datasets) == list(stacked.datasets)
    assert not shared.refit.any() and not stacked.refit.any()
    np.testing.assert_allclose(shared.objective, stacked.objective, rtol=1e-12)
    np.testing.assert_allclose(shared.beta, stacked.beta, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(shared.theta, stacked.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(shared.sigma, stacked.sigma, rtol=1e-8)
    np.testing.assert_allclose(shared.beta_se, stacked.beta_se, rtol=1e-6)
    for ours, theirs in zip(shared.terms, stacked.terms):
        for d in range(len(shared.datasets)):
            np.testing.assert_allclose(ours.b[d], theirs.b[d], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ours.cond_sd[d], theirs.cond_sd[d], rtol=1e-6)
            np.testing.assert_array_equal(ours.levels[d], theirs.levels[d])
    assert list(shared.messages) == list(stacked.messages)
    np.testing.assert_array_equal(shared.converged, stacked.converged)


def test_the_shared_statistics_equal_the_stacked_rows():
    """The specialisation equals the general statistics of the datasets stacked, weights and offset included."""
    rng = np.random.default_rng(1)
    n, n_datasets, ell = 60, 40, 6
    level = np.repeat(np.arange(ell), n // ell)
    X = np.c_[np.ones(n), rng.normal(size=(n, 2))]
    z = X[:, :2]
    Y = rng.normal(size=(n, n_datasets)) * 5 + 1e4  # a large location: the shift's refinement matters
    weights, offset = rng.uniform(0.5, 2, n), rng.normal(size=n)
    for w, o in ((None, None), (weights, offset)):
        shared = shared_design_statistics(level, X, z, Y, ell, w, o)
        stacked = sufficient_statistics(np.repeat(np.arange(n_datasets), n), np.tile(level, n_datasets),
                                        np.tile(X, (n_datasets, 1)), np.tile(z, (n_datasets, 1)), Y.T.ravel(),
                                        n_datasets, ell, None if w is None else np.tile(w, n_datasets),
                                        None if o is None else np.tile(o, n_datasets))
        for name in ("ztz", "ztx", "zty", "xtx", "yty", "n", "log_weights", "beta_shift"):
            ours, theirs = getattr(shared, name), getattr(stacked, name)
            assert ours.shape == theirs.shape, name
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * np.abs(theirs).max(), err_msg=name)
        # X'W r is zero up to rounding of the location's fit, in both
        scale = np.abs(shared.zty).max()
        np.testing.assert_allclose(shared.xty, stacked.xty, atol=1e-12 * scale)
    # one block of datasets or several: the same numbers
    blocks = pytest.MonkeyPatch.context()
    with blocks as patch:
        patch.setattr("hierpool.algebra.statistics.SHARED_BLOCK_VALUES", n * 7)
        in_blocks = shared_design_statistics(level, X, z, Y, ell, weights, offset)
    # (to the rounding of a response's location: the products' sums run in other orders)
    rounding = 1e-14 * np.abs(Y).max() * n
    np.testing.assert_allclose(in_blocks.zty, shared.zty, rtol=0, atol=rounding)
    np.testing.assert_allclose(in_blocks.yty, shared.yty, rtol=1e-12)
    np.testing.assert_allclose(in_blocks.beta_shift, shared.beta_shift, rtol=0,
                               atol=1e-14 * np.abs(shared.beta_shift).max())


@pytest.mark.parametrize("case", ["reml", "ml, weights and offset", "known sds", "a covariate far from centred"])
def test_each_response_equals_its_dataset_of_the_long_frame(design, responses, case):
    data, kwargs = design, {}
    if case == "ml, weights and offset":
        kwargs = {"reml": False, "weights": design.w.to_numpy(), "offset": "off"}
    elif case == "known sds":
        data, kwargs = design.assign(se=10.0 + design.w), {"se": "se"}
    elif case == "a covariate far from centred":  # conditioned (hierpool.batch.conditioning), then mapped back
        data = design.assign(Days=design.Days + 2000.0)
    shared = hp.fit_batch(SLEEP, data, responses=responses, progress=False, **kwargs)
    stacked_kwargs = dict(kwargs)
    if isinstance(kwargs.get("weights"), np.ndarray):
        stacked_kwargs["weights"] = np.tile(kwargs["weights"], N_RESPONSES)
    stacked = fit_stacked(SLEEP, long_frame(data, responses), progress=False, **stacked_kwargs)
    assert_rows_equal(shared, stacked)
    assert shared.datasets.name == "dataset"


def test_the_compiled_programs_equal_the_host_search(design, responses, monkeypatch):
    """The shared statistics through the compiled path too (a GPU's), float32 beside float64."""
    array = responses.to_numpy()
    host = hp.fit_batch(SLEEP, design, responses=array, progress=False)
    monkeypatch.setattr(fit_module, "_on_host", lambda *a: False)
    compiled = hp.fit_batch(SLEEP, design, responses=array, progress=False)
    assert_same_fits(host, compiled, same_steps=False)
    single = compiled.objective.to_numpy()
    as_float32 = hp.fit_batch(SLEEP, design, responses=array, progress=False, dtype="float32")
    np.testing.assert_allclose(as_float32.objective, single, rtol=1e-5)
    assert list(host.datasets) == list(range(N_RESPONSES))


def test_rows_data_drops_are_dropped_for_every_response(design, responses):
    """A row missing a design value is dropped for every dataset (counted once in the warning), whatever its
    responses hold there; nothing the user passed is modified."""
    data = design.copy()
    data.loc[data.index[[4, 40]], "Days"] = np.nan
    values = responses.copy()
    values.iloc[4] = np.nan  # (at a dropped row: not read)
    before_data, before_values = data.copy(), values.copy()
    with pytest.warns(hp.HierpoolWarning, match=r"dropped 2 of 180 rows with missing values \(Days: 2\)"):
        shared = hp.fit_batch(SLEEP, data, responses=values, progress=False)
    pd.testing.assert_frame_equal(data, before_data)
    pd.testing.assert_frame_equal(values, before_values)
    kept = data.Days.notna().to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        stacked = fit_stacked(SLEEP, long_frame(data[kept], values[kept]), progress=False)
    assert_rows_equal(shared, stacked)


@pytest.mark.parametrize("formula", [SLEEP, "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"])
def test_a_refused_response_is_refused_in_its_row_alone(design, responses, formula):
    """One value, infinite, beyond 1e150 or too small to square: hp.lmm's refusal in the response's row, in its
    words; the others fitted as without it.  Every response refused: nothing left to fit, as the long frame says."""
    values = responses.copy()
    values["r3"] = 250.0
    values.loc[values.index[5], "r5"] = np.inf
    values["r7"] = values["r7"] * 1e149
    values["r8"] = values["r8"] * 1e-145
    before = values.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a refused response's sums warn of nothing)
        shared = hp.fit_batch(formula, design, responses=values, progress=False, polish=False)
    pd.testing.assert_frame_equal(values, before)
    for label in ("r3", "r5", "r7", "r8"):
        with pytest.raises(hp.HierpoolError) as single:
            hp.lmm(formula, design.assign(Reaction=values[label]))
        assert shared.messages[label] == str(single.value)
        assert np.isnan(shared.objective[label]) and not shared.converged[label]
    kept = [label for label in values.columns if label not in ("r3", "r5", "r7", "r8")]
    alone = hp.fit_batch(formula, design, responses=values[kept], progress=False)
    np.testing.assert_array_equal(shared.objective[kept], alone.objective)
    with pytest.raises(hp.DataError, match="no dataset is left to fit: dataset 'r0': response 'Reaction' is constant"):
        hp.fit_batch(formula, design, responses=values.assign(**{label: 1.0 for label in values.columns}))


@pytest.mark.parametrize("case", ["two rows a subject", "one subject", "a copied column"])
def test_a_design_hp_lmm_refuses_is_refused_once(design, responses, case):
    """Refused while building the design (too few rows for the term's effects), by the batch's count checks (one
    level) or by its column checks (a copied column): in hp.lmm's words, once for every response."""
    formula, data = SLEEP, design.groupby("Subject").head(2)
    if case == "one subject":
        data = design[design.Subject == design.Subject.iloc[0]]
    elif case == "a copied column":
        formula, data = "Reaction ~ Days + (Days + D2 | Subject)", design.assign(D2=2.0 * design.Days)
    with pytest.raises(hp.DataError) as single:
        hp.lmm(formula, data)
    with pytest.raises(hp.DataError) as batch:
        hp.fit_batch(formula, data, responses=responses.loc[data.index], progress=False)
    assert str(batch.value) == f"fit_batch: every response shares data's design, which hp.lmm refuses: {single.value}"


@pytest.mark.parametrize("bad, match", [
    ("missing", r"responses column 'r2' has 1 missing value at rows"),
    ("one-dimensional", "two-dimensional, one row per row of data"),
    ("rows", "two-dimensional, one row per row of data"),
    ("index", "must have data's index"),
    ("text", "responses column 'r1' holds other than numbers"),
    ("repeated", "repeats the dataset label 'r0'"),
    ("by", "by='Subject' with responses="),
    ("expression", r"must then be a column name, got 'log\(Reaction\)'"),
    ("list", "needs data as one DataFrame"),
    ("complex", r"responses column 'r0' holds other than numbers \(complex128\)"),
    ("complex array", r"responses holds other than numbers \(complex128\)"),
    ("true/false", r"responses column 'r0' holds other than numbers \(bool\)"),
])
def test_bad_responses_are_refused_by_name(design, responses, bad, match):
    data, values, formula, kwargs = design, responses.copy(), SLEEP, {}
    if bad == "missing":
        values.iloc[7, 2] = np.nan
    elif bad == "one-dimensional":
        values = values.r0.to_numpy()
    elif bad == "rows":
        values = values.to_numpy()[:-1]
    elif bad == "index":
        values.index = values.index + 1
    elif bad == "text":
        values["r1"] = values["r1"].astype(str)
    elif bad == "repeated":
        values.columns = ["r0"] * N_RESPONSES
    elif bad == "by":
        kwargs = {"by": "Subject"}
    elif bad == "expression":
        formula = "log(Reaction) ~ Days + (Days | Subject)"
    elif bad == "list":
        data = [design]
    elif bad == "complex":  # (NumPy would keep the real part)
        values["r0"] = values["r0"] + 1j
    elif bad == "complex array":
        values = values.to_numpy() + 1j
    elif bad == "true/false":  # (hp.lmm refuses a true/false response; a binomial GLMM takes it)
        values["r0"] = values["r0"] > 250
    error = hp.DataError if bad == "missing" else hp.ArgumentError
    with pytest.raises(error, match=match):
        hp.fit_batch(formula, data, responses=values, progress=False, **kwargs)


CROSSED = "Reaction ~ Days + (1 | Subject) + (1 | Block)"


def with_blocks(design):
    """The design with a second grouping factor crossed with Subject: a block of days."""
    return design.assign(Block=(design.Days // 3).astype(int).astype(str))


def test_the_shared_systems_and_start_equal_the_stacked_rows(design, responses):
    """Several terms: the systems (shared_design_systems) and the moments' start equal the long frame's."""
    from hierpool.algebra.batched_systems import system_arrays
    from hierpool.batch.fit_terms import linear_start, term_problems
    from hierpool.batch.plan import plan_batch
    from hierpool.batch.shared_design import read_responses, shared_design_plan

    data = with_blocks(design)
    values = responses.iloc[:, :5]
    kwargs = {"weights": "w", "offset": "off"}
    shared = shared_design_plan(CROSSED, data, read_responses(CROSSED, data, values, "dataset"), "fit_batch",
                                "hp.lmm", term_problems, **kwargs)
    stacked = plan_batch(CROSSED, long_frame(data, values), "dataset", "fit_batch", "hp.lmm", one_term=False,
                         **kwargs)
    datasets = np.arange(5)
    for merged in (False, True):
        ours, theirs = (plan.term_systems(datasets, merged=merged) for plan in (shared, stacked))
        assert len(ours) == len(theirs) == 1
        (members, systems, n), (their_members, their_systems, their_n) = ours[0], theirs[0]
        np.testing.assert_array_equal(members, their_members)
        np.testing.assert_array_equal(n, their_n)
        assert systems.layout == their_systems.layout
        for a, b in zip(system_arrays(systems), system_arrays(their_systems)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    starts = [linear_start(plan, datasets, plan.location_shifts()[1]) for plan in (shared, stacked)]
    np.testing.assert_allclose(*starts, rtol=1e-10)


@pytest.mark.parametrize("path", ["host", "compiled"])
@pytest.mark.parametrize("formula", [CROSSED, "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"])
def test_several_terms_equal_the_long_frame(design, responses, formula, path, monkeypatch):
    """Crossed terms, and terms on one grouping factor (searched as one term on the host)."""
    from hierpool.batch import fit_terms

    data = with_blocks(design)
    values = responses.iloc[:, :6]
    if path == "compiled":
        monkeypatch.setattr(fit_terms, "_on_host", lambda *a: False)
    shared = hp.fit_batch(formula, data, responses=values, weights=design.w.to_numpy(), progress=False)
    stacked = fit_stacked(formula, long_frame(data, values), weights=np.tile(design.w.to_numpy(), 6),
                           progress=False)
    assert_rows_equal(shared, stacked)


def test_other_models_are_fitted_on_the_long_frame(design, responses):
    """AR(1) residuals (no shared shortcut): the long frame built from the responses, equal to the user's."""
    values = responses.iloc[:, :3]
    correlation = hp.ar1("Subject", time="Days")
    shared = hp.fit_batch(SLEEP, design, responses=values, correlation=correlation, progress=False)
    stacked = fit_stacked(SLEEP, long_frame(design, values), correlation=correlation, progress=False)
    assert_rows_equal(shared, stacked)
    np.testing.assert_allclose(shared.phi, stacked.phi, rtol=1e-8)


def test_the_datasets_are_labelled_as_the_responses_columns(design, responses):
    """A DataFrame's column labels and their name label the datasets, on the shared path and the long frame's."""
    values = responses.iloc[:, :3].rename_axis(columns="gene")
    for correlation in (None, hp.ar1("Subject", time="Days")):
        batch = hp.fit_batch(SLEEP, design, responses=values, correlation=correlation, progress=False)
        assert batch.datasets.tolist() == ["r0", "r1", "r2"] and batch.datasets.name == "gene"
        assert batch.to_frame().columns[0] == "gene"
    positions = hp.fit_batch(SLEEP, design, responses=values.to_numpy(), correlation=hp.ar1("Subject", time="Days"),
                             progress=False)
    assert positions.datasets.tolist() == [0, 1, 2] and positions.datasets.dtype.kind == "i"


def test_the_long_frame_of_responses_repeats_the_design():
    data = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0.0, 0.0, 0.0], "dataset": ["a", "b", "c"]})
    values = np.arange(6.0).reshape(3, 2)
    frame, by, weights, offset = responses_long_frame(
        data, Responses(values, pd.Index(["p", "q"]), "y"), np.array([1.0, 2.0, 3.0]), "x")
    assert by == "dataset_"  # (data has a dataset column)
    assert frame[by].tolist() == ["p"] * 3 + ["q"] * 3
    assert frame.y.tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    assert frame.x.tolist() == [1.0, 2.0, 3.0] * 2
    assert weights.tolist() == [1.0, 2.0, 3.0] * 2 and offset == "x"


def test_bayes_batch_samples_the_responses_as_their_long_frame(design, responses):
    """bayes_batch(..., responses=): the datasets of the long frame built from them, the same draws."""
    values = responses.iloc[:, :2]
    settings = {"chains": 1, "draws": 30, "tune": 30, "seed": 3, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)  # (30 draws: diagnostics not ok, as they say)
        shared = hp.bayes_batch(SLEEP, design, responses=values, **settings)
        stacked = hp.bayes_batch(SLEEP, long_frame(design, values), **settings)
    pd.testing.assert_frame_equal(shared.fixef, stacked.fixef)
    assert shared.datasets.tolist() == ["r0", "r1"]


# --- a long frame whose datasets share one design (a simulation study's, a bootstrap's) is fitted as responses ---


def test_a_long_frame_of_one_design_is_fitted_as_responses_on_it(design, responses, monkeypatch):
    """Datasets stacked on one design, labelled by text in no sorted order: the same rows as the long frame's own
    path (to rounding: the statistics' sums differ in order), and as ``responses=``, the long frame's plan never
    built; nothing the user passed is modified."""
    values = responses[responses.columns[::-1]]  # r11 .. r0: the labels' first appearance, not sorted, is the order
    frame = long_frame(design.assign(Days=design.Days + 2000.0), values)  # conditioned, then mapped back, too
    before = frame.copy()
    stacked = fit_stacked(SLEEP, frame, offset="off", progress=False)
    monkeypatch.setattr(fit_module, "plan_batch", mock.Mock(side_effect=AssertionError("the long frame's plan")))
    found = hp.fit_batch(SLEEP, frame, offset="off", progress=False)
    pd.testing.assert_frame_equal(frame, before)
    assert_rows_equal(found, stacked)
    assert list(found.datasets) == list(values.columns) and found.datasets.name == "dataset"
    given = hp.fit_batch(SLEEP, design.assign(Days=design.Days + 2000.0), responses=values, offset="off",
                         progress=False)
    np.testing.assert_array_equal(found.objective, given.objective)
    pd.testing.assert_frame_equal(found.ranef, given.ranef)


def _frame_with(design, responses, case):
    """A long frame of the design's datasets, changed by ``case`` (None where it still holds one design)."""
    frame = long_frame(design.assign(cat=pd.Categorical(design.Subject)), responses.iloc[:, :6])
    n = len(design)
    kwargs = {}
    if case == "a value in a middle dataset":
        frame.loc[3 * n + 7, "Days"] += 1.0
    elif case == "a value in the last dataset":
        frame.loc[len(frame) - 1, "Subject"] = frame.Subject.iloc[0]
    elif case == "a category in a middle dataset":
        frame.loc[2 * n + 15, "cat"] = frame.cat.iloc[0]  # (row 15: another subject than row 0)
    elif case == "one dataset's rows reordered":
        frame.iloc[[2 * n, 2 * n + 1]] = frame.iloc[[2 * n + 1, 2 * n]].to_numpy()
    elif case == "a dataset a row short":
        frame = frame.drop(index=4 * n + 3)
    elif case == "datasets interleaved":
        frame = frame.sort_values(["Subject", "Days", "dataset"], kind="stable")
    elif case == "a missing value in a middle dataset":
        frame.loc[3 * n + 7, "Days"] = np.nan
    elif case == "a missing response":
        frame.loc[3 * n + 7, "Reaction"] = np.nan
    elif case == "weights as an array":
        kwargs = {"weights": np.tile(design.w.to_numpy(), 6)}
    elif case == "a label on two runs":
        frame.loc[frame.dataset == "r5", "dataset"] = "r0"
    elif case == "an object column":
        frame["Subject"] = frame.Subject.astype(object)
    elif case == "a zero's sign":  # -0.0 == 0.0, but np.signbit(x) or 1 / x tell them apart
        frame.loc[frame.index[3 * n:4 * n][frame.Days.iloc[3 * n:4 * n].to_numpy() == 0], "Days"] = -0.0
    elif case == "the response on the right-hand side":
        kwargs = {"formula": "Reaction ~ Days + I(Reaction > 300) + (1 | cat) + (Days | Subject)"}
    elif case == "the response as weights":
        kwargs = {"weights": "Reaction"}
    elif case == "a user's function":  # (the long frame checks what it gives each dataset's rows)
        kwargs = {"formula": "Reaction ~ halved(Days) + (1 | cat) + (Days | Subject)"}
    return frame, kwargs


@pytest.mark.parametrize("case", [
    "a value in a middle dataset", "a value in the last dataset", "a category in a middle dataset",
    "one dataset's rows reordered", "a dataset a row short", "datasets interleaved",
    "a missing value in a middle dataset", "a missing response", "weights as an array", "a label on two runs",
    "an object column", "a zero's sign", "the response on the right-hand side", "the response as weights",
    "a user's function",
])
def test_one_design_is_found_only_where_every_dataset_has_it(design, responses, case):
    formula = "Reaction ~ Days + (1 | cat) + (Days | Subject)"
    frame, kwargs = _frame_with(design, responses, None)
    found = one_design_in_long_frame(formula, frame, "dataset", **kwargs)
    assert found is not None
    np.testing.assert_array_equal(found[1].values, responses.iloc[:, :6].to_numpy())
    pd.testing.assert_frame_equal(found[0], frame.iloc[:len(design)][["Days", "cat", "Subject", "Reaction"]])
    changed, kwargs = _frame_with(design, responses, case)
    assert one_design_in_long_frame(kwargs.pop("formula", formula), changed, "dataset", **kwargs) is None


def halved(x):
    return np.asarray(x) / 2.0


@pytest.mark.parametrize("formula", ["Reaction ~ Days + I(Reaction > 300) + (Days | Subject)",
                                     "Reaction ~ Days + offset(0.5 * Reaction) + (1 | Subject)"])
def test_a_model_that_reads_the_response_besides_is_fitted_on_each_dataset_s_response(design, responses, formula):
    """The shared design is built on a placeholder response: a model reading the response on its right-hand side
    takes the long frame, from a long frame of one design and from responses= alike (each dataset's hp.lmm fit)."""
    values = responses.iloc[:, :3]
    found = hp.fit_batch(formula, long_frame(design, values), progress=False)
    given = hp.fit_batch(formula, design, responses=values, progress=False)
    single = [hp.lmm(formula, design.assign(Reaction=values[label])).objective for label in values.columns]
    np.testing.assert_allclose(found.objective, single, rtol=1e-10)
    np.testing.assert_allclose(given.objective, single, rtol=1e-10)


@pytest.mark.parametrize("location", [1e10, -1e12])
def test_a_large_common_location_of_the_responses_costs_no_digits(design, responses, location):
    """The location shift subtracts X beta0 column by column, as the long frame's does: 1e10 + y lost 3e-7 of the
    criterion to the fitted values rounded at 1e10 (the forty-seventh session's review)."""
    values = responses.iloc[:, :4] + location
    stacked = fit_stacked(SLEEP, long_frame(design, values), progress=False)
    found = hp.fit_batch(SLEEP, long_frame(design, values), progress=False)
    given = hp.fit_batch(SLEEP, design, responses=values, progress=False)
    np.testing.assert_allclose(found.objective, stacked.objective, rtol=1e-11)
    np.testing.assert_allclose(given.objective, stacked.objective, rtol=1e-11)


def test_a_response_the_single_fit_refuses_leaves_the_batch_to_the_long_frame(design, responses):
    """One dataset's response constant: the long frame's own path, its refusal in that row as it words it."""
    frame = long_frame(design, responses.iloc[:, :4])
    frame.loc[frame.dataset == "r2", "Reaction"] = 250.0
    found = hp.fit_batch(SLEEP, frame, progress=False)
    stacked = fit_stacked(SLEEP, frame, progress=False)
    assert found.messages["r2"] == stacked.messages["r2"] != ""
    np.testing.assert_array_equal(found.objective, stacked.objective)


@pytest.mark.parametrize("entry", ["responses", "long frame", "list"])
def test_a_response_x_fits_to_rounding_is_fitted_alone(design, responses, entry, monkeypatch):
    """A noise-free response (a line of Days) and one whose variation is its rounding: their residuals are rounding
    noise, which the matrix products round otherwise than hp.lmm's sums (the first was reported "converged" at a
    criterion of -11,620 where hp.lmm raises; the long frame's own path, on a list, at -12,608): each row is
    hp.lmm's outcome, a refusal or its fit, whichever way the datasets come; the others are as without them.  A
    residual of 1e-7 of the response's spread is fitted in the batch, equal to hp.lmm's."""
    values = responses.iloc[:, :5].copy()
    values["r1"] = 250.0 + 10.0 * design.Days.to_numpy()
    values["r2"] = 1.0 + 1e-15 * (np.arange(len(design)) % 2)
    values["r4"] = values["r1"] + 1e-7 * values["r1"].std() * np.random.default_rng(4).normal(size=len(design))
    data = (design if entry == "responses" else long_frame(design, values) if entry == "long frame"
            else [design.assign(Reaction=values[label]) for label in values.columns])
    # the check runs in blocks of datasets (memory bounded): two a block, so that r1 and r2 fall in two of them
    from hierpool.batch import near_exact

    monkeypatch.setattr(near_exact, "SHARED_BLOCK_VALUES", 2 * len(design))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (hp.lmm's own on r1, as it gives them fitted alone)
        batch = hp.fit_batch(SLEEP, data, responses=values if entry == "responses" else None, progress=False,
                             polish=False)
    if entry == "list":
        batch.objective.index = batch.messages.index = batch.refit.index = batch.converged.index = values.columns
    with pytest.raises(hp.HierpoolError) as single:
        hp.lmm(SLEEP, design.assign(Reaction=values["r1"]))
    assert np.isnan(batch.objective["r1"]) and not batch.converged["r1"]
    assert batch.messages["r1"].startswith("X fits its response to rounding") and str(single.value) in batch.messages["r1"]
    alone = hp.lmm(SLEEP, design.assign(Reaction=values["r2"]))
    assert batch.refit["r2"] and batch.objective["r2"] == pytest.approx(alone.objective, rel=1e-12)
    close = hp.lmm(SLEEP, design.assign(Reaction=values["r4"]))
    assert not batch.refit["r4"] and batch.objective["r4"] == pytest.approx(close.objective, rel=1e-10)
    others = hp.fit_batch(SLEEP, design, responses=values[["r0", "r3"]], progress=False)
    np.testing.assert_allclose(batch.objective[["r0", "r3"]], others.objective, rtol=1e-12)


@pytest.mark.parametrize("container", ["list", "dict"])
def test_datasets_as_frames_of_one_design_are_fitted_as_responses_on_it(design, responses, container, monkeypatch):
    """The datasets as a list (labels: positions) or a dict of frames (tuple keys): the long frame's rows and labels,
    its plan never built."""
    values = responses.iloc[:, :5]
    frames = [design.assign(Reaction=values[label]) for label in values.columns]
    data = frames if container == "list" else {("site", j): frame for j, frame in enumerate(frames)}
    stacked = fit_stacked(SLEEP, data, progress=False)
    monkeypatch.setattr(fit_module, "plan_batch", mock.Mock(side_effect=AssertionError("the long frame's plan")))
    found = hp.fit_batch(SLEEP, data, progress=False)
    assert_rows_equal(found, stacked)
    assert found.datasets.equals(stacked.datasets) and found.datasets.name == "dataset"
    assert list(found.datasets) == (list(range(5)) if container == "list" else [("site", j) for j in range(5)])


@pytest.mark.parametrize("case", ["a value in one frame", "another dtype in one frame", "other categories in one",
                                  "a frame a row short", "a frame with the by column", "a missing response"])
def test_frames_of_designs_of_their_own_keep_the_long_frame(design, responses, case):
    formula = "Reaction ~ Days + (1 | cat) + (Days | Subject)"
    frames = [design.assign(Reaction=responses[label], cat=pd.Categorical(design.Subject))
              for label in responses.columns[:4]]
    assert one_design_in_long_frame(formula, frames, "dataset") is not None
    frame = frames[2]
    if case == "a value in one frame":
        frame.loc[frame.index[5], "Days"] += 1.0
    elif case == "another dtype in one frame":
        frames[2] = frame.assign(Days=frame.Days.astype(np.float32))
    elif case == "other categories in one":  # (the same codes, other labels)
        frames[2] = frame.assign(cat=frame.cat.cat.rename_categories(lambda label: label + "x"))
    elif case == "a frame a row short":
        frames[2] = frame.iloc[1:]
    elif case == "a frame with the by column":
        frames[2] = frame.assign(dataset=2)
    elif case == "a missing response":
        frame.loc[frame.index[5], "Reaction"] = np.nan
    assert one_design_in_long_frame(formula, frames, "dataset") is None


def test_a_dict_with_a_missing_key_is_refused_as_the_long_frame_refuses_it(design, responses):
    frames = {key: design.assign(Reaction=responses[label]) for key, label in zip([None, 1, 2], responses.columns)}
    assert one_design_in_long_frame(SLEEP, frames, "dataset") is None
    with pytest.raises(hp.ArgumentError, match="a dataset's key is None"):
        hp.fit_batch(SLEEP, frames, progress=False)


def test_text_columns_compare_by_value_whether_or_not_they_share_their_strings(design, responses):
    """A long frame built by repeating one frame's column shares its strings (compared by pointer); one whose
    strings are equal but other objects (read separately), or differ in one row, is compared by value."""
    frame = long_frame(design, responses.iloc[:, :4])
    assert isinstance(frame.Subject.dtype, pd.StringDtype)
    assert one_design_in_long_frame(SLEEP, frame, "dataset") is not None
    strings = [(s + "!")[:-1] for s in frame.Subject]  # (equal strings, new objects)
    copies = frame.assign(Subject=pd.array(strings, dtype=frame.Subject.dtype))
    row = len(design) * 2
    assert copies.Subject.to_numpy()[row] is not frame.Subject.to_numpy()[row]
    assert one_design_in_long_frame(SLEEP, copies, "dataset") is not None
    changed = copies.copy()
    changed.loc[len(design) * 2 + 3, "Subject"] = "another"
    assert one_design_in_long_frame(SLEEP, changed, "dataset") is None
