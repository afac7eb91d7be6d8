# Reference values for the fixed-effect coding of interactions (hierpool/spec/r_coding.py): lme4's ML deviance,
# number of fixed effects and fixed effects (by lme4's names) for formulas whose interactions formulae and R's
# model.matrix may code differently.
# Writes validation/formula_coding_reference.json, which tests/test_formula_terms.py reads (CI needs no R).
#
#   apt-get install -y r-base-core r-cran-lme4 r-cran-jsonlite
#   Rscript validation/formula_coding_reference.R
#
# Data: validation/formula_coding_data.csv, 400 rows simulated once in Python (numpy default_rng(2)): numeric a, b;
# factors f (p, q), c (x, y, z), h (u, v, w); groups g (40 of 10 rows); y.  The ML deviance depends on the
# fixed-effect columns only through their span, so an equal deviance is the same model whatever the parametrization.
# "formulae_differs" marks the formulas whose columns formulae spans differently from R's (found by fitting both);
# there and where the span is R's but the columns are not (y ~ f:c + h), hierpool fits R's columns
# (hierpool/spec/r_coding.py), so every formula must give lme4's deviance and fixed effects.  "predict_fixed": lme4's
# population-level predictions (re.form = NA) of the first 12 rows, read by hierpool as new data.  R's nesting f/c
# and 0 + f*c*h, whose matrices formulae cannot build (its columns do not match its terms), are R's columns too.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

d <- read.csv("validation/formula_coding_data.csv", colClasses = c(g = "character"))
formulas <- c(
  "y ~ (a + f):c", "y ~ a:c + f:c", "y ~ a:c + c:f", "y ~ f:c:h", "y ~ b + (a + f):c", "y ~ h + (a + f):c",
  "y ~ f:c", "y ~ a:c", "y ~ a + a:c", "y ~ c + a:c", "y ~ f + a:c", "y ~ f*c", "y ~ f + f:c", "y ~ c + f:c",
  "y ~ 0 + f:c", "y ~ f*c*h", "y ~ f + c:h", "y ~ f:c + c:h", "y ~ a*f*c", "y ~ a:f:c", "y ~ a + a:f:c",
  "y ~ f*c - f", "y ~ f*c - c", "y ~ f*c - 1", "y ~ c + f:c:h", "y ~ (f + c + h)^2", "y ~ a:b + c", "y ~ a:b:c",
  "y ~ f:a + c:a", "y ~ 0 + f + c", "y ~ 0 + a:c", "y ~ 0 + a + f:c", "y ~ 0 + c + f:c", "y ~ 0 + f*c",
  "y ~ 0 + f:c:h", "y ~ 0 + a:f + c", "y ~ poly(a, 2):c", "y ~ poly(a, 2)*c", "y ~ a*b*c", "y ~ a:b:f + c",
  "y ~ f:h + c:h", "y ~ f:h + c:h + f:c", "y ~ f + c + f:c:h", "y ~ f:c + h", "y ~ a:f + b:c", "y ~ a:f + a:c",
  "y ~ a + f + a:f:c", "y ~ f + c:h + f:c:h", "y ~ log(b + 5):c", "y ~ I(a^2):f + f", "y ~ a + f + c + a:f + f:c",
  "y ~ a:c + f:h", "y ~ I(a > 0):f", "y ~ f:c + offset(a)", "y ~ 0 + f:c + h", "y ~ f:poly(b, 2)",
  "y ~ a + f:c + a:f", "y ~ f/c", "y ~ f/a", "y ~ 0 + f*c*h", "y ~ 0 + (a + f + c)^2", "y ~ h + f:c:h"
)
differs <- c("y ~ (a + f):c", "y ~ a:c + f:c", "y ~ a:c + c:f", "y ~ f:c:h", "y ~ b + (a + f):c",
             "y ~ h + (a + f):c")
models <- lapply(formulas, function(f) {
  m <- suppressMessages(suppressWarnings(lmer(as.formula(paste(f, "+ (1 | g)")), d, REML = FALSE)))
  list(formula = f, deviance = deviance(m), n_fixef = length(fixef(m)), formulae_differs = f %in% differs,
       fixef = as.list(fixef(m)), predict_fixed = unname(predict(m, newdata = d[1:12, ], re.form = NA)))
})
out <- list(generated_by = "validation/formula_coding_reference.R", r_version = R.version.string,
            lme4_version = as.character(packageVersion("lme4")), random = "(1 | g)", models = models)
write_json(out, "validation/formula_coding_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
cat("wrote validation/formula_coding_reference.json\n")
