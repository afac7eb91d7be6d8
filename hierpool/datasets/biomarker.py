"""A simulated study shaped like the one partial pooling is taught with.

Patients with repeated biomarker readings: some have 1-2 readings, some 20.
Each patient has a true level (and a true slope over time); readings are the
true trajectory plus measurement noise.  Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def biomarker(n_patients: int = 60, seed: int = 2024) -> pd.DataFrame:
    """Simulate the biomarker study.

    Parameters
    ----------
    n_patients : int
        Number of patients; a third have 1-2 readings, a third 5-8, a third 20.
    seed : int

    Returns
    -------
    pandas.DataFrame
        Columns patient (str), time (years from the middle of the 3-year study,
        -1.5 to 1.5), biomarker, true_level (the patient's true level at time 0,
        mid-study), true_slope (per year).  ``frame.attrs["truth"]`` maps the
        coefficients of ``biomarker ~ time + (time | patient)`` to their true
        columns; :func:`hierpool.pooling` reads it.

    Notes
    -----
    Population mean 50, between-patient sd 6, slope mean 1.5 per year with sd
    0.8 (correlation 0.3 with the level), measurement sd 8.  Time is centred so
    that the intercept-only model ``biomarker ~ 1 + (1 | patient)`` targets the
    same true level as the slope model.
    """
    rng = np.random.default_rng(seed)
    sizes = np.concatenate(
        [
            rng.integers(1, 3, size=n_patients // 3),
            rng.integers(5, 9, size=n_patients // 3),
            np.full(n_patients - 2 * (n_patients // 3), 20),
        ]
    )
    rng.shuffle(sizes)
    sd_level, sd_slope, corr = 6.0, 0.8, 0.3
    cov = np.array([[sd_level**2, corr * sd_level * sd_slope], [corr * sd_level * sd_slope, sd_slope**2]])
    effects = rng.multivariate_normal([0.0, 0.0], cov, size=n_patients)
    rows = []
    for i, (size, (level, slope)) in enumerate(zip(sizes, effects)):
        times = np.sort(rng.uniform(-1.5, 1.5, size=size))
        true_level, true_slope = 50.0 + level, 1.5 + slope
        readings = true_level + true_slope * times + rng.normal(0, 8.0, size=size)
        for t, y in zip(times, readings):
            rows.append((f"P{i + 1:03d}", t, y, true_level, true_slope))
    frame = pd.DataFrame(rows, columns=["patient", "time", "biomarker", "true_level", "true_slope"])
    frame.attrs["truth"] = {"Intercept": "true_level", "time": "true_slope"}
    return frame
