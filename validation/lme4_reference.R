# Reference values for hierpool's closed-form engine, from lme4 (and metafor for known
# residual sds).  Writes validation/lme4_reference.json, which the tests read (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-lme4 r-cran-nlme r-cran-jsonlite r-cran-metafor
#   setarch "$(uname -m)" -R Rscript validation/lme4_reference.R
#
# setarch -R (no address randomization) makes the output byte-reproducible: with it, lme4's
# optimizer path for the crossed Penicillin models differs from run to run in the 8th digit of
# theta (51 or 66 bobyqa evaluations, the same R, lme4 and data), far inside every tolerance.
#
# Factors are re-levelled alphabetically (as hierpool orders string columns) so that both use
# the same treatment contrasts; lme4 terms are named as lme4 names them and the tests map
# "(Intercept)" -> "Intercept" and "SexMale" <-> "Sex[Male]".
#
# The "features" section (issue 15: prior weights, offsets, R functions in formulas, a sum
# contrast, predictions on new data, robustness to the location and scale of y and x) is
# written by fit_feature() below; tests/test_lme4_features.py reads it.
suppressMessages({
  library(lme4)
  library(jsonlite)
  library(metafor)
})

relevel_alpha <- function(df) {
  for (v in names(df)) if (is.factor(df[[v]])) df[[v]] <- factor(as.character(df[[v]]))
  df
}

datasets <- list(
  ChickWeight = ChickWeight,   # datasets: Chick is an ordered factor there; relevel_alpha makes it plain
  sleepstudy = sleepstudy,
  Dyestuff = Dyestuff,
  Dyestuff2 = Dyestuff2,
  Penicillin = Penicillin,
  Pastes = Pastes,
  Machines = nlme::Machines,
  Orthodont = nlme::Orthodont
)

models <- list(
  list(id = "sleepstudy_corr_reml", data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)", reml = TRUE),
  list(id = "sleepstudy_corr_ml", data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)", reml = FALSE),
  list(id = "sleepstudy_uncorr_reml", data = "sleepstudy", formula = "Reaction ~ Days + (Days || Subject)", reml = TRUE),
  list(id = "sleepstudy_uncorr_ml", data = "sleepstudy", formula = "Reaction ~ Days + (Days || Subject)", reml = FALSE),
  list(id = "sleepstudy_int_reml", data = "sleepstudy", formula = "Reaction ~ Days + (1 | Subject)", reml = TRUE),
  list(id = "sleepstudy_int_ml", data = "sleepstudy", formula = "Reaction ~ Days + (1 | Subject)", reml = FALSE),
  list(id = "dyestuff_reml", data = "Dyestuff", formula = "Yield ~ 1 + (1 | Batch)", reml = TRUE),
  list(id = "dyestuff_ml", data = "Dyestuff", formula = "Yield ~ 1 + (1 | Batch)", reml = FALSE),
  list(id = "dyestuff2_reml", data = "Dyestuff2", formula = "Yield ~ 1 + (1 | Batch)", reml = TRUE),
  list(id = "penicillin_reml", data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)", reml = TRUE),
  list(id = "penicillin_ml", data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)", reml = FALSE),
  list(id = "pastes_reml", data = "Pastes", formula = "strength ~ 1 + (1 | batch/cask)", reml = TRUE),
  list(id = "machines_reml", data = "Machines", formula = "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", reml = TRUE),
  list(id = "orthodont_reml", data = "Orthodont", formula = "distance ~ age * Sex + (age | Subject)", reml = TRUE),
  list(id = "orthodont_ml", data = "Orthodont", formula = "distance ~ age * Sex + (age | Subject)", reml = FALSE)
)

tight_control <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhobeg = 2e-1, rhoend = 1e-10, maxfun = 1e5))

fit_reference <- function(m) {
  df <- relevel_alpha(as.data.frame(datasets[[m$data]]))
  f <- as.formula(m$formula)
  fm <- lmer(f, data = df, REML = m$reml, control = tight_control)
  devfun <- lmer(f, data = df, REML = m$reml, devFunOnly = TRUE)
  theta <- unname(getME(fm, "theta"))
  theta_probe <- 0.8 * theta + 0.1   # an arbitrary theta: checks the objective apart from the optimizer
  c(list(id = m$id, data = m$data, formula = m$formula, reml = m$reml,
         nobs = nobs(fm), sum_response = sum(model.response(model.frame(fm)))),
    fit_outputs(fm, devfun, m$reml, theta_probe))
}

# Every number the tests compare, from a fitted merMod; devfun (lme4's devFunOnly) at theta_probe.
fit_outputs <- function(fm, devfun, reml, theta_probe) {
  theta <- unname(getME(fm, "theta"))
  vc <- as.data.frame(VarCorr(fm))
  re <- as.data.frame(ranef(fm, condVar = TRUE))
  fe <- fixef(fm)
  list(
    objective = if (reml) unname(REMLcrit(fm)) else unname(deviance(fm)),
    theta = theta, theta_names = names(getME(fm, "theta")),
    theta_probe = theta_probe, objective_at_probe = devfun(theta_probe),
    sigma = sigma(fm),
    fixef = as.list(fe), fixef_se = as.list(setNames(sqrt(diag(as.matrix(vcov(fm)))), names(fe))),
    vcov = unname(as.matrix(vcov(fm))),
    loglik = as.numeric(logLik(fm)), aic = AIC(fm), bic = BIC(fm),
    is_singular = isSingular(fm),
    varcorr = list(grp = vc$grp, var1 = ifelse(is.na(vc$var1), "", vc$var1), var2 = ifelse(is.na(vc$var2), "", vc$var2),
                   vcov = vc$vcov, sdcor = vc$sdcor),
    ranef = list(grpvar = as.character(re$grpvar), term = as.character(re$term), grp = as.character(re$grp),
                 condval = re$condval, condsd = re$condsd),
    fitted = unname(fitted(fm)),
    fitted_population = unname(predict(fm, re.form = NA))
  )
}

eight_schools <- function() {
  y <- c(28, 8, -3, 7, -1, 1, 18, 12)
  se <- c(15, 10, 16, 11, 9, 11, 10, 18)
  res <- rma(yi = y, sei = se, method = "REML", control = list(tau2.min = 0, threshold = 1e-12, maxiter = 1000))
  bl <- blup(res)
  re <- ranef(res)
  list(
    id = "eight_schools_reml", y = y, se = se,
    tau = sqrt(res$tau2), mu = unname(coef(res)), mu_se = res$se,
    loglik_reml = as.numeric(logLik(res)),
    blup = bl$pred, blup_se = bl$se,
    ranef = re$pred, ranef_se = re$se
  )
}

bcg <- function(with_moderator) {
  dat <- escalc(measure = "RR", ai = tpos, bi = tneg, ci = cpos, di = cneg, data = dat.bcg)
  res <- if (with_moderator) rma(yi, vi, mods = ~ ablat, data = dat, method = "REML") else rma(yi, vi, data = dat, method = "REML")
  bl <- blup(res)
  list(
    id = if (with_moderator) "bcg_ablat_reml" else "bcg_reml",
    y = as.numeric(dat$yi), se = sqrt(as.numeric(dat$vi)), ablat = dat$ablat, trial = dat$trial,
    formula = if (with_moderator) "y ~ ablat + (1 | trial)" else "y ~ 1 + (1 | trial)",
    tau = sqrt(res$tau2), beta = unname(as.numeric(coef(res))), beta_se = unname(as.numeric(res$se)),
    loglik_reml = as.numeric(logLik(res)),
    blup = bl$pred, blup_se = bl$se
  )
}

fit_insteval <- function() {
  df <- InstEval
  fm <- lmer(y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept), data = df, REML = TRUE)
  list(id = "insteval_reml", formula = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
       objective = unname(REMLcrit(fm)), theta = unname(getME(fm, "theta")), fixef = as.list(fixef(fm)),
       sigma = sigma(fm))
}

# ---- features (issue 15): prior weights, offsets, R functions in formulas, a sum contrast, ----
# ---- predictions on new data, and the location and scale of y and x                        ----
#
# One entry per case: id; data (the data set, or null for simulated data); r_formula (what lmer
# got); formula (hierpool's text for the same model); reml; weights (a column name or null; lmer's
# prior weights, residual variance sigma^2 / w); columns (columns added to the data set, or every
# column of simulated data); names (lme4 coefficient name -> hierpool's name); lme4_warnings
# (lmer's warnings and messages, verbatim); every output of fit_outputs(); where the case has new
# data, newdata with predict_re = predict(fm, newdata) and predict_population = predict(fm,
# newdata, re.form = NA).
#
# Made-up columns (weights, offsets, the simulated data) come from fixed formulas and seeds and go
# through the JSON text (stored()) before lmer sees them: jsonlite writes 15 significant digits,
# so R fits exactly the doubles the tests read back, and the tests never re-derive them.
stored <- function(v) fromJSON(toJSON(v, digits = NA))

sleep_columns <- local({
  set.seed(1501)
  s <- sleepstudy
  row <- seq_len(nrow(s))
  subject_shift <- rnorm(nlevels(s$Subject), 0, 5)[as.integer(s$Subject)]
  list(
    w = 0.5 + ((row - 1) %% 4) / 2,                                     # 0.5, 1, 1.5, 2, 0.5, ...
    off = stored(3 * sqrt(s$Days) + subject_shift + rnorm(nrow(s))),    # nonlinear in Days: not aliased
    off_aliased = 2 * s$Days                                            # the issue's: aliased with Days
  )
})
penicillin_w <- 0.25 + ((seq_len(nrow(Penicillin)) - 1) %% 5) / 4      # 0.25, 0.5, ..., 1.25, 0.25, ...

# New rows for predict(): subjects of the data, Days inside, between and beyond the observed 0..9,
# and offsets of their own.
sleep_newdata <- local({
  days <- c(0, 2.5, 11, 4, 7.5, 9, 1, 3, 6.2, 10, 5, 12)
  list(Subject = c(308L, 308L, 309L, 330L, 331L, 335L, 350L, 352L, 370L, 372L, 337L, 333L),
       Days = days, off = stored(3 * sqrt(days) + 0.1 * seq_along(days)))
})

# y ~ x + (x | g), 300 rows in 30 groups (issue 15's robustness cases); signal has moderate
# variances (intercept sd 1, slope sd 0.5, residual sd 1).  The user's y is signal shifted or
# scaled; year is a calendar-year covariate with y_year its response.
robust_data <- local({
  set.seed(300)
  n_groups <- 30
  gi <- rep(seq_len(n_groups), each = 10)
  x <- stored(rnorm(length(gi)))
  b <- cbind(rnorm(n_groups, 0, 1), rnorm(n_groups, 0, 0.5))
  signal <- stored(2 + 0.5 * x + b[gi, 1] + b[gi, 2] * x + rnorm(length(gi)))
  year <- 2000 + round(4 * x)
  y_year <- stored(1 + 0.25 * (year - 2000) + b[gi, 1] + 0.2 * b[gi, 2] * (year - 2000) + rnorm(length(gi)))
  list(g = sprintf("g%02d", gi), x = x, signal = signal, year = year, y_year = y_year)
})

# For the robustness cases lme4's own optimizer is not taken on trust: the same model is also fitted
# to well-conditioned data (y before its shift and scale; year - 2000) and that optimum mapped back
# to the user's parametrization (theta); lme4's devfun on the user's data evaluates both thetas
# and every output comes from lme4 at the better one (built with mkMerMod; objective_source says
# which).  The tests then require hierpool's criterion <= lme4_fit$objective (lme4's optimizer on
# the user's data) and equal to objective within 1e-6: a lower criterion than lme4's optimizer
# found is accepted where lme4's own devfun confirms it.
robust_y <- function(shift, scale) {
  y <- stored((robust_data$signal + shift) * scale)
  list(columns = list(y = y, x = robust_data$x, g = robust_data$g),
       check = list(description = sprintf("y = (signal + %g) * %g: fitted to signal, theta unchanged", shift, scale),
                    columns = list(y = robust_data$signal),
                    theta = function(theta) theta,
                    fixef = function(b) c(b[1] * scale + shift * scale, b[-1] * scale),
                    fitted = function(f) (f + shift) * scale))
}
robust_year <- function() {
  a <- rbind(c(1, -2000), c(0, 1))   # (intercept, slope) at year 0 from those at year 2000
  list(columns = list(y = robust_data$y_year, year = robust_data$year, g = robust_data$g),
       check = list(description = "fitted with year - 2000; theta of (year | g) mapped by chol(A L L' A'), A = [1 -2000; 0 1]",
                    columns = list(year = robust_data$year - 2000),
                    theta = function(theta) {
                      if (length(theta) == 1) return(theta)
                      l <- matrix(c(theta[1], theta[2], 0, theta[3]), 2)
                      lu <- t(chol(a %*% l %*% t(l) %*% t(a)))
                      c(lu[1, 1], lu[2, 1], lu[2, 2])
                    },
                    fixef = function(b) c(b[1] - 2000 * b[2], b[2]),
                    fitted = function(f) f))
}

sleep_names <- list("(Intercept)" = "Intercept", Days = "Days")
features <- list(
  list(id = "sleepstudy_weights_corr_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ Days + (Days | Subject)", formula = "Reaction ~ Days + (Days | Subject)",
       weights = "w", columns = sleep_columns["w"], names = sleep_names),
  list(id = "penicillin_weights_crossed_reml", data = "Penicillin", reml = TRUE,
       r_formula = "diameter ~ 1 + (1 | plate) + (1 | sample)", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)",
       weights = "w", columns = list(w = penicillin_w), names = list("(Intercept)" = "Intercept")),
  list(id = "sleepstudy_offset_corr_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ Days + offset(off) + (Days | Subject)", formula = "Reaction ~ Days + offset(off) + (Days | Subject)",
       columns = sleep_columns["off"], names = sleep_names),
  list(id = "sleepstudy_offset_aliased_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ Days + offset(off) + (1 | Subject)", formula = "Reaction ~ Days + offset(off) + (1 | Subject)",
       columns = list(off = sleep_columns$off_aliased), names = sleep_names),
  list(id = "sleepstudy_offset_weights_ml", data = "sleepstudy", reml = FALSE,
       r_formula = "Reaction ~ Days + offset(off) + (Days | Subject)", formula = "Reaction ~ Days + offset(off) + (Days | Subject)",
       weights = "w", columns = sleep_columns[c("w", "off")], names = sleep_names),
  list(id = "sleepstudy_log_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ log(Days + 1) + (1 | Subject)", formula = "Reaction ~ log(Days + 1) + (1 | Subject)",
       names = list("(Intercept)" = "Intercept", "log(Days + 1)" = "log(Days + 1)")),
  list(id = "chickweight_quadratic_reml", data = "ChickWeight", reml = TRUE,
       r_formula = "weight ~ Time + I(Time^2) + (Time | Chick)", formula = "weight ~ Time + I(Time^2) + (Time | Chick)",
       names = list("(Intercept)" = "Intercept", Time = "Time", "I(Time^2)" = "I(Time ** 2)")),
  list(id = "sleepstudy_scale_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ scale(Days) + (scale(Days) | Subject)", formula = "Reaction ~ scale(Days) + (scale(Days) | Subject)",
       names = list("(Intercept)" = "Intercept", "scale(Days)" = "scale(Days)")),
  # R: contr.sum omits the last level (C); formulae's Sum does too: Machine1 = [A], Machine2 = [B].
  list(id = "machines_sum_contrast_reml", data = "Machines", reml = TRUE,
       r_formula = "score ~ Machine + (1 | Worker)", r_contrasts = list(Machine = "contr.sum"),
       formula = "score ~ C(Machine, Sum) + (1 | Worker)",
       names = list("(Intercept)" = "Intercept", Machine1 = "C(Machine, Sum)[A]", Machine2 = "C(Machine, Sum)[B]")),
  # predict() on new data: scale() takes the mean and sd of the fitted data (R's makepredictcall),
  # the offset comes from the new rows.
  list(id = "sleepstudy_newdata_transforms_offset_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ scale(Days) + log(Days + 1) + offset(off) + (Days | Subject)",
       formula = "Reaction ~ scale(Days) + log(Days + 1) + offset(off) + (Days | Subject)",
       columns = sleep_columns["off"], newdata = sleep_newdata,
       names = list("(Intercept)" = "Intercept", "scale(Days)" = "scale(Days)", "log(Days + 1)" = "log(Days + 1)", Days = "Days"),
       by_hand = function(fm, df, nd) {
         days <- df$Days
         x <- cbind(1, (nd$Days - mean(days)) / sd(days), log(nd$Days + 1))
         pop <- drop(x %*% fixef(fm)) + nd$off
         b <- ranef(fm)$Subject[as.character(nd$Subject), ]
         list(re = pop + b[, 1] + b[, 2] * nd$Days, population = pop)
       }),
  # poly() is orthogonal in R and in formulae (the same columns); new data use the fitted data's coefs.
  list(id = "sleepstudy_newdata_poly_reml", data = "sleepstudy", reml = TRUE,
       r_formula = "Reaction ~ poly(Days, 2) + (1 | Subject)", formula = "Reaction ~ poly(Days, 2) + (1 | Subject)",
       newdata = sleep_newdata[c("Subject", "Days")],
       names = list("(Intercept)" = "Intercept", "poly(Days, 2)1" = "poly(Days, 2)[0]", "poly(Days, 2)2" = "poly(Days, 2)[1]"),
       by_hand = function(fm, df, nd) {
         pop <- drop(cbind(1, predict(poly(df$Days, 2), nd$Days)) %*% fixef(fm))
         list(re = pop + ranef(fm)$Subject[as.character(nd$Subject), 1], population = pop)
       })
)
robust_cases <- list(
  list(id = "robust_y_plus_1e4_reml", case = robust_y(1e4, 1), r_formula = "y ~ x + (x | g)", theta_probe = c(1, 0, 1)),
  list(id = "robust_y_plus_1e7_reml", case = robust_y(1e7, 1), r_formula = "y ~ x + (x | g)", theta_probe = c(1, 0, 1)),
  list(id = "robust_y_times_1e-8_reml", case = robust_y(0, 1e-8), r_formula = "y ~ x + (x | g)", theta_probe = c(1, 0, 1)),
  list(id = "robust_y_times_1e8_reml", case = robust_y(0, 1e8), r_formula = "y ~ x + (x | g)", theta_probe = c(1, 0, 1)),
  list(id = "robust_year_intercept_reml", case = robust_year(), r_formula = "y ~ year + (1 | g)", theta_probe = 1),
  list(id = "robust_year_slope_reml", case = robust_year(), r_formula = "y ~ year + (year | g)", theta_probe = c(1, 0, 1))
)
for (r in robust_cases) {
  coefs <- if (grepl("year", r$r_formula)) "year" else "x"
  features[[length(features) + 1]] <- list(
    id = r$id, data = NULL, reml = TRUE, r_formula = r$r_formula, formula = r$r_formula,
    columns = r$case$columns, check = r$case$check, theta_probe = r$theta_probe,
    names = setNames(list("Intercept", coefs), c("(Intercept)", coefs)))
}

# lmer's warnings and messages, verbatim, and the fit.
lmer_logged <- function(call, env) {
  said <- character(0)
  fm <- withCallingHandlers(eval(call, env),
    warning = function(w) { said <<- c(said, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(m) { said <<- c(said, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
  list(fm = fm, said = said)
}

# lme4's merMod at a given theta (no optimization): lFormula + mkLmerDevfun + mkMerMod.
lmer_at <- function(call, env, theta) {
  lcall <- call
  lcall[[1]] <- quote(lFormula)
  lf <- eval(lcall, env)
  devfun <- do.call(mkLmerDevfun, lf)
  fval <- devfun(theta)
  mkMerMod(environment(devfun), list(par = theta, fval = fval, conv = 0, feval = 1, message = "theta fixed"),
           lf$reTrms, fr = lf$fr, mc = call)
}

fit_feature <- function(m) {
  if (is.null(m$data)) {
    df <- as.data.frame(m$columns, stringsAsFactors = TRUE)
  } else {
    df <- relevel_alpha(as.data.frame(datasets[[m$data]]))
    for (v in names(m$columns)) df[[v]] <- m$columns[[v]]
  }
  env <- environment()
  call <- bquote(lmer(.(as.formula(m$r_formula)), data = df, REML = .(m$reml), control = tight_control))
  if (!is.null(m$weights)) call$weights <- as.name(m$weights)
  if (!is.null(m$r_contrasts)) call$contrasts <- m$r_contrasts
  logged <- lmer_logged(call, env)
  fm <- logged$fm
  dcall <- call
  dcall$control <- NULL
  dcall$devFunOnly <- TRUE
  devfun <- eval(dcall, env)
  objective_of <- function(fit) if (m$reml) unname(REMLcrit(fit)) else unname(deviance(fit))
  extra <- list()
  if (!is.null(m$check)) {
    cdf <- df
    for (v in names(m$check$columns)) cdf[[v]] <- m$check$columns[[v]]
    ccall <- call
    ccall$data <- quote(cdf)
    cfm <- lmer_logged(ccall, env)$fm
    theta_mapped <- m$check$theta(unname(getME(cfm, "theta")))
    at_mapped <- devfun(theta_mapped)
    lme4_fit <- list(objective = objective_of(fm), theta = unname(getME(fm, "theta")), fixef = as.list(fixef(fm)))
    use_mapped <- at_mapped < lme4_fit$objective
    if (use_mapped) fm <- lmer_at(call, env, theta_mapped)
    extra <- list(
      lme4_fit = lme4_fit,
      reparametrized = list(description = m$check$description, objective_own_scale = objective_of(cfm),
                            theta = theta_mapped, objective_at_theta = at_mapped,
                            fixef = as.list(setNames(m$check$fixef(unname(fixef(cfm))), names(fixef(fm)))),
                            max_fitted_difference = max(abs(m$check$fitted(fitted(cfm)) - fitted(fm)))),
      objective_source = if (use_mapped) "lme4 devfun at the reparametrized optimum" else "lme4 optimizer")
  }
  theta <- unname(getME(fm, "theta"))
  theta_probe <- if (is.null(m$theta_probe)) 0.8 * theta + 0.1 else m$theta_probe
  na_if_null <- function(v) if (is.null(v)) NA else v   # JSON null, not {}
  out <- c(list(id = m$id, data = na_if_null(m$data), r_formula = m$r_formula, formula = m$formula, reml = m$reml,
                weights = na_if_null(m$weights), r_contrasts = na_if_null(m$r_contrasts), columns = m$columns, names = m$names,
                lme4_warnings = I(logged$said), nobs = nobs(fm), sum_response = sum(model.response(model.frame(fm)))),
           fit_outputs(fm, devfun, m$reml, theta_probe), extra)
  if (!is.null(m$newdata)) {
    nd <- as.data.frame(m$newdata)
    for (v in names(nd)) if (is.factor(df[[v]])) nd[[v]] <- factor(as.character(nd[[v]]), levels = levels(df[[v]]))
    out$newdata <- m$newdata
    out$predict_re <- unname(predict(fm, newdata = nd))
    out$predict_population <- unname(predict(fm, newdata = nd, re.form = NA))
    hand <- m$by_hand(fm, df, nd)   # predict.merMod against the formula worked by hand
    stopifnot(isTRUE(all.equal(out$predict_re, unname(hand$re), tolerance = 1e-12)),
              isTRUE(all.equal(out$predict_population, unname(hand$population), tolerance = 1e-12)))
  }
  out
}

out <- list(
  generator = "validation/lme4_reference.R",
  r_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  metafor_version = as.character(packageVersion("metafor")),
  models = lapply(models, fit_reference),
  known_se = list(eight_schools(), bcg(FALSE), bcg(TRUE)),
  insteval = fit_insteval(),
  features = lapply(features, fit_feature)
)
args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/lme4_reference.json"
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), target)
cat("wrote", target, "\n")
