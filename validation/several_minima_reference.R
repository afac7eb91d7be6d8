# Reference for small models whose REML criterion has several minima: one random-effect term of three or four
# coefficients on 6 groups of 6 rows (validation/several_minima_data.csv, simulated in NumPy):
#   spline_193, spline_88: y ~ 1 + (0 + b0 + b1 + b2 + b3 | g), the b columns a cubic B-spline basis of x ~ U(0, 1)
#     (formulae's bs(x, df = 4)), each group's coefficients N(0, 1), residual sd 0.5;
#   slopes_14: y ~ 1 + x1 + x2 + (1 + x1 + x2 | g), x1, x2 ~ N(0, 1), residual sd 1.
# hp.lmm once ended on a higher face than lmer (spline_193: 64.436 against lmer's 61.650; spline_88: 38.198 against
# 38.073) or in an interior minimum above a boundary one (slopes_14: 118.5297 against 118.5292), and hp.fit_batch
# apart from it.  Writes validation/several_minima_reference.json: lmer's REML criterion and theta for each.
#
#   Rscript validation/several_minima_reference.R
library(lme4)
library(jsonlite)
d <- read.csv("validation/several_minima_data.csv", colClasses = c(g = "character"))
formulas <- list(spline_193 = y ~ 1 + (0 + b0 + b1 + b2 + b3 | g), spline_88 = y ~ 1 + (0 + b0 + b1 + b2 + b3 | g),
                 slopes_14 = y ~ 1 + x1 + x2 + (1 + x1 + x2 | g))
fits <- lapply(names(formulas), function(name) {
  fit <- lmer(formulas[[name]], data = d[d$dataset == name, ], REML = TRUE)
  list(formula = deparse(formulas[[name]]), reml_criterion = REMLcrit(fit), theta = unname(getME(fit, "theta")),
       singular = isSingular(fit))
})
names(fits) <- names(formulas)
out <- list(generator = "validation/several_minima_reference.R", r_version = R.version.string,
            lme4 = as.character(packageVersion("lme4")), fits = fits)
write_json(out, "validation/several_minima_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
