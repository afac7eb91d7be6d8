"""JAX, loaded when a compiled program first needs it, and configured whenever it is loaded.

The algebra runs on NumPy arrays on the host (small models: no compilation) and as
compiled XLA programs (large models, NUTS, batches).  Importing JAX costs more than a
whole small fit (benchmarks/RESULTS.md, "First fits, 2026-12-01"), so the host path
never imports it:

- ``jax`` and ``jnp`` here are stand-ins that import the real modules on first
  attribute access (only the traced and compiled branches touch them);
- :func:`pytree_dataclass` registers the algebra's dataclasses (systems, solutions,
  statistics) as JAX pytrees, and :func:`configure` turns on float64 (the closed form
  works in float64), at the moment JAX is imported, by whoever imports it: hierpool's
  own compiled path, NumPyro, or the user's ``import jax`` before ``jax.jit(objective)``.
  A finder on ``sys.meta_path`` (PEP 451) runs :func:`configure` right after JAX's own
  ``__init__``; when JAX was imported before this module, it runs at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import threading

_PYTREE_CLASSES: list[type] = []
_LOCK = threading.Lock()
_CONFIGURED: list = []  # the jax module once configured


def configure(jax_module) -> None:
    """float64 on, and every :func:`pytree_dataclass` registered (once per process)."""
    with _LOCK:
        if _CONFIGURED:
            return
        jax_module.config.update("jax_enable_x64", True)
        for cls in _PYTREE_CLASSES:
            jax_module.tree_util.register_dataclass(cls)
        _CONFIGURED.append(jax_module)


def pytree_dataclass(cls: type) -> type:
    """Class decorator: ``jax.tree_util.register_dataclass(cls)`` when JAX is (or gets) imported.

    Fields with ``metadata=dict(static=True)`` are static (hashable metadata), the others leaves.
    """
    with _LOCK:
        _PYTREE_CLASSES.append(cls)
        configured = bool(_CONFIGURED)
    if configured:
        _CONFIGURED[0].tree_util.register_dataclass(cls)
    return cls


class _ConfigureAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``jax`` like the other finders, and wraps its loader to call :func:`configure` after it runs.

    It stays on ``sys.meta_path`` until JAX has been imported and configured: a lookup that
    imports nothing (``importlib.util.find_spec("jax")``, how libraries test whether JAX is
    installed) or a failed import leaves it there for the real import.
    """

    _searching = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname != "jax" or getattr(self._searching, "active", False):
            return None
        self._searching.active = True  # the other finders find jax; this one must not recurse
        try:
            spec = importlib.util.find_spec("jax")
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            if module.__name__ == "jax":  # a loader shared by several modules runs this for each
                configure(module)
                _remove_finder()

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _ConfigureAfterImport()


def _remove_finder() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


class _Module:
    """A module imported on first attribute access (and configured, for ``jax``)."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            module = importlib.import_module(self._name)
            configure(importlib.import_module("jax"))  # before any thread can use it through this stand-in
            self._module = module
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"


def loaded() -> bool:
    """Whether JAX has been imported in this process (by anyone)."""
    return "jax" in sys.modules


def _accelerator_plugins_installed() -> bool:
    """Whether a PJRT plugin (CUDA, ROCm, Metal ...) or libtpu is installed, as JAX discovers them.

    JAX finds plugins as modules of the ``jax_plugins`` namespace package, as entry points of
    the ``jax_plugins`` group and in ``PJRT_NAMES_AND_LIBRARY_PATHS``; a TPU through the ``libtpu``
    package or ``TPU_LIBRARY_PATH``.
    """
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or os.environ.get("TPU_LIBRARY_PATH"):
        return True
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    namespace = importlib.util.find_spec("jax_plugins")
    return namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations or ()))


def default_backend_is_cpu() -> bool:
    """Whether JAX runs its programs on the CPU, answered without importing JAX where it can be.

    JAX is imported (to ask ``jax.default_backend()``) only when it already is, or when an
    accelerator plugin is installed and ``JAX_PLATFORMS`` does not name the CPU first.
    """
    if not loaded():
        platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
        if platforms.split(",")[0] == "cpu" or not _accelerator_plugins_installed():
            return True
    return jax.default_backend() == "cpu"


jax = _Module("jax")
jnp = _Module("jax.numpy")

if "jax" in sys.modules:
    configure(sys.modules["jax"])
else:
    sys.meta_path.insert(0, _FINDER)
