"""Formula parts that only name numeric columns are read without formulae (hierpool.spec.columns):
the same names, columns, levels and new-data encoding as formulae gives, and formulae still reads
every other part."""

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.spec import columns, design, formula
from hierpool.spec.newdata import model_rows

FORMULAE = [
    "y ~ x + (x | g)",
    "y ~ 1 + x + (0 + x | g)",
    "y ~ x + z + (x || g)",
    "y ~ 0 + x + (1 | g)",
    "y ~ (1 | g)",
    "y ~ x + z + (1 + x + z || g) + (1 | h)",
    "y ~ z + x + (z + x | g)",
    "y ~ x + (1 | g:h)",
    "y ~ x + (z + x + 1 || g)",  # lme4 puts the intercept's term first, on both paths
    "y ~ x + (1 | g) + (1 | h)",
    "y ~ x + f + (1 | g)",  # f is categorical: its part goes to formulae
    "y ~ x + (b | g)",  # b is boolean: formulae encodes it
    "y ~ x + (1 | g/h)",  # nesting: lme4's expandSlash, (1 | h:g) + (1 | g)
    "y ~ x + (x | g/h)",
    "y ~ x + (x || g/h/f)",
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    n = 120
    g, h = rng.integers(0, 10, n), rng.integers(0, 4, n)
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "z": rng.integers(0, 5, n),  # integer: numeric for formulae too
            "g": [f"s{i}" for i in g],
            "h": h,
            "f": np.array(["a", "b", "c"])[np.arange(n) % 3],
            "b": np.arange(n) % 2 == 0,
        }
    )
    frame["y"] = 1 + frame.x + rng.normal(size=10)[g] + rng.normal(size=4)[h] + rng.normal(size=n)
    return frame


def _formulae_only(monkeypatch):
    """Send every part to formulae, as before spec.columns existed."""
    for module in (formula, design):
        for name in ("plain_part", "plain_fixed", "plain_grouping"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *args: None)
    formula._parse.cache_clear()


@pytest.mark.parametrize("text", FORMULAE)
def test_plain_parts_read_as_formulae_reads_them(data, text, monkeypatch):
    fast = design.build_design(text, data)
    with monkeypatch.context() as patch:
        _formulae_only(patch)
        reference = design.build_design(text, data)
    formula._parse.cache_clear()
    assert fast.spec == reference.spec
    assert fast.fixed_names == reference.fixed_names and fast.columns == reference.columns
    np.testing.assert_array_equal(fast.y, reference.y)
    np.testing.assert_array_equal(fast.X, reference.X)
    assert len(fast.terms) == len(reference.terms)
    for a, b in zip(fast.terms, reference.terms):
        assert (a.group, a.coef_names, a.spec) == (b.group, b.coef_names, b.spec)
        np.testing.assert_array_equal(a.levels, b.levels)
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.z, b.z)
    new = data.iloc[::7].assign(x=lambda d: d.x + 1.0)
    X, terms, offset = model_rows(fast, new)
    X_ref, terms_ref, offset_ref = model_rows(reference, new)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(offset, offset_ref)
    for (z, level), (z_ref, level_ref) in zip(terms, terms_ref):
        np.testing.assert_array_equal(z, z_ref)
        np.testing.assert_array_equal(level, level_ref)


def test_which_parts_are_plain():
    assert columns.plain_part("1 + Days") == columns.PlainPart(True, ("Days",))
    assert columns.plain_part("0 + Days") == columns.PlainPart(False, ("Days",))
    assert columns.plain_part("Days") == columns.PlainPart(True, ("Days",))
    for text in ("0", "0 + 1 + x", "x + x", "log(x)", "x:z", "x * z", "x - 1", "C(x)", "I(x**2)", "True", "_x"):
        assert columns.plain_part(text) is None, text
    assert columns.plain_fixed("y ~ x") == ("y", columns.PlainPart(True, ("x",)))
    assert columns.plain_fixed("log(y) ~ x") is None
    assert columns.plain_grouping("a:b") == (("a", "b"),)
    assert columns.plain_grouping("a/b/c") == (("c", "b", "a"), ("b", "a"), ("a",))
    for text in ("a:a", "a/a", "a:b/c", "a/", "log(a)"):
        assert columns.plain_grouping(text) is None, text


def test_new_data_with_a_text_column_where_a_number_was_is_refused(data):
    fit = hp.lmm("y ~ x + (1 | g)", data)
    with pytest.raises(hp.HierpoolError, match="'x'"):
        fit.predict(data.iloc[:3].assign(x="a"))


def test_a_one_written_after_a_name_means_what_lme4_means(data):
    # formulae cannot parse (x + 1 | g); lme4 reads it as (1 + x | g): intercept first
    late, early = design.build_design("y ~ x + (x + 1 | g)", data), design.build_design("y ~ x + (1 + x | g)", data)
    assert late.terms[0].coef_names == early.terms[0].coef_names == ("Intercept", "x")
    np.testing.assert_array_equal(late.terms[0].z, early.terms[0].z)


def test_duplicated_and_intercept_named_columns_are_refused_by_name(data):
    with pytest.raises(hp.DataError, match="column 'x' appears 2 times"):
        design.build_design("y ~ x + (1 | g)", pd.concat([data, data[["x"]]], axis=1))
    with pytest.raises(hp.DataError, match="'Intercept'"):
        design.build_design("y ~ Intercept + (1 | g)", data.assign(Intercept=data.x))


@pytest.mark.parametrize("formula", ["y ~ 0 + xb + (1 | g)", "y ~ x + (0 + xb | g)", "y ~ xb:x + (1 | g)",
                                     "y ~ xb + x + (1 | g)"])
def test_a_logical_column_is_a_factor_as_in_r(data, formula):
    # R's model.matrix reads a logical as a factor (xbFALSE, xbTRUE); read as a 0/1 number, the first three were
    # other models, silently (REML 1050.8 for lme4's 1026.4 on the first).  The fit equals the same column's as text
    # (levels "False" < "True": the same baseline), its predictions on new logical rows too; a binomial response
    # stays 0/1, and nullable booleans read alike
    logical = data.assign(xb=data["x"] > 0.3)
    text = logical.assign(xb=logical["xb"].astype(str))
    mine, theirs = hp.lmm(formula, logical), hp.lmm(formula, text)
    assert mine.objective == pytest.approx(theirs.objective, rel=1e-12)
    np.testing.assert_allclose(mine.fixef.to_numpy(), theirs.fixef.to_numpy(), rtol=1e-8)
    assert list(mine.fixef.index) == list(theirs.fixef.index)
    np.testing.assert_allclose(mine.predict(logical.head(5)), theirs.predict(text.head(5)), rtol=1e-10)
    nullable = hp.lmm(formula, logical.assign(xb=logical["xb"].astype("boolean")))
    assert nullable.objective == pytest.approx(mine.objective, rel=1e-12)
    # new data may give the logical as 0/1 (read as False/True: they had matched no level, every row getting True's
    # coefficient), but no other number
    numbers = logical.head(6).assign(xb=logical["xb"].head(6).astype(int))
    np.testing.assert_allclose(mine.predict(numbers), mine.predict(logical.head(6)), rtol=1e-12)
    as_objects = logical.head(6).assign(xb=logical["xb"].head(6).astype(object))  # True/False held as objects
    np.testing.assert_allclose(mine.predict(as_objects), mine.predict(logical.head(6)), rtol=1e-12)
    with pytest.raises(hp.DataError, match="column 'xb' was true/false in fitting"):
        mine.predict(numbers.assign(xb=2))
    # a logical grouping factor's labels are text, as every factor's: "True" in new data is its level True
    grouped = hp.lmm("y ~ x + (1 | xb)", logical)
    np.testing.assert_allclose(grouped.predict(logical.head(6).assign(xb=logical["xb"].head(6).astype(str))),
                               grouped.predict(logical.head(6)), rtol=1e-12)


def test_a_logical_inside_a_call_is_its_values_and_one_with_a_single_value_is_dropped_with_a_warning(data):
    # offset(xb) and I(xb * 1) read the values, as R does (a factor there was refused); a logical with one value is a
    # constant column, dropped by the rank check with its warning (silently dropped as a one-level factor)
    logical = data.assign(xb=data["x"] > 0.3, one=True)
    as_number = logical.assign(xn=logical["xb"].astype(float))
    for written, meant in (("y ~ x + offset(xb) + (1 | g)", "y ~ x + offset(xn) + (1 | g)"),
                           ("y ~ x + I(xb * 1) + (1 | g)", "y ~ x + xn + (1 | g)")):
        assert hp.lmm(written, as_number).objective == pytest.approx(hp.lmm(meant, as_number).objective, rel=1e-12)
    with pytest.warns(hp.HierpoolWarning, match="dropping 1 column.*one"):
        hp.lmm("y ~ x + one + (1 | g)", logical)
