# Reference posteriors for hierpool's Bayesian generalized linear mixed models (hp.bayes with family=):
# long rstanarm runs of the same models under the same priors.  Writes validation/glmm_bayes_reference.json,
# which tests/test_glmm_bayes.py reads (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-rstanarm r-cran-posterior r-cran-jsonlite r-cran-mass r-cran-lme4
#   Rscript validation/glmm_bayes_reference.R [output.json]
#
# (a few minutes on two cores.)
#
# Models (data as validation/glmm_reference.json has them):
# - cbpp_binomial: cbind(incidence, size - incidence) ~ period + (1 | herd), binomial (logit), lme4::cbpp;
# - epil_exposure_poisson_offset: y ~ post * trt + offset(log(weeks)) + (1 | subject), poisson (log), the
#   rows stored in glmm_reference.json (MASS::epil with each patient's baseline count as period 0);
# - epil_negbin: y ~ lbase * trt + lage + V4 + (1 | subject), negative binomial (NB2, log), MASS::epil.
#
# Priors, the same on both sides:
# - fixed effects, intercept included: flat (rstanarm prior = NULL, prior_intercept = NULL; hierpool
#   priors={"Intercept": "flat", "b": "flat"}).  Flat, because rstanarm puts its intercept prior on the
#   intercept of centred predictors, which hierpool's priors cannot express; under flat priors the two
#   intercepts have the same posterior (a linear change of variables with unit Jacobian);
# - the random-intercept sd: rstanarm's default decov(regularization = 1, concentration = 1, shape = 1,
#   scale = 1), which for one scalar term in a non-Gaussian model is sd = tau, tau ~ Gamma(1, 1), i.e.
#   Exponential(1) (hierpool priors={"sd": Exponential(1)}); checked here by sampling that prior alone
#   (prior_PD = TRUE): "decov_prior_check" stores the prior mean and median of the sd (1 and log 2);
# - the negative binomial's shape: Exponential(1), rstanarm's default prior_aux on its reciprocal_dispersion
#   and hierpool's default prior "shape".  But rstanarm's count models multiply a negative binomial's
#   random-effect scale by that same parameter (count.stan: theta_L = scale .* (tau * aux)), so its sd is
#   tau * shape with tau ~ Exponential(1): the prior density of (sd, shape) is Exp(sd / shape; 1) / shape
#   * Exp(shape; 1), where hierpool's is Exp(sd; 1) * Exp(shape; 1).  Its draws are therefore reweighted
#   to hierpool's prior, w = shape * exp(sd / shape - sd) (self-normalized importance sampling; the
#   weights vary little: "importance_sampling" stores their relative effective size), each mean's MCSE by
#   the delta method, the MCSE of the mean of w (x - mean) / mean(w).
#
# Each model: 4 chains x 10,000 draws after 1,000 warm-up, adapt_delta 0.95, seed 20261201.  Stored per
# quantity: posterior mean, sd and the MCSE of the mean (posterior::summarise_draws, Vehtari et al. 2021),
# bulk ESS and R-hat.  Fixed effects are named as lme4 names them ("(Intercept)", "period2").

suppressMessages({
  library(rstanarm)
  library(posterior)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
here <- dirname(normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE)[1])))
out_file <- if (length(args)) args[[1]] else file.path(here, "glmm_bayes_reference.json")
glmm_reference <- fromJSON(file.path(here, "glmm_reference.json"), simplifyVector = TRUE)

SEED <- 20261201
CHAINS <- 4
WARMUP <- 1000
DRAWS <- 10000

cbpp <- lme4::cbpp
epil <- MASS::epil
epil$subject <- factor(epil$subject)
epil_exposure <- as.data.frame(glmm_reference$datasets$epil_exposure$rows)
epil_exposure$subject <- factor(epil_exposure$subject)
epil_exposure$trt <- factor(epil_exposure$trt, levels = c("placebo", "progabide"))

summarise <- function(draws, log_weights = NULL) {
  s <- summarise_draws(draws, mean, sd, mcse_mean, ess_bulk, rhat)
  out <- lapply(setNames(seq_len(nrow(s)), s$variable), function(i)
    list(mean = s$mean[i], sd = s$sd[i], mcse_mean = s$mcse_mean[i], ess_bulk = s$ess_bulk[i], rhat = s$rhat[i]))
  if (is.null(log_weights)) return(out)
  w <- exp(log_weights - max(log_weights))
  w <- w / mean(w)
  for (name in names(out)) {
    x <- draws[, , name]
    m <- sum(w * x) / sum(w)
    f <- x
    f[] <- w * (x - m)
    out[[name]]$mean <- m
    out[[name]]$sd <- sqrt(sum(w * (x - m)^2) / sum(w))
    out[[name]]$mcse_mean <- summarise_draws(f, mcse_mean)$mcse_mean[1]
  }
  out
}

fit_model <- function(id, formula, data, family, group) {
  common <- list(formula = as.formula(formula), data = data, prior = NULL, prior_intercept = NULL,
                 prior_covariance = decov(1, 1, 1, 1), chains = CHAINS, iter = WARMUP + DRAWS, warmup = WARMUP,
                 seed = SEED, cores = 2, refresh = 0, adapt_delta = 0.95)
  fit <- if (family == "negative_binomial") {
    do.call(stan_glmer.nb, c(common, list(prior_aux = exponential(1))))
  } else {
    do.call(stan_glmer, c(common, list(family = get(family)())))
  }
  draws <- as_draws_array(as.array(fit))
  names <- variables(draws)
  fixed <- names[!grepl("^(b\\[|Sigma\\[|reciprocal_dispersion)", names)]
  sigma <- sprintf("Sigma[%s:(Intercept),(Intercept)]", group)
  effects <- grep(sprintf("^b\\[\\(Intercept\\) %s:", group), names, value = TRUE)
  sd_draws <- draws[, , sigma]
  sd_draws[] <- sqrt(sd_draws)
  variables(sd_draws) <- "sd"
  log_weights <- NULL
  if (family == "negative_binomial") {  # to hierpool's prior: see the header
    shape <- as.vector(draws[, , "reciprocal_dispersion"])
    log_weights <- log(shape) + as.vector(sd_draws) / shape - as.vector(sd_draws)
  }
  fixed_summary <- summarise(draws[, , fixed], log_weights)
  effect_summary <- summarise(draws[, , effects], log_weights)
  names(effect_summary) <- sub("\\]$", "", sub(sprintf("^b\\[\\(Intercept\\) %s:", group), "", names(effect_summary)))
  sampler <- rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE)
  out <- list(id = id, formula = formula, family = family, group = group,
              fixef = fixed_summary, sd = summarise(sd_draws, log_weights)[["sd"]], ranef = effect_summary,
              divergences = sum(sapply(sampler, function(x) sum(x[, "divergent__"]))))
  if (family == "negative_binomial") {
    out$shape <- summarise(draws[, , "reciprocal_dispersion"], log_weights)[[1]]
    w <- exp(log_weights - max(log_weights))
    out$importance_sampling <- list(
      note = "rstanarm's draws reweighted from its prior of (sd, shape) to hierpool's (see the R script's header)",
      relative_effective_size = sum(w)^2 / sum(w^2) / length(w), max_normalized_weight = max(w) / sum(w))
  }
  out
}

models <- list(
  fit_model("cbpp_binomial", "cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, "binomial", "herd"),
  fit_model("epil_exposure_poisson_offset", "y ~ post * trt + offset(log(weeks)) + (1 | subject)", epil_exposure,
            "poisson", "subject"),
  fit_model("epil_negbin", "y ~ lbase * trt + lage + V4 + (1 | subject)", epil, "negative_binomial", "subject")
)

# the decov prior of one scalar term alone: sd ~ Exponential(1)?  (Proper normal priors on the fixed effects
# here, rstanarm's defaults: under flat ones the prior alone is improper and its chains cannot converge.)
prior_fit <- stan_glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp, family = binomial(),
                        prior = normal(0, 2.5), prior_intercept = normal(0, 2.5), prior_covariance = decov(1, 1, 1, 1),
                        prior_PD = TRUE,
                        chains = CHAINS, iter = WARMUP + DRAWS, warmup = WARMUP, seed = SEED, cores = 2, refresh = 0,
                        adapt_delta = 0.95)
prior_sd <- sqrt(as.matrix(prior_fit)[, "Sigma[herd:(Intercept),(Intercept)]"])
prior_sd_array <- as_draws_array(sqrt(as.array(prior_fit)[, , "Sigma[herd:(Intercept),(Intercept)]", drop = FALSE]))
prior_summary <- summarise_draws(prior_sd_array, mcse_mean, rhat)
decov_prior_check <- list(note = "prior-only draws of cbpp's herd sd under decov(1, 1, 1, 1); Exponential(1) has mean 1, median log 2",
                          mean = mean(prior_sd), median = median(prior_sd), mcse_mean = prior_summary$mcse_mean[1],
                          rhat = prior_summary$rhat[1], exponential_1_median = log(2))

result <- list(
  generator = "validation/glmm_bayes_reference.R",
  command = "Rscript validation/glmm_bayes_reference.R",
  r_version = R.version.string,
  packages = list(rstanarm = as.character(packageVersion("rstanarm")), rstan = as.character(packageVersion("rstan")),
                  posterior = as.character(packageVersion("posterior"))),
  settings = list(chains = CHAINS, warmup = WARMUP, draws = DRAWS, adapt_delta = 0.95, seed = SEED),
  priors = list(fixed = "flat (prior = NULL, prior_intercept = NULL)",
                sd = "decov(1, 1, 1, 1): Exponential(1) on a scalar term's sd (the negative binomial: reweighted to it)",
                shape = "exponential(1) on reciprocal_dispersion (NB2 shape)"),
  decov_prior_check = decov_prior_check,
  models = models
)
writeLines(toJSON(result, auto_unbox = TRUE, digits = NA, pretty = TRUE), out_file)
cat("wrote", out_file, "\n")
