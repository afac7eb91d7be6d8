"""Classic mixed-model data sets, shipped as small CSV tables (no download).

Sources: lme4 1.1.31 (sleepstudy, Dyestuff, Penicillin, Pastes, cbpp; Bates et al. 2015),
HLMdiag (the Minnesota radon survey of Gelman & Hill 2007, ch. 12), and the eight
schools of Rubin (1981) as printed in Gelman et al., *Bayesian Data Analysis*, table 5.2.
Grouping columns are strings, so ``(1 | g)`` never sees them as numbers.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd


def _table(name: str, groups: tuple[str, ...]) -> pd.DataFrame:
    with resources.files(__package__).joinpath("data", f"{name}.csv").open() as handle:
        frame = pd.read_csv(handle)
    for column in groups:
        frame[column] = frame[column].astype(str)
    return frame


def sleepstudy() -> pd.DataFrame:
    """Reaction times (ms) of 18 subjects over 10 days of sleep deprivation (lme4).

    Columns Reaction, Days (0-9), Subject.  Model: ``Reaction ~ Days + (Days | Subject)``.
    """
    return _table("sleepstudy", ("Subject",))


def dyestuff() -> pd.DataFrame:
    """Yield of dyestuff (grams) from 5 preparations in each of 6 batches (lme4).

    Columns Batch, Yield.  Model: ``Yield ~ 1 + (1 | Batch)``.
    """
    return _table("dyestuff", ("Batch",))


def penicillin() -> pd.DataFrame:
    """Diameter (mm) of growth-inhibition zones: 6 penicillin samples on 24 plates (lme4).

    Columns diameter, plate, sample.  Crossed: ``diameter ~ 1 + (1 | plate) + (1 | sample)``.
    """
    return _table("penicillin", ("plate", "sample"))


def pastes() -> pd.DataFrame:
    """Strength of a chemical paste: 2 samples from each of 3 casks in 10 batches (lme4).

    Columns strength, batch, cask, sample (= batch:cask).  Nested: ``strength ~ 1 + (1 | batch/cask)``.
    """
    return _table("pastes", ("batch", "cask", "sample"))


def cbpp() -> pd.DataFrame:
    """Contagious bovine pleuropneumonia: new cases (incidence) among the cattle (size) of 15 herds over 4 periods
    (lme4's cbpp, 56 rows; Lesnoff et al. 2004).

    Columns herd, incidence, size, period ("1"-"4").  Model:
    ``hp.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", data, family="binomial")``.
    """
    return _table("cbpp", ("herd", "period"))


def radon() -> pd.DataFrame:
    """Log radon in 919 Minnesota homes in 85 counties (Gelman & Hill 2007; HLMdiag's copy).

    Columns log_radon, floor (0 = basement, 1 = first floor), uranium (log county
    uranium), county (id), county_name.  Model: ``log_radon ~ floor + (1 | county)``.
    """
    return _table("radon", ("county", "county_name"))


def eight_schools() -> pd.DataFrame:
    """Estimated coaching effects (y) and their standard errors (se) in 8 schools (Rubin 1981).

    Model with known residual sds: ``hp.lmm("y ~ 1 + (1 | school)", data, se="se")``.
    """
    return pd.DataFrame(
        {
            "school": list("ABCDEFGH"),
            "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
            "se": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
        }
    )
