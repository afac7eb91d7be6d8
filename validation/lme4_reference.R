# Reference values for hierpool's closed-form engine, from lme4 (and metafor for known
# residual sds).  Writes validation/lme4_reference.json, which the tests read (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-lme4 r-cran-nlme r-cran-jsonlite r-cran-metafor
#   Rscript validation/lme4_reference.R
#
# Factors are re-levelled alphabetically (as hierpool orders string columns) so that both use
# the same treatment contrasts; lme4 terms are named as lme4 names them and the tests map
# "(Intercept)" -> "Intercept" and "SexMale" <-> "Sex[Male]".
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

fit_reference <- function(m) {
  df <- relevel_alpha(as.data.frame(datasets[[m$data]]))
  f <- as.formula(m$formula)
  fm <- lmer(f, data = df, REML = m$reml,
             control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhobeg = 2e-1, rhoend = 1e-10, maxfun = 1e5)))
  devfun <- lmer(f, data = df, REML = m$reml, devFunOnly = TRUE)
  theta <- unname(getME(fm, "theta"))
  theta_probe <- 0.8 * theta + 0.1   # an arbitrary theta: checks the objective apart from the optimizer
  vc <- as.data.frame(VarCorr(fm))
  re <- as.data.frame(ranef(fm, condVar = TRUE))
  fe <- fixef(fm)
  list(
    id = m$id, data = m$data, formula = m$formula, reml = m$reml,
    nobs = nobs(fm), sum_response = sum(model.response(model.frame(fm))),
    objective = if (m$reml) unname(REMLcrit(fm)) else unname(deviance(fm)),
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

out <- list(
  generator = "validation/lme4_reference.R",
  r_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  metafor_version = as.character(packageVersion("metafor")),
  models = lapply(models, fit_reference),
  known_se = list(eight_schools(), bcg(FALSE), bcg(TRUE)),
  insteval = fit_insteval()
)
args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/lme4_reference.json"
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), target)
cat("wrote", target, "\n")
