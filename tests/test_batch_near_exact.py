"""A response X fits to rounding (noise-free data, or one varying only at its rounding) in a long frame of datasets
with rows of their own: fitted alone by the single fit, whose outcome is its row (hierpool.batch.near_exact), on
every linear path; the shared design's responses are tested in test_batch_shared_design.py."""

import warnings

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.algebra.checks import AT_ROUNDING, NEAR_EXACT, fits_to_rounding
from hierpool.batch.near_exact import REASON, near_exact_datasets

ONE_TERM, SLOPES, TWO_TERMS = ("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days | Subject)",
                               "Reaction ~ Days + (1 | Subject) + (1 | week)")


@pytest.fixture(scope="module")
def frame():
    """Five sleepstudy datasets, each without a subject of its own (designs of their own: the long frame's path):
    dataset 1 noise-free (a line of Days: hp.lmm refuses it), 2 varying at its rounding (hp.lmm fits it), 3 a
    residual of 1e-7 of its spread (fitted in the batch: its residual variance is what X leaves, nothing vanished), 0
    and 4 noisy; weights and an offset that X does not fit."""
    sleep = hp.datasets.sleepstudy()
    rng = np.random.default_rng(5)
    frames = []
    for d in range(5):
        data = sleep[sleep.Subject != sleep.Subject.unique()[d]].assign(dataset=d)
        reaction = data.Reaction.to_numpy() + rng.normal(0, 20, len(data))
        if d == 1:
            reaction = 250.0 + 10.0 * data.Days.to_numpy()
        elif d == 2:
            reaction = 1.0 + 1e-15 * (np.arange(len(data)) % 2)
        elif d == 3:
            line = 250.0 + 10.0 * data.Days.to_numpy()
            reaction = line + 1e-7 * line.std() * rng.normal(size=len(data))
        frames.append(data.assign(Reaction=reaction, week=(data.Days // 5).astype(str)))
    return pd.concat(frames, ignore_index=True)


def _single(formula, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.lmm(formula, data, **kwargs)


def _assert_the_single_fits_outcome(batch, d, formula, data, **kwargs):
    """Dataset ``d``'s row is set aside for hp.lmm (:data:`REASON`) and holds its outcome: its refusal in its words,
    or its fit."""
    assert batch.messages[d].startswith(REASON)
    try:
        alone = _single(formula, data, **kwargs)
    except hp.HierpoolError as refused:  # (the one-term fits of the noise-free line)
        assert np.isnan(batch.objective[d]) and not batch.converged[d] and str(refused) in batch.messages[d]
    else:
        assert batch.refit[d] and batch.objective[d] == pytest.approx(alone.objective, rel=1e-12)


@pytest.mark.parametrize("formula, kwargs", [(ONE_TERM, {}), (SLOPES, {"reml": False}), (TWO_TERMS, {}),
                                             (ONE_TERM, {"correlation": hp.ar1("Subject", time="Days")})],
                         ids=["one term", "slopes ML", "two terms", "AR(1)"])
def test_a_dataset_x_fits_to_rounding_is_the_single_fits_outcome(frame, formula, kwargs):
    """Each path's row of a near-exact dataset is hp.lmm's outcome on it (before: the batch's sums' rounding noise,
    "converged" at a criterion of its own); the others are the batch's own fits, equal to hp.lmm's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (hp.lmm's own, on the datasets fitted alone)
        batch = hp.fit_batch(formula, frame, by="dataset", progress=False, polish=False, **kwargs)
    for d in (1, 2):
        _assert_the_single_fits_outcome(batch, d, formula, frame[frame.dataset == d], **kwargs)
    for d in (0, 3, 4):
        fit = _single(formula, frame[frame.dataset == d], **kwargs)
        assert not batch.refit[d], batch.messages[d]
        assert batch.objective[d] == pytest.approx(fit.objective, rel=1e-8)


def test_weights_and_an_offset_enter_the_rule(frame):
    """An offset X does not fit makes the noise-free response y - offset noisy (fitted in the batch); the same
    offset on a line of Days leaves it noise-free.  Weights scale each row's part alike."""
    rng = np.random.default_rng(2)
    data = frame[frame.dataset.isin([0, 1])].assign(w=lambda f: rng.uniform(0.5, 2.0, len(f)))
    noisy = rng.normal(0, 5, len(data))
    shifted = hp.fit_batch(ONE_TERM, data, by="dataset", weights="w", offset=noisy, progress=False)
    assert not shifted.refit.any() and shifted.converged.all()
    fit = _single(ONE_TERM, data[data.dataset == 1], weights="w", offset=noisy[data.dataset.to_numpy() == 1])
    assert shifted.objective[1] == pytest.approx(fit.objective, rel=1e-8)
    offset = 3.0 * data.Days.to_numpy()
    line = hp.fit_batch(ONE_TERM, data, by="dataset", weights="w", offset=offset, progress=False)
    assert not line.refit[0] and line.converged[0]
    rows = data.dataset.to_numpy() == 1
    _assert_the_single_fits_outcome(line, 1, ONE_TERM, data[rows], weights="w", offset=offset[rows])


def test_the_rule_reads_each_datasets_sums():
    """The two bars (the residual against the spread, and against the size) on each side, per dataset of rows."""
    spread, size = 4.0, 1e6
    below, above = (NEAR_EXACT * 0.9) ** 2 * spread, (NEAR_EXACT * 1.1) ** 2 * spread
    np.testing.assert_array_equal(fits_to_rounding(np.array([below, above]), spread, size), [True, False])
    tiny = (AT_ROUNDING * 0.9) ** 2 * size
    assert fits_to_rounding(np.array([tiny]), 0.0, size)[0] and not fits_to_rounding(np.array([tiny]), 0.0, 0.9)[0]
    # a long frame's rows: dataset 0 a line plus noise, 1 the line, 2 a large location plus noise (not near)
    x = np.tile(np.arange(6.0), 3)
    noise = np.random.default_rng(0).normal(size=6)
    target = np.concatenate([1 + x[:6] + noise, 1 + x[:6], 1e13 + noise])
    dataset = np.repeat(np.arange(3), 6)
    X = np.column_stack([np.ones(18), x])
    residual = target.copy()
    for d in range(3):
        rows = dataset == d
        residual[rows] -= X[rows] @ np.linalg.lstsq(X[rows], target[rows], rcond=None)[0]
    near = near_exact_datasets(dataset, target, residual, np.ones(18), 3)
    np.testing.assert_array_equal(near, [False, True, False])


def test_known_residual_sds_leave_no_residual_to_round():
    """With se= the criterion holds no residual variance: a dataset X fits exactly (as many rows as fixed effects)
    is not set aside for its residual, on the long frame or as responses on one design."""
    rng = np.random.default_rng(3)
    data = pd.DataFrame({"g": np.repeat(["a", "b", "c"], 4), "x": rng.normal(size=12), "se": rng.uniform(0.5, 1.5, 12)})
    lines = np.column_stack([1 + 2 * data.x, rng.normal(size=12), 3 - data.x])
    frame = pd.concat([data.assign(y=lines[:, j], dataset=j) for j in range(3)], ignore_index=True)
    frame = frame.drop(index=[13])  # (a row fewer in one dataset: the long frame's own path)
    for batch in (hp.fit_batch("y ~ x + (1 | g)", frame, by="dataset", se="se", progress=False),
                  hp.fit_batch("y ~ x + (1 | g)", data, responses=lines, se="se", progress=False)):
        assert not batch.messages.str.startswith(REASON).any(), batch.messages.tolist()


def test_a_shared_designs_noise_free_response_on_a_column_far_from_centred_is_found():
    """x = 1e5 + Days: the normal equations of the user's X lost a noise-free response's residual digits (1e-6 of
    its spread: not flagged, "converged" at -7,900 where hp.lmm's fit is -10,816); X's QR keeps them."""
    sleep = hp.datasets.sleepstudy()
    design = sleep.assign(x=1e5 + sleep.Days)
    formula = "Reaction ~ x + (1 | Subject)"
    line = 250.0 + 10.0 * sleep.Days.to_numpy()
    batch = hp.fit_batch(formula, design, responses=np.c_[line, sleep.Reaction], progress=False)
    _assert_the_single_fits_outcome(batch, 0, formula, design.assign(Reaction=line))
    assert not batch.messages.iloc[1] and not batch.refit.iloc[1]


def test_sums_beyond_a_float_flag_nothing():
    """Weights of 1e300 overflow the sums: inf <= 1e-16 inf would flag a noisy response."""
    assert not fits_to_rounding(np.array([np.inf]), np.array([np.inf]), np.array([np.inf]))[0]
    assert not fits_to_rounding(np.array([1.0]), np.array([np.inf]), np.array([1.0]))[0]
