"""Which response family and link a GLMM asked for, and whether the response fits it.

What the user wrote (``family="binomial"``, ``link="probit"``), checked and named; the
numerics of each family live in :mod:`hierpool.algebra.family`.  Names follow R's
``family`` objects and glmmTMB: ``bernoulli`` is the binomial with one trial per row,
``negative_binomial`` (alias ``nbinom2``) is NB2 (variance mu + mu^2 / shape), as
``glmer.nb`` and glmmTMB's ``nbinom2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError, DataError

#: Links each family accepts, its canonical link first.
LINKS = {
    "binomial": ("logit", "probit", "cloglog"),
    "poisson": ("log",),
    "negative_binomial": ("log",),
}
#: Other names users write for a family (glmmTMB's, R's).
ALIASES = {"bernoulli": "binomial", "nbinom2": "negative_binomial", "negbin": "negative_binomial"}
#: How far a count may be from an integer before it is refused (counts read back from proportions).
INTEGER_TOL = 1e-8


@dataclass(frozen=True)
class FamilySpec:
    """A family and link by name.

    ``bernoulli``: the user asked for one trial per row, so the response must be 0/1 and no
    trials (weights) are accepted.
    """

    name: str
    link: str
    bernoulli: bool = False


def optional_family_spec(family, link: str | None = None) -> FamilySpec | None:
    """``hp.bayes``'s ``family=``: None (or ``"gaussian"``) is the linear mixed model, whose link must be the identity
    (None returned); any other, :func:`family_spec`."""
    if family is None or (isinstance(family, str) and family.strip().lower() == "gaussian"):
        if link not in (None, "identity"):
            raise ArgumentError(f"link {link!r} given for a Gaussian model, whose link is the identity; "
                                "give family= for a generalized linear mixed model")
        return None
    return family_spec(family, link)


def family_spec(family, link: str | None = None) -> FamilySpec:
    """The :class:`FamilySpec` of ``family=`` and ``link=`` (the family's canonical link when None)."""
    if isinstance(family, FamilySpec):
        if link is not None and link != family.link:
            raise ArgumentError(f"link={link!r} given with a family that already has link {family.link!r}")
        return family
    if not isinstance(family, str):
        raise ArgumentError(f"family must be a string such as 'binomial' or 'poisson', got {family!r}")
    asked = family.strip().lower()
    name = ALIASES.get(asked, asked)
    if name not in LINKS:
        known = ", ".join(sorted(set(LINKS) | set(ALIASES)))
        raise ArgumentError(f"family {family!r} is not supported; use one of {known}")
    if link is None:
        link = LINKS[name][0]
    if not isinstance(link, str) or link.strip().lower() not in LINKS[name]:
        raise ArgumentError(f"link {link!r} is not available for family {name!r}; use one of {', '.join(LINKS[name])}")
    return FamilySpec(name, link.strip().lower(), bernoulli=asked == "bernoulli")


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.abs(values - np.round(values)) <= INTEGER_TOL * np.maximum(1.0, np.abs(values))))


def check_response(spec: FamilySpec, y: np.ndarray, trials: np.ndarray | None, name: str) -> None:
    """A :class:`~hierpool.errors.DataError` naming the response when its values do not fit the family.

    Binomial: proportions in [0, 1] whose successes ``y * trials`` are whole numbers (0/1 with
    ``bernoulli``); Poisson and negative binomial: non-negative whole counts.  ``trials``: the
    binomial's trials per row (``cbind`` totals or ``weights=``), None for one per row.
    """
    if not np.all(np.isfinite(y)):
        raise DataError(f"response {name!r} has non-finite values")
    if spec.name == "binomial":
        if np.any(y < 0) or np.any(y > 1):
            at = np.flatnonzero((y < 0) | (y > 1))[0]
            # with trials (cbind's or weights=) the counts the user wrote, not only the proportion made of them
            found = f"{float(y[at])!r}" if trials is None else \
                f"{float(y[at])!r} ({float(y[at] * trials[at]):g} successes of {float(trials[at]):g} trials)"
            raise DataError(f"response {name!r} of a binomial model must be 0/1 or a proportion in [0, 1] "
                            f"(with the trials as weights, or cbind(successes, failures)); found {found}")
        if spec.bernoulli and (trials is not None or not np.all((y == 0) | (y == 1))):
            raise DataError(f"response {name!r} of a bernoulli model must be 0/1, one trial per row; "
                            "use family='binomial' for proportions or cbind(successes, failures)")
        if trials is not None:
            if np.any(trials < 0) or not _integral(trials):
                raise DataError(f"the trials of binomial response {name!r} must be non-negative whole numbers")
            if not _integral(y * trials):
                raise DataError(f"response {name!r} times its trials is not a whole number of successes")
        elif not np.all((y == 0) | (y == 1)):
            raise DataError(f"response {name!r} has proportions but no trials: give them as weights= "
                            "or write cbind(successes, failures)")
        return
    if np.any(y < 0) or not _integral(y):
        bad = y[(y < 0) | (np.abs(y - np.round(y)) > INTEGER_TOL * np.maximum(1.0, np.abs(y)))][0]
        raise DataError(f"response {name!r} of a {spec.name} model must be non-negative whole counts; found {float(bad)!r}")


def binary_outcome_per_level(family_name: str, row_weights: np.ndarray, index: np.ndarray, z: np.ndarray,
                             dataset=None, n_datasets: int = 1) -> np.ndarray:
    """Per dataset, whether a term of one constant column (``z``, (n, k): an intercept) has one 0/1 outcome at
    every level that holds a row (``index``: each row's level; ``dataset``: each row's dataset, one dataset when
    None): an observation-level effect of a Bernoulli model, or ``(1 | a/b)`` with one row per ``b:a`` cell, whose
    variance is not identified (:func:`unidentified_term_message`).  A dataset with any row of other than one
    trial (counts, or prior weights) is not flagged, nor a term whose column varies (``(0 + x | obs)``: the
    variance of b x changes with x, which identifies it).  (n_datasets,) booleans."""
    row_weights, z = np.asarray(row_weights), np.asarray(z)
    rows = row_weights > 0
    flagged = np.zeros(n_datasets, dtype=bool)
    if family_name != "binomial" or z.shape[1] != 1 or not rows.any() or np.ptp(z[rows, 0]) > 0:
        return flagged
    dataset = np.zeros(len(rows), dtype=np.int64) if dataset is None else np.asarray(dataset, dtype=np.int64)
    binary = np.bincount(dataset[rows], weights=row_weights[rows] != 1, minlength=n_datasets) == 0
    rows &= binary[dataset]
    if not rows.any():
        return flagged
    d, level = dataset[rows], np.asarray(index)[rows].astype(np.int64)
    # (dataset, level) pairs counted by sorting: a long frame's level codes are global, and a table of every
    # dataset by every level would not fit in memory
    _, pair, counts = np.unique(d * (int(level.max()) + 1) + level, return_inverse=True, return_counts=True)
    most = np.zeros(n_datasets, dtype=np.int64)
    np.maximum.at(most, d, counts[pair])  # each dataset's most rows at one level
    return most == 1


def unidentified_term_message(label: str, group: str) -> str:
    """Why a term of :func:`binary_outcome_per_level` is not identified: a binary outcome shows no overdispersion,
    P(y = 1) = E[logit^-1(eta + b)] being a function of eta and the term's variance together, so that the variance
    trades against the fixed effects' scale (exactly so for the probit link: Phi(eta / sqrt(1 + sigma^2))) and
    where a Laplace fit of it ends is an artefact of its start (Bolker et al., GLMM FAQ, "Overdispersion")."""
    return (f"the term {label} has one observation per level of {group!r} and the response is 0/1: its variance is "
            "not identified (a binary outcome shows no overdispersion; the variance trades against the fixed "
            "effects' scale), so where its fit ends is arbitrary; drop the term")
