# Reference for ordered factors, which R codes with polynomial contrasts (contr.poly: f.L, f.Q, f.C...): lme4's
# fixed effects, criterion, variance components and predictions on sleepstudy with Days binned into an ordered
# four-level phase (early < mid < late < last) and a two-level half (a random slope on it), and glmer on cbpp with period ordered.  Writes
# validation/ordered_factor_reference.json.
#
#   Rscript validation/ordered_factor_reference.R
library(lme4)
library(jsonlite)
sleep <- sleepstudy
sleep$phase <- factor(c("early", "mid", "late", "last")[findInterval(sleep$Days, c(0, 3, 6, 8))],
                      levels = c("early", "mid", "late", "last"), ordered = TRUE)
sleep$half <- factor(ifelse(sleep$Days < 5, "first", "second"), ordered = TRUE)  # a slope on an ordered factor
new <- data.frame(Days = c(1, 4, 9), phase = factor(c("early", "late", "last"), levels = levels(sleep$phase),
                                                     ordered = TRUE),
                  half = factor(c("first", "first", "second"), levels = levels(sleep$half), ordered = TRUE),
                  Subject = c("308", "309", "new"))
models <- list(
  list(id = "phase", formula = "Reaction ~ phase + (1 | Subject)"),
  list(id = "phase_days", formula = "Reaction ~ phase * Days + (Days | Subject)"),
  list(id = "no_intercept", formula = "Reaction ~ 0 + phase + (1 | Subject)"),
  list(id = "slopes", formula = "Reaction ~ Days + (half | Subject)")
)
out <- list(generator = "validation/ordered_factor_reference.R", r_version = R.version.string,
            lme4 = as.character(packageVersion("lme4")), lmm = list())
control <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
for (m in models) {
  fit <- lmer(as.formula(m$formula), sleep, control = control)
  out$lmm[[m$id]] <- list(formula = m$formula, reml_criterion = unname(REMLcrit(fit)), fixef = as.list(fixef(fit)),
                          sdcor = as.data.frame(VarCorr(fit))$sdcor,
                          predict = unname(predict(fit, newdata = new, allow.new.levels = TRUE)))
}
cbpp2 <- cbpp
cbpp2$period <- factor(cbpp2$period, ordered = TRUE)
gcontrol <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-10, optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
g <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp2, binomial, control = gcontrol)
out$glmm <- list(formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                 minus_2_loglik = -2 * as.numeric(logLik(g)), fixef = as.list(fixef(g)))
write_json(out, "validation/ordered_factor_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
