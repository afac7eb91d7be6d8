# Long reference run of Stan (brms) for hierpool's Bayesian BYM2 disease-mapping model (issue 19):
#
#   sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type = "bym2"),   Poisson, North Carolina 1974-78
#
# with hierpool's default priors for a Poisson GLMM as they were until 2026-12-05 (hierpool/bayesian/priors.py; the
# intercept's is now wider, and the tests set this one on hierpool's side) set explicitly (validation/nc_sids.R):
# Intercept ~ Normal(0, 2.5), nwbir_rate ~ Normal(0, 2.5 / sd(nwbir_rate)) (sd with the n denominator),
# sdcar ~ HalfNormal(2.5), rhocar ~ Beta(1, 1).  brms's BYM2 is hierpool's: rcar = sdcar (sqrt(1 - rho) u +
# sqrt(rho / s) v), u iid N(0, 1), v ICAR with brms's soft sum-to-zero constraint sum(v) ~ N(0, 0.001 n), s the
# scaling factor (brms's car_scale = 0.5859791, validation/spatial_reference.json's).  The data are the files
# hierpool ships (hierpool/datasets/data/), expected counts internally standardised as hp.datasets.nc_sids().
# Writes validation/spatial_brms_reference.json: posterior mean, sd and MCSE of the mean (posterior package) of
# the fixed effects, sdcar, rhocar and every county's log relative risk x'beta + rcar; the tests compare hierpool's
# posterior to it in Monte-Carlo units (|z| < 4 with both runs' MCSEs).  About 6 minutes with 2 cores.
#
#   Rscript validation/spatial_brms_reference.R
suppressMessages(library(posterior))
source("validation/nc_sids.R")  # nc, W, s_x, priors, formula

chains <- 4; iter <- 12000; warmup <- 2000
seconds <- system.time(fit <- brm(formula, data = nc, data2 = list(W = W), family = poisson(), prior = priors,
                                  chains = chains, iter = iter, warmup = warmup, cores = 2, seed = 20261202,
                                  refresh = 0, silent = 2))[["elapsed"]]
draws <- as_draws_matrix(fit)
X <- cbind(1, nc$nwbir_rate)
beta <- draws[, c("b_Intercept", "b_nwbir_rate")]
rcar <- draws[, sprintf("rcar[%d]", seq_len(nrow(nc)))]
# rcar is indexed by brms's locations (the grouping factor's levels, W's rows matched by name): standata's Jloc
# gives each county's location
log_rr_chains <- chained(beta %*% t(X) + rcar[, standata(fit)$Jloc])
dimnames(log_rr_chains)$variable <- nc$county
sampler <- nuts_params(fit)
out <- list(
  generated_by = "validation/spatial_brms_reference.R", brms_version = as.character(packageVersion("brms")),
  r_version = R.version.string, chains = chains, iter = iter, warmup = warmup, seconds = seconds,
  divergences = sum(subset(sampler, Parameter == "divergent__")$Value),
  car_scale = standata(fit)$car_scale, s_x = s_x,
  parameters = summary_of(subset_draws(as_draws_array(fit), variable = c("b_Intercept", "b_nwbir_rate", "sdcar",
                                                                           "rhocar"))),
  log_relative_risk = summary_of(log_rr_chains)
)
write_json(out, "validation/spatial_brms_reference.json", auto_unbox = TRUE, digits = NA, pretty = TRUE)
