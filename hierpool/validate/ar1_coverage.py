"""Frequentist coverage of hierpool's intervals under AR(1) residuals, by simulation.

Each replication draws ``n_groups`` series of ``steps`` consecutive observations from a fixed truth:
y = 1 + 0.5 x + b_g + e, b_g ~ N(0, sd_b^2), e an AR(1) chain with phi and sd sigma in each series, and
x a within-series covariate that changes slowly (blocks of ``block`` steps, each block's value N(0, 1)),
the design where ignoring the correlation misleads.  It fits ``hp.lmm(..., correlation=hp.ar1("g", "t"))``
and checks whether each interval covers its target:

* ``fixed effect x``: the Wald interval fixef +/- z se around 0.5;
* ``fixed effect x, residuals taken as independent``: the same from ``hp.lmm`` without the correlation
  (for contrast: its coverage falls short);
* ``phi``: the fit's interval (nlme's: Wald on log((1 + phi) / (1 - phi))) around phi;
* ``blup``: BLUP +/- z joint sd around b_g;
* ``next step``: ``predict(interval="prediction")`` of each series' next observation (its last residual
  carried forward) around a draw of it given the simulated past.

Coverage and its Monte-Carlo se as :func:`hierpool.validate.coverage.coverage` reports them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..algebra.ar1 import carried, unwhiten
from ..closedform import lmm
from ..closedform.predict import normal_quantile
from ..errors import integer_argument, real_argument, seed_argument
from ..spec.arguments import probability_argument
from ..spec.correlation import ar1, series_of
from ._arguments import generator_argument
from .coverage import coverage_of, group_label, label_positions

BETA = (1.0, 0.5)


def simulate_ar1_study(rng, n_groups: int = 20, steps: int = 30, phi: float = 0.6, sd_b: float = 1.0,
                       sigma: float = 1.0, block: int = 5):
    """One data set and its truth: (data, b, each series' last residual, x of the next step).

    ``phi`` lies between -1 and 1 (a stationary chain); ``sd_b`` >= 0 and ``sigma`` > 0.
    """
    generator_argument(rng)
    n_groups = integer_argument("n_groups", n_groups)
    steps = integer_argument("steps", steps, minimum=2)  # series of two rows at least: phi is fitted from them
    phi = real_argument("phi", phi, above=-1.0, below=1.0)
    sd_b = real_argument("sd_b", sd_b, at_least=0.0)
    sigma = real_argument("sigma", sigma, above=0.0)
    block = integer_argument("block", block)
    g = np.repeat(np.arange(n_groups), steps)
    t = np.tile(np.arange(steps), n_groups)
    blocks = rng.normal(size=(n_groups, steps // block + 2))
    x = blocks[g, t // block]
    b = rng.normal(0, sd_b, n_groups)
    data = pd.DataFrame({"x": x, "t": t.astype(float), "g": [group_label(i) for i in g]})
    series = series_of(ar1("g", time="t"), data, data.index)
    noise = sigma * unwhiten(rng.normal(size=len(g)), series.previous, carried(phi, series.previous, series.lag),
                             series.order)
    data.insert(0, "y", BETA[0] + BETA[1] * x + b[g] + noise)
    return data, b, noise.reshape(n_groups, steps)[:, -1], blocks[np.arange(n_groups), steps // block]


def ar1_coverage(n_reps: int = 100, level: float = 0.95, n_groups: int = 20, steps: int = 30, phi: float = 0.6,
                 seed: int = 0) -> pd.DataFrame:
    """Coverage of the AR(1) fit's intervals (see the module docstring).

    Returns
    -------
    pandas.DataFrame
        interval, n (intervals checked), coverage, mcse.
    """
    n_reps = integer_argument("n_reps", n_reps)
    probability_argument("level", level)
    n_groups = integer_argument("n_groups", n_groups, minimum=2)
    steps = integer_argument("steps", steps, minimum=2)
    phi = real_argument("phi", phi, above=-1.0, below=1.0)
    rng = np.random.default_rng(seed_argument(seed))
    z = normal_quantile(level)
    hits: dict[str, list] = {}

    def record(name, covered):
        covered = np.atleast_1d(np.asarray(covered, dtype=bool))
        hits.setdefault(name, []).append((int(covered.sum()), covered.size))

    for _ in range(n_reps):
        data, b, last_noise, next_x = simulate_ar1_study(rng, n_groups, steps, phi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boundary fits in small samples are part of the study
            fit = lmm("y ~ x + (1 | g)", data, correlation=ar1("g", time="t"))
            plain = lmm("y ~ x + (1 | g)", data)
        for name, model in (("fixed effect x", fit), ("fixed effect x, residuals taken as independent", plain)):
            record(name, abs(model.fixef["x"] - BETA[1]) <= z * model.fixef_se["x"])
        record("phi", fit.phi_interval[0] <= phi <= fit.phi_interval[1])
        ranef = fit.ranef
        order = label_positions(ranef.grp, n_groups)
        record("blup", np.abs(ranef.condval.to_numpy()[order] - b) <= z * fit.ranef_joint_sd()[order])
        new = pd.DataFrame({"x": next_x, "t": float(steps), "g": [group_label(i) for i in range(n_groups)]})
        predicted = fit.predict(new, interval="prediction", level=level)
        next_y = (BETA[0] + BETA[1] * next_x + b + phi * last_noise
                  + np.sqrt(1 - phi**2) * rng.normal(0, 1.0, n_groups))
        record("next step", (predicted.lower <= next_y) & (next_y <= predicted.upper))
    return pd.DataFrame([{"interval": name, **coverage_of(per_rep)} for name, per_rep in hits.items()])
