"""Many simulated replicates of a sleepstudy-shaped design, for batch fitting."""

from __future__ import annotations

import numpy as np
import pandas as pd


def sleepstudy_replicates(n_datasets: int = 100, n_subjects: int = 18, n_days: int = 10, seed: int = 0) -> pd.DataFrame:
    """Simulate ``n_datasets`` data sets shaped like lme4's sleepstudy, in one long frame.

    Each data set has ``n_subjects`` subjects observed on days 0 .. n_days-1, with
    parameters near lme4's sleepstudy fit: fixed effects (251.4, 10.5), subject
    sds (24.7, 5.9) with correlation 0.07, residual sd 25.6.

    Returns
    -------
    pandas.DataFrame
        Columns dataset (int), Subject (str), Days, Reaction.
    """
    design, reaction = sleepstudy_responses(n_datasets, n_subjects, n_days, seed)
    return pd.DataFrame({
        "dataset": np.repeat(np.arange(n_datasets), len(design)),
        "Subject": np.tile(design.Subject.to_numpy(), n_datasets),
        "Days": np.tile(design.Days.to_numpy(), n_datasets),
        "Reaction": reaction.T.ravel(),
    })


def sleepstudy_responses(n_datasets: int = 100, n_subjects: int = 18, n_days: int = 10,
                         seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """The data sets of :func:`sleepstudy_replicates` (the same seed, the same numbers) as one design and its
    responses, for ``hp.fit_batch(formula, design, responses=reaction)``.

    Returns
    -------
    design : pandas.DataFrame
        One data set's rows: columns Subject (str), Days.
    reaction : numpy.ndarray
        (rows of ``design``, ``n_datasets``): each data set's Reaction.
    """
    rng = np.random.default_rng(seed)
    sds, cor = np.array([24.7, 5.9]), 0.07
    cov = np.outer(sds, sds) * np.array([[1.0, cor], [cor, 1.0]])
    effects = rng.multivariate_normal([0.0, 0.0], cov, size=(n_datasets, n_subjects))
    days = np.tile(np.arange(n_days, dtype=float), n_subjects)
    subject = np.repeat(np.arange(n_subjects), n_days)
    mean = (251.4 + effects[:, subject, 0]) + (10.5 + effects[:, subject, 1]) * days
    reaction = mean + rng.normal(0.0, 25.6, size=mean.shape)
    design = pd.DataFrame({"Subject": np.char.add("S", subject.astype(str)), "Days": days})
    return design, np.ascontiguousarray(reaction.T)
