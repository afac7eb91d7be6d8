# Reference for likelihood-ratio tests between nested fits, lme4's anova(m0, m1): sleepstudy's random intercept
# against its correlated slope (REML fits, refitted by ML as anova does), and cbpp's binomial without and with period.
# Writes validation/anova_reference.json.
#
#   Rscript validation/anova_reference.R
library(lme4)
library(jsonlite)
table_of <- function(a) lapply(as.data.frame(a), function(column) unname(column))
m0 <- lmer(Reaction ~ Days + (1 | Subject), sleepstudy)
m1 <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10))
g0 <- glmer(cbind(incidence, size - incidence) ~ 1 + (1 | herd), cbpp, binomial, control = control)
g1 <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, control = control)
out <- list(generator = "validation/anova_reference.R", lme4 = as.character(packageVersion("lme4")),
            lmm = list(formulas = c("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days | Subject)"),
                       table = table_of(anova(m0, m1))),
            glmm = list(formulas = c("cbind(incidence, size - incidence) ~ 1 + (1 | herd)",
                                     "cbind(incidence, size - incidence) ~ period + (1 | herd)"),
                        table = table_of(anova(g0, g1))))
write_json(out, "validation/anova_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null")
