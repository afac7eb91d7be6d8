"""A zero that varies under ``jax.vmap`` wherever a given value does: the start of a vmapped loop's carries.

``jax.vmap`` of a ``lax.while_loop``, ``lax.scan`` or ``lax.fori_loop`` learns which carries vary over the
mapped axis by tracing the loop's body, then tracing it again as long as a carry that started shared (a
constant: a counter, a bracket's ends, an identity mass matrix) comes out of a pass varying.  The body of a
batch's loop is large (a Newton fit, a penalized IRLS, a NUTS iteration), so each extra pass costs a whole
trace of it, and nested loops multiply them.  A carry that will vary anyway is started varying by adding
:func:`varying_zero` of a value that varies: the loop is traced once, and computes the same values.
Used by the batch's Newton search, penalized IRLS and NUTS chains (``bayesian.nuts._varying_with``).  Not every
loop gains: the AR(1) batch's golden sections, whose bracket starts shared, gained nothing started varying (the
measurements of both: benchmarks/RESULTS.md, "Tracing bayes_batch's chains").
"""

from __future__ import annotations

from .jax_runtime import jnp  # imported on first use


def varying_zero(value, dtype=None):
    """``0`` (of ``dtype``; else an int, of ``value``'s type where that is one) computed from ``value``: under
    ``jax.vmap`` it varies over the mapped axis wherever ``value`` does, and it is 0 whatever ``value`` holds (NaN
    and inf included).

    Not ``jnp.zeros_like(value)``, nor ``jnp.isfinite`` of an integer: each is a constant, shared under ``vmap``
    whatever ``value`` is.
    """
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.inexact):
        zero = jnp.where(jnp.isfinite(value), 0, 0)  # (value * 0 is NaN at inf)
    else:
        zero = value * 0
    return zero if dtype is None else zero.astype(dtype)
