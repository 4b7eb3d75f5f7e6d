"""The plugin manager: built-in backends and third-party ones, registered the same way.

Third-party plugins are discovered through the entry-point group ``quantoracle``::

    [project.entry-points.quantoracle]
    my_backend = "my_package.plugin"
"""

from __future__ import annotations

import importlib
from functools import cached_property

import pluggy

from quantoracle.errors import PluginError
from quantoracle.oracle import hookspecs
from quantoracle.oracle.spec import Backend, BackendSpec

# Module names, not imports: the oracle learns of backends only through the hook.
BUILTIN_PLUGINS = (
    "quantoracle.backends.reference.plugin",
    "quantoracle.backends.triton_nvfp4.plugin",
)


class Registry:
    """A pluggy ``PluginManager`` and the backends its plugins declare.

    ``Registry()`` holds the built-ins and every installed entry-point plugin;
    ``Registry(builtins=False, entry_points=False)`` starts empty (for tests and experiments).
    """

    def __init__(self, *, builtins: bool = True, entry_points: bool = True) -> None:
        self.generation = 0  # bumped whenever plugins change; part of the resolve cache key
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        if builtins:
            for module in BUILTIN_PLUGINS:
                self.manager.register(importlib.import_module(module), name=module)
        if entry_points:
            self.manager.load_setuptools_entrypoints(hookspecs.PROJECT)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions)."""
        self.manager.register(plugin, name=name)
        self._changed()

    def unregister(self, plugin: object) -> None:
        self.manager.unregister(plugin)
        self._changed()

    def _changed(self) -> None:
        self.generation += 1
        self.__dict__.pop("backends", None)

    @cached_property
    def backends(self) -> dict[str, Backend]:
        """Every declared backend by name, in registration order. Raises :class:`PluginError`
        for a duplicate name (naming both plugins) or an object that is not a backend."""
        found: dict[str, Backend] = {}
        owner: dict[str, str] = {}
        for impl in reversed(self.manager.hook.quantoracle_backends.get_hookimpls()):
            for backend in impl.function():
                if not isinstance(backend, Backend) or not isinstance(backend.spec, BackendSpec):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} returned {backend!r}, which is not a backend: "
                        "it needs a `spec: BackendSpec` and `prepare` / `apply` methods"
                    )
                name = backend.spec.name
                if name in found:
                    raise PluginError(
                        f"backend name {name!r} is declared by both {owner[name]!r} and "
                        f"{impl.plugin_name!r}: rename one, or uninstall one of the plugins"
                    )
                found[name], owner[name] = backend, impl.plugin_name
        return found


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry (built-ins plus entry points), created on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
