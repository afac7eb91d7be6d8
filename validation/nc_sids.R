# North Carolina's SIDS data as hierpool ships them (hierpool/datasets/data/), for the R scripts that fit the BYM2
# model with brms (validation/spatial_brms_reference.R, benchmarks/spatial.py): the 100 counties with their
# internally standardised expected counts and non-white birth share as hp.datasets.nc_sids() computes them, the 0/1
# adjacency matrix W named by county, and hierpool's default priors for the model, written for brms.
# Run from the repository root: source("validation/nc_sids.R").
suppressMessages({library(brms); library(jsonlite)})

edges <- read.csv("hierpool/datasets/data/nc_sids_adjacency.csv", colClasses = "character")
features <- fromJSON("hierpool/datasets/data/nc_sids.geojson", simplifyVector = FALSE)$features
nc <- do.call(rbind, lapply(features, function(f) with(f$properties, data.frame(
  county = NAME, births74 = BIR74, sid74 = SID74, nwbir74 = NWBIR74))))
nc$expected <- nc$births74 * sum(nc$sid74) / sum(nc$births74)
nc$nwbir_rate <- nc$nwbir74 / nc$births74
W <- matrix(0, nrow(nc), nrow(nc), dimnames = list(nc$county, nc$county))
W[cbind(edges$a, edges$b)] <- 1
W[cbind(edges$b, edges$a)] <- 1

# hierpool's defaults for a Poisson model until 2026-12-05 (hierpool/bayesian/priors.py, hierpool/bayesian/spatial.py;
# the default intercept prior is now wider, Normal(0, 4.5) here, and tests/test_spatial_bayes.py sets this one):
# Normal(0, 2.5) intercept, Normal(0, 2.5 / sd(nwbir_rate)) slope (sd with the n denominator), HalfNormal(2.5) sd,
# Beta(1, 1) rho
s_x <- sqrt(mean((nc$nwbir_rate - mean(nc$nwbir_rate))^2))
priors <- c(prior(normal(0, 2.5), class = b, coef = Intercept),
            prior_string(sprintf("normal(0, %.17g)", 2.5 / s_x), class = "b", coef = "nwbir_rate"),
            prior(normal(0, 2.5), class = sdcar), prior(beta(1, 1), class = rhocar))
formula <- sid74 ~ 0 + Intercept + nwbir_rate + offset(log(expected)) + car(W, gr = county, type = "bym2")

# the reference scripts' summaries (posterior package): mean, sd, MCSE of the mean, bulk ESS and R-hat of each
# variable of a draws object; chained() rebuilds a draws_array from a matrix of draws of `chains` chains of
# `iter - warmup` draws each (the calling script's variables), so that the MCSEs see the chains
summary_of <- function(x) {
  s <- summarise_draws(x, mean, sd, mcse_mean, ess_bulk, rhat)
  setNames(lapply(seq_len(nrow(s)), function(i) list(mean = s$mean[i], sd = s$sd[i], mcse = s$mcse_mean[i],
                                                      ess_bulk = s$ess_bulk[i], rhat = s$rhat[i])), s$variable)
}
chained <- function(m) {
  a <- array(as.numeric(m), dim = c(iter - warmup, chains, ncol(m)), dimnames = list(NULL, NULL, colnames(m)))
  as_draws_array(a)
}
