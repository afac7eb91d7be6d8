"""The model algebra: one implementation of the maths that both engines and the batch layer call.

Layers of the package (dependencies point down only; ``tests/test_layers.py`` reads every import
with ``ast`` and fails on an upward import, a cycle, or a private name taken across packages):

- ``errors``, ``datasets``;
- ``spec``: formula -> :class:`~hierpool.spec.design.Design` (checks, missing rows, transforms);
  what the user asked for, no numerics.  formulae reads the formula parts; a part that only names
  numeric columns is read by ``spec.columns`` instead (tested equal), so such formulae never import it.
  ``spec.correlation`` reads an AR(1) structure's series; ``pedigree`` (beside ``spec``) turns a pedigree
  into A, inbreeding and the sparse A^-1 (NumPy and SciPy only);
- ``algebra`` (here): cross-products (``system``, ``statistics``; ``batched_systems``: many datasets'
  systems at once, padded to common shapes, for the batch layer), the blocked factorization and
  the profiled criterion (``criterion``; on the host, term 0's small blocks written out entry by entry:
  ``term0_entries``), Henderson's solution, prediction blocks and exact draws
  (``henderson``), the collapsed marginal likelihood (``marginal``), the one-term specialisation
  (``one_term``, ``one_term_marginal``), starts and checks (``start``, ``checks``), the VarCorr
  table (``varcorr``), compiler settings and caches (``compiler_options``), JAX loading
  (``jax_runtime``); spatial terms' graph algebra (``icar``: the ICAR precision, BYM2 scaling, the sparse
  precision of each CAR type with its constraints and constrained log determinant, the sum-to-zero
  coordinates, a draw of N(0, precision) from the Laplacian's edge factorization) and the stacking of several
  terms' latent blocks (``latent_blocks``: a ``(lhs | g)`` term's kron(I, Sigma^-1), block-diagonal
  constraints, each row's random part as slots); for GLMMs the families (``family``), PIRLS and the Laplace
  criterion on the host (``laplace``), over many datasets at once on the host (``laplace_batch``: the same
  shared pieces over a leading datasets axis) and as one compiled program (``laplace_program``), its exact
  gradient written once for all three (``laplace_gradient``), adaptive quadrature (``quadrature``),
  population-average means (``marginal_mean``) and the separation check (``separation``); AR(1) residuals by whitening, on the host
  and in programs, and for one term from per-level lagged moments that give the whitened statistics at any phi
  (``ar1``); the host searches over a stack of datasets (``search``: Newton's method, the linear model's search
  in theta, and the AR(1) searches in (theta, u)), which ``hp.fit_batch`` runs over chunks and
  ``hp.lmm(..., correlation=)`` over its one dataset;
- ``closedform`` (REML/ML optimizer, results), then ``bayesian`` (NumPyro models, NUTS driver;
  it may read a closed-form fit, e.g. variances held at their REML values): the two engines,
  reading the same Design and the same algebra;
- ``batch``: many datasets per compiled call (buckets, chunks, vmap, shards), or on the host on a CPU (small
  one-term batches; several-term batches and binomial or Poisson GLMM batches in float64); the models whose single fit has no batched form (a
  relationship matrix, spatial terms, adaptive quadrature) dataset by dataset through that single fit
  (``batch.fit_each``, ``batch.bayes_each``).  The host searches of a chunk (``batch.glmm_search``,
  ``algebra.search``) and ``batch.host_processes`` import no JAX, so that a worker process can run a GLMM
  or several-term linear chunk beside the main one, and a host batch raises the C allocator's thresholds once
  (``algebra.host_allocator``); they search terms on one grouping factor as one term whose factor is block-diagonal
  with theirs (``batch.plan.one_factor``, ``linalg.block_diagonal_positions``);
- ``plots``, then ``pooling_comparison``, ``ridge``, ``validate``, then ``cli``.

Host or compiled.  The algebra is written once against an array namespace
(:func:`~hierpool.algebra.linalg.array_namespace`): NumPy arrays run it on the host, traced arrays
inside ``jax.jit``/``grad``/``vmap``.  Where reverse-mode autodiff would be slow the adjoint is
written out, and the host path chains it by hand
(:func:`~hierpool.algebra.criterion.objective_and_gradient_on_host`).  A model is fitted on the
host when compiling would cost more than the arithmetic, or, on a CPU, when its data are large
enough that the memory JAX's runtime and XLA's buffers add matters more than the time compiling saves
(:func:`~hierpool.algebra.compiler_options.compile_pays`); then JAX is not imported
(:mod:`~hierpool.algebra.jax_runtime`; only a large fit on a machine with an accelerator plugin asks
JAX for its backend).  A compiled closed-form fit on CPU still solves at its
optimum on the host (one solve costs less than compiling it).  On the host the blocked criterion, its
gradient, the solution, the prediction blocks and a GLMM's Laplace gradient also take a batch of
``Layout.dense_only`` systems with leading axes (a chunk of datasets at once, their level grids shared:
:func:`~hierpool.algebra.batched_systems.shared_grid`; a GLMM's rows marked by dataset:
:mod:`~hierpool.algebra.laplace_batch`), where a compiled program would vmap them.

Specialise, don't fork.  A model with one random-effect term is evaluated from per-level
sufficient statistics (:mod:`~hierpool.algebra.one_term`: k x k blocks per level, complex-step
gradient on the host for ``hp.lmm``; ``hp.fit_batch``'s host search takes the same statistics as
general systems, :func:`~hierpool.algebra.batched_systems.statistics_systems`), ending in the same formula
(:func:`~hierpool.algebra.criterion.profiled_criterion`) and returning the same
:class:`~hierpool.algebra.henderson.Solution`; tests hold the two paths equal.

Extension points (where the next model classes plug in; each is one seam, named here so that no
engine grows an ``if`` for it):

- **family** -- the response distribution.  Gaussian: the criterion profiles sigma out of the
  penalized residual sum of squares (:func:`~hierpool.algebra.criterion.profiled_criterion`).  A
  GLMM family (:mod:`~hierpool.algebra.family`) replaces the prior weights W and the response in
  ``A = [Z X y]^T W [Z X y]`` by PIRLS working weights and working response at each step, refilling
  one :class:`~hierpool.algebra.system.SystemPattern` (:func:`~hierpool.algebra.system.build_system`,
  or :func:`~hierpool.algebra.system.fill_in_program` in a compiled program), factors the same
  blocked matrix, and adds its own deviance in place of the profiled Gaussian term
  (:mod:`~hierpool.algebra.laplace`).
- **residual covariance** -- independent today: W is diagonal (prior weights, or 1 / se^2).
  A within-group correlation (AR(1), CAR1) enters as a precision that whitens each group's
  rows before the cross-products are formed (:func:`~hierpool.algebra.system.build_system`);
  everything downstream reads only the cross-products.
- **covariance of each random-effect term** -- unstructured k x k today (``(x || g)`` is separate
  scalar terms): theta maps to the relative factors T_j (:func:`~hierpool.algebra.linalg.theta_to_factors`),
  and every kernel applies Lambda = I_ell (x) T_j through ``scale_columns`` and the term-0 blocks.
  A known relationship matrix A makes Lambda = T_j (x) L_A (L_A its Cholesky factor, or A^-1 as a
  sparse precision), and a spatial term a sparse precision (graph Laplacian): both change how
  Lambda acts on a term's columns, not the factorization around it.  Today a relationship matrix
  is fitted outside this algebra, by :mod:`hierpool.closedform.relmat` (Henderson's equations with
  A^-1 factored by SciPy's sparse LU; one relationship term, intercept terms beside it; the Bayesian
  engine's :mod:`hierpool.bayesian.relmat` samples from the same factorization), because the blocked
  factorization's term 0 is block diagonal and a dense rest block would be q x q; bringing it in means
  a sparse precision block in the factorization (the same one a spatial term needs).  Spatial terms
  (``car(area, type=...)``) are likewise fitted outside the blocked factorization: the closed form by
  :mod:`hierpool.closedform.spatial` (the Laplace approximation on the sparse precision of
  :class:`~hierpool.algebra.icar.CarPrior`, one bordered sparse LU per solve for the sum-to-zero
  constraints), the Bayesian engine by :mod:`hierpool.bayesian.spatial` (NUTS, the same quadratic form over
  the graph's edges, the constraint exact through :func:`~hierpool.algebra.icar.sum_to_zero`) and, for a
  Gaussian response, :mod:`hierpool.bayesian.spatial_exact` (the closed form's exact marginal likelihood and
  bordered factor, sampled by :mod:`hierpool.bayesian.psi_sampler`, the animal model's sampler too).  Several
  spatial terms, and ``(lhs | g)`` terms beside them, are stacked latent blocks
  (:mod:`hierpool.algebra.latent_blocks`) in that same sparse system, not in the blocked factorization.
"""
