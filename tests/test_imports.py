"""What importing hierpool costs: the engines load on first use, and the closed-form engine
never loads the Bayesian stack (NumPyro, ArviZ) or matplotlib."""

import subprocess
import sys

import pytest

HEAVY = ("jax", "formulae", "scipy", "numpyro", "arviz", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_hierpool_loads_no_engine():
    assert _loaded_after("import hierpool") == set()


def test_the_closed_form_engine_does_not_load_the_bayesian_stack():
    loaded = _loaded_after("import hierpool as hp\nhp.lmm\nimport jax\nassert jax.config.jax_enable_x64")
    assert {"jax", "formulae"} <= loaded
    assert not loaded & {"numpyro", "arviz", "matplotlib"}


def test_public_names_resolve_lazily():
    import hierpool as hp

    assert callable(hp.bayes) and callable(hp.fit_batch) and hp.validate.coverage
    assert {"lmm", "bayes", "pooling", "datasets"} <= set(dir(hp))
    with pytest.raises(AttributeError, match="no_such_name"):
        hp.no_such_name


def test_importing_a_submodule_first_does_not_shadow_a_public_function():
    code = ("import hierpool.pooling_comparison, hierpool.closedform, hierpool.bayesian\nimport hierpool as hp\n"
            "assert callable(hp.pooling) and callable(hp.lmm) and callable(hp.bayes)")
    subprocess.run([sys.executable, "-c", code], check=True)
