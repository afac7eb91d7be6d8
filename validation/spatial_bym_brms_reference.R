# Long reference run of Stan (brms) for hierpool's Bayesian BYM model with two random terms (issue 19):
#
#   sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type = "icar") + (1 | county),   Poisson, NC 1974-78
#
# Besag, York & Mollie's (1991) model: a spatial ICAR term and an unstructured county intercept, each with its sd.
# hierpool's default priors for a Poisson GLMM until 2026-12-05 set explicitly (validation/nc_sids.R; the tests set
# this intercept prior on hierpool's side, whose default is now wider): Intercept ~ Normal(0, 2.5),
# nwbir_rate ~ Normal(0, 2.5 / sd(nwbir_rate)), sdcar ~ HalfNormal(2.5), sd(county) ~ HalfNormal(2.5).  brms's
# ICAR has a soft sum-to-zero constraint (sum(v) ~ N(0, 0.001 n)), hierpool's an exact one.
# Writes validation/spatial_bym_brms_reference.json: posterior mean, sd and MCSE of the mean of the fixed effects,
# sdcar, sd_county__Intercept and every county's log relative risk x'beta + rcar + r_county; tests/
# test_spatial_bayes.py compares hierpool's posterior to it in Monte-Carlo units (|z| < 4 with both runs' MCSEs).
#
#   Rscript validation/spatial_bym_brms_reference.R
suppressMessages(library(posterior))
source("validation/nc_sids.R")  # nc, W, s_x

priors <- c(prior(normal(0, 2.5), class = b, coef = Intercept),
            prior_string(sprintf("normal(0, %.17g)", 2.5 / s_x), class = "b", coef = "nwbir_rate"),
            prior(normal(0, 2.5), class = sdcar), prior(normal(0, 2.5), class = sd, group = county))
formula <- sid74 ~ 0 + Intercept + nwbir_rate + offset(log(expected)) + car(W, gr = county, type = "icar") +
  (1 | county)
chains <- 4; iter <- 12000; warmup <- 2000
seconds <- system.time(fit <- brm(formula, data = nc, data2 = list(W = W), family = poisson(), prior = priors,
                                  chains = chains, iter = iter, warmup = warmup, cores = 2, seed = 20261202,
                                  refresh = 0, silent = 2, control = list(adapt_delta = 0.95)))[["elapsed"]]
draws <- as_draws_matrix(fit)
X <- cbind(1, nc$nwbir_rate)
beta <- draws[, c("b_Intercept", "b_nwbir_rate")]
rcar <- draws[, sprintf("rcar[%d]", seq_len(nrow(nc)))]
# r_county's columns are named by level, where brms may have written a space as a dot ("New Hanover")
county_columns <- grep("^r_county\\[", colnames(draws), value = TRUE)
county_levels <- sub("^r_county\\[(.*),Intercept\\]$", "\\1", county_columns)
county <- draws[, county_columns[match(gsub(" ", ".", nc$county), gsub(" ", ".", county_levels))]]
stopifnot(!anyNA(colnames(county)))
# rcar is indexed by brms's locations (standata's Jloc gives each county's)
log_rr_chains <- chained(beta %*% t(X) + rcar[, standata(fit)$Jloc] + county)
dimnames(log_rr_chains)$variable <- nc$county
sampler <- nuts_params(fit)
out <- list(
  generated_by = "validation/spatial_bym_brms_reference.R", brms_version = as.character(packageVersion("brms")),
  r_version = R.version.string, chains = chains, iter = iter, warmup = warmup, seconds = seconds,
  divergences = sum(subset(sampler, Parameter == "divergent__")$Value), s_x = s_x,
  parameters = summary_of(subset_draws(as_draws_array(fit), variable = c("b_Intercept", "b_nwbir_rate", "sdcar",
                                                                           "sd_county__Intercept"))),
  log_relative_risk = summary_of(log_rr_chains)
)
write_json(out, "validation/spatial_bym_brms_reference.json", auto_unbox = TRUE, digits = NA, pretty = TRUE)
