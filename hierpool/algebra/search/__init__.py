"""Host searches of (theta) or (theta, u) over a stack of datasets, in NumPy: one dataset is a stack of one.

Newton's method on the host and compiled (:mod:`~hierpool.algebra.search.newton`, with the moment start of many
datasets), the linear mixed model's search of one term's statistics or several terms' systems
(:mod:`~hierpool.algebra.search.terms`), and the searches with AR(1) residuals that move (theta, u) together, for
one term from per-level lagged moments (:mod:`~hierpool.algebra.search.ar1_moments`) and for several terms from
the whitened systems (:mod:`~hierpool.algebra.search.ar1_systems`).  ``hp.fit_batch`` runs them over chunks of
datasets (:mod:`hierpool.batch`), ``hp.lmm(..., correlation=)`` over its one dataset
(:mod:`hierpool.closedform.ar1`): the same search, written once, below both.  They import no JAX (the compiled
Newton method loads it on first use), so that a worker process can run a chunk
(:mod:`hierpool.batch.host_processes`).
"""

#: Bytes of temporaries one host call of these searches may hold by default: a batch's chunk (fewer datasets per
#: call where each would hold more than ``HOST_CHUNK_BYTES / HOST_CHUNK``, :func:`hierpool.batch.plan.host_chunk`;
#: each path states its bytes per dataset; one call per core runs at a time), and the most a dataset's lag classes'
#: sums may take (:func:`~hierpool.algebra.search.ar1_systems.lagged_systems_pay`), in a batch's chunk or
#: ``hp.lmm``'s one dataset.
HOST_CHUNK_BYTES = 64 * 2**20
