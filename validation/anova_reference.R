# Reference for likelihood-ratio tests between nested fits, lme4's anova(m0, m1): sleepstudy's random intercept
# against its correlated slope (REML fits, refitted by ML as anova does), and cbpp's binomial without and with period;
# and nlme's anova of Ovary's random intercept without and with AR(1) residuals and of the GLS fit with AR(1)
# residuals: their REML fits compared as they are (nlme's anova; hierpool's refit = FALSE: the fixed effects are the
# same) and their ML fits (what hierpool's default refit by maximum likelihood compares).
# Writes validation/anova_reference.json.
#
#   Rscript validation/anova_reference.R
library(lme4)
library(jsonlite)
library(nlme)
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
ovary <- as.data.frame(Ovary)
ovary$s <- sin(2 * pi * ovary$Time)
ovary$c <- cos(2 * pi * ovary$Time)
nlme_models <- function(method) {
  list(gls = gls(follicles ~ s + c, ovary, correlation = corAR1(form = ~ 1 | Mare), method = method),
       lme = lme(follicles ~ s + c, ovary, random = ~ 1 | Mare, method = method),
       lme_ar1 = lme(follicles ~ s + c, ovary, random = ~ 1 | Mare, correlation = corAR1(), method = method))
}
nlme_table <- function(models) {
  a <- anova(models$gls, models$lme, models$lme_ar1)
  list(npar = a$df, AIC = a$AIC, BIC = a$BIC, logLik = a$logLik, L.Ratio = a$L.Ratio, p = a$"p-value")
}
out$nlme <- list(nlme = as.character(packageVersion("nlme")),
                 formulas = c(gls = "follicles ~ s + c, correlation = corAR1(form = ~ 1 | Mare)",
                              lme = "follicles ~ s + c + (1 | Mare)",
                              lme_ar1 = "follicles ~ s + c + (1 | Mare), correlation = corAR1()"),
                 REML = nlme_table(nlme_models("REML")), ML = nlme_table(nlme_models("ML")))
write_json(out, "validation/anova_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null")
