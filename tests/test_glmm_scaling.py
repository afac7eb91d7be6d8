"""The GLMM search's change of variables (hierpool.closedform.glmm_scaling), its forward-difference Hessian, and the
separation check's deduplication of rows."""

import numpy as np
import pytest

from hierpool.closedform.glmm_scaling import block_scaling
from hierpool.closedform.optimize import hessian_from_gradients


def _spd(n, seed):
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


@pytest.fixture(scope="module")
def scaling():
    # two bounded variables (theta) first, three free ones (beta): the order the GLMM search uses
    return block_scaling(_spd(5, 0), origin=np.array([1.0, 0.5, -2.0, 0.3, 4.0]), free=[2, 3, 4], scaled=[0, 1])


def test_the_change_of_variables_is_invertible_and_origin_is_zero(scaling):
    y = np.random.default_rng(1).normal(size=5)
    np.testing.assert_allclose(scaling.to_y(scaling.to_x(y)), y, atol=1e-12)
    np.testing.assert_array_equal(scaling.to_x(np.zeros(5)), scaling.origin)


def test_the_gradient_in_y_is_the_chain_rule(scaling):
    """F(x) = c.x: dF/dy by finite differences of F(to_x(y)) equals gradient_to_y(c)."""
    c = np.array([0.3, -1.0, 2.0, 0.5, -0.7])
    y = np.random.default_rng(2).normal(size=5)
    numeric = [(c @ scaling.to_x(y + 1e-6 * e) - c @ scaling.to_x(y - 1e-6 * e)) / 2e-6 for e in np.eye(5)]
    np.testing.assert_allclose(scaling.gradient_to_y(c), numeric, rtol=1e-7)


def test_each_bounded_variable_depends_on_its_own_y_only(scaling):
    """So that L-BFGS-B's box bounds in y are the bounds in x."""
    lower_y = scaling.lower_y(np.array([0.0, 0.0, -np.inf, -np.inf, -np.inf]))
    for i in (0, 1):
        y = np.random.default_rng(3).normal(size=5)
        y[i] = lower_y[i]
        assert scaling.to_x(y)[i] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="free"):
        scaling.lower_y(np.zeros(5))


def test_with_the_exact_hessian_the_free_block_becomes_the_identity():
    """Without bounded variables, y = L^T (x - x0) turns a quadratic's Hessian into I."""
    h = _spd(4, 4)
    scaling = block_scaling(h, np.zeros(4), free=[0, 1, 2, 3], scaled=[])
    jacobian = np.stack([scaling.to_x(e) for e in np.eye(4)], axis=1)  # dx/dy
    np.testing.assert_allclose(jacobian.T @ h @ jacobian, np.eye(4), atol=1e-10)


def test_forward_differences_along_directions_recover_the_hessian():
    """H D = G: along any basis D the (extrapolated) forward differences of a quadratic's gradient give H exactly;
    and on a quartic, differences along directions of unit curvature are accurate where raw coordinates of very
    different scales are not (the uncentred-covariate case)."""
    h = _spd(3, 5)
    x = np.array([0.2, 1.0, -0.5])
    lower = np.full(3, -np.inf)
    directions = np.random.default_rng(9).normal(size=(3, 3))
    forward = hessian_from_gradients(lambda points: points @ h, x, lower, gradient=x @ h, directions=directions)
    np.testing.assert_allclose(forward, h, rtol=1e-8)
    # f = 0.5 x'Hx + c (s x_2)^4 / 24 with s = 1000: the x_2 curvature s^2 (1 + c s^2 x_2^2 / 2) is far above the
    # others (a cubic's differences are exact once extrapolated: the error is the fourth derivative's)
    s, c = 1000.0, 1e-3
    scaled = np.diag([1.0, 1.0, s])

    def gradient(points):
        g = points @ h
        g[:, 2] += c * s**4 * points[:, 2] ** 3 / 6
        return g

    point = np.array([0.1, 0.2, 1e-3])
    exact = h.copy()
    exact[2, 2] += c * s**4 * point[2] ** 2 / 2
    raw = hessian_from_gradients(gradient, point, lower, step=1e-4, gradient=gradient(point[None])[0],
                                 directions=np.eye(3))
    unit = hessian_from_gradients(gradient, point, lower, step=1e-4, gradient=gradient(point[None])[0],
                                  directions=np.linalg.inv(scaled))
    # the O(step^2) error: 7e-9 relative along the unit direction, 1e6 times that along the raw coordinate
    assert abs(unit[2, 2] - exact[2, 2]) < 1e-7 * exact[2, 2] < 0.1 * abs(raw[2, 2] - exact[2, 2])
    with pytest.raises(ValueError, match="gradient"):
        hessian_from_gradients(gradient, point, lower, directions=np.eye(3))


def test_distinct_rows_are_numpys_unique_rows():
    """The separation check's deduplication (hierpool.algebra.separation.distinct_rows)."""
    from hierpool.algebra.separation import distinct_rows

    a = np.random.default_rng(6).integers(0, 3, (500, 4)).astype(float)
    a[:, 1] += 0.5 * np.random.default_rng(7).integers(0, 2, 500)
    np.testing.assert_array_equal(distinct_rows(a), np.unique(a, axis=0))
    assert distinct_rows(np.zeros((0, 3))).shape == (0, 3)
