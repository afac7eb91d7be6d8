# Reference for coef(fit) (fixed plus random coefficients per level) of lmer and glmer, and glmer's fitted values
# and deviance and Pearson residuals: sleepstudy's (Days | Subject) and cbpp's binomial (1 | herd).  Writes
# validation/coef_residuals_reference.json.
#
#   Rscript validation/coef_residuals_reference.R
library(lme4)
library(jsonlite)
lmm <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
glmm <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial,
              control = glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10)))
by_level <- function(table) lapply(split(table, rownames(table)), function(row) unname(unlist(row)))
out <- list(generator = "validation/coef_residuals_reference.R", lme4 = as.character(packageVersion("lme4")),
            lmm = list(formula = "Reaction ~ Days + (Days | Subject)", coef = by_level(coef(lmm)$Subject)),
            glmm = list(formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                        coef = by_level(coef(glmm)$herd), fitted = unname(fitted(glmm)),
                        deviance_residuals = unname(residuals(glmm)),
                        pearson_residuals = unname(residuals(glmm, type = "pearson"))))
write_json(out, "validation/coef_residuals_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
