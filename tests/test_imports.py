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
    assert "jax" in loaded
    assert not loaded & {"numpyro", "arviz", "matplotlib", "formulae"}  # formulae: only for a formula that needs it


def test_batch_fitting_does_not_load_the_bayesian_stack():
    # fit_batch is closed form: NumPyro and ArviZ (seconds of imports) load only with bayes_batch
    # one process: what fit_batch loaded, then what bayes_batch adds
    loaded = _loaded_after("import hierpool as hp\nhp.fit_batch\nfrom hierpool.batch import BatchResult\n"
                           f"print(' '.join(m + '@batch' for m in {HEAVY!r} if m in sys.modules))\nhp.bayes_batch")
    batch = {name.removesuffix("@batch") for name in loaded if name.endswith("@batch")}
    assert "jax" in batch and not batch & {"numpyro", "arviz", "matplotlib"}
    assert {"numpyro", "arviz"} <= loaded - {name + "@batch" for name in batch}


def test_a_small_fit_and_its_tables_run_without_jax_or_scipy():
    # the host path (one-term specialisation and general blocked algebra) never imports JAX, and a small model
    # with an interior optimum no SciPy (NLopt's optimizer, NumPy's small factorizations): half a second each
    code = ("import hierpool as hp\nd = hp.datasets.sleepstudy().assign(half=lambda d: d.Days // 5)\n"
            "for f in ('Reaction ~ Days + (Days | Subject)', 'Reaction ~ Days + (1 | Subject/half)'):\n"
            "    fit = hp.lmm(f, d)\n"
            "    fit.summary(), fit.ranef, fit.varcorr, fit.ranef_joint_sd(), fit.predict(d.iloc[:3], interval='prediction')")
    # a formula that only names numeric columns needs no formulae, lme4's a/b nesting included
    assert _loaded_after(code) == set()
    assert _loaded_after(code.replace("Days + (Days", "log(Days + 1) + (Days")) == {"formulae", "scipy"}
    # a boundary (singular) fit is decided by SciPy's L-BFGS-B
    singular = "import hierpool as hp\nhp.lmm('Reaction ~ Days + (1 | Subject) + (1 | Days)', hp.datasets.sleepstudy())"
    assert _loaded_after(singular) == {"scipy"}


def test_the_fit_command_draws_no_plots_unless_asked(tmp_path):
    # matplotlib's import alone outlasts a small fit: `hierpool fit` loads it only with --plots
    csv = tmp_path / "sleep.csv"
    code = ("import contextlib, io\nimport hierpool as hp\nfrom hierpool.cli import main\n"
            f"hp.datasets.sleepstudy().to_csv({str(csv)!r}, index=False)\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['fit', {str(csv)!r}, 'Reaction ~ Days + (Days | Subject)', '--out', {str(tmp_path / 'out')!r}])")
    assert _loaded_after(code) == set()  # tests/test_cli.py checks that --plots writes them


def test_deciding_that_large_data_stay_on_a_cpu_host_imports_no_jax():
    # compile_pays asks JAX for its backend only where an accelerator plugin is installed (and not when
    # JAX_PLATFORMS names the CPU first, which this machine-independent check sets)
    code = ("import os\nos.environ['JAX_PLATFORMS'] = 'cpu'\n"
            "from hierpool.algebra.compiler_options import compile_pays\n"
            "assert not compile_pays(1e12, rows=10**6)")
    assert _loaded_after(code) == set()


def test_jax_imported_later_gets_float64_and_the_algebra_pytrees():
    # a system built without JAX, then the user's own jax.jit: JAX is configured when it is imported
    code = ("import warnings\nimport numpy as np\nimport hierpool as hp\n"
            "model = hp.MixedModel('Reaction ~ Days + (1 | Subject) + (1 | Days)', hp.datasets.sleepstudy())\n"
            "theta = np.array([1.0, 0.5])\nvalue = model.objective(theta)\n"
            "import jax\nfrom hierpool.algebra.criterion import objective\n"
            "assert jax.config.jax_enable_x64\n"
            "compiled = float(jax.jit(objective)(jax.numpy.asarray(theta), model.system))\n"
            "assert abs(compiled - value) < 1e-9 * abs(value), (compiled, value)")
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_a_lookup_of_jax_that_imports_nothing_leaves_the_configuration_for_the_real_import():
    # libraries test whether JAX is installed with importlib.util.find_spec("jax"): the finder must
    # stay in place, so the later import still gets float64 and the registered pytrees (fit_batch)
    code = ("import importlib.util, sys\nimport hierpool as hp\n"
            "hp.lmm('Reaction ~ Days + (1 | Subject)', hp.datasets.sleepstudy())\n"
            "assert importlib.util.find_spec('jax') is not None and 'jax' not in sys.modules\n"
            "import jax\nassert jax.config.jax_enable_x64\n"
            "data = hp.datasets.sleepstudy_replicates(2, seed=1)\n"
            "hp.fit_batch('Reaction ~ Days + (Days | Subject)', data, by='dataset', progress=None)")
    subprocess.run([sys.executable, "-c", code], check=True)
