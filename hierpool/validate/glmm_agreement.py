"""A GLMM's Bayesian posterior against its Laplace fit: the mode (exact) and the mean (a gap that shrinks).

The posterior is the one ``hp.bayes(..., family=...)`` samples: the NumPyro model
:func:`hierpool.bayesian.glmm.glmm_model`,

    eta = o + X beta + sum_j Z_j b_j,   b_j[l] ~ Normal(0, Sigma_j),   y ~ family(g^-1(eta)),

(with the variance held its sampler draws the spherical u of b_j = F_j u_j, u_j ~ Normal(0, I)),
here with the variance parameters *held* at the Laplace fit's (F_j = T_j(theta-hat), lme4's
relative covariance factor; the unit-scale GLMM has no residual sd).  Its log density, in u,

    log p(beta, u | y) = sum_i log p(y_i | eta_i) - |u|^2 / 2 + log p(beta) + const,

is NumPyro's :func:`numpyro.infer.util.log_density` of that model: nothing here re-implements
the likelihood, and the closed form's PIRLS is not called to find the posterior's mode.

Mode (:func:`mode_agreement`), exact.  -2 times that log density (flat prior on beta) is the
penalized deviance that PIRLS minimizes (Bates et al. 2015, sec. 5; the normalizing constants of
the family aside).  Hence

* ``beta="held"``: with beta held at the Laplace estimate beta-hat, the posterior mode of u, and
  so of b = F u (F is constant when theta is held, so the mode moves with the linear map and no
  Jacobian enters), is the conditional mode u*(theta-hat, beta-hat): lme4's ``ranef(fit)``, the
  fit's ``ranef.condval``.  This is the issue's statement taken literally for b.
* ``beta="flat"``: with a flat prior on beta and (beta, u) free, the *joint* posterior mode is the
  joint minimizer of the penalized deviance, glmer's ``nAGQ = 0`` mode at theta-hat
  (:func:`hierpool.algebra.laplace.conditional_mode` with ``joint=True``).  It is not the Laplace
  fit's (beta-hat, b*): beta-hat maximizes the Laplace-approximated *marginal* likelihood, which
  carries the log-determinant log |L_theta|, a function of beta through the working weights.  The
  two differ by O(1/n) and the comparison says which one the posterior reproduces.

Both are found by Newton's method on the model's log density (its gradient and Hessian by JAX),
to a gradient below 1e-10, and compared effect by effect; the bound is 1e-6 absolute.

Mean (:func:`mode_mean_gap`, :func:`mode_mean_gap_series`).  The posterior *mean* of b (variance
held; NUTS, as ``hp.bayes`` samples it) differs from the conditional mode, because the posterior of
b given few binomial or Poisson observations is skewed; the Laplace approximation is the Gaussian
centred at the mode.  The gap is reported per effect in posterior-sd units,
gap = (post_mean - condval) / post_sd, with its Monte-Carlo error mcse / post_sd.  With beta held
at beta-hat (the default; ``hp.bayes`` holds it by a prior of sd 1e-4 standard errors) the gap is
the skewness of b's posterior given (theta-hat, beta-hat), which goes to 0 as the observations per
group grow (Bernstein-von Mises); the series shows it on simulated binomial data.  With a flat
prior on beta the posterior mean also averages over beta, whose own mean - mode difference is of
order 1 / groups and does not shrink with the observations per group.

References
----------
Bates, D., Maechler, M., Bolker, B. & Walker, S. (2015). Fitting linear mixed-effects models using
lme4. J. Stat. Softw. 67(1).
Tierney, L. & Kadane, J. B. (1986). Accurate approximations for posterior moments and marginal
densities. JASA 81, 82-86 (the mean-mode difference of a Laplace approximation is O(1/n)).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..algebra.laplace import conditional_mode
from ..bayesian import bayes, resolve_priors
from ..bayesian.glmm import centering_weights, glmm_data, glmm_model, held_variance
from ..bayesian.model import HeldVariance
from ..bayesian.nuts import sample_nuts
from ..bayesian.results import summarize_draws
from ..closedform import glmm
from ..closedform.glmm_results import GLMMResult
from ..errors import ArgumentError, boolean_argument, integer_argument, real_argument, seed_argument
from ..spec.arguments import sampler_arguments
from ._arguments import callable_argument, generator_argument, instance_argument, sizes_argument
from .agreement import flat_beta_priors

#: The bound of :func:`mode_agreement`: largest |posterior mode - conditional mode| over the effects.
MODE_TOLERANCE = 1e-6
#: Newton's method on the log density stops when its gradient's largest entry is below this.
GRADIENT_TOLERANCE = 1e-10


def _effect_keys(design) -> pd.DataFrame:
    """(grpvar, term, grp) of every effect, in the order of the model's u (term, level, coefficient)."""
    rows = [(t.group, coef, str(level)) for t in design.terms for level in t.levels for coef in t.coef_names]
    return pd.DataFrame(rows, columns=["grpvar", "term", "grp"])


def _conditional_modes(fit: GLMMResult, keys: pd.DataFrame) -> pd.DataFrame:
    ranef = fit.ranef.assign(grp=fit.ranef.grp.astype(str))
    merged = keys.merge(ranef, on=["grpvar", "term", "grp"], how="left", validate="one_to_one")
    if merged.condval.isna().any():
        raise ArgumentError("fit: its ranef table does not name every effect of its design")
    return merged


@dataclass(frozen=True)
class ModeAgreement:
    """What :func:`mode_agreement` found.

    Attributes
    ----------
    beta : str
        ``"held"`` (beta at the Laplace estimate) or ``"flat"`` (flat prior, beta free).
    table : pandas.DataFrame
        One row per random effect: grpvar, term, grp, condval (the fit's conditional mode),
        reference (the mode it is compared with: condval with beta held, the nAGQ = 0 joint
        mode at theta-hat with beta flat), posterior_mode, difference (posterior_mode - reference).
    beta_table : pandas.DataFrame
        Per fixed effect: laplace (beta-hat), reference, posterior_mode, difference.
    max_abs_difference : float
        Largest |difference| over the random and (beta flat) fixed effects.
    gradient_at_reference : float
        Largest entry of the log density's gradient (in the free coordinates) at the reference mode:
        0 there up to PIRLS's convergence, a check that does not depend on the optimizer.
    newton_steps : int
    tolerance : float
    passed : bool
        ``max_abs_difference <= tolerance``.
    """

    beta: str
    table: pd.DataFrame
    beta_table: pd.DataFrame
    max_abs_difference: float
    gradient_at_reference: float
    newton_steps: int
    tolerance: float
    passed: bool

    def summary(self) -> str:
        what = "conditional modes" if self.beta == "held" else "nAGQ = 0 joint mode at theta-hat"
        return (f"posterior mode (variance held, beta {self.beta}) vs {what}: {len(self.table)} effects, "
                f"max |difference| {self.max_abs_difference:.2e} (bound {self.tolerance:.0e}): "
                f"{'PASSED' if self.passed else 'FAILED'}; "
                f"|gradient| at the reference {self.gradient_at_reference:.1e}, "
                f"{self.newton_steps} Newton steps")


def _model_data(design):
    """The model's data as ``hp.bayes``'s sampler builds it with the variance parameters held (non-centered)."""
    return glmm_data(design, centering_weights(design, "non-centered"))


def _log_density_function(design, held: HeldVariance, priors):
    """(log density of :func:`glmm_model` with the variance held, (beta, u) -> b, the model's u of (u, b)).

    With the variance parameters held the model samples the spherical u of b = F u (site ``z__j``).
    b is read from the model's own ``b__j`` sites (a NumPyro trace), so this module does not
    re-derive the model's map from u to b.
    """
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.infer.util import log_density

    data = _model_data(design)
    ks = tuple(t.k for t in design.terms)
    n_levels = tuple(t.n_levels for t in design.terms)
    kwargs = dict(ks=ks, n_levels=n_levels, family=design.family.name, link=design.family.link)
    normal_beta = bool(priors.beta) and priors.beta_all_normal()
    sizes = [ell * k for ell, k in zip(n_levels, ks)]

    def params_of(beta, v_flat):
        beta = jnp.asarray(beta)
        params = {"beta": beta} if normal_beta else {f"beta__{i}": beta[i] for i in range(design.p)}
        start = 0
        for j, (ell, k) in enumerate(zip(n_levels, ks)):
            params[f"z__{j}"] = jnp.asarray(v_flat)[start:start + sizes[j]].reshape(ell, k)
            start += sizes[j]
        return params

    def log_p(beta, v_flat):
        return log_density(glmm_model, (data, priors, held), kwargs, params_of(beta, v_flat))[0]

    def b_of(beta, v_flat):
        model = handlers.substitute(glmm_model, data=params_of(beta, v_flat))
        trace = handlers.trace(model).get_trace(data, priors, held, **kwargs)
        return np.concatenate([np.asarray(trace[f"b__{j}"]["value"], dtype=float).ravel() for j in range(len(ks))])

    def v_of(u_flat, b_flat):
        """The sampled coordinates of the effects whose spherical form is u and whose values are b."""
        return u_flat

    return log_p, b_of, v_of, sum(sizes)


def _newton_maximize(f, x0, max_steps: int = 100):
    """The maximizer of a concave f by Newton's method with step halving; (x, steps)."""
    import jax

    gradient = jax.grad(f)

    @jax.jit
    def derivatives(x):  # one compiled program for the value, gradient and Hessian
        return f(x), gradient(x), jax.jacfwd(gradient)(x)

    x = np.asarray(x0, dtype=float)
    value, grad, hess = (np.asarray(a, dtype=float) for a in derivatives(x))
    for step in range(1, max_steps + 1):
        if np.max(np.abs(grad), initial=0.0) < GRADIENT_TOLERANCE:
            return x, step - 1
        direction = -np.linalg.solve(hess, grad)
        scale = 1.0
        for _ in range(60):
            trial = x + scale * direction
            trial_value, trial_grad, trial_hess = (np.asarray(a, dtype=float) for a in derivatives(trial))
            if np.isfinite(trial_value) and trial_value >= value - 1e-12 * abs(value):
                break
            scale *= 0.5
        x, value, grad, hess = trial, trial_value, trial_grad, trial_hess
    return x, max_steps


def mode_agreement(fit: GLMMResult, beta: str = "held", tolerance: float = MODE_TOLERANCE) -> ModeAgreement:
    """The posterior mode of the random effects, by optimization, against the conditional modes.

    The variance parameters (theta, and a negative binomial's shape) are held at ``fit``'s; the
    log density optimized is that of the model ``hp.bayes(..., family=..., variance=fit)``
    samples (:func:`hierpool.bayesian.glmm.glmm_model`, NumPyro's ``log_density``), with a flat
    prior on beta.  See the module docstring for why the two choices of ``beta`` have different
    references.

    Parameters
    ----------
    fit : GLMMResult
        An ``hp.glmm`` fit (Laplace or quadrature: the conditional modes are PIRLS's at its optimum).
    beta : {"held", "flat"}
        ``"held"``: beta fixed at ``fit.fixef``; the posterior mode of b is compared with
        ``fit.ranef.condval``.  ``"flat"``: flat prior, (beta, u) optimized jointly; compared with
        the joint mode of the penalized deviance at theta-hat (glmer's nAGQ = 0 mode).
    tolerance : float
        Bound on the largest absolute difference (a finite number > 0).

    Returns
    -------
    ModeAgreement
    """
    import jax.numpy as jnp

    instance_argument("fit", fit, GLMMResult, "a GLMM fit of hp.glmm (GLMMResult)")
    if beta not in ("held", "flat"):
        raise ArgumentError(f"beta must be 'held' or 'flat', got {beta!r}")
    tolerance = real_argument("tolerance", tolerance, above=0.0)
    held = held_variance(fit)
    design = fit.design
    priors = resolve_priors(design, flat_beta_priors(fit))
    log_p, b_of, v_of, n_v = _log_density_function(design, held, priors)
    beta_hat = np.asarray(fit.fixef, dtype=float)
    table = _conditional_modes(fit, _effect_keys(design))

    def flat(mode):
        return np.concatenate([np.asarray(x, dtype=float).ravel() for x in mode])

    if beta == "held":
        v_mode, steps = _newton_maximize(lambda v: log_p(beta_hat, v), np.zeros(n_v))
        beta_mode, reference_beta = beta_hat, beta_hat
        reference_b = table.condval.to_numpy()
        reference_v = v_of(flat(fit.optimum.mode.u), flat(fit.optimum.mode.b))
        gradient = np.asarray(_grad(lambda v: log_p(beta_hat, v))(jnp.asarray(reference_v)))
    else:
        p = design.p
        x_mode, steps = _newton_maximize(lambda x: log_p(x[:p], x[p:]), np.concatenate([beta_hat, np.zeros(n_v)]))
        beta_mode, v_mode = x_mode[:p], x_mode[p:]
        joint = conditional_mode(fit.theta, beta_hat, design, fit.family, joint=True)
        reference_beta, reference_b = np.asarray(joint.beta, dtype=float), flat(joint.b)
        reference_v = v_of(flat(joint.u), reference_b)
        x_ref = jnp.asarray(np.concatenate([reference_beta, reference_v]))
        gradient = np.asarray(_grad(lambda x: log_p(x[:p], x[p:]))(x_ref))
    b_mode = b_of(beta_mode, v_mode)
    table = table[["grpvar", "term", "grp", "condval"]].assign(
        reference=reference_b, posterior_mode=b_mode, difference=b_mode - reference_b)
    beta_table = pd.DataFrame({"laplace": beta_hat, "reference": reference_beta, "posterior_mode": beta_mode,
                               "difference": beta_mode - reference_beta}, index=list(design.fixed_names))
    worst = float(max(np.max(np.abs(table.difference.to_numpy()), initial=0.0),
                      np.max(np.abs(beta_table.difference.to_numpy()), initial=0.0)))
    return ModeAgreement(beta=beta, table=table, beta_table=beta_table, max_abs_difference=worst,
                         gradient_at_reference=float(np.max(np.abs(gradient), initial=0.0)), newton_steps=steps,
                         tolerance=tolerance, passed=bool(worst <= tolerance))


def _grad(f):
    import jax

    return jax.grad(f)


@dataclass(frozen=True)
class ModeMeanGap:
    """What :func:`mode_mean_gap` found.

    Attributes
    ----------
    table : pandas.DataFrame
        Per random effect: grpvar, term, grp, condval, condsd, post_mean, post_sd, mcse, ess,
        r_hat, gap (= (post_mean - condval) / post_sd), gap_mcse (= mcse / post_sd), z
        (= (post_mean - condval) / mcse: the gap in Monte-Carlo units).
    fit, posterior
        The Laplace fit, and ``hp.bayes``'s result (beta flat) or the draws of b, (chain, draw,
        effect) in the table's order (beta held).
    divergences : int
    beta : str
        ``"held"`` or ``"flat"`` (:func:`mode_mean_gap`).
    """

    table: pd.DataFrame
    fit: object
    posterior: object
    divergences: int
    beta: str = "held"

    @property
    def mean_abs_gap(self) -> float:
        """Mean |gap| over the effects, in posterior sds (biased up by the Monte-Carlo noise)."""
        return float(np.mean(np.abs(self.table.gap)))

    @property
    def mean_squared_gap(self) -> tuple[float, float]:
        """(mean of gap^2 - gap_mcse^2, its standard error): an unbiased estimate of the mean squared gap.

        Subtracting each gap's Monte-Carlo variance removes the noise's contribution (E[(g + e)^2] =
        g^2 + var(e)); the standard error is the delta method's, sqrt(sum(4 g^2 s^2 + 2 s^4)) / n,
        s = gap_mcse, the gaps' Monte-Carlo errors taken as independent.
        """
        g, s = self.table.gap.to_numpy(), self.table.gap_mcse.to_numpy()
        n = max(len(g), 1)
        estimate = float(np.mean(g**2 - s**2))
        se = float(np.sqrt(np.sum(4 * np.maximum(g**2 - s**2, 0) * s**2 + 2 * s**4)) / n)
        return estimate, se

    def summary(self) -> str:
        ms, se = self.mean_squared_gap
        return (f"posterior mean - conditional mode (variance held, beta {self.beta}), in posterior sds: "
                f"mean |gap| {self.mean_abs_gap:.3f}, max |gap| {np.max(np.abs(self.table.gap)):.3f}, "
                f"rms gap (noise removed) {np.sqrt(max(ms, 0.0)):.3f} (mean square {ms:.4f} +/- {se:.4f}); "
                f"max |z| {np.max(np.abs(self.table.z)):.1f}, {self.divergences} divergent transitions")


def mode_mean_gap(
    formula: str,
    data: pd.DataFrame,
    family: str = "binomial",
    link: str | None = None,
    weights=None,
    offset=None,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    target_accept: float = 0.8,
    beta: str = "held",
) -> ModeMeanGap:
    """How far the posterior means of the random effects are from the conditional modes.

    Fits ``hp.glmm`` (Laplace) and samples ``hp.bayes`` with the variance parameters held at its
    theta (``variance=fit``): the posterior whose *mode* is the conditional mode
    (:func:`mode_agreement`).  The difference of its *mean* is real, not Monte-Carlo noise (the
    table's z).

    Parameters
    ----------
    formula, data, family, link, weights, offset
        As :func:`hierpool.glmm`; both engines get the same.
    chains, draws, tune, seed, target_accept
        Sampler settings.
    beta : {"held", "flat"}
        ``"held"``: beta conditioned at the Laplace estimate (``numpyro.handlers.condition`` on the
        model's fixed-effect sites, :func:`beta_held_model`: ``hp.bayes`` has no way to hold beta)
        and the same model sampled by ``hp.bayes``'s NUTS driver: the posterior of b given
        (theta-hat, beta-hat, y), whose mode *is* the conditional mode; the gap is that
        posterior's mean - mode (its skewness), which vanishes as the observations per group
        grow (:func:`mode_mean_gap_series`).  ``"flat"``: ``hp.bayes(..., variance=fit)`` with a
        flat prior on beta; the posterior mean of b then also averages over beta, whose marginal
        posterior (the likelihood in beta at theta-hat) has its own mean - mode difference, of
        order 1 / groups: that part of the gap does not shrink with the observations per group.

    Returns
    -------
    ModeMeanGap
    """
    chains, draws, tune, seed = sampler_arguments(chains, draws, tune, seed, None, target_accept, min_chains=2)
    if beta not in ("held", "flat"):
        raise ArgumentError(f"beta must be 'held' or 'flat', got {beta!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary or separation warnings of small simulated data sets
        fit = glmm(formula, data, family=family, link=link, weights=weights, offset=offset)
    keys = _effect_keys(fit.design)
    table = _conditional_modes(fit, keys)
    if beta == "flat":
        post = bayes(formula, data, family=family, link=link, weights=weights, offset=offset, variance=fit,
                     priors=flat_beta_priors(fit), chains=chains, draws=draws, tune=tune, seed=seed,
                     target_accept=target_accept)
        ranef = post.ranef.assign(grp=post.ranef.grp.astype(str))
        table = table.merge(ranef[["grpvar", "term", "grp", "mean", "sd", "mcse_mean", "ess_bulk", "r_hat"]],
                            on=["grpvar", "term", "grp"], how="left", validate="one_to_one")
        divergences = post.divergences
    else:
        post, divergences = _held_beta_draws(fit, chains, draws, tune, seed, target_accept)
        summary = summarize_draws(post, 0.95)
        table = table.assign(**{name: np.asarray(summary[name]) for name in
                                ("mean", "sd", "mcse_mean", "ess_bulk", "r_hat")})
    table = table.rename(columns={"mean": "post_mean", "sd": "post_sd", "mcse_mean": "mcse", "ess_bulk": "ess"})
    difference = table.post_mean - table.condval
    # a zero variance (singular fit) pins an effect at exactly 0 in both engines: no gap, not 0 / 0
    pinned = ((table.condsd == 0) & (table.post_sd < 1e-12) & (table.condval.abs() < 1e-12)
              & (table.post_mean.abs() < 1e-12)).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        table["gap"] = np.where(pinned, 0.0, difference / table.post_sd)
        table["gap_mcse"] = np.where(pinned, 0.0, table.mcse / table.post_sd)
        table["z"] = np.where(pinned, 0.0, difference / table.mcse)
    return ModeMeanGap(table=table, fit=fit, posterior=post, divergences=divergences, beta=beta)


def beta_held_model(data, priors, held, beta, *, ks, n_levels, family, link):
    """:func:`glmm_model` with its fixed-effect sites conditioned at ``beta`` (flat priors: sites ``beta__i``)."""
    from numpyro import handlers

    with handlers.condition(data={f"beta__{i}": beta[i] for i in range(beta.shape[0])}):
        glmm_model(data, priors, held, ks=ks, n_levels=n_levels, family=family, link=link)


def _held_beta_draws(fit: GLMMResult, chains: int, draws: int, tune: int, seed: int, target_accept: float):
    """NUTS draws of b (chain, draw, effect) of :func:`glmm_model`, theta held and beta conditioned at beta-hat.

    Sampled by hierpool's NUTS driver (:func:`hierpool.bayesian.nuts.sample_nuts`, as ``hp.bayes``),
    with beta-hat an argument of the compiled program, not a constant of it: one program per shape.
    """
    import jax

    design = fit.design
    priors = resolve_priors(design, flat_beta_priors(fit))
    ks = tuple(t.k for t in design.terms)
    n_levels = tuple(t.n_levels for t in design.terms)
    out, stats = sample_nuts(
        beta_held_model,
        (_model_data(design), priors, held_variance(fit), jax.device_put(np.asarray(fit.fixef, dtype=float))),
        static=(("ks", ks), ("n_levels", n_levels), ("family", design.family.name), ("link", design.family.link)),
        chains=chains, tune=tune, draws=draws, seed=seed, target_accept=target_accept, dense_mass=True,
    )
    b = np.concatenate([np.asarray(out[f"b__{j}"], dtype=float).reshape(chains, draws, -1) for j in range(len(ks))],
                       axis=-1)
    return b, int(np.sum(np.asarray(stats["diverging"])))


def simulate_binomial_groups(trials: int, rng, n_groups: int = 20, beta=(-1.0, 0.5), sd: float = 1.0,
                             aggregate: bool = False, truth_seed: int | None = None):
    """One data set: ``n_groups`` groups of ``trials`` Bernoulli observations each, y ~ x + (1 | g), logit link.

    ``aggregate=False``: one 0/1 row per observation, x per row.  ``aggregate=True``: one row per
    group, y the proportion of successes and ``n`` the trials (fit with ``weights="n"``), x per
    group; every size then has the same rows, so one compiled sampler serves the whole series.
    ``truth_seed``: the covariate and the group effects b are drawn from this seed, the same for
    every size (with ``aggregate=True``), so that a series varies the trials alone; None draws them
    from ``rng`` too.

    Returns ``(formula, data)``; the ``simulate`` argument of :func:`mode_mean_gap_series`
    (``functools.partial`` sets the other arguments).
    """
    trials = integer_argument("trials", trials)
    generator_argument(rng)
    n_groups = integer_argument("n_groups", n_groups)
    if isinstance(beta, (str, bytes)) or not hasattr(beta, "__len__") or len(beta) != 2:
        raise ArgumentError(f"beta must be two numbers (intercept, slope), got {beta!r}")
    beta = tuple(real_argument(f"beta[{i}]", value) for i, value in enumerate(beta))
    sd = real_argument("sd", sd, at_least=0.0)
    aggregate = boolean_argument("aggregate", aggregate)
    truth_seed = seed_argument(truth_seed, optional=True)
    if aggregate:
        source = rng if truth_seed is None else np.random.default_rng(truth_seed)
        x = source.normal(size=n_groups)
        b = source.normal(0.0, sd, n_groups)
        successes = rng.binomial(trials, 1.0 / (1.0 + np.exp(-(beta[0] + beta[1] * x + b))))
        return "y ~ x + (1 | g)", pd.DataFrame({"y": successes / trials, "n": float(trials), "x": x,
                                                 "g": [f"g{i:03d}" for i in range(n_groups)]})
    g = np.repeat(np.arange(n_groups), trials)
    x = rng.normal(size=g.size)
    b = rng.normal(0.0, sd, n_groups)
    eta = beta[0] + beta[1] * x + b[g]
    y = (rng.uniform(size=g.size) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return "y ~ x + (1 | g)", pd.DataFrame({"y": y, "x": x, "g": [f"g{i:03d}" for i in g]})


def mode_mean_gap_series(simulate=simulate_binomial_groups, sizes=(2, 5, 20, 100), seed: int = 0,
                         family: str = "binomial", **kwargs) -> pd.DataFrame:
    """The posterior mean - conditional mode gap as the observations per group grow.

    Parameters
    ----------
    simulate : callable
        ``simulate(size, rng) -> (formula, data)``: a data set with ``size`` observations per
        group (:func:`simulate_binomial_groups` by default).
    sizes : sequence of int
    family : str
    **kwargs
        Passed to :func:`mode_mean_gap`.

    Returns
    -------
    pandas.DataFrame
        Per size: mean_abs_gap (posterior sds), mean_squared_gap with its standard error
        mean_squared_gap_se (the Monte-Carlo noise removed; :attr:`ModeMeanGap.mean_squared_gap`),
        rms_gap (its square root, 0 when the estimate is negative), max_abs_z (the largest gap in
        Monte-Carlo units), mean_sd_ratio (posterior sd / condsd: near 1 with beta held, above 1
        with beta flat, whose uncertainty condsd does not carry), divergences and
        singular (the Laplace fit's variance is 0: every effect pinned at 0, no gap to measure) and
        theta (the fit's first theta: the gap is small where theta^2 times a group's information is
        small, the prior then dominating b's posterior, which is nearly Gaussian).
    """
    callable_argument("simulate", simulate)
    sizes = sizes_argument("sizes", sizes)
    rng = np.random.default_rng(seed_argument(seed))
    rows = []
    for size in sizes:
        formula, data = simulate(size, rng)
        report = mode_mean_gap(formula, data, family=family, seed=seed, **kwargs)
        ms, se = report.mean_squared_gap
        table = report.table
        rows.append({"size": size, "effects": len(table), "mean_abs_gap": report.mean_abs_gap,
                     "mean_squared_gap": ms, "mean_squared_gap_se": se, "rms_gap": float(np.sqrt(max(ms, 0.0))),
                     "max_abs_z": float(np.max(np.abs(table.z))),
                     "mean_sd_ratio": float(np.mean(table.post_sd / table.condsd)),
                     "divergences": report.divergences, "singular": bool(report.fit.is_singular),
                     "theta": float(np.asarray(report.fit.theta)[0])})
    return pd.DataFrame(rows)
