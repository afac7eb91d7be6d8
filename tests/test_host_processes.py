"""Worker processes of the host paths (hierpool.batch.host_processes): where a chunk runs, what comes back, and a
GLMM and a several-term linear batch fitted with them equal to the same batches on threads alone, and the
allocator thresholds a host batch raises (hierpool.algebra.host_allocator)."""

import math
import mmap
import os
import platform
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
import hierpool.batch.fit_glmm as fit_glmm_module
import hierpool.batch.fit_terms as fit_terms_module
from hierpool.batch import host_processes
from hierpool.batch.plan import plan_batch


def _ready_worker():
    """A started worker, idle (waiting at most 60 s for its imports)."""
    host_processes.start(1)
    deadline = time.monotonic() + 60
    while host_processes._IDLE.empty():
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.01)


def _with_a_chunk_running_here(function, *arguments, hold=0.2):
    """host_processes.call(function, *arguments) from a thread while this thread holds the slot of chunks run here
    (released after ``hold`` seconds, long enough that the caller's thread finds it held): the call goes to a
    worker, or waits for the slot."""
    out = {}

    def caller():
        try:
            out["value"] = host_processes.call(function, *arguments)
        except Exception as error:  # noqa: BLE001 - re-raised below
            out["error"] = error

    with host_processes._HERE:
        thread = threading.Thread(target=caller)
        thread.start()
        time.sleep(hold)
    thread.join(60)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_the_search_a_worker_runs_imports_without_jax_or_pandas():
    check = ("import sys, hierpool.batch.glmm_search, hierpool.algebra.search.terms, hierpool.algebra.search.ar1_systems, "
             "hierpool.batch.host_processes; print('jax' in sys.modules, 'pandas' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"]


def test_a_call_goes_to_a_worker_while_a_chunk_runs_here_and_its_errors_come_back():
    _ready_worker()
    assert _with_a_chunk_running_here(os.getpid) != os.getpid()
    assert _with_a_chunk_running_here(math.sqrt, 6.25) == 2.5
    with pytest.raises(ValueError, match="math domain") as raised:
        _with_a_chunk_running_here(math.sqrt, -1.0)
    assert any("host worker process" in note for note in raised.value.__notes__)  # raised there, with its traceback
    assert _with_a_chunk_running_here(os.getpid) != os.getpid()  # the worker outlived its error
    assert _with_a_chunk_running_here(os.getenv, "JAX_PLATFORMS") == "cpu"  # never a GPU's JAX beside the parent's


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_a_large_result_comes_back_whole_from_a_worker():
    """A pipe gives a large message in several reads: each is read to its length (20 MB, a chunk's order)."""
    _ready_worker()
    assert _with_a_chunk_running_here(bytes, 20_000_000) == bytes(20_000_000)


def test_a_function_that_cannot_be_pickled_runs_here():
    _ready_worker()
    assert _with_a_chunk_running_here(lambda: os.getpid()) == os.getpid()


def test_a_function_a_worker_cannot_import_runs_here():
    module = types.ModuleType("hierpool_test_only_in_this_process")
    exec("import os\ndef pid():\n    return os.getpid()", module.__dict__)
    sys.modules[module.__name__] = module  # pickled by reference here; no such module in the worker
    try:
        _ready_worker()
        assert _with_a_chunk_running_here(module.pid) == os.getpid()
    finally:
        del sys.modules[module.__name__]


def test_a_worker_that_died_leaves_its_chunk_here():
    _ready_worker()
    worker = next(w for w in host_processes._WORKERS if w.alive)
    worker.process.kill()
    worker.process.wait(10)
    with pytest.warns(RuntimeWarning, match="worker process died"):
        assert _with_a_chunk_running_here(os.getpid) == os.getpid()
    assert not worker.alive


def _recorded(statuses: list, outcome):
    """A worker's (status, value), its status kept: a chunk sent but unloadable there comes back to run here."""
    statuses.append(outcome[0])
    return outcome


def _assert_workers_fit_as_threads(monkeypatch, module, threshold: str, fit, names, threads: bool = True) -> None:
    """``fit()`` (a batch) with ``module``'s chunks sent to a worker process (two threads, one worker, the row
    threshold ``threshold`` at 0), then on threads alone: some chunk ran there, and the results ``names`` and the
    random effects are the same bit for bit.  ``threads=False``: ``module``'s own thread count is left as it is
    (its work goes to ``worker_count``'s workers plus this process)."""
    remote = []
    run = host_processes._Worker.run
    monkeypatch.setattr(host_processes._Worker, "run", lambda self, message: _recorded(remote, run(self, message)))
    if threads:
        monkeypatch.setattr(module, "thread_count", lambda *_: 2)
    monkeypatch.setattr(host_processes, "worker_count", lambda threads: 1)  # a worker even on one usable core
    monkeypatch.setattr(module, threshold, 0)
    _ready_worker()
    with_processes = fit()
    assert remote and set(remote) == {"ok"}, f"no chunk ran in a worker, or one came back here: {remote}"
    remote.clear()
    monkeypatch.setenv(host_processes.SWITCH, "0")
    monkeypatch.setattr(host_processes, "_WORKERS", [])
    threads = fit()
    assert not remote
    for name in names:
        np.testing.assert_array_equal(getattr(with_processes, name), getattr(threads, name), err_msg=name)
    pd.testing.assert_frame_equal(with_processes.ranef, threads.ranef)


@pytest.mark.filterwarnings("error:a hierpool host worker process died")  # a chunk lost there is no fallback here
def test_a_glmm_batch_fitted_in_worker_processes_equals_it_on_threads(monkeypatch):
    rng = np.random.default_rng(5)
    frames = []
    for d in range(8):
        g = np.repeat(np.arange(12), 10)
        x = rng.normal(size=g.size)
        eta = -0.3 + 0.8 * x + rng.normal(0, 0.7, 12)[g]
        frames.append(pd.DataFrame({"g": g.astype(str), "x": x, "y": rng.binomial(1, 1 / (1 + np.exp(-eta)))}))
    _assert_workers_fit_as_threads(
        monkeypatch, fit_glmm_module, "PROCESS_MIN_ROWS",
        lambda: hp.fit_batch("y ~ x + (1 | g)", frames, by="rep", family="binomial", progress=False),
        ("objective", "beta", "theta", "beta_se"))



def _binomial_frames(seed: int) -> list:
    """Four small binomial datasets (8 groups of 3 rows, 5-14 trials) with a random intercept."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(4):
        g, trials = np.repeat(np.arange(8), 3), rng.integers(5, 15, 24)
        eta = -0.5 + rng.normal(0, 0.6, 8)[g]
        frames.append(pd.DataFrame({"g": g.astype(str), "n": trials, "y": rng.binomial(trials, 1 / (1 + np.exp(-eta)))}))
    return frames


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_bayes_batch_s_independence_pass_in_worker_processes_equals_it_here(monkeypatch):
    """hp.bayes_batch's independence sampler (a binomial, one scalar term), dataset by dataset in a worker process
    too: each dataset's draws are its seed's wherever it runs."""
    import hierpool.batch.bayes as bayes_module

    frames = _binomial_frames(8)
    _assert_workers_fit_as_threads(
        monkeypatch, bayes_module, "INDEPENDENCE_PROCESS_MIN",
        lambda: hp.bayes_batch("cbind(y, n - y) ~ 1 + (1 | g)", frames, by="rep", family="binomial", draws=200,
                               tune=200, seed=3, progress=False),
        ("fixef", "varcorr", "methods"), threads=False)


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_a_spatial_batch_fitted_in_worker_processes_equals_it_here(monkeypatch):
    """fit_batch's dataset-by-dataset spatial fits (hp.glmm with the batch's graph) in a worker process too: the same
    numbers, and each dataset's warnings kept in its row (recorded there and sent back)."""
    import hierpool.batch.fit_each as fit_each_module
    from hierpool.spec.adjacency import lattice_edges

    rng = np.random.default_rng(9)
    areas = [f"a{i}" for i in range(16)]
    frames = [pd.DataFrame({"area": areas, "e": rng.uniform(5, 15, 16)}).assign(
        y=lambda d: rng.poisson(d["e"] * np.exp(rng.normal(0, 0.3, 16)))) for _ in range(4)]
    _assert_workers_fit_as_threads(
        monkeypatch, fit_each_module, "EACH_PROCESS_MIN",
        lambda: hp.fit_batch("y ~ 1 + offset(log(e)) + car(area, type='bym2')", frames, by="rep", family="poisson",
                             adjacency=lattice_edges(4, 4), progress=False),
        ("objective", "beta", "theta", "messages"), threads=False)


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_gaussian_spatial_posteriors_sampled_in_worker_processes_equal_them_sampled_here(monkeypatch):
    """bayes_batch's Gaussian spatial datasets, each hp.bayes's exact sampler (NumPy and SciPy), in a worker
    process too: the same draws."""
    import hierpool.batch.fit_each as fit_each_module
    from hierpool.spec.adjacency import lattice_edges

    rng = np.random.default_rng(12)
    frames = [pd.DataFrame({"area": [f"a{i}" for i in range(16)], "y": rng.normal(size=16)}) for _ in range(2)]
    _assert_workers_fit_as_threads(
        monkeypatch, fit_each_module, "EACH_PROCESS_MIN",
        lambda: hp.bayes_batch("y ~ 1 + car(area, type='icar')", frames, by="rep", adjacency=lattice_edges(4, 4),
                               draws=100, tune=100, seed=1, progress=False),
        ("fixef", "hyperparameters", "messages"), threads=False)


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_datasets_fitted_alone_in_worker_processes_equal_them_fitted_here(monkeypatch):
    """fit_batch at nAGQ = 0 fits every dataset alone by hp.glmm: in a worker process too, the same rows; also where
    the device's chunk threads are one (a GPU's: plan.thread_count), the single fits being the host's."""
    import hierpool.batch.fit as fit_module

    monkeypatch.setattr(fit_module, "thread_count", lambda *_, **__: 1)
    monkeypatch.setattr(fit_module, "host_threads", lambda: 3)  # (a machine's cores: not 1, whatever this one has)
    threads, whole_runs = [], host_processes.whole_runs
    monkeypatch.setattr(host_processes, "whole_runs", lambda *args, **kwargs: threads.append(kwargs["threads"])
                        or whole_runs(*args, **kwargs))
    frames = _binomial_frames(10)
    _assert_workers_fit_as_threads(
        monkeypatch, fit_module, "REFIT_PROCESS_MIN",
        lambda: hp.fit_batch("cbind(y, n - y) ~ 1 + (1 | g)", frames, by="rep", family="binomial", nAGQ=0,
                             progress=False),
        ("objective", "beta", "theta", "beta_se", "messages"), threads=False)
    assert set(threads) == {3}  # a core each, not the device's chunk threads


def test_a_formula_that_reads_the_caller_s_names_is_fitted_here(monkeypatch):
    """A user's function and np.sin are found in the caller's namespace, which a worker process or a pool thread has
    not: such datasets were refused in every row (FormulaError: unknown name), even bayes_batch's three datasets
    without workers (its pool thread).  They are fitted here, as hp.glmm and hp.bayes fit them."""
    import hierpool.batch.fit as fit_module

    def shifted(x):
        return x + 1.0

    rng = np.random.default_rng(11)
    frames = []
    for d in range(3):
        g, trials, x = np.repeat(np.arange(8), 3), rng.integers(5, 15, 24), rng.normal(size=24)
        eta = -0.5 + 0.5 * x + rng.normal(0, 0.6, 8)[g]
        frames.append(pd.DataFrame({"g": g.astype(str), "n": trials, "x": x,
                                    "y": rng.binomial(trials, 1 / (1 + np.exp(-eta)))}))
    formula = "cbind(y, n - y) ~ np.sin(x) + shifted(x) + (1 | g)"
    monkeypatch.setattr(fit_module, "REFIT_PROCESS_MIN", 0)
    monkeypatch.setattr(host_processes, "worker_count", lambda threads: 1)
    batch = hp.fit_batch(formula, frames, by="rep", family="binomial", nAGQ=0, progress=False)
    assert batch.messages.str.contains("refitted by hp.glmm").all(), list(batch.messages)
    single = hp.glmm(formula, frames[2], family="binomial", nAGQ=0)
    assert batch.objective.iloc[2] == single.optimum.deviance
    posterior = hp.bayes_batch(formula, frames, by="rep", family="binomial", draws=100, tune=100, seed=1,
                               progress=False)
    assert posterior.diagnostics["method"].tolist() == ["independence"] * 3, list(posterior.diagnostics.message)


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
def test_a_several_term_linear_batch_fitted_in_worker_processes_equals_it_on_threads(monkeypatch):
    rng = np.random.default_rng(6)
    frames = []
    for d in range(8):
        subj, item = (a.ravel().astype(str) for a in np.meshgrid(np.arange(10), np.arange(6), indexing="ij"))
        x = rng.normal(size=subj.size)
        y = 1 + 0.5 * x + rng.normal(0, 0.8, 10)[subj.astype(int)] + rng.normal(0, 0.5, 6)[item.astype(int)]
        frames.append(pd.DataFrame({"subj": subj, "item": item, "x": x, "y": y + rng.normal(size=subj.size)}))
    _assert_workers_fit_as_threads(
        monkeypatch, fit_terms_module, "LINEAR_PROCESS_MIN_ROWS",
        lambda: hp.fit_batch("y ~ x + (1 + x | subj) + (1 | item)", frames, by="rep", progress=False),
        ("objective", "beta", "theta", "beta_se", "sigma"))


@pytest.mark.filterwarnings("error:a hierpool host worker process died")
@pytest.mark.parametrize("formula", ["y ~ x + (1 | site) + (1 | subj)", "y ~ x + (1 | subj)"],
                         ids=["several terms", "one term"])
def test_an_ar1_batch_fitted_in_worker_processes_equals_it_on_threads(monkeypatch, formula):
    """The chunks searched in a worker process: several terms on the whitened systems (their rows built here, their
    lag classes' sums formed there), one term from its lagged moments (formed here)."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    rng = np.random.default_rng(7)
    frames = []
    for d in range(6):
        rows = []
        for site in range(5):
            a = rng.normal(0, 1.0)
            for subj in range(3):
                e, b = rng.normal(), rng.normal(0, 0.7)
                for t in range(6):
                    e = 0.6 * e + 0.8 * rng.normal()
                    rows.append({"site": f"s{site}", "subj": f"s{site}_{subj}", "t": t, "x": rng.normal(),
                                 "y": 2 + a + b + e})
        frames.append(pd.DataFrame(rows))
    _assert_workers_fit_as_threads(
        monkeypatch, fit_ar1_module, "AR1_PROCESS_MIN_ROWS",
        lambda: hp.fit_batch(formula, frames, by="rep", correlation=hp.ar1("subj", time="t"), progress=False),
        ("objective", "beta", "theta", "phi", "sigma"))


def test_a_linear_batch_of_heavy_dense_systems_goes_to_worker_processes_below_the_row_threshold(monkeypatch):
    # few rows but large dense systems per dataset: the evaluation work, not the rows, decides
    rng = np.random.default_rng(8)
    subj, item = (a.ravel().astype(str) for a in np.meshgrid(np.arange(16), np.arange(8), indexing="ij"))
    frames = [pd.DataFrame({"subj": subj, "item": item, "x": rng.normal(size=subj.size),
                            "y": rng.normal(size=subj.size)}) for _ in range(3)]
    plan = plan_batch("y ~ x + (1 + x | subj) + (1 | item)", frames, "rep", "fit_batch", "hp.lmm", one_term=False)
    # term 0: subj, 16 levels of 2; the rest: item's 8 levels of 1 and X, y: m = 8 + 2 + 1
    assert fit_terms_module.evaluation_work(plan, np.arange(3)) == 3 * (16 * 2 * 11**2 + 11**3)
    # at the padded level counts (10 subjects: 16; 6 items: 8, where the datasets' counts differ), and terms on one
    # factor searched as one (no rest)
    fewer = [frames[0][(frames[0].subj.astype(int) < 10) & (frames[0].item.astype(int) < 6)], *frames[1:]]
    plan = plan_batch("y ~ x + (1 + x | subj) + (1 | item)", fewer, "rep", "fit_batch", "hp.lmm", one_term=False)
    assert fit_terms_module.evaluation_work(plan, np.arange(3)) == 3 * (16 * 2 * 11**2 + 11**3)
    plan = plan_batch("y ~ x + (1 + x || subj)", frames, "rep", "fit_batch", "hp.lmm", one_term=False)
    assert fit_terms_module.evaluation_work(plan, np.arange(3), term_ks=(1, 1)) == 3 * (16 * 2 * 3**2 + 3**3)
    asked = []

    def recorded(plan, attempted, min_rows, search):
        asked.append(min_rows)
        return False  # no workers: the batch runs on threads

    monkeypatch.setattr(fit_terms_module, "start_processes", recorded)
    for work, rows in ((0, 0), (10**12, fit_terms_module.LINEAR_PROCESS_MIN_ROWS)):
        monkeypatch.setattr(fit_terms_module, "LINEAR_PROCESS_MIN_WORK", work)
        hp.fit_batch("y ~ x + (1 + x | subj) + (1 | item)", frames, by="rep", progress=False)
        assert asked[-1] == rows


# 8 arrays of 3 MiB held at once, then freed, ten times over: the page faults of the second ten rounds
ALLOCATION_ROUNDS = """
import resource, sys
import numpy as np
if sys.argv[1] == "fit_batch":  # a first batch, which raises the thresholds (hierpool.algebra.host_allocator)
    import pandas as pd
    import hierpool as hp
    frame = pd.DataFrame({"g": np.repeat(list("abcdef"), 5), "x": np.linspace(-1, 1, 30)})
    frame["y"] = frame.x + np.sin(7 * frame.x) + np.cos(np.arange(30))
    hp.fit_batch("y ~ x + (1 | g)", [frame, frame], by="rep", progress=False)
def rounds():
    for _ in range(10):
        arrays = [np.ones(3 * 2**20 // 8) for _ in range(8)]
        del arrays
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[always]" in setting.read()
    except OSError:
        return False


# glibc's dynamic rule, counted in 4 KiB pages: huge pages for every heap (THP "always") would fault per 2 MiB
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                    or mmap.PAGESIZE != 4096 or _transparent_huge_pages_always(),
                    reason="glibc's dynamic mmap threshold, faults counted in 4 KiB pages")
def test_raised_malloc_thresholds_keep_large_temporaries_in_the_heap():
    """hierpool.algebra.host_allocator: after a first hp.fit_batch (its one freed block), arrays of a few MiB freed and
    allocated again reuse the heap's pages; without it glibc hands the top of its heap back (over its 2 x 3 MiB trim
    threshold) and every round faults its 24 MiB in again.  (A batch whose own call were skipped faulted as the plain
    process: measured, benchmarks/RESULTS.md, twenty-first session.)"""
    def faults(mode):
        # the allocator's own settings left at glibc's defaults (dynamic thresholds)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        run = subprocess.run([sys.executable, "-c", ALLOCATION_ROUNDS, mode], capture_output=True, text=True,
                             timeout=120, check=True, env=env)
        return int(run.stdout)

    plain, raised = faults("plain"), faults("fit_batch")
    assert plain > 5 * 6144  # most of ten rounds of 24 MiB in 4 KiB pages faulted in again
    assert raised < plain / 20
