# Reference for a negative binomial GLMM whose shape is in the hundreds (the profile nearly flat in log shape): 280
# simulated counts in 20 groups (validation/nb_flat_shape_data.csv, drawn with shape 200).  glmer.nb's shape (its
# theta.ml warns of its iteration limit), logLik and fixed effects.  Writes validation/nb_flat_shape_reference.json.
#
#   Rscript validation/nb_flat_shape_reference.R
library(lme4)
library(jsonlite)
data <- read.csv("validation/nb_flat_shape_data.csv")
data$g <- factor(data$g)
fit <- glmer.nb(y ~ x + (1 | g), data)
out <- list(generator = "validation/nb_flat_shape_reference.R", lme4 = as.character(packageVersion("lme4")),
            formula = "y ~ x + (1 | g)", shape = getME(fit, "glmer.nb.theta"), loglik = as.numeric(logLik(fit)),
            fixef = as.list(fixef(fit)), sd = attr(VarCorr(fit)$g, "stddev")[[1]])
write_json(out, "validation/nb_flat_shape_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
