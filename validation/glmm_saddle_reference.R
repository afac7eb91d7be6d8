# Reference for a GLMM whose likelihood has a saddle at a zero variance: a Bernoulli model with crossed
# subjects and items and a correlated slope per item, y ~ x + (1 | subj) + (1 + x | item), 30 subjects x 20
# items (validation/glmm_saddle_data.csv, simulated in NumPy: intercept sds 0.8 and 0.5, the item slope's sd 0.3).
# At the item slope's T diagonal = 0 the deviance's slope in it is 0, its curvature negative: hp.glmm's
# bounded L-BFGS-B once stopped there, 0.20 above this optimum.  Writes validation/glmm_saddle_reference.json.
#
#   Rscript validation/glmm_saddle_reference.R
#
# glmer's control as in validation/glmm_reference.R (bobyqa, tolPwrss 1e-10, rhoend 1e-10).
library(lme4)
library(jsonlite)
d <- read.csv("validation/glmm_saddle_data.csv", colClasses = c(subj = "character", item = "character"))
control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
fit <- glmer(y ~ x + (1 | subj) + (1 + x | item), data = d, family = binomial, control = control)
out <- list(
  generator = "validation/glmm_saddle_reference.R",
  r_version = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  formula = "y ~ x + (1 | subj) + (1 + x | item)",
  family = "binomial",
  minus_2_loglik = -2 * as.numeric(logLik(fit)),
  theta = unname(getME(fit, "theta")),
  theta_names = names(getME(fit, "theta")),
  fixef = as.list(fixef(fit)),
  singular = isSingular(fit)
)
write_json(out, "validation/glmm_saddle_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
