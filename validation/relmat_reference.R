# Reference values for hierpool's "animal model": a linear mixed model whose random effect has a known
# covariance, a numerator relationship matrix A computed from a pedigree,
#     y = X beta + Z a + e,   a ~ N(0, sigma_A^2 A),   e ~ N(0, sigma_E^2 I),
# fitted with lme4 the way pedigreemm / lme4qtl do it: lFormula() builds the model for y ~ sex + (1 | animal),
# then the Cholesky factor of A is pushed into the random-effects design, Z* = Z L with A = L L', so that
# lme4's own random effects b* ~ N(0, sigma_A^2 I) and a = L b*.  Writes validation/relmat_reference.json,
# which the tests read (CI needs no R).
#
#   python validation/relmat_data.py          # (re)writes relmat_pedigree.csv and relmat_phenotypes.csv
#   Rscript validation/relmat_reference.R [output.json]
#
# Needs R with lme4, Matrix and jsonlite (apt-get install -y r-cran-lme4 r-cran-jsonlite); not pedigreemm.
#
# Data: validation/relmat_pedigree.csv (id, sire, dam; empty = unknown parent; parents listed before their
# offspring) and validation/relmat_phenotypes.csv (animal, sex, y; some animals have two records, some
# pedigree animals have none).  See relmat_data.py for the simulation.
#
# Method:
# - A by Henderson's tabular method over ALL pedigree animals (plain R, dense; 400 animals).
# - The random-effect factor keeps a level for every pedigree animal (lFormula's model frame drops unused
#   levels, so the random-effects terms are rebuilt here for all levels): Zt* = t(L) %*% Zt, where Zt has an
#   all-zero column per unrecorded animal (and Z L then has all-zero columns for animals with no recorded
#   descendants; lme4 copes, as Lambda' Z*' Z* Lambda + I stays positive definite).  Breeding values of all
#   animals, recorded or not, are a-hat = L b*-hat.
# - Cross-check 1: the pedigreemm-style fit on the recorded animals only, with A_rr (the marginal of the
#   recorded animals' effects is N(0, sigma_A^2 A_rr), so the likelihood is the same), and the unrecorded
#   animals' breeding values E[a_u | y] = A_ur A_rr^{-1} a_r-hat.
# - Cross-check 2: dense -2 log-likelihood (REML and ML) at lme4's estimates from V = sigma_A^2 Z A Z'
#   + sigma_E^2 I, the GLS fixed effects and their standard errors.
# - Cross-check 3: Henderson's mixed model equations with A^{-1} (lambda = sigma_E^2 / sigma_A^2) give the
#   fixed effects and the breeding values; the prediction error variances are PEV = sigma_E^2 diag(C^aa),
#   C^aa the breeding-value block of the inverse MME coefficient matrix (this accounts for the uncertainty
#   in beta-hat; the conditional SD stored is sqrt(PEV)).
# - Optimum: lme4's optimizer (nloptwrap BOBYQA, xtol_abs = ftol_abs = 1e-14) finds theta = sigma_A / sigma_E
#   only to ~1e-8 (the criterion is flat at its minimum: its tolerance acts on the criterion), so theta is then
#   polished to the root of the analytic derivative of the profiled criterion (dense, uniroot, tol 1e-15) and
#   lme4's deviance function is evaluated there before mkMerMod.  Checked: the analytic derivative against a
#   central difference of lme4's deviance function; nloptwrap's and Brent's (optimize) optima agree in theta
#   to < 1e-6 and in the criterion to ~1e-16 (the polish moves sigma2_A in its 8th digit).
# All agreements are asserted to 1e-8 (relative to max(1, |value|)) unless noted; the script stops if any fails.
#
# Second model (JSON key "fits_pe"): the repeatability animal model with a permanent-environment effect,
#     y ~ sex + (1 | animal) + (1 | pe),  pe a copy of the animal factor over the recorded animals only,
#     y = X beta + Z_a a + Z_p p + e,  a ~ N(0, sigma_A^2 A) (all pedigree animals, as above),
#     p ~ N(0, sigma_PE^2 I),  e ~ N(0, sigma_E^2 I);  theta = (sigma_A / sigma_E, sigma_PE / sigma_E).
# sigma_PE^2 is identified (weakly) only through the 30 animals with two records.  Fitted the same way: lFormula,
# the animal term's block of Zt replaced by t(L) Zt_animal over all pedigree animals, the pe term kept as lme4
# builds it, mkLmerDevfun, optimizeLmer (nloptwrap BOBYQA, tolerances as above), then theta polished on the
# dense analytic score (Newton for an interior optimum; if sigma_PE^2 is at its boundary 0, a 1-D root in
# theta_A with theta_PE = 0, and the one-sided derivative in sigma_PE^2 / sigma_E^2 asserted >= 0).  Checks:
# lme4's Nelder-Mead on the same deviance function, the analytic score against central differences of lme4's
# deviance function, the dense REML/ML -2 log-likelihood from V = sigma_A^2 Z_a A Z_a' + sigma_PE^2 Z_p Z_p'
# + sigma_E^2 I, GLS fixed effects and SEs, Henderson's MME (breeding values, pe BLUPs); at the boundary, the
# first model's fit.  repeatability = (sigma_A^2 + sigma_PE^2) / total, h2 = sigma_A^2 / total.  With these data
# (simulated without a permanent-environment effect, see relmat_data.py) sigma_PE^2 is estimated at its
# boundary 0 by REML and ML, so fits_pe reproduces fits (repeatability = h2, pe BLUPs all 0).

suppressPackageStartupMessages({
  library(Matrix)
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
target <- if (length(args)) args[[1]] else "validation/relmat_reference.json"
ped_path <- "validation/relmat_pedigree.csv"
phen_path <- "validation/relmat_phenotypes.csv"
TOL <- 1e-8

# Assert |x - y| <= TOL * max(1, |y|) elementwise; report the largest scaled difference.
check <- function(what, x, y, tol = TOL) {
  x <- as.numeric(x)
  y <- as.numeric(y)
  stopifnot(length(x) == length(y))
  d <- max(abs(x - y) / pmax(1, abs(y)))
  cat(sprintf("  check %-58s max scaled diff %.2e\n", what, d))
  if (!(d <= tol)) stop(sprintf("check failed: %s (%.3e > %.1e)", what, d, tol))
  invisible(d)
}

# ---- data ------------------------------------------------------------------------------------------------
ped <- read.csv(ped_path, colClasses = "character", na.strings = "")
phen <- read.csv(phen_path, colClasses = c("character", "character", "numeric"), na.strings = "")
ids <- ped$id
n_ped <- length(ids)
sire <- match(ped$sire, ids)  # NA = unknown
dam <- match(ped$dam, ids)
stopifnot(!anyDuplicated(ids), all(is.na(ped$sire) | !is.na(sire)), all(is.na(ped$dam) | !is.na(dam)))
stopifnot(all(is.na(sire) | sire < seq_len(n_ped)), all(is.na(dam) | dam < seq_len(n_ped)))  # parents first
stopifnot(all(phen$animal %in% ids), !anyNA(phen$y))

# ---- numerator relationship matrix, Henderson's tabular method ---------------------------------------------
# A[i, j] = (A[j, s] + A[j, d]) / 2 for j < i (unknown parent contributes 0); A[i, i] = 1 + A[s, d] / 2.
tabular_A <- function(sire, dam) {
  n <- length(sire)
  A <- matrix(0, n, n)
  for (i in seq_len(n)) {
    s <- sire[i]
    d <- dam[i]
    if (i > 1) {
      j <- seq_len(i - 1)
      row <- 0.5 * ((if (is.na(s)) 0 else A[j, s]) + (if (is.na(d)) 0 else A[j, d]))
      A[i, j] <- row
      A[j, i] <- row
    }
    A[i, i] <- 1 + (if (!is.na(s) && !is.na(d)) 0.5 * A[s, d] else 0)
  }
  dimnames(A) <- list(ids, ids)
  A
}
A <- tabular_A(sire, dam)
inbreeding <- diag(A) - 1
R_A <- chol(A)          # upper triangular, A = R' R
L_A <- t(R_A)           # lower triangular, A = L L'
check("chol: L L' == A", tcrossprod(L_A), A, tol = 1e-12)

# Animal factor with a level for every pedigree animal, in pedigree order.
phen$animal <- factor(phen$animal, levels = ids)
phen$sex <- factor(phen$sex, levels = c("F", "M"))
recorded <- ids %in% phen$animal
n_rec <- nrow(phen)
cat(sprintf("animals %d, records %d, recorded animals %d, unrecorded %d, repeated %d, max F %.6f\n",
            n_ped, n_rec, sum(recorded), sum(!recorded), sum(table(phen$animal) > 1), max(inbreeding)))

FORMULA <- y ~ sex + (1 | animal)

# ---- analytic score of the profiled criterion in theta = sigma_A / sigma_E (dense) -----------------------------
# The criterion is flat at its minimum, so a derivative-free optimizer pins theta down only to ~sqrt(eps)
# (~1e-8).  The root of the analytic derivative is well conditioned: with H = Z A Z', W = I + theta^2 H,
# V = sigma^2 W and sigma^2 profiled out,
#   ML:   d crit / d theta = tr(W^-1 dW) - n       r' W^-1 dW W^-1 r / r' W^-1 r
#   REML: d crit / d theta = tr(P dW)    - (n - p) r' W^-1 dW W^-1 r / r' W^-1 r,
# dW = 2 theta H, r = y - X beta-hat(theta) (GLS), P = W^-1 - W^-1 X (X' W^-1 X)^-1 X' W^-1.
Z_all <- as.matrix(t(fac2sparse(phen$animal, drop.unused.levels = FALSE)))  # n x n_ped incidence
H_all <- Z_all %*% A %*% t(Z_all)
X_all <- model.matrix(~ sex, phen)
score_theta <- function(theta, REML) {
  n <- n_rec
  p <- ncol(X_all)
  Wi <- solve(diag(n) + theta^2 * H_all)
  WiX <- Wi %*% X_all
  P <- Wi - WiX %*% solve(crossprod(X_all, WiX), t(WiX))
  Py <- as.numeric(P %*% phen$y)                                       # = W^-1 r
  dW <- 2 * theta * H_all
  quad <- sum(Py * phen$y)                                             # = r' W^-1 r
  if (REML) sum(P * dW) - (n - p) * sum(Py * (dW %*% Py)) / quad
  else sum(Wi * dW) - n * sum(Py * (dW %*% Py)) / quad
}
polish_theta <- function(theta0, REML) {
  ur <- uniroot(score_theta, theta0 * c(1 - 1e-4, 1 + 1e-4), REML = REML, extendInt = "yes", tol = 1e-15,
                maxiter = 200)
  ur$root
}

# ---- lme4 fit with the relationship factor pushed into Z ---------------------------------------------------
# levels: the animals the random effect is defined over (all pedigree animals, or only the recorded ones);
# L: lower Cholesky factor of A restricted to those animals.
fit_animal <- function(REML, levels, L) {
  lf <- lFormula(FORMULA, data = phen, REML = REML)
  fac <- factor(as.character(phen$animal), levels = levels)
  Zt <- fac2sparse(fac, drop.unused.levels = FALSE)            # q x n indicator, zero rows if unrecorded
  Zt_star <- as(as(Matrix(t(L), sparse = TRUE) %*% Zt, "generalMatrix"), "CsparseMatrix")  # t(Z L)
  q <- length(levels)
  rt <- lf$reTrms
  rt$Zt <- Zt_star
  rt$Ztlist <- list(`1 | animal` = Zt_star)
  rt$Lambdat <- as(as(Diagonal(q, x = rep(1, q)), "generalMatrix"), "CsparseMatrix")
  rt$Lind <- rep(1L, q)
  rt$theta <- 1
  rt$lower <- 0
  rt$flist <- structure(list(animal = fac), assign = 1L)
  rt$Gp <- c(0L, as.integer(q))
  rt$nl <- c(animal = q)
  rt$cnms <- list(animal = "(Intercept)")
  lf$reTrms <- rt
  devfun <- do.call(mkLmerDevfun, lf)
  opt <- optimizeLmer(devfun, optimizer = "nloptwrap",
                      control = list(algorithm = "NLOPT_LN_BOBYQA", xtol_abs = 1e-14, ftol_abs = 1e-14,
                                     xtol_rel = 1e-15, ftol_rel = 1e-15, maxeval = 100000))
  # polish theta to the root of the analytic score; lme4's deviance function is evaluated there
  theta_opt <- opt$par
  theta <- polish_theta(theta_opt, REML)
  opt$par <- theta
  opt$fval <- devfun(theta)  # also leaves lme4's model objects (pp, resp) at theta
  fit <- mkMerMod(environment(devfun), opt, lf$reTrms, fr = lf$fr)
  b_star <- as.numeric(getME(fit, "b"))                        # lme4's effects on the Z* scale
  a_hat <- setNames(as.numeric(L %*% b_star), levels)          # breeding values a = L b*
  # Brent's method on the same deviance function, as an independent optimizer.
  brent <- optimize(function(th) devfun(th), c(0, 10 * max(1, theta)), tol = 1e-13)
  h <- 1e-4
  slope <- (devfun(theta + h) - devfun(theta - h)) / (2 * h)                # central difference at theta
  optimizer_fval <- devfun(theta_opt)
  devfun(theta)  # leave the environment at the optimum
  list(fit = fit, opt = opt, a_hat = a_hat, brent = brent, slope = slope, theta_opt = theta_opt,
       optimizer_fval = optimizer_fval, score = score_theta(theta, REML), devfun = devfun)
}

# ---- dense checks: marginal likelihood and Henderson's MME -------------------------------------------------
dense_checks <- function(fit, REML) {
  X <- getME(fit, "X")
  y <- phen$y
  Z <- t(fac2sparse(phen$animal, drop.unused.levels = FALSE))  # n x n_ped incidence, all pedigree animals
  Z <- as.matrix(Z)
  sigma2_E <- sigma(fit)^2
  sigma2_A <- (getME(fit, "theta") * sigma(fit))^2
  V <- sigma2_A * Z %*% A %*% t(Z) + sigma2_E * diag(n_rec)
  Vi <- solve(V)
  XtViX <- crossprod(X, Vi %*% X)
  beta <- solve(XtViX, crossprod(X, Vi %*% y))
  r <- y - X %*% beta
  logdetV <- as.numeric(determinant(V, logarithm = TRUE)$modulus)
  quad <- as.numeric(crossprod(r, Vi %*% r))
  n <- n_rec
  p <- ncol(X)
  crit <- if (REML) {
    (n - p) * log(2 * pi) + logdetV + as.numeric(determinant(XtViX, logarithm = TRUE)$modulus) + quad
  } else {
    n * log(2 * pi) + logdetV + quad
  }
  # Henderson's MME with A^{-1}: [X'X X'Z; Z'X Z'Z + lambda A^{-1}] [beta; a] = [X'y; Z'y]
  lambda <- sigma2_E / sigma2_A
  Ainv <- solve(A)
  C <- rbind(cbind(crossprod(X), crossprod(X, Z)), cbind(crossprod(Z, X), crossprod(Z) + lambda * Ainv))
  rhs <- c(crossprod(X, y), crossprod(Z, y))
  Cinv <- solve(C)
  sol <- as.numeric(Cinv %*% rhs)
  ia <- p + seq_len(n_ped)
  list(crit = crit, beta = as.numeric(beta), beta_se = sqrt(diag(solve(XtViX))),
       mme_beta = sol[seq_len(p)], mme_a = setNames(sol[ia], ids), pev = setNames(sigma2_E * diag(Cinv)[ia], ids))
}

# ---- fits ------------------------------------------------------------------------------------------------
rec_ids <- ids[recorded]
A_rr <- A[rec_ids, rec_ids]
L_rr <- t(chol(A_rr))
results <- list()
for (method in c("REML", "ML")) {
  REML <- method == "REML"
  cat(method, "\n")
  full <- fit_animal(REML, ids, L_A)
  sub <- fit_animal(REML, rec_ids, L_rr)
  fit <- full$fit
  theta <- as.numeric(getME(fit, "theta"))
  sigma <- sigma(fit)
  sigma2_A <- (theta * sigma)^2
  sigma2_E <- sigma^2
  crit <- if (REML) REMLcrit(fit) else deviance(fit)
  ll <- as.numeric(logLik(fit))
  fe <- fixef(fit)
  fe_se <- sqrt(diag(as.matrix(vcov(fit))))
  names(fe_se) <- names(fe)
  stopifnot(identical(names(fe), c("(Intercept)", "sexM")))

  # lme4's own consistency and the optimizer checks
  check("criterion == -2 logLik", crit, -2 * ll, tol = 1e-12)
  check("VarCorr animal variance == (theta sigma)^2", VarCorr(fit)$animal[1, 1], sigma2_A, tol = 1e-12)
  check("Brent optimum criterion == criterion at score root", full$brent$objective, crit)
  check("nloptwrap optimum criterion == criterion at score root", full$optimizer_fval, crit)
  cat(sprintf(paste0("  theta %.14f: nloptwrap %.14f (%s), Brent %.14f;\n",
                     "  analytic score at theta %.2e, central difference %.2e\n"),
              theta, full$theta_opt, sub(":.*", "", full$opt$message), full$brent$minimum, full$score,
              full$slope))
  # the analytic score against a central difference of lme4's deviance function away from the optimum
  th1 <- 0.8 * theta
  check("analytic score == central diff. of lme4 devfun at 0.8 theta", score_theta(th1, REML),
        (full$devfun(th1 + 1e-5) - full$devfun(th1 - 1e-5)) / 2e-5, tol = 1e-5)
  full$devfun(theta)
  stopifnot(theta > 0, abs(theta - full$theta_opt) < 1e-6, abs(theta - full$brent$minimum) < 1e-6,
            full$optimizer_fval >= crit - 1e-10, full$brent$objective >= crit - 1e-10, abs(full$slope) < 1e-6)

  # pedigreemm-style fit over the recorded animals only (A_rr): same likelihood, same estimates
  crit_sub <- if (REML) REMLcrit(sub$fit) else deviance(sub$fit)
  check("A_rr fit criterion == full-pedigree fit criterion", crit_sub, crit)
  check("A_rr fit fixef == full fit fixef", fixef(sub$fit), fe)
  check("A_rr fit theta == full fit theta", getME(sub$fit, "theta"), theta)
  # breeding values: recorded animals directly, unrecorded ones by E[a_u | a_r] = A_ur A_rr^{-1} a_r
  a_sub <- numeric(n_ped)
  names(a_sub) <- ids
  a_sub[rec_ids] <- sub$a_hat
  a_sub[!recorded] <- A[!recorded, rec_ids] %*% solve(A_rr, sub$a_hat)
  check("A_rr fit breeding values (A_ur A_rr^-1 a_r) == full fit", a_sub, full$a_hat)

  # dense likelihood and MME at lme4's estimates
  dc <- dense_checks(fit, REML)
  check(sprintf("dense %s -2 logLik == lme4", method), dc$crit, crit)
  check("dense GLS beta == lme4 fixef", dc$beta, fe)
  check("dense GLS beta SE == lme4 vcov", dc$beta_se, fe_se)
  check("MME beta == lme4 fixef", dc$mme_beta, fe)
  check("MME breeding values == L b*", dc$mme_a, full$a_hat)
  check("MME breeding values of unrecorded == A_ur A_rr^-1 a_r", dc$mme_a[!recorded], a_sub[!recorded])

  # prediction error variances lie in (0, sigma2_A (1 + F)]; equality only for animals without information
  stopifnot(all(dc$pev > 0), all(dc$pev <= sigma2_A * diag(A) * (1 + 1e-10)))

  results[[method]] <- list(
    method = method,
    criterion = crit,
    minus_two_loglik = -2 * ll,
    logLik = ll,
    theta = theta,
    sigma = sigma,
    sigma2_A = sigma2_A,
    sigma2_E = sigma2_E,
    h2 = sigma2_A / (sigma2_A + sigma2_E),
    fixef = as.list(fe),
    fixef_se = as.list(fe_se),
    optimizer = list(name = "nloptwrap NLOPT_LN_BOBYQA, then root of the analytic score (uniroot)",
                     message = full$opt$message, nloptwrap_theta = full$theta_opt, brent_theta = full$brent$minimum,
                     score_at_theta = full$score, central_difference_at_theta = full$slope),
    breeding_values = list(
      id = ids,
      value = unname(full$a_hat),
      pev = unname(dc$pev),
      se = unname(sqrt(dc$pev))
    )
  )
  cat(sprintf("  %s criterion %.10f  sigma2_A %.10f  sigma2_E %.10f  h2 %.10f\n", method, crit, sigma2_A,
              sigma2_E, sigma2_A / (sigma2_A + sigma2_E)))
  cat(sprintf("  fixef %s; se %s\n", paste(format(fe, digits = 12), collapse = " "),
              paste(format(fe_se, digits = 12), collapse = " ")))
}

# ==== second model: repeatability animal model with a permanent-environment effect ===========================
# y ~ sex + (1 | animal) + (1 | pe), pe a copy of the animal factor over the recorded animals only:
#     y = X beta + Z_a a + Z_p p + e,  a ~ N(0, sigma_A^2 A) (all pedigree animals),  p ~ N(0, sigma_PE^2 I),
#     e ~ N(0, sigma_E^2 I);  theta = (sigma_A / sigma_E, sigma_PE / sigma_E).
PE_FORMULA <- y ~ sex + (1 | animal) + (1 | pe)
phen$pe <- factor(as.character(phen$animal), levels = rec_ids)   # = the levels lme4 keeps (unused dropped)
Z_pe <- as.matrix(t(fac2sparse(phen$pe, drop.unused.levels = FALSE)))  # n x n_recorded incidence
G_pe <- tcrossprod(Z_pe)                                              # Z_p Z_p'

# Analytic derivatives of the profiled criterion, W = I + theta_1^2 H + theta_2^2 G (H = Z_a A Z_a'), in the
# directions dW (same formulas as score_theta): theta_k (dW = 2 theta_k H_k) or s_k = theta_k^2 (dW = H_k).
score_pe_dirs <- function(theta, REML, dWs) {
  n <- n_rec
  p <- ncol(X_all)
  Wi <- solve(diag(n) + theta[1]^2 * H_all + theta[2]^2 * G_pe)
  WiX <- Wi %*% X_all
  P <- Wi - WiX %*% solve(crossprod(X_all, WiX), t(WiX))
  Py <- as.numeric(P %*% phen$y)
  quad <- sum(Py * phen$y)
  vapply(dWs, function(dW) {
    if (REML) sum(P * dW) - (n - p) * sum(Py * (dW %*% Py)) / quad
    else sum(Wi * dW) - n * sum(Py * (dW %*% Py)) / quad
  }, numeric(1))
}
score_pe <- function(theta, REML) score_pe_dirs(theta, REML, list(2 * theta[1] * H_all, 2 * theta[2] * G_pe))
# Newton on the analytic score (Jacobian by central differences of the analytic score) from the optimizer's
# theta; if sigma_PE^2 sits at the boundary 0, a 1-D root in theta_1 with theta_2 = 0 instead.
polish_pe <- function(theta0, REML) {
  if (theta0[2] < 1e-6) {
    th1 <- uniroot(function(t1) score_pe(c(t1, 0), REML)[1], theta0[1] * c(1 - 1e-4, 1 + 1e-4),
                   extendInt = "yes", tol = 1e-15, maxiter = 200)$root
    return(list(theta = c(th1, 0), boundary = TRUE, iterations = NA_integer_))
  }
  th <- theta0
  for (it in seq_len(50)) {
    g <- score_pe(th, REML)
    J <- sapply(1:2, function(k) {
      h <- 1e-6 * max(1, abs(th[k]))
      e <- replace(numeric(2), k, h)
      (score_pe(th + e, REML) - score_pe(th - e, REML)) / (2 * h)
    })
    step <- solve(J, g)
    th <- th - step
    if (max(abs(step)) < 1e-14) break
  }
  stopifnot(max(abs(step)) < 1e-12, all(th > 0))
  list(theta = th, boundary = FALSE, iterations = it)
}

fit_pe <- function(REML) {
  lf <- lFormula(PE_FORMULA, data = phen, REML = REML)
  rt <- lf$reTrms
  stopifnot(identical(names(rt$Ztlist), c("1 | animal", "1 | pe")), identical(names(rt$flist), c("animal", "pe")),
            identical(levels(rt$flist$pe), rec_ids), identical(rt$cnms, list(animal = "(Intercept)", pe = "(Intercept)")))
  Zt_pe <- rt$Ztlist[["1 | pe"]]                                    # the pe term as lme4 builds it
  # the animal term over all pedigree animals, relationship factor pushed in: Zt* = t(L) Zt
  fac <- factor(as.character(phen$animal), levels = ids)
  Zt_a <- as(as(Matrix(t(L_A), sparse = TRUE) %*% fac2sparse(fac, drop.unused.levels = FALSE), "generalMatrix"),
             "CsparseMatrix")
  q_a <- n_ped
  q_p <- nrow(Zt_pe)
  rt$Zt <- as(as(rbind(Zt_a, Zt_pe), "generalMatrix"), "CsparseMatrix")
  rt$Ztlist <- list(`1 | animal` = Zt_a, `1 | pe` = Zt_pe)
  rt$Lambdat <- as(as(Diagonal(q_a + q_p, x = rep(1, q_a + q_p)), "generalMatrix"), "CsparseMatrix")
  rt$Lind <- c(rep(1L, q_a), rep(2L, q_p))
  rt$theta <- c(1, 1)
  rt$lower <- c(0, 0)
  rt$flist <- structure(list(animal = fac, pe = rt$flist$pe), assign = c(1L, 2L))
  rt$Gp <- c(0L, as.integer(q_a), as.integer(q_a + q_p))
  rt$nl <- c(animal = q_a, pe = q_p)
  lf$reTrms <- rt
  devfun <- do.call(mkLmerDevfun, lf)
  opt <- optimizeLmer(devfun, optimizer = "nloptwrap",
                      control = list(algorithm = "NLOPT_LN_BOBYQA", xtol_abs = 1e-14, ftol_abs = 1e-14,
                                     xtol_rel = 1e-15, ftol_rel = 1e-15, maxeval = 100000))
  theta_opt <- as.numeric(opt$par)
  optimizer_fval <- opt$fval
  pol <- polish_pe(theta_opt, REML)
  theta <- pol$theta
  opt$par <- theta
  opt$fval <- devfun(theta)
  # a second derivative-free optimizer on the same deviance function (Nelder-Mead, lme4's own)
  nm <- optimizeLmer(devfun, optimizer = "Nelder_Mead",
                     control = list(FtolAbs = 1e-15, FtolRel = 1e-15, XtolRel = 1e-12, maxfun = 100000))
  # central differences of lme4's deviance function at theta and at 0.8 theta (against the analytic score)
  cdiff <- function(th, h) sapply(1:2, function(k) {
    e <- replace(numeric(2), k, h)
    if (th[k] - h < 0) (devfun(th + e) - devfun(th)) / h else (devfun(th + e) - devfun(th - e)) / (2 * h)
  })
  slope <- cdiff(theta, 1e-4)
  th1 <- 0.8 * theta + c(0, if (pol$boundary) 0.05 else 0)
  check("analytic score == central diff. of lme4 devfun at 0.8 theta", score_pe(th1, REML), cdiff(th1, 1e-5),
        tol = 1e-5)
  devfun(theta)  # leave lme4's model objects (pp, resp) at the optimum
  fit <- mkMerMod(environment(devfun), opt, lf$reTrms, fr = lf$fr)
  b <- as.numeric(getME(fit, "b"))
  a_hat <- setNames(as.numeric(L_A %*% b[seq_len(q_a)]), ids)      # breeding values a = L b*
  pe_hat <- setNames(b[q_a + seq_len(q_p)], rec_ids)                # pe BLUPs (Lambda u, as lme4 reports them)
  list(fit = fit, opt = opt, theta_opt = theta_opt, optimizer_fval = optimizer_fval, polish = pol, nm = nm,
       slope = slope, score = score_pe(theta, REML),
       score_s2 = score_pe_dirs(theta, REML, list(H_all, G_pe)), a_hat = a_hat, pe_hat = pe_hat, devfun = devfun)
}

# Dense checks: marginal -2 log-likelihood from V = sigma2_A Z_a A Z_a' + sigma2_PE Z_p Z_p' + sigma2_E I, GLS,
# and Henderson's MME [X'X X'Z_a X'Z_p; . Z_a'Z_a + lambda_A A^-1 Z_a'Z_p; . . Z_p'Z_p + lambda_PE I].
dense_checks_pe <- function(REML, sigma2_A, sigma2_PE, sigma2_E) {
  X <- X_all
  y <- phen$y
  n <- n_rec
  p <- ncol(X)
  V <- sigma2_A * H_all + sigma2_PE * G_pe + sigma2_E * diag(n)
  Vi <- solve(V)
  XtViX <- crossprod(X, Vi %*% X)
  beta <- solve(XtViX, crossprod(X, Vi %*% y))
  r <- y - X %*% beta
  logdetV <- as.numeric(determinant(V, logarithm = TRUE)$modulus)
  quad <- as.numeric(crossprod(r, Vi %*% r))
  crit <- if (REML) {
    (n - p) * log(2 * pi) + logdetV + as.numeric(determinant(XtViX, logarithm = TRUE)$modulus) + quad
  } else {
    n * log(2 * pi) + logdetV + quad
  }
  out <- list(crit = crit, beta = as.numeric(beta), beta_se = sqrt(diag(solve(XtViX))))
  if (sigma2_PE > 0) {
    Zc <- cbind(Z_all, Z_pe)
    pen <- matrix(0, ncol(Zc), ncol(Zc))
    pen[seq_len(n_ped), seq_len(n_ped)] <- sigma2_E / sigma2_A * solve(A)
    ip <- n_ped + seq_len(ncol(Z_pe))
    pen[cbind(ip, ip)] <- sigma2_E / sigma2_PE
    C <- rbind(cbind(crossprod(X), crossprod(X, Zc)), cbind(crossprod(Zc, X), crossprod(Zc) + pen))
    sol <- solve(C, c(crossprod(X, y), crossprod(Zc, y)))
    out$mme_beta <- sol[seq_len(p)]
    out$mme_a <- sol[p + seq_len(n_ped)]
    out$mme_pe <- sol[p + ip]
  } else {
    # sigma2_PE = 0: p = 0 exactly, and the MME reduce to the animal-only ones
    C <- rbind(cbind(crossprod(X), crossprod(X, Z_all)),
               cbind(crossprod(Z_all, X), crossprod(Z_all) + sigma2_E / sigma2_A * solve(A)))
    sol <- solve(C, c(crossprod(X, y), crossprod(Z_all, y)))
    out$mme_beta <- sol[seq_len(p)]
    out$mme_a <- sol[p + seq_len(n_ped)]
    out$mme_pe <- numeric(ncol(Z_pe))
  }
  out
}

results_pe <- list()
for (method in c("REML", "ML")) {
  REML <- method == "REML"
  cat(method, "(repeatability model with permanent environment)\n")
  pf <- fit_pe(REML)
  fit <- pf$fit
  theta <- as.numeric(getME(fit, "theta"))
  sigma <- sigma(fit)
  sigma2_A <- (theta[1] * sigma)^2
  sigma2_PE <- (theta[2] * sigma)^2
  sigma2_E <- sigma^2
  total <- sigma2_A + sigma2_PE + sigma2_E
  crit <- if (REML) REMLcrit(fit) else deviance(fit)
  ll <- as.numeric(logLik(fit))
  fe <- fixef(fit)
  fe_se <- sqrt(diag(as.matrix(vcov(fit))))
  names(fe_se) <- names(fe)
  stopifnot(identical(names(fe), c("(Intercept)", "sexM")))
  vc <- VarCorr(fit)

  check("criterion == -2 logLik", crit, -2 * ll, tol = 1e-12)
  check("VarCorr animal, pe variances == (theta sigma)^2", c(vc$animal[1, 1], vc$pe[1, 1]), c(sigma2_A, sigma2_PE),
        tol = 1e-12)
  check("nloptwrap optimum criterion == criterion at score root", pf$optimizer_fval, crit)
  check("Nelder-Mead optimum criterion == criterion at score root", pf$nm$fval, crit)
  cat(sprintf(paste0("  theta (%.14f, %.14f): nloptwrap (%.14f, %.14f) (%s),\n",
                     "  Nelder-Mead (%.14f, %.14f); Newton iterations %s, boundary %s;\n",
                     "  analytic score at theta (%.2e, %.2e), central difference (%.2e, %.2e),\n",
                     "  derivative in sigma^2 ratios (%.4e, %.4e)\n"),
              theta[1], theta[2], pf$theta_opt[1], pf$theta_opt[2], sub(":.*", "", pf$opt$message),
              pf$nm$par[1], pf$nm$par[2], pf$polish$iterations, pf$polish$boundary, pf$score[1], pf$score[2],
              pf$slope[1], pf$slope[2], pf$score_s2[1], pf$score_s2[2]))
  stopifnot(theta[1] > 0, max(abs(theta - pf$theta_opt)) < 1e-5, max(abs(theta - pf$nm$par)) < 1e-4,
            pf$optimizer_fval >= crit - 1e-10, pf$nm$fval >= crit - 1e-10, abs(pf$score[1]) < 1e-8)
  # at an interior optimum both derivatives vanish; at theta_2 = 0 the one-sided derivative in sigma2_PE >= 0
  if (pf$polish$boundary) stopifnot(pf$score_s2[2] >= 0) else stopifnot(abs(pf$score[2]) < 1e-8)

  dc <- dense_checks_pe(REML, sigma2_A, sigma2_PE, sigma2_E)
  check(sprintf("dense %s -2 logLik (V with A and PE) == lme4", method), dc$crit, crit)
  check("dense GLS beta == lme4 fixef", dc$beta, fe)
  check("dense GLS beta SE == lme4 vcov", dc$beta_se, fe_se)
  check("MME beta == lme4 fixef", dc$mme_beta, fe)
  check("MME breeding values == L b*", dc$mme_a, pf$a_hat)
  check("MME pe BLUPs == lme4 pe effects", dc$mme_pe, pf$pe_hat)
  if (pf$polish$boundary) {
    # sigma2_PE = 0: the model is the first one, so its fit must be reproduced
    r1 <- results[[method]]
    check("boundary: criterion == first model's", crit, r1$criterion)
    check("boundary: sigma2_A, sigma2_E == first model's", c(sigma2_A, sigma2_E), c(r1$sigma2_A, r1$sigma2_E))
    check("boundary: fixef, SE == first model's", c(fe, fe_se), unlist(c(r1$fixef, r1$fixef_se)))
    check("boundary: breeding values == first model's", pf$a_hat, r1$breeding_values$value)
    stopifnot(all(pf$pe_hat == 0))
  }

  results_pe[[method]] <- list(
    method = method,
    formula = "y ~ sex + (1 | animal) + (1 | pe)",
    criterion = crit,
    minus_two_loglik = -2 * ll,
    logLik = ll,
    theta = list(animal = theta[1], pe = theta[2]),
    sigma = sigma,
    sigma2_A = sigma2_A,
    sigma2_PE = sigma2_PE,
    sigma2_E = sigma2_E,
    repeatability = (sigma2_A + sigma2_PE) / total,
    h2 = sigma2_A / total,
    fixef = as.list(fe),
    fixef_se = as.list(fe_se),
    optimizer = list(name = paste("nloptwrap NLOPT_LN_BOBYQA, then", if (pf$polish$boundary)
                       "the root of the analytic score in theta_A at theta_PE = 0 (boundary; uniroot)" else
                       "Newton on the analytic score"),
                     message = pf$opt$message, nloptwrap_theta = pf$theta_opt, nloptwrap_criterion = pf$optimizer_fval,
                     nelder_mead_theta = as.numeric(pf$nm$par), nelder_mead_criterion = pf$nm$fval,
                     pe_at_boundary = pf$polish$boundary, score_at_theta = pf$score,
                     central_difference_at_theta = pf$slope,
                     derivative_in_variance_ratios = pf$score_s2),
    breeding_values = list(id = ids, value = unname(pf$a_hat)),
    pe = list(id = rec_ids, value = unname(pf$pe_hat))
  )
  cat(sprintf("  %s criterion %.10f  sigma2_A %.10f  sigma2_PE %.10f  sigma2_E %.10f  repeatability %.10f  h2 %.10f\n",
              method, crit, sigma2_A, sigma2_PE, sigma2_E, (sigma2_A + sigma2_PE) / total, sigma2_A / total))
  cat(sprintf("  fixef %s; se %s\n", paste(format(fe, digits = 12), collapse = " "),
              paste(format(fe_se, digits = 12), collapse = " ")))
}

# ---- write ------------------------------------------------------------------------------------------------
out <- list(
  generated_by = "validation/relmat_reference.R",
  command = "python validation/relmat_data.py && Rscript validation/relmat_reference.R",
  r_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  Matrix_version = as.character(packageVersion("Matrix")),
  description = paste(
    "Animal model y ~ sex + (1 | animal), animal effects a ~ N(0, sigma2_A A), A the numerator relationship",
    "matrix of the pedigree (Henderson's tabular method). Fitted with lme4's modular functions (lFormula,",
    "mkLmerDevfun, optimizeLmer with nloptwrap BOBYQA xtol_abs = ftol_abs = 1e-14, theta then polished to the",
    "root of the analytic derivative of the profiled criterion, mkMerMod), the lower",
    "Cholesky factor L of A (A = L L') pushed into the design (Zt* = t(L) Zt) over all pedigree animals, so",
    "a = L b*. criterion: REML criterion (REML) or deviance (ML), both -2 logLik. sigma2_A = (theta sigma)^2,",
    "sigma2_E = sigma^2, h2 = sigma2_A / (sigma2_A + sigma2_E). breeding_values: a-hat for every pedigree",
    "animal in pedigree order (unrecorded animals included); pev = sigma2_E diag of the breeding-value block of",
    "the inverse of Henderson's MME coefficient matrix (accounts for beta-hat's uncertainty); se = sqrt(pev).",
    "Checked in the script to 1e-8 against a dense marginal likelihood, GLS, Henderson's MME and the",
    "pedigreemm-style fit on the recorded animals' A_rr (unrecorded animals: A_ur A_rr^-1 a_r-hat)."
  ),
  data = list(
    pedigree = ped_path,
    phenotypes = phen_path,
    formula = "y ~ sex + (1 | animal)",
    sex_levels = c("F", "M"),
    n_animals = n_ped,
    n_records = n_rec,
    n_recorded_animals = sum(recorded),
    n_unrecorded_animals = sum(!recorded),
    n_animals_with_repeated_records = sum(table(phen$animal) > 1),
    n_inbred = sum(inbreeding > 0),
    max_inbreeding = max(inbreeding)
  ),
  pedigree = list(id = ids, recorded = recorded, inbreeding = unname(inbreeding)),
  fits = results,
  fits_pe = results_pe
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, null = "null", pretty = TRUE), target)
cat("wrote", target, "\n")
