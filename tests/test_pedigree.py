"""hp.pedigree: A by the tabular method, inbreeding by Meuwissen & Luo, A^-1 by Henderson's rules; checks."""

import numpy as np
import pandas as pd
import pytest

import hierpool as hp

# Mrode (2014), "Linear Models for the Prediction of Animal Breeding Values", example 2.1
MRODE = pd.DataFrame({"id": [1, 2, 3, 4, 5, 6], "sire": [0, 0, 1, 1, 4, 5], "dam": [0, 0, 2, 0, 3, 2]})
MRODE_A = np.array([
    [1.0, 0.0, 0.5, 0.5, 0.5, 0.25],
    [0.0, 1.0, 0.5, 0.0, 0.25, 0.625],
    [0.5, 0.5, 1.0, 0.25, 0.625, 0.5625],
    [0.5, 0.0, 0.25, 1.0, 0.625, 0.3125],
    [0.5, 0.25, 0.625, 0.625, 1.125, 0.6875],
    [0.25, 0.625, 0.5625, 0.3125, 0.6875, 1.125],
])


def _random_pedigree(seed: int, generations: int = 8, size: int = 40) -> pd.DataFrame:
    """Small closed population with random mating (so relatives mate: inbreeding), some parents unknown."""
    rng = np.random.default_rng(seed)
    rows, previous = [], [f"f{i}" for i in range(size)]
    rows += [(a, None, None) for a in previous]
    for g in range(generations):
        current = [f"g{g}_{i}" for i in range(size)]
        for animal in current:
            sire, dam = rng.choice(previous, 2, replace=False)
            rows.append((animal, sire if rng.random() > 0.05 else None, dam if rng.random() > 0.05 else np.nan))
        previous = current
    shuffled = [rows[i] for i in rng.permutation(len(rows))]  # offspring before parents in places
    return pd.DataFrame(shuffled, columns=["id", "sire", "dam"])


def test_the_textbook_example():
    a = hp.pedigree.relationship_matrix(MRODE)
    np.testing.assert_allclose(a.loc[[str(i) for i in range(1, 7)], [str(i) for i in range(1, 7)]], MRODE_A,
                               atol=1e-15)
    np.testing.assert_allclose(hp.pedigree.inbreeding(MRODE).loc[["5", "6"]], [0.125, 0.125], atol=1e-15)


def test_inbreeding_and_the_sparse_inverse_agree_with_the_tabular_a():
    ped = _random_pedigree(1)
    a = hp.pedigree.relationship_matrix(ped)
    f = hp.pedigree.inbreeding(ped)
    assert f.max() > 0.1  # the check has inbreeding to get right
    np.testing.assert_allclose(f.loc[a.index].to_numpy(), np.diag(a.to_numpy()) - 1.0, atol=1e-12)
    inverse, ids = hp.pedigree.inverse_relationship_matrix(ped)
    dense = a.loc[ids, ids].to_numpy()
    np.testing.assert_allclose(inverse @ dense, np.eye(len(ids)), atol=1e-9)
    assert inverse.nnz <= 7 * len(ids)  # sparse: each animal touches itself, its parents and their pair


def test_parents_come_first_and_parent_only_animals_are_founders():
    ped = pd.DataFrame({"id": ["calf", "cow"], "sire": ["bull", np.nan], "dam": ["cow", None]})
    a = hp.pedigree.relationship_matrix(ped)
    order = list(a.index)
    assert order.index("calf") > max(order.index("cow"), order.index("bull"))
    assert a.loc["calf", "cow"] == 0.5 and a.loc["calf", "bull"] == 0.5 and a.loc["calf", "calf"] == 1.0


@pytest.mark.parametrize("coding", ["Int64", "dot", "nan text", "NA text"])
def test_every_spelling_of_an_unknown_parent_is_unknown(coding):
    """pandas' NA (an Int64 column: convert_dtypes, nullable reads) was labelled "<NA>", one made-up founder that was
    sire and dam of every animal without known parents: founders related by 1, h^2 0.555 for 0.384.  SAS's "." and
    astype(str)'s "nan" too."""
    expected = hp.pedigree.relationship_matrix(MRODE)
    unknown = MRODE[["sire", "dam"]] == 0
    if coding == "Int64":
        coded = MRODE.astype("Int64").mask(unknown.reindex(columns=MRODE.columns, fill_value=False))
    else:
        text = {"dot": ".", "nan text": "nan", "NA text": "NA"}[coding]
        coded = MRODE.astype(str).mask(unknown.reindex(columns=MRODE.columns, fill_value=False), text)
    a = hp.pedigree.relationship_matrix(coded)
    assert sorted(a.index) == sorted(expected.index)  # no made-up founder
    np.testing.assert_allclose(a.loc[expected.index, expected.index], expected, atol=1e-15)


def test_parents_written_otherwise_than_the_ids_are_refused_by_name():
    """Parents as "4.0" (a float column turned to text) beside ids 4: each became a made-up founder, silently."""
    written = MRODE.assign(sire=MRODE["sire"].astype(float).astype(str), dam=MRODE["dam"].astype(float).astype(str))
    with pytest.raises(hp.DataError, match=r"write 5 parent\(s\) otherwise than its 'id' column.*'1.0' \('1'\)"):
        hp.pedigree.relationship_matrix(written)
    ids_as_text = MRODE.assign(id=MRODE["id"].astype(float).astype(str), sire=MRODE["sire"].astype(float),
                               dam=MRODE["dam"].astype(float))  # the mirror: ids "4.0", parents 4.0 (review)
    with pytest.raises(hp.DataError, match=r"otherwise than its 'id' column.*'1' \('1.0'\)"):
        hp.pedigree.relationship_matrix(ids_as_text)
    # as floats (not text) they are the animals
    floats = MRODE.astype(float)
    np.testing.assert_allclose(hp.pedigree.relationship_matrix(floats), hp.pedigree.relationship_matrix(MRODE))


@pytest.mark.parametrize("frame,message", [
    (pd.DataFrame({"id": ["a", "a"], "sire": [0, 0], "dam": [0, 0]}), "'a' more than once"),
    (pd.DataFrame({"id": ["a", "b"], "sire": ["b", "a"], "dam": [0, 0]}), "loop"),
    (pd.DataFrame({"id": ["a"], "sire": ["a"], "dam": [0]}), "its own parent"),
    (pd.DataFrame({"id": ["a"], "father": [0], "dam": [0]}), "no column 'sire'"),
])
def test_bad_pedigrees_are_refused_by_name(frame, message):
    with pytest.raises(hp.DataError, match=message):
        hp.pedigree.relationship_matrix(frame)


def test_both_inbreeding_methods_agree(monkeypatch):
    # generation by generation (triangular solves) and Meuwissen & Luo's ancestor loop: the same F, exactly, on
    # a pedigree with unknown parents, selfing and several overlapping generations
    from hierpool import pedigree

    rng = np.random.default_rng(3)
    ids = [f"x{i}" for i in range(500)]
    parent = [[None] * 30 + [ids[rng.integers(0, i)] if rng.uniform() < 0.9 else None for i in range(30, 500)]
              for _ in range(2)]
    frame = pd.DataFrame({"id": ids, "sire": parent[0], "dam": parent[1]})
    generations = hp.pedigree.inbreeding(frame)
    monkeypatch.setattr(pedigree, "GENERATION_MAX_COLUMNS", 0)  # the loop
    ancestors = hp.pedigree.inbreeding(frame)
    assert generations.max() > 0.25 and generations.index.equals(ancestors.index)
    np.testing.assert_allclose(generations, ancestors, rtol=0, atol=1e-13)
    tabular = hp.pedigree.relationship_matrix(frame)
    np.testing.assert_allclose(np.diag(tabular.loc[generations.index, generations.index]) - 1, generations, atol=1e-13)
