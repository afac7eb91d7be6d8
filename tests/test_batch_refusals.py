"""hp.fit_batch: a dataset the batch cannot fit keeps its row and says why, and never stops the other datasets.

A perfectly separated Bernoulli dataset beside others, a dataset with no usable rows (empty, lacking a column, an
all-missing response) and one whose response is constant: each keeps its row, NaN where there is no number, with
the reason in ``messages``; every other dataset equals its single fit.
"""

import warnings
from functools import partial

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
import hierpool.batch.fit_glmm as fit_glmm_module
from hierpool.batch.glmm_search import beta_covariance
from hierpool.batch.plan import plan_batch

BERNOULLI = "bern ~ x + (1 | g)"
LINEAR = "y ~ x + (1 | g)"


def _bernoulli(seed: int, groups: int = 10, per: int = 5) -> pd.DataFrame:
    """0/1 outcomes of a logistic random-intercept model (the reviewer's draws, which the separated dataset's test
    needs: whether its Hessian comes out exactly singular depends on the bits of its chunk-mates')."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, 0.8, groups)
    rows = []
    for g in range(groups):
        for _ in range(per):
            x, trials = rng.normal(), rng.integers(1, 12)
            p = 1 / (1 + np.exp(-(-0.3 + 0.6 * x + effects[g])))
            rng.binomial(trials, p)  # the reviewer drew a binomial count too: the draws after it are theirs
            rows.append({"g": f"g{g}", "x": x, "bern": int(rng.uniform() < p)})
    return pd.DataFrame(rows)


def _gaussian(seed: int, groups: int = 6, per: int = 5) -> pd.DataFrame:
    """A linear random-intercept model's data."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    return pd.DataFrame({"g": [f"g{i}" for i in g], "x": x,
                         "y": 1 + 0.5 * x + rng.normal(0, 1, groups)[g] + rng.normal(size=g.size)})


def _quiet(fit, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(*args, **kwargs)


def test_an_exactly_singular_hessian_in_a_stack_gives_nan_for_its_dataset_alone():
    # NumPy's inv of a stack raised LinAlgError for every dataset when one Hessian was exactly singular
    regular = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    singular = np.array([[2e-14, 0.0, -4e-12], [0.0, 0.0, 0.0], [-4e-12, 0.0, 0.0]])
    covariance = beta_covariance(np.stack([regular, singular]), np.array([1.0, 1e-9]), n_theta=1, p=2)
    np.testing.assert_allclose(covariance[0], np.linalg.inv(regular / 2)[1:, 1:])
    assert np.isnan(covariance[1]).all()


def test_a_separated_dataset_in_a_chunk_with_others_is_not_converged_and_the_others_are_fitted(monkeypatch):
    # one thread and chunks of two, whatever the machine's cores: the separated dataset shares its chunk with the
    # first (its Hessian came out exactly singular there, and the batch raised numpy's LinAlgError)
    monkeypatch.setattr(fit_glmm_module, "thread_count", lambda *a, **k: 1)
    separated = _bernoulli(2).assign(bern=lambda f: (f.x > 0).astype(int))
    frames = [_bernoulli(0), separated, _bernoulli(3)]
    batch = hp.fit_batch(BERNOULLI, frames, by="rep", family="binomial", chunk_size=2, progress=False)
    assert not batch.converged.iloc[1] and batch.messages.iloc[1], batch.messages.tolist()
    without = hp.fit_batch(BERNOULLI, frames[::2], by="rep", family="binomial", progress=False)
    for d, alone in ((0, 0), (2, 1)):
        single = _quiet(hp.glmm, BERNOULLI, frames[d], family="binomial")
        assert batch.converged.iloc[d] and not batch.messages.iloc[d]
        assert batch.objective.iloc[d] == pytest.approx(single.optimum.deviance, rel=1e-8)
        # as fitted without the separated dataset (beta's optimum is flat to 1e-5 here: hp.glmm's stops as near)
        np.testing.assert_allclose(batch.beta[d], without.beta[alone], rtol=1e-8)
        np.testing.assert_allclose(batch.beta[d], single.fixef.to_numpy(), rtol=1e-4)


def _counts(seed: int, groups: int = 6, per: int = 5) -> pd.DataFrame:
    """Poisson counts of a log-linear random-intercept model."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    eta = 0.5 + 0.4 * x + rng.normal(0, 0.5, groups)[g]
    return pd.DataFrame({"g": [f"g{i}" for i in g], "x": x, "y": rng.poisson(np.exp(eta))})


def _assert_rows_as_fitted_without(batch, kept, reference, positions):
    """Rows ``kept`` of ``batch`` are rows ``positions`` of ``reference`` (the batch without the refused datasets)."""
    for d, r in zip(kept, positions):
        assert batch.converged.iloc[d] and not batch.messages.iloc[d]
        assert batch.objective.iloc[d] == pytest.approx(reference.objective.iloc[r], rel=1e-10)
        np.testing.assert_allclose(batch.beta[d], reference.beta[r], rtol=1e-8)


def _assert_refused(batch, d, reason):
    assert np.isnan(batch.objective.iloc[d]) and np.isnan(batch.beta[d]).all() and not batch.converged.iloc[d]
    assert reason in batch.messages.iloc[d], batch.messages.tolist()


def test_a_dataset_with_no_usable_rows_keeps_its_row_and_says_why():
    # they vanished from the result: labels [0, 4] of five datasets, and positional indexing then misaligned
    good = [_gaussian(0), _gaussian(4)]
    n = len(good[0])
    frames = [good[0], good[0].iloc[:0], _gaussian(2).drop(columns="x"), _gaussian(3).assign(y=np.nan), good[1]]
    # the dataset lacking x is refused for it, not counted among the rows dropped for missing values (it was: 2n of
    # 4n, "(x: n, y: n)")
    # (and which datasets they were in: the batch's warning named none)
    with pytest.warns(hp.HierpoolWarning, match=rf"dropped {n} of {3 * n} rows with missing values \(y: {n}\), in 1 "
                                                rf"dataset \(3: {n}\)"):
        batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    assert list(batch.datasets) == [0, 1, 2, 3, 4] and len(batch.to_frame()) == 5
    _assert_refused(batch, 1, "the dataset is empty")
    _assert_refused(batch, 2, "uses column 'x', which is not in this dataset")
    _assert_refused(batch, 3, f"no rows left after dropping missing values (y: {n})")
    reference = hp.fit_batch(LINEAR, good, by="rep", progress=False)
    _assert_rows_as_fitted_without(batch, [0, 4], reference, [0, 1])
    # a dict's keys, and one DataFrame's by column (every row's label, those all dropped too), the same way
    named = hp.fit_batch(LINEAR, {"a": good[0], "b": good[0].iloc[:0], "c": good[1]}, by="rep", progress=False)
    assert list(named.datasets) == ["a", "b", "c"] and "the dataset is empty" in named.messages["b"]
    long = pd.concat([frame.assign(rep=label) for label, frame in zip("abc", frames[2:])], ignore_index=True)
    with pytest.warns(hp.HierpoolWarning, match="dropped"):
        one = hp.fit_batch(LINEAR, long, by="rep", progress=False)
    assert list(one.datasets) == ["a", "b", "c"]
    _assert_refused(one, 0, f"no rows left after dropping missing values (x: {n})")
    _assert_refused(one, 1, f"no rows left after dropping missing values (y: {n})")


def _single_refusal(fit, formula, frame, **kwargs) -> str:
    with pytest.raises(hp.DataError) as refused:
        _quiet(fit, formula, frame, **kwargs)
    return str(refused.value)


def test_a_constant_response_is_refused_in_its_row_as_hp_lmm_refuses_it():
    # its fit reported a criterion of -9,000 and a residual sd of 2e-32 as converged, with no message
    frames = [_gaussian(0), _gaussian(1).assign(y=3.0), _gaussian(2)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    reason = _single_refusal(hp.lmm, LINEAR, frames[1])
    assert "is constant" in reason
    _assert_refused(batch, 1, reason)
    assert np.isnan(batch.sigma[1])
    _assert_rows_as_fitted_without(batch, [0, 2], hp.fit_batch(LINEAR, frames[::2], by="rep", progress=False),
                                   [0, 1])


def test_a_poisson_dataset_of_zeros_is_refused_in_its_row_as_hp_glmm_refuses_it():
    # its row kept the numbers where the search stopped (an intercept of -25), not converged, hp.glmm's refusal
    # reported as the refit's failure
    frames = [_counts(0), _counts(1).assign(y=0), _counts(2), _counts(3).iloc[:0]]
    batch = hp.fit_batch(LINEAR, frames, by="rep", family="poisson", progress=False)
    _assert_refused(batch, 1, _single_refusal(hp.glmm, LINEAR, frames[1], family="poisson"))
    _assert_refused(batch, 3, "the dataset is empty")
    assert not batch.refit.iloc[1]
    reference = hp.fit_batch(LINEAR, frames[::2], by="rep", family="poisson", progress=False)
    _assert_rows_as_fitted_without(batch, [0, 2], reference, [0, 1])


@pytest.mark.parametrize("model", ["several terms", "ar1"])
def test_the_several_term_and_ar1_paths_refuse_a_constant_response_and_an_empty_dataset(model):
    """The several-term and AR(1) paths read their datasets' problems from fit_terms.term_problems, which now
    takes the plan's refusals: a constant response fitted at -2 log L -9128 (converged) there before."""
    data = hp.datasets.sleepstudy().assign(half=lambda f: f["Subject"].astype(str).str[-1])
    formula, kwargs = {"several terms": ("Reaction ~ Days + (1 | Subject) + (1 | half)", {}),
                       "ar1": ("Reaction ~ Days + (1 | Subject)", {"correlation": hp.ar1("Subject")})}[model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = hp.fit_batch(formula, [data, data.assign(Reaction=5.0), data.iloc[:0]], progress=False, **kwargs)
    assert np.isfinite(batch.objective.iloc[0]) and batch.objective.iloc[1:].isna().all()
    assert "is constant" in batch.messages.iloc[1] and "empty" in batch.messages.iloc[2], batch.messages.tolist()
    assert not batch.converged.iloc[1:].any()


def test_a_column_of_another_kind_in_one_dataset_is_refused_in_its_row():
    # stacked on the others' numbers, one dataset's text column made one object column that the whole batch's
    # formula refused ("Variable is of an unrecognized type"), naming neither the column nor the dataset
    frames = [_gaussian(0), _gaussian(1).assign(x=lambda f: f["x"].astype(str)), _gaussian(2),
              _gaussian(3).assign(x=lambda f: f["x"] > 0)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds text or categories in this dataset but numbers in 2 other datasets")
    _assert_refused(batch, 3, "column 'x' holds true/false values in this dataset but numbers in 2 other datasets")
    _assert_rows_as_fitted_without(batch, [0, 2], hp.fit_batch(LINEAR, frames[::2], by="rep", progress=False),
                                   [0, 1])
    # text in every dataset is a factor in every dataset; an unused column may differ
    factors = [frame.assign(x=lambda f: np.where(f["x"] > 0, "up", "down"), note=k) for k, frame in
               enumerate([_gaussian(0), _gaussian(1), _gaussian(2)])]
    factors[1] = factors[1].assign(note="text")
    assert not hp.fit_batch(LINEAR, factors, by="rep", progress=False).messages.any()


def test_numbers_among_text_responses_are_fitted_and_the_text_refused():
    # most datasets held text in the response: the one of numbers was outvoted, and the text ones' design then
    # refused the whole batch ("response 'y' must be numeric"), the good dataset with it
    frames = [_gaussian(seed) for seed in range(4)]
    frames = [frame if k == 1 else frame.assign(y=frame["y"].astype(str)) for k, frame in enumerate(frames)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    for d in (0, 2, 3):
        _assert_refused(batch, d, _single_refusal(hp.lmm, LINEAR, frames[d]))
    assert batch.objective.iloc[1] == pytest.approx(hp.lmm(LINEAR, frames[1]).objective, rel=1e-10)
    # text in every dataset is still the one error it was
    with pytest.raises(hp.DataError, match="response 'y' must be numeric"):
        hp.fit_batch(LINEAR, [frames[0], frames[2]], by="rep", progress=False)


@pytest.mark.parametrize("family", [None, "poisson"])
def test_a_covariate_of_large_mean_is_kept_as_hp_lmm_keeps_it(family):
    # the rank of each dataset's X'X from its eigenvalues said 1 of 2 for x = 20,000 + z (below eps times the
    # largest), and the batch refused the dataset that hp.lmm / hp.glmm fit (a GLMM at nAGQ = 0, whose rows are all
    # hp.glmm's refits: there only the rank check is under test; the linear row must be the batch's own fit)
    frames = [(_counts if family else _gaussian)(seed) for seed in range(3)]
    frames[1] = frames[1].assign(x=20000.0 + frames[1]["x"])
    glmm = {"family": family, "nAGQ": 0} if family else {}
    batch = _quiet(hp.fit_batch, LINEAR, frames, by="rep", progress=False, **glmm)
    single = _quiet(hp.glmm, LINEAR, frames[1], **glmm) if family else _quiet(hp.lmm, LINEAR, frames[1])
    if family:
        assert "refitted by hp.glmm" in batch.messages.iloc[1], batch.messages.tolist()
    else:
        assert not batch.messages.iloc[1] and not batch.refit.iloc[1], batch.messages.tolist()
    objective = single.optimum.deviance if family else single.objective
    assert batch.objective.iloc[1] == pytest.approx(objective, rel=1e-8)
    np.testing.assert_allclose(batch.beta[1], single.fixef, rtol=1e-6)


def test_a_dataset_whose_response_its_family_refuses_is_refused_in_its_row():
    # a negative count in one dataset refused the whole batch (naming the value, not the dataset)
    frames = [_counts(0), _counts(1).assign(y=lambda f: f["y"] - 3), _counts(2)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", family="poisson", progress=False)
    _assert_refused(batch, 1, _single_refusal(hp.glmm, LINEAR, frames[1], family="poisson"))
    reference = hp.fit_batch(LINEAR, frames[::2], by="rep", family="poisson", progress=False)
    _assert_rows_as_fitted_without(batch, [0, 2], reference, [0, 1])
    # one DataFrame with weights as an array: the refused dataset's rows and weights are left out together
    long = pd.concat([frame.assign(rep=label) for label, frame in zip("abc", frames)], ignore_index=True)
    weights = np.linspace(0.5, 2.0, len(long))
    one = hp.fit_batch(LINEAR, long, by="rep", family="poisson", weights=weights, progress=False)
    assert list(one.datasets) == ["a", "b", "c"] and "non-negative whole counts" in one.messages["b"]
    first = hp.glmm(LINEAR, frames[0], family="poisson", weights=weights[:len(frames[0])])
    assert one.objective["a"] == pytest.approx(first.optimum.deviance, rel=1e-8)
    # the same mistake in every dataset is one error, as before
    with pytest.raises(hp.DataError, match="non-negative whole counts"):
        hp.fit_batch(LINEAR, [frame.assign(y=frame["y"] - 30) for frame in frames], by="rep", family="poisson",
                     progress=False)


@pytest.mark.parametrize("family", [None, "poisson"])
def test_a_dataset_lacking_a_level_is_its_single_fit_and_one_with_an_aliased_column_is_refused_naming_it(family):
    """A level absent from one dataset (its column zero there) refused every other dataset of the batch (one stray
    level in one replicate, and the rest refused): such a dataset is its single fit, NaN in that column's place, the
    other columns meaning what they mean in the batch.  A column aliased but not zero (constant x2; a baseline level
    absent) would change the others' meaning: refused, naming it ("the 5 fixed-effect columns have rank 4" named
    none)."""
    frames = [_gaussian(seed).assign(f=lambda d: np.array(["p", "q", "r"])[np.arange(len(d)) % 3],
                                     x2=lambda d: np.sin(np.arange(len(d)))) for seed in range(4)]
    frames[1] = frames[1][frames[1]["f"] != "r"]  # the level r absent
    frames[2] = frames[2].assign(x2=1.5)  # x2 constant: aliased with the intercept
    frames[3] = frames[3][frames[3]["f"] != "p"]  # the baseline p absent: f[q] and f[r] are the intercept
    if family:
        frames = [frame.assign(y=np.round(np.exp(frame["y"] / 4))) for frame in frames]
    formula = "y ~ x + x2 + f + (1 | g)"
    fit, single, arguments = (hp.fit_batch, hp.glmm, {"family": family}) if family else (hp.fit_batch, hp.lmm, {})
    batch = _quiet(fit, formula, frames, by="rep", progress=False, **arguments)
    _assert_refused(batch, 2, "rank 4 in this dataset: x2 zero or aliased with earlier columns here")
    _assert_refused(batch, 3, "rank 4 in this dataset: f[r] zero or aliased with earlier columns here")
    assert batch.converged.iloc[0] and batch.converged.iloc[1] and batch.refit.iloc[1]
    assert batch.messages.iloc[1].startswith("f[r] zero in this dataset (a level it lacks): fitted alone")
    alone = _quiet(single, formula, frames[1], **arguments)
    objective = alone.objective if family is None else alone.optimum.deviance
    assert batch.objective.iloc[1] == pytest.approx(objective, rel=1e-8)
    np.testing.assert_allclose(batch.beta[1, :-1], alone.fixef.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(batch.beta_se[1, :-1], alone.fixef_se.to_numpy(), rtol=1e-6)
    assert np.isnan(batch.beta[1, -1]) and np.isnan(batch.beta_se[1, -1])


def test_a_column_of_python_objects_in_one_dataset_is_refused_in_its_row():
    # numbers held as objects in one dataset made the stacked column an object column, which the whole batch's
    # design refused, naming the good datasets' floats; a column of None there is missing values
    frames = [_gaussian(0), _gaussian(1).assign(x=lambda f: f["x"].astype(object)), _gaussian(2),
              _gaussian(3).assign(x=None)]
    batch = _quiet(hp.fit_batch, LINEAR, frames, by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds Python objects (float) in this dataset, which the formula cannot")
    _assert_refused(batch, 3, "no rows left after dropping missing values (x: 30)")
    _assert_rows_as_fitted_without(batch, [0, 2], hp.fit_batch(LINEAR, frames[::2], by="rep", progress=False),
                                   [0, 1])


@pytest.mark.parametrize("first", [True, False])
def test_which_dataset_is_refused_for_its_columns_kind_does_not_depend_on_the_order(first):
    # two datasets, one of each kind: the first one's kind was kept, so numbers held as objects (which hp.lmm
    # refuses) were fitted and the clean dataset refused, and a text response first refused the whole batch
    clean = _gaussian(0)
    for odd, reason in ((clean.assign(y=clean["y"].astype(object)), "holds Python objects (float) in this dataset"),
                        (clean.assign(y=clean["y"].astype(str)), "holds text or categories in this dataset but")):
        frames = [odd, clean] if first else [clean, odd]
        batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
        _assert_refused(batch, 0 if first else 1, f"column 'y' {reason}")
        assert batch.converged.iloc[1 if first else 0]


def test_empty_batches_and_a_missing_formula_are_refused_and_reasons_show_the_users_names():
    """Every dataset empty, an empty long frame, or formula=None raised NumPy's ValueError or a TypeError; and the
    reasons in the rows showed the library's own names: 'hierpool_response' for a cbind response, np.str_('g0')."""
    empty = _gaussian(0).iloc[:0].assign(d="a")
    for data, by in (({"a": empty, "b": empty}, {}), (empty, {"by": "d"})):
        with pytest.raises(hp.DataError, match="data is empty: it has no rows"):
            hp.fit_batch(LINEAR, data, progress=False, **by)
    with pytest.raises(hp.FormulaError, match="formula must be a string, got NoneType"):
        hp.fit_batch(None, empty, by="d", progress=False)
    zeros = _gaussian(1).assign(k=0, n=3)
    with pytest.raises(hp.DataError, match=r"response 'cbind\(k, n - k\)' is constant \(0.0\)"):
        hp.glmm("cbind(k, n - k) ~ x + (1 | g)", zeros, family="binomial")
    with pytest.raises(hp.DataError, match=r"grouping factor 'g' has only one level \('g0'\)"):
        hp.lmm(LINEAR, _gaussian(2).assign(g=np.array(["g0"], dtype=object)[0]))


@pytest.mark.parametrize("by, formula, kwargs", [("x", LINEAR, {}), ("g", LINEAR, {}), ("w", LINEAR, {"weights": "w"}),
                                               ("x", "bern ~ x + (1 | g)", {"family": "bernoulli"})])
def test_a_by_column_the_model_reads_is_refused_naming_it(by, formula, kwargs):
    # by='x' with x a fixed effect: each dataset's x one value (aliased with the intercept: one dataset fitted
    # without it, the others refused), and to_frame() then refused its two columns named 'x'
    data = _gaussian(3).assign(w=1.0, bern=lambda f: (f.y > f.y.median()).astype(int))
    data = data.assign(x=np.round(data.x), g=data.g)
    with pytest.raises(hp.ArgumentError, match=f"by='{by}' is a column the model reads"):
        hp.fit_batch(formula, data, by=by, progress=False, **kwargs)
    with pytest.raises(hp.ArgumentError, match=f"bayes_batch: by='{by}' is a column the model reads"):
        hp.bayes_batch(formula, data, by=by, progress=False, **kwargs)


def test_tuple_keys_label_their_datasets_and_a_missing_key_is_refused_naming_it():
    """``dict(tuple(frame.groupby(["site", "arm"])))`` keys each dataset by a tuple, which pandas read as a column of
    its items (its ValueError escaped); a None key made rows naming no dataset (an error about a 'dataset' column)."""
    frames = {("a", 0): _gaussian(3), ("a", 1): _gaussian(4), ("b", 0): _gaussian(5)}
    batch = hp.fit_batch(LINEAR, frames, progress=False)
    assert list(batch.datasets) == list(frames)
    assert batch.objective.loc[[("a", 1)]].iloc[0] == pytest.approx(hp.lmm(LINEAR, frames[("a", 1)]).objective,
                                                                       rel=1e-10)
    assert list(batch.to_frame()["dataset"]) == list(frames)
    for key in (None, np.nan):
        with pytest.raises(hp.ArgumentError, match=f"a dataset's key is {key!r}: every dataset of a dict needs"):
            hp.fit_batch(LINEAR, {key: _gaussian(3), "b": _gaussian(4)}, progress=False)


def test_a_refused_datasets_reason_names_its_rows_as_its_single_fit_does_and_numpy_does_not_warn():
    """A zero under log() in one dataset: its reason named the long frame's position ('rows [80]', no row of the
    user's), and NumPy's 'divide by zero encountered in log' reached the user beside hierpool's refusal."""
    frames = [_gaussian(seed).assign(e=lambda d: np.exp(d.x)) for seed in range(4)]
    frames[2].loc[3, "e"] = 0.0
    long = pd.concat(frames, keys=range(4), names=["d", None]).reset_index(level=0)
    long.index = [f"r{i}" for i in range(len(long))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(hp.DataError) as single:
            hp.lmm("y ~ log(e) + (1 | g)", frames[2])
        listed = hp.fit_batch("y ~ log(e) + (1 | g)", frames, progress=False)
        stacked = hp.fit_batch("y ~ log(e) + (1 | g)", long, by="d", progress=False)
    assert "(rows [3])" in str(single.value) and listed.messages.iloc[2] == str(single.value)
    assert "(rows ['r63'])" in stacked.messages.iloc[2]
    assert np.isnan(listed.objective.iloc[2]) and listed.messages.iloc[[0, 1, 3]].eq("").all()


def test_a_batch_whose_every_dataset_is_refused_gives_the_first_datasets_own_reason():
    """The long frame's error counted the datasets together ("70 levels for 70 observations" of 30 and 40 rows)."""
    rng = np.random.default_rng(0)
    frames = {"a": pd.DataFrame({"x": rng.normal(size=30), "y": rng.normal(size=30)}),
              "b": pd.DataFrame({"x": rng.normal(size=40), "y": rng.normal(size=40)})}
    with pytest.raises(hp.DataError) as single:
        hp.lmm("y ~ x + (1 | x)", frames["a"])
    assert "30 levels for 30 observations" in str(single.value)
    for batch in (hp.fit_batch, hp.bayes_batch):
        with pytest.raises(hp.DataError) as refused:
            batch("y ~ x + (1 | x)", frames, progress=False)
        assert str(refused.value) == f"no dataset is left to fit: dataset 'a': {single.value} (as is every dataset)"
    many = [pd.DataFrame({"x": rng.normal(size=30), "y": rng.normal(size=30)}) for _ in range(25)]  # 20 refused:
    # the batch stops there
    with pytest.raises(hp.DataError, match=r"^no dataset is left to fit: dataset 0: grouping factor 'x' has 30 levels "
                                           r"for 30 observations; .* \(as are the 19 datasets after it\)$"):
        hp.fit_batch("y ~ x + (1 | x)", many, progress=False)


def test_the_vote_on_a_columns_kind_reads_the_stacked_error_where_the_first_dataset_has_another_reason():
    """Text responses in three datasets of four, the first also without x: every kept dataset is refused, and the
    retry of the one with numbers (its own fit) read the first dataset's reason (its rows missing), which named the
    voted column only by chance, and gave it to all three rows."""
    frames = {label: _gaussian(seed) for seed, label in enumerate("abcd")}
    for label in "abc":
        frames[label] = frames[label].assign(y=frames[label]["y"].map(lambda v: f"{v:.3f}"))
    frames["a"] = frames["a"].assign(x=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = hp.fit_batch(LINEAR, frames, progress=False)
    assert batch.messages.loc[["b", "c"]].eq("response 'y' must be numeric, got dtype str").all()
    assert batch.objective["d"] == pytest.approx(hp.lmm(LINEAR, frames["d"]).objective, rel=1e-10)


@pytest.mark.parametrize("formula, value", [("y ~ x + (1 + z | g)", 1.0), ("y ~ x + (z || g)", 0.0)])
def test_a_random_slope_on_a_constant_column_is_refused_by_the_single_fit_and_in_its_batch_row(formula, value):
    """z constant in one dataset: the slope's column copies the intercept's (or, 0, carries nothing), so the term's
    covariance is not identified.  The batch's row said converged (a correlation of -1, or a theta left at its
    start); hp.lmm said not converged.  Both refuse it, naming the term.  (Terms on one factor whose columns are
    dependent may still be identified by their separate variances: not refused, test below.)"""
    frames = [_gaussian(seed).assign(z=lambda f: np.cos(np.arange(len(f)))) for seed in range(3)]
    frames[1] = frames[1].assign(z=value)
    batch = _quiet(hp.fit_batch, formula, frames, by="rep", progress=False)
    _assert_refused(batch, 1, "has column(s) z zero or a copy of its earlier columns")
    assert batch.converged.iloc[0] and batch.converged.iloc[2]
    with pytest.raises(hp.DataError, match=r"column\(s\) z zero or a copy of its earlier columns"):
        _quiet(hp.lmm, formula, frames[1])


def test_terms_on_one_factor_with_dependent_columns_but_separate_variances_are_fitted():
    """Compound symmetry beside per-level variances, (1 | g) + (0 + fa | g) + (0 + fb | g): fa + fb is the
    intercept's column, yet the three variances are identified (lme4 fits it); a check across the terms of a factor
    refused it (review)."""
    frame = _gaussian(4, groups=12, per=6).assign(f=lambda d: np.where(np.arange(len(d)) % 2, "a", "b"))
    frame = frame.assign(fa=(frame["f"] == "a").astype(float), fb=(frame["f"] == "b").astype(float))
    fit = _quiet(hp.lmm, "y ~ f + (1 | g) + (0 + fa | g) + (0 + fb | g)", frame)
    batch = _quiet(hp.fit_batch, "y ~ f + (1 | g) + (0 + fa | g) + (0 + fb | g)", [frame, frame], progress=False)
    assert batch.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-8)


def test_a_dataset_lacking_a_level_of_a_factor_in_a_random_term_too_is_refused_not_refitted():
    """(1 + f | g) where one dataset lacks a level of f: its single fit's term has other columns than the batch's,
    so it cannot stand in the batch's row (the refit failed with a KeyError in the row: review); refused by name."""
    frames = [_gaussian(seed, groups=8, per=6).assign(f=lambda d: np.array(["p", "q", "r"])[np.arange(len(d)) % 3])
              for seed in range(3)]
    frames[1] = frames[1][frames[1]["f"] != "r"]
    batch = _quiet(hp.fit_batch, "y ~ f + (1 + f | g)", frames, by="rep", progress=False)
    _assert_refused(batch, 1, "rank 2 in this dataset: f[r] zero or aliased with earlier columns here")
    assert "KeyError" not in batch.messages.iloc[1]


def test_true_false_values_among_numbers_alone_are_refused_in_their_row():
    # pandas stacks a bool column with numbers as numbers: the dataset was fitted on 0/1 where its single fit reads
    # a factor (x[True]), with nothing said (the text case above made an object column, and was caught)
    frames = [_gaussian(0), _gaussian(1).assign(x=lambda f: f["x"] > 0), _gaussian(2)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds true/false values in this dataset but numbers in 2 other datasets")


def test_a_categorical_of_numbers_beside_numbers_is_read_as_its_single_fit_reads_it():
    """pandas stacks a Categorical of numbers with numbers as numbers: a dataset whose x was a Categorical (a factor
    in its single fit) was fitted as a covariate, and where most datasets held Categoricals the batch fitted them all
    so, with nothing said (the forty-third session's probe).  The kinds' vote is now taken before stacking."""
    frames = [_gaussian(0), _gaussian(1).assign(x=lambda f: pd.Categorical(np.digitize(f["x"], [-0.5, 0.5]))),
              _gaussian(2)]
    batch = hp.fit_batch(LINEAR, frames, by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds text or categories in this dataset but numbers in 2 other datasets")
    # most datasets hold the factor: they are fitted as their single fits, the numbers refused
    factors = [frame.assign(x=lambda f: pd.Categorical(np.digitize(f["x"], [-0.5, 0.5]))) for frame in frames]
    batch = hp.fit_batch(LINEAR, [factors[0], _gaussian(1), factors[2]], by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds numbers in this dataset but text or categories in 2 other datasets")
    single = hp.lmm(LINEAR, factors[2])
    assert list(batch.fixed_names) == list(single.fixef.index) == ["Intercept", "x[1]", "x[2]"]
    assert batch.objective.iloc[2] == pytest.approx(single.objective, rel=1e-10)


def test_true_false_values_of_a_column_read_in_the_response_and_a_term_are_refused_in_their_row():
    # y + x ~ x: x is read outside the response too, so its true/false values are a factor in the single fit; the
    # check took every name of the response for a response's alone and fitted that dataset on 0/1, with nothing said
    frames = [_gaussian(0), _gaussian(1).assign(x=lambda f: f["x"] > 0), _gaussian(2)]
    batch = hp.fit_batch(LINEAR.replace("y ~", "y + x ~"), frames, by="rep", progress=False)
    _assert_refused(batch, 1, "column 'x' holds true/false values in this dataset but numbers in 2 other datasets")


def scaled_to_top(values):  # a user's function of the whole column: the column over its maximum
    return values / values.max()


def test_a_function_of_the_whole_column_takes_each_datasets_own_values_whichever_dataset_it_changes_alone():
    """I(x / np.max(x)) where one dataset of 20 has its maximum 8, the others 10: a sample of 16 datasets missed it,
    and its posterior slope was 10/8 of its single fit's (probe).  Each dataset's design is now its own (its single
    fit's values of the call, batch.dataset_transforms), with NumPy's function as with a user's."""
    rng = np.random.default_rng(220)
    frames = []
    for d in range(20):
        top = 8.0 if d == 7 else 10.0
        frame = _gaussian(d)
        frames.append(frame.assign(x=np.r_[top, rng.integers(0, top + 1, len(frame) - 1)].astype(float)))
    for formula in ("y ~ I(x / np.max(x)) + (1 | g)", "y ~ scaled_to_top(x) + (1 | g)"):
        batch = hp.fit_batch(formula, frames, by="rep", progress=False)
        assert not batch.messages.any()
        for d in (6, 7):
            single = hp.lmm(formula, frames[d])
            assert batch.objective.iloc[d] == pytest.approx(single.objective, rel=1e-10)
            np.testing.assert_allclose(batch.beta[d], single.fixef.to_numpy(), rtol=1e-5, atol=1e-6)


def demean(values):  # a user's function of the whole column it is given
    return values - values.mean()


def doubled(values):  # a user's function of each row alone
    return 2.0 * values


@pytest.mark.parametrize("family", [None, "poisson"])
def test_a_users_function_of_the_whole_column_and_one_of_each_row_are_each_single_fits(family):
    # the batch evaluates the formula once on the datasets stacked: demean(x) took every dataset's mean (an
    # intercept 54.8 for the single fit's 75.3, silently), then was refused; each dataset's own values now
    frames = [_gaussian(k).assign(x=lambda f, k=k: f["x"] + 3.0 * k) for k in range(3)]
    if family:
        frames = [frame.assign(y=lambda f: np.round(np.exp(f["y"] / 4))) for frame in frames]
    fitted = {"family": family} if family else {}
    for function in ("demean", "doubled"):
        formula = LINEAR.replace("~ x", f"~ {function}(x)")
        batch = hp.fit_batch(formula, frames, by="rep", progress=False, **fitted)
        single = (hp.glmm if family else hp.lmm)(formula, frames[2], **fitted)
        assert batch.objective.iloc[2] == pytest.approx(-2 * single.loglik if family else single.objective,
                                                        rel=1e-8)
        np.testing.assert_allclose(batch.beta[2], single.fixef.to_numpy(), rtol=1e-5)


def test_stateful_transforms_are_each_datasets_own_and_a_dataset_its_own_design_refuses_says_why():
    """scale(), center() and poly() were refused by fit_batch (on the long frame they take every dataset's mean,
    sd or basis); they are each dataset's own now, in the response and in a random-effect term too.  A dataset
    whose own scale() or poly() is not finite (x constant in it, or of two values for poly(x, 2)) is refused in its
    row in its single fit's words, and one whose own poly() drops an aliased column (x of three values for
    poly(x, 3)) is fitted alone, as its single fit, NaN in that column."""
    frames = [_gaussian(k).assign(x=lambda f, k=k: (1.0 + k) * f["x"] + 3.0 * k) for k in range(3)]
    frames.append(_gaussian(3).assign(x=2.0))
    frames += [_gaussian(k).assign(x=lambda f, k=k: (np.arange(len(f)) % k).astype(float)) for k in (2, 3)]
    formulas = ("y ~ scale(x) + (1 | g)", "scale(y) ~ center(x) + (0 + scale(x) | g)", "y ~ poly(x, 2) + (1 | g)",
                "y ~ poly(x, 3) + (1 | g)", "y ~ cr(x, df=4) + (1 | g)")
    for formula in formulas:
        batch = hp.fit_batch(formula, frames, by="rep", progress=False)
        for d, frame in enumerate(frames):
            try:
                single = _quiet(hp.lmm, formula, frame)
            except (hp.DataError, hp.FormulaError) as refused:  # (cr() of too few values: formulae's words)
                _assert_refused(batch, d, str(refused))
                continue
            assert batch.objective.iloc[d] == pytest.approx(single.objective, rel=1e-10), formula
            fixef = batch.fixef.iloc[d].dropna()
            assert list(fixef.index) == list(single.fixef.index)
            np.testing.assert_allclose(fixef, single.fixef, rtol=1e-5, atol=1e-6)
            if d == 5 and "poly(x, 3)" in formula:  # (its own design drops the aliased cubic: fitted alone)
                assert list(single.fixef.index) == ["Intercept", "poly(x, 3)[0]", "poly(x, 3)[1]"]
                assert batch.messages.iloc[d].startswith("poly(x, 3)[2] not in its own design (zero or aliased in it)")
        assert batch.messages.iloc[3] and not batch.messages.iloc[:3].any()
    plan = plan_batch("y ~ poly(x, 2) + (1 | g)", frames[:3], "rep", "bayes_batch", "hp.bayes", one_term=False)
    np.testing.assert_array_equal(plan.design.X[plan.dataset == 1], _quiet(hp.lmm, "y ~ poly(x, 2) + (1 | g)",
                                                                            frames[1]).design.X)


def _curved(seed: int, loc: float = 0.0, levels: str = "abc") -> pd.DataFrame:
    """A quadratic in u (x = u + loc), a three-level factor f (``levels``), an offset column o."""
    rng = np.random.default_rng(seed)
    g = np.arange(48) // 6
    u = rng.uniform(0, 1, 48)
    return pd.DataFrame({"y": 1 + 2 * u - 3 * u ** 2 + rng.normal(size=8)[g] + 0.3 * rng.normal(size=48),
                         "x": u + loc, "g": g.astype(str), "f": np.resize(np.array(list(levels)), 48),
                         "o": rng.normal(0, 3, 48) * (seed > 0)})


@pytest.mark.parametrize("formula, frames, alone, kwargs", [
    # the long frame (x at 0..1 and at 3e7 + 0..1) took I(scale(x) ** 2) for aliased with scale(x) and dropped it
    # from every dataset, silently
    ("y ~ scale(x) + I(scale(x) ** 2) + (1 | g)", [_curved(0), _curved(1, 3e7), _curved(2, 3e7)], (), {}),
    # a level dataset 2 lacks: its scale(x):f[c] is zero, fitted alone as x:f[c] is (it was refused)
    ("y ~ scale(x) * f + (1 | g)", [_curved(1), _curved(2), _curved(3, levels="ab")], (2,), {}),
    # the pooled values' log is not finite on the long frame, each dataset's is: the batch was refused
    ("y ~ np.log(x - np.mean(x) + 0.6) + (1 | g)", [_curved(0), _curved(1, 100.0)], (), {}),
    # x aliased after poly(x, 2) in every dataset: dropped, as each single fit drops it (not in the long frame's
    # check, which skips the pooled poly() columns)
    ("y ~ poly(x, 2) + x + (1 | g)", [_curved(0), _curved(1, 5.0)], (), {}),
    # the same with the one-column transform (no whole design but the first's, whose aliasing it missed); and one
    # dataset, whose long frame is its own rows, checked as its single fit's
    ("y ~ scale(x) + x + (1 | g)", [_curved(0), _curved(1, 5.0)], (), {}),
    ("y ~ poly(x, 2) + x + (1 | g)", [_curved(0)], (), {}),
    # a random-effect column and a response of pooled values not finite on the long frame, each dataset's finite
    ("y ~ x + (1 + np.log(x - np.mean(x) + 0.6) | g)", [_curved(0), _curved(1, 100.0)], (), {}),
    ("np.log(y - np.mean(y) + 6) ~ x + (1 | g)", [_curved(0), _curved(1).assign(y=lambda d: d["y"] + 50)], (), {}),
    # binary(f) takes the first sorted level of the column it is given: the stacked datasets' "a" for a dataset of
    # levels b, c (the third review); and a Poisson response made by a call, whose pooled values are not counts
    ("y ~ x + I(x + binary(f)) + (1 | g)", [_curved(0), _curved(1, levels="bc"), _curved(2)], (), {}),
    ("I(k - np.max(k) + 8) ~ x + (1 | g)", [_curved(d).assign(k=lambda f, d=d: np.round(np.exp(f["y"] / 2)) + 30 * d)
                                            for d in range(3)], (), {"family": "poisson"}),
    # datasets of the same x, t, g share one build: its offset= column was the first dataset's for both
    ("y ~ x + offset(scale(x)) + (1 | g)", [_curved(0), _curved(0).assign(o=_curved(1)["o"])], (), {"offset": "o"}),
])
def test_the_reviews_whole_column_cases_are_each_datasets_single_fit(formula, frames, alone, kwargs):
    batch = _quiet(hp.fit_batch, formula, frames, by="rep", progress=False, **kwargs)
    for d, frame in enumerate(frames):
        single = _quiet(hp.glmm if "family" in kwargs else hp.lmm, formula, frame, **kwargs)
        objective = -2 * single.loglik if "family" in kwargs else single.objective
        assert batch.objective.iloc[d] == pytest.approx(objective, rel=1e-8), (d, batch.messages.iloc[d])
        fixef = batch.fixef.iloc[d].dropna()
        assert list(fixef.index) == list(single.fixef.index)
        np.testing.assert_allclose(fixef, single.fixef, rtol=1e-5, atol=1e-6)
        assert bool(batch.messages.iloc[d]) == (d in alone)


def test_one_columns_transforms_are_the_whole_designs_values_to_the_bit(monkeypatch):
    """scale(x), center(x), standardize(x), poly(x, 2), bs(x, df=4) of one column are applied per dataset by the
    transform itself (not a whole design a dataset): the long design is that of whole designs, bit for bit, with an integer column, rows
    dropped for a missing x, and the transform in a random slope."""
    import hierpool.batch.dataset_transforms as transforms

    frames = [_gaussian(k).assign(x=lambda f, k=k: (1.0 + k) * f["x"] + 3.0 * k,
                                  n=lambda f, k=k: np.arange(len(f)) % (3 + k),
                                  w=lambda f, k=k: np.cos(np.arange(len(f)) + k),
                                  v=lambda f, k=k: np.sin(2.0 * np.arange(len(f)) + k) + k,
                                  u=lambda f, k=k: np.arange(len(f)) ** 1.5 / (1 + k)) for k in range(4)]
    frames[2].loc[4, "x"] = np.nan
    formula = "y ~ scale(x) + center(n) + standardize(w) + poly(v, 2) + bs(u, df=4) + (1 + scale(x) | g)"
    builds = []
    own_made = transforms._own_made
    monkeypatch.setattr(transforms, "_own_made", lambda *args: builds.append(1) or own_made(*args))
    plans = [plan_batch(formula, frames, "rep", "fit_batch", "hp.lmm", one_term=False)]
    assert len(builds) == 1, "the first dataset's whole design alone, which checks the transforms' values"
    monkeypatch.setattr(transforms, "column_calls", lambda *args: None)
    plans.append(plan_batch(formula, frames, "rep", "fit_batch", "hp.lmm", one_term=False))
    fast, whole = (plan.design for plan in plans)
    np.testing.assert_array_equal(fast.X, whole.X)
    np.testing.assert_array_equal(fast.terms[0].z, whole.terms[0].z)
    single = _quiet(hp.lmm, formula, frames[2])
    np.testing.assert_array_equal(fast.X[plans[0].dataset == 2], single.design.X)


def test_only_what_the_users_function_makes_is_each_datasets_own_and_a_true_false_response_is_its_numbers():
    # the review's cases: a dataset lacking a level codes C(f, Sum) otherwise, which refused the whole batch in the
    # name of doubled() (only the columns a call makes are the dataset's own design's); a Bernoulli response given as True/False
    # in one dataset is its 1/0, which the bool-among-numbers check refused
    frames = [_gaussian(k).assign(f=lambda d: np.array(["a", "b", "c"])[np.arange(len(d)) % 3]) for k in range(3)]
    frames.append(_gaussian(3).assign(f=lambda d: np.array(["a", "b"])[np.arange(len(d)) % 2]))
    formula = "y ~ doubled(x) + C(f, Sum) + (1 | g)"
    batch = hp.fit_batch(formula, frames, by="rep", progress=False)
    assert not batch.messages.iloc[:3].any()
    for k in range(3):
        assert batch.objective.iloc[k] == pytest.approx(_quiet(hp.lmm, formula, frames[k]).objective, rel=1e-8)
    _assert_refused(batch, 3, "rank 3 in this dataset")
    binary = [_bernoulli(k) for k in range(3)]
    binary[0] = binary[0].assign(bern=binary[0]["bern"].astype(bool))
    batch = _quiet(hp.fit_batch, BERNOULLI, binary, by="rep", family="binomial", progress=False)
    single = _quiet(hp.glmm, BERNOULLI, binary[0].assign(bern=binary[0]["bern"].astype(int)), family="binomial")
    assert not batch.messages.any()
    np.testing.assert_allclose(batch.fixef.loc[0].to_numpy(dtype=float), single.fixef.to_numpy(), rtol=1e-5)


def test_datasets_ordering_a_factors_levels_otherwise_are_refused_in_their_rows():
    """A single fit codes a Categorical in its categories' order (the first used level the baseline).  Stacked,
    Categoricals of other categories became text, sorted, and a dataset ordering its levels c, b, a was fitted with
    baseline a where its single fit takes c: other coefficients, silently.  Such a dataset is now refused in its row;
    datasets whose orders agree (one with an unused category, one of text in the same order) are fitted, each as its
    single fit."""

    def dataset(seed):
        r = np.random.default_rng(seed)
        frame = pd.DataFrame({"f": r.choice(list("abc"), 60), "x": r.normal(size=60), "g": np.repeat(list("pqrstu"), 10)})
        return frame.assign(y=frame["x"] + frame["f"].map({"a": 0.0, "b": 1.0, "c": 2.0}) + r.normal(size=60))

    formula = "y ~ x + f + (1 | g)"
    forward = pd.CategoricalDtype(["a", "b", "c", "d"])  # (d unused)
    frames = [dataset(0).astype({"f": forward}), dataset(1).astype({"f": pd.CategoricalDtype(list("cba"))}),
              dataset(2), dataset(3).astype({"f": forward})]
    batch = hp.fit_batch(formula, frames, progress=False)
    assert "orders its levels ['c', 'b', 'a'] (its single fit's baseline 'c')" in batch.messages.iloc[1]
    assert np.isnan(batch.objective.iloc[1])
    for d in (0, 2, 3):
        single = hp.lmm(formula, frames[d])
        assert batch.objective.iloc[d] == pytest.approx(single.objective, rel=1e-8)
        np.testing.assert_allclose(batch.fixef.iloc[d][single.fixef.index], single.fixef, rtol=1e-6)
    # the odd order first in the batch: the others' order is still the batch's (it took the first Categorical's,
    # and set the other three aside)
    first = hp.fit_batch(formula, [frames[1], frames[0], frames[2], frames[3]], progress=False)
    assert "orders its levels ['c', 'b', 'a']" in first.messages.iloc[0]
    np.testing.assert_allclose(first.objective.iloc[1:].to_numpy(), batch.objective.iloc[[0, 2, 3]].to_numpy(),
                               rtol=1e-10)
    # text counts for its sorted order: two text datasets and a sorted Categorical outvote the odd one placed first
    text = hp.fit_batch(formula, [frames[1], dataset(2), dataset(4), frames[0]], progress=False)
    assert "orders its levels ['c', 'b', 'a']" in text.messages.iloc[0] and not text.messages.iloc[1:].any()


def test_a_grouping_column_of_numbers_beside_text_gives_each_dataset_its_single_fits_level_order():
    """Stacked beside another dataset's text, a dataset's numbers 0..11 were read as their text and ordered so
    (0, 1, 10, 11, 2, ...): its values were its single fit's, its ranef rows in another order.  Each dataset's
    levels now come in its own single fit's order (numbers as numbers, text as text), as one frame with by= too."""
    numbers = _gaussian(0, groups=12).assign(g=lambda f: pd.factorize(f["g"])[0])
    text = _gaussian(1).assign(g=lambda f: np.asarray(["k", "j", "a", "b"])[pd.factorize(f["g"])[0] % 4])
    assert numbers["g"].nunique() > 10
    long = pd.concat([numbers.assign(rep=0), text.assign(rep=1)], ignore_index=True)
    for data, by in (([numbers, text], "dataset"), (long, "rep")):
        batch = _quiet(hp.fit_batch, "y ~ x + (1 | g)", data, by=by, progress=False)
        for d, frame in enumerate((numbers, text)):
            single = hp.lmm("y ~ x + (1 | g)", frame).ranef
            rows = batch.ranef[batch.ranef[by] == d]
            assert list(rows["grp"]) == list(single["grp"]), (by, d)
            np.testing.assert_allclose(rows["condval"], single["condval"], rtol=1e-6, atol=1e-9)


def test_a_dataset_names_the_term_its_single_fit_names_first():
    """Its single fit checks the terms in lme4's order by the dataset's own level counts: where factor a has one level
    and b a level a row, it names b; the batch checked them in the long frame's order and named a (review)."""
    # (stacked, a has more levels than b: the long frame's order checks a first)
    frames = [_gaussian(seed, groups=6, per=5).assign(a=np.resize([f"a{i}" for i in range(20)], 30),
                                                       b=np.resize(["u", "v", "w"], 30)) for seed in (0, 1)]
    frames.append(_gaussian(2, groups=4, per=3).assign(a="only", b=[f"b{i}" for i in range(12)]))
    formula = "y ~ x + (1 | a) + (1 | b)"
    with pytest.raises(hp.DataError) as refused:
        hp.lmm(formula, frames[2])
    assert "'b' has 12 levels for 12 observations" in str(refused.value)
    batch = _quiet(hp.fit_batch, formula, frames, progress=False)
    assert batch.messages.iloc[2] == str(refused.value) and batch.converged.iloc[:2].all()


def test_grouping_labels_of_other_types_across_datasets_and_a_response_too_small_to_square():
    """Each dataset is fitted as its single fit reads it: a grouping column of numbers in one dataset and of text in
    another met in one stacked column, where 3 and "3" were refused for the whole batch though every single fit
    reads its own; a dataset mixing them itself is refused in its row, with its single fit's words.  A dataset whose
    response is too small to square (below 1e-140) passed the long frame's check (its largest value is another
    dataset's) and was fitted to a search that stopped on NaN steps; it is refused in its row too."""
    base = _gaussian(0)
    as_numbers = base.assign(g=pd.factorize(base["g"])[0])
    as_text = _gaussian(1).assign(g=lambda f: pd.factorize(f["g"])[0].astype(str))
    collided = _gaussian(2).assign(g=lambda f: pd.Series(pd.factorize(f["g"])[0], dtype=object))
    threes = collided.index[collided["g"] == 3]
    collided.loc[threes[::2], "g"] = "3"  # the others stay the number 3
    tiny = _gaussian(3).assign(y=lambda f: f["y"] * 1e-142)
    frames = [as_numbers, as_text, collided, tiny]
    batch = _quiet(hp.fit_batch, "y ~ x + (1 | g)", frames, progress=False)
    for d in (0, 1):
        assert batch.objective.iloc[d] == pytest.approx(hp.lmm("y ~ x + (1 | g)", frames[d]).objective, rel=1e-8)
    for d, words in ((2, "all read as the level '3'"), (3, "below 1e-140")):
        with pytest.raises(hp.DataError, match=words) as refused:
            hp.lmm("y ~ x + (1 | g)", frames[d])
        assert batch.messages.iloc[d] == str(refused.value) and np.isnan(batch.objective.iloc[d])
    # one frame with by= and a weights array (the rows of a refused dataset stay: the array still matches them); a
    # column the formula does not read may mix anything; a dataset lacking the grouping column is refused in its row
    long = pd.concat([f.assign(rep=d) for d, f in enumerate(frames[:3])], ignore_index=True)
    by = _quiet(hp.fit_batch, "y ~ x + (1 | g)", long.assign(note=[3, "3"] * (len(long) // 2)), by="rep",
                weights=np.ones(len(long)), progress=False)
    np.testing.assert_allclose(by.objective.iloc[:2], batch.objective.iloc[:2], rtol=1e-10)
    assert "all read as the level '3'" in by.messages.iloc[2]
    lacking = _quiet(hp.fit_batch, "y ~ x + (1 | g)", [as_numbers, as_text, _gaussian(4).drop(columns="g")],
                     progress=False)
    assert "the model uses column 'g', which is not in this dataset" in lacking.messages.iloc[2]
    np.testing.assert_allclose(lacking.objective.iloc[:2], batch.objective.iloc[:2], rtol=1e-10)


def test_a_column_held_twice_and_multiindex_columns_are_refused_by_name():
    """A by, grouping or weights column held twice, or MultiIndex columns: pandas' TypeError or AttributeError
    ("'DataFrame' object has no attribute 'dtype'") in hp.fit_batch, and in hp.lmm for the weights and the
    MultiIndex (the forty-third session's probe)."""
    frame = pd.concat([_gaussian(0).assign(rep=0), _gaussian(1).assign(rep=1)], ignore_index=True).assign(w=1.0)

    def twice(name):
        return pd.concat([frame, frame[[name]]], axis=1)

    for name, call in (("rep", lambda d: hp.fit_batch(LINEAR, d, by="rep", progress=False)),
                       ("g", lambda d: hp.fit_batch(LINEAR, d, by="rep", progress=False)),
                       ("w", lambda d: hp.fit_batch(LINEAR, d, by="rep", weights="w", progress=False)),
                       ("w", lambda d: hp.lmm(LINEAR, d, weights="w"))):
        with pytest.raises(hp.DataError, match=f"column '{name}' appears 2 times"):
            call(twice(name))
    flat = frame.drop(columns="w").set_axis(pd.MultiIndex.from_tuples([(c, "a") for c in frame.columns[:-1]]),
                                            axis=1)
    for call in (lambda d: hp.fit_batch(LINEAR, d, by="rep", progress=False), lambda d: hp.lmm(LINEAR, d)):
        with pytest.raises(hp.DataError, match="MultiIndex columns"):
            call(flat)
    # an unused column held twice is no one's business, as in hp.lmm
    assert np.isfinite(hp.fit_batch(LINEAR, twice("w"), by="rep", progress=False).objective).all()


def test_a_binomial_response_of_no_trials_in_any_row_is_refused_by_name():
    # its rows dropped, NumPy's "zero-size array to reduction operation" followed, in hp.glmm and in a batch whose
    # every dataset has none (the forty-third session's probe)
    frame = _bernoulli(0).assign(s=0, f=0)
    with pytest.raises(hp.DataError, match=r"'cbind\(s, f\)' has 0 trials in every row"):
        _quiet(hp.glmm, "cbind(s, f) ~ x + (1 | g)", frame, family="binomial")
    with pytest.raises(hp.DataError, match=r"'cbind\(s, f\)' has 0 trials in every row"):
        _quiet(hp.fit_batch, "cbind(s, f) ~ x + (1 | g)", [frame, frame], family="binomial", progress=False)


def test_a_row_whose_search_stopped_and_whose_single_fit_raises_holds_no_estimates():
    """A Poisson count of 1e20: the batch's search stopped short, and hp.glmm raises on the dataset; the row kept
    the stopped search's numbers (an intercept of 6.7, -2 log L 5.5e12), which hp.bootstrap would have counted as a
    replicate, and NumPy's overflow warnings reached the user (the forty-third session's probe)."""
    rng = np.random.default_rng(4)
    frames = [pd.DataFrame({"g": np.repeat(list("abcdef"), 5), "x": rng.normal(size=30),
                            "y": rng.poisson(2.0, 30).astype(float)}) for _ in range(2)]
    frames[0].loc[3, "y"] = 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(hp.ConvergenceError):
            hp.glmm("y ~ x + (1 | g)", frames[0], family="poisson")
        batch = hp.fit_batch("y ~ x + (1 | g)", frames, family="poisson", progress=False)
    assert "refit by hp.glmm failed: ConvergenceError" in batch.messages.iloc[0]
    assert np.isnan(batch.objective.iloc[0]) and np.isnan(batch.beta[0]).all() and np.isnan(batch.theta[0]).all()
    assert not batch.converged.iloc[0] and not batch.is_singular.iloc[0]
    assert np.isfinite(batch.objective.iloc[1]) and batch.converged.iloc[1]


def test_a_response_less_its_offset_that_is_constant_is_refused_by_name():
    # offset = the response: hp.lmm raised ConvergenceError (no finite criterion), and the batch's row held an
    # objective of inf with NumPy's divide warnings (the forty-third session's probe)
    frame = _gaussian(0)
    with pytest.raises(hp.DataError, match="response 'y' less the offset is constant"):
        hp.lmm(LINEAR, frame, offset="y")
    batch = hp.fit_batch(LINEAR, [frame.assign(o=frame["y"]), frame.assign(o=0.0)], by="rep", offset="o",
                         progress=False)
    _assert_refused(batch, 0, "response 'y' less the offset is constant")
    assert batch.objective.iloc[1] == pytest.approx(hp.lmm(LINEAR, frame).objective, rel=1e-10)


def test_weights_or_an_offset_of_text_values_are_refused_as_their_column_is():
    # text as a column is refused ("must be numeric"); as an array it was read as numbers (the forty-third
    # session's probe)
    frame = _gaussian(0).assign(rep=0)
    for values in (np.array(["2", "0.5"] * 15), pd.Categorical(["2", "1"] * 15), np.array([True, False] * 15),
                   pd.Categorical([2.0, 1.0] * 15)):  # (a Categorical of numbers is refused as a column too)
        for fit in (hp.lmm, partial(hp.fit_batch, by="rep", progress=False)):
            with pytest.raises(hp.ArgumentError, match="weights must be numbers"):
                fit(LINEAR, frame, weights=values)
        with pytest.raises(hp.ArgumentError, match="offset must be numbers"):
            hp.lmm(LINEAR, frame, offset=values)
