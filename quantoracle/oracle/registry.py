"""The plugin manager: built-in backends and third-party ones, registered the same way, each
plugin isolated from the others.

Third-party plugins are discovered through the entry-point group ``quantoracle``::

    [project.entry-points.quantoracle]
    my_backend = "my_package.plugin"

A plugin that fails (its module does not import, pluggy refuses its hooks, its hook raises or
returns something other than a sequence of backends, or it declares a backend name an earlier
plugin declared) is recorded as a :class:`~quantoracle.errors.PluginError` in
:attr:`Registry.broken`, logged once as a warning, and left out; every other backend keeps
working. ``Registry(strict=True)`` or ``QUANTORACLE_STRICT_PLUGINS=1`` raises instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata

import pluggy

from quantoracle.errors import OptionError, PluginError
from quantoracle.oracle import hookspecs
from quantoracle.oracle.spec import Backend, BackendSpec

# Module names, not imports: the oracle learns of backends only through the hook.
BUILTIN_PLUGINS = (
    "quantoracle.backends.reference.plugin",
    "quantoracle.backends.triton_nvfp4.plugin",
    "quantoracle.backends.humming.plugin",
)
BUILTIN_DISTRIBUTION = "quantoracle"
ENV_STRICT = "QUANTORACLE_STRICT_PLUGINS"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin comes from.

    - ``plugin``: its registered name (the entry point's name, a built-in's module name, or the
      name given to :meth:`Registry.register`).
    - ``entry_point``: the :class:`importlib.metadata.EntryPoint` it was loaded from (``group``,
      ``name``, ``value``); ``None`` for a built-in or a plugin registered by code.
    - ``distribution`` / ``version``: the installed distribution that provides it
      (``"quantoracle"`` for built-ins); ``None`` where not known (a plugin registered by code,
      or quantoracle run from a source tree that is not installed).
    """

    plugin: str
    entry_point: metadata.EntryPoint | None
    distribution: str | None
    version: str | None

    def __str__(self) -> str:
        if self.entry_point:
            where = f"entry point {self.entry_point.group}:{self.entry_point.name} = {self.entry_point.value}"
        else:
            where = "built-in" if self.distribution == BUILTIN_DISTRIBUTION else "registered by code"
        if self.distribution:
            where += f", distribution {self.distribution} {self.version or '(version unknown)'}"
        return f"plugin {self.plugin!r} ({where})"

    def fix(self) -> str:
        """What the user can do about a broken plugin of this origin."""
        if self.distribution == BUILTIN_DISTRIBUTION:
            return "Reinstall quantoracle; if that does not help, report it as a quantoracle bug"
        if self.distribution:
            return f"Fix it, or uninstall it with `pip uninstall {self.distribution}`"
        return "Fix the plugin object passed to Registry.register"

    def error(self, cause: str, exc: BaseException | None = None) -> PluginError:
        """A :class:`PluginError` naming this origin, ``cause`` (a sentence) and the fix."""
        error = PluginError(
            f"{self} is broken: {cause}. {self.fix()}",
            plugin=self.plugin, entry_point=self.entry_point, distribution=self.distribution,
            version=self.version, cause=cause,
        )
        error.__cause__ = exc
        return error


@dataclass(frozen=True)
class _Catalog:
    """What the registered plugins' hooks declared, computed once per change."""

    backends: dict[str, Backend]
    owners: dict[str, str]  # backend name -> plugin name
    broken: tuple[PluginError, ...]


class Registry:
    """A pluggy ``PluginManager`` and the backends its plugins declare.

    ``Registry()`` holds the built-ins and every installed entry-point plugin, loaded one by one
    (sorted by distribution, then entry-point name) so that each failure is attributed;
    ``Registry(builtins=False, entry_points=False)`` starts empty (for tests and experiments).
    ``strict`` (default: ``QUANTORACLE_STRICT_PLUGINS=1``) raises the first
    :class:`~quantoracle.errors.PluginError` instead of recording it in :attr:`broken`: at
    construction or :meth:`register` for load failures, at first use of :attr:`backends` for
    hook failures.
    """

    def __init__(self, *, builtins: bool = True, entry_points: bool = True, strict: bool | None = None) -> None:
        self.strict = _strict_from_env() if strict is None else strict
        self.generation = 0  # bumped whenever plugins change; part of the resolve cache key
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self._origins: dict[str, PluginOrigin] = {}
        self._load_failures: list[PluginError] = []
        self._reported: set[str] = set()
        if builtins:
            version = _version(BUILTIN_DISTRIBUTION)
            for module in BUILTIN_PLUGINS:
                origin = PluginOrigin(module, None, BUILTIN_DISTRIBUTION, version)
                self._load(origin, lambda module=module: importlib.import_module(module))
        if entry_points:
            found = metadata.entry_points(group=hookspecs.PROJECT)
            for entry_point in sorted(found, key=lambda ep: (ep.dist.name if ep.dist else "", ep.name)):
                dist = entry_point.dist
                origin = PluginOrigin(entry_point.name, entry_point, dist and dist.name, dist and dist.version)
                self._load(origin, entry_point.load)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Add a plugin (a module or object with ``@hookimpl`` functions). One that pluggy refuses
        (a hook with the wrong signature, a name already taken) or that has no quantoracle hook
        is recorded in :attr:`broken` (raised when strict)."""
        name = name or self.manager.get_canonical_name(plugin)
        self._add(plugin, PluginOrigin(name, None, None, None))

    def unregister(self, plugin: object) -> None:
        name = self.manager.get_name(plugin)
        self.manager.unregister(plugin)
        self._origins.pop(name, None)
        self._changed()

    @property
    def backends(self) -> dict[str, Backend]:
        """Every declared backend by name, in plugin registration order (built-ins first), from
        the plugins that are not broken."""
        return self._catalog.backends

    @property
    def broken(self) -> tuple[PluginError, ...]:
        """Every broken plugin, as the :class:`~quantoracle.errors.PluginError` that says why:
        load failures first, then hook failures, each in registration order."""
        return (*self._load_failures, *self._catalog.broken)

    def origin(self, backend: str) -> PluginOrigin:
        """Where the plugin declaring ``backend`` comes from. Raises
        :class:`~quantoracle.oracle.engine.UnknownBackendError` for a name no working plugin
        declares."""
        catalog = self._catalog
        if backend not in catalog.owners:
            from quantoracle.oracle.engine import UnknownBackendError  # the engine imports this module

            raise UnknownBackendError(f"unknown backend {backend!r}; registered: {', '.join(catalog.backends)}")
        return self._origins[catalog.owners[backend]]

    def distributions(self) -> dict[str, str | None]:
        """Distribution name -> version for quantoracle and for every distribution whose plugin
        declares a registered backend (``None``: version unknown). Plugins registered by code
        have no distribution and are not listed."""
        found = {BUILTIN_DISTRIBUTION: _version(BUILTIN_DISTRIBUTION)}
        for plugin in dict.fromkeys(self._catalog.owners.values()):
            origin = self._origins[plugin]
            if origin.distribution:
                found[origin.distribution] = origin.version
        return found

    def _load(self, origin: PluginOrigin, load: Callable[[], object]) -> None:
        try:
            plugin = load()
        except Exception as exc:
            self._fail(origin.error(f"importing it raised {_describe(exc)}", exc))
            return
        self._add(plugin, origin)

    def _add(self, plugin: object, origin: PluginOrigin) -> None:
        try:
            self.manager.register(plugin, name=origin.plugin)
        except Exception as exc:  # pluggy: a hook with the wrong signature, a name taken twice
            if self.manager.get_plugin(origin.plugin) is plugin:  # pluggy leaves the name taken
                self.manager.unregister(name=origin.plugin)
            self._fail(origin.error(f"pluggy refused to register it: {_describe(exc)}", exc))
            return
        callers = self.manager.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if not caller.has_spec())
        if unknown or not callers:
            self.manager.unregister(plugin)
            cause = (f"it marks {', '.join(unknown)} with @hookimpl, which is not a quantoracle hook"
                     if unknown else "it has no @hookimpl-marked function")
            self._fail(origin.error(f"{cause}; define `@hookimpl def quantoracle_backends()`"))
            return
        self._origins[origin.plugin] = origin
        self._changed()

    def _fail(self, error: PluginError) -> None:
        self._report(error)
        self._load_failures.append(error)

    def _report(self, error: PluginError) -> None:
        """Raise ``error`` when strict; else log it, once per registry."""
        if self.strict:
            raise error
        if str(error) not in self._reported:
            self._reported.add(str(error))
            log.warning("%s; it is left out and the other backends keep working (%s=1 makes this an error)",
                        error, ENV_STRICT)

    def _changed(self) -> None:
        self.generation += 1
        self.__dict__.pop("_catalog", None)

    @cached_property
    def _catalog(self) -> _Catalog:
        backends: dict[str, Backend] = {}
        owners: dict[str, str] = {}
        broken: list[PluginError] = []
        for impl in self.manager.hook.quantoracle_backends.get_hookimpls():  # registration order
            origin = self._origins[impl.plugin_name]
            try:
                declared = self._declared(impl.function, origin)
                names = [backend.spec.name for backend in declared]
                for name in names:
                    first = owners.get(name) or (impl.plugin_name if names.count(name) > 1 else None)
                    if first:
                        raise origin.error(
                            f"backend name {name!r} is declared by both {first!r} and "
                            f"{impl.plugin_name!r}: rename one, or uninstall one of the plugins"
                        )
            except PluginError as error:
                self._report(error)
                broken.append(error)
                continue
            for backend in declared:
                backends[backend.spec.name], owners[backend.spec.name] = backend, impl.plugin_name
        return _Catalog(backends, owners, tuple(broken))

    @staticmethod
    def _declared(hook: Callable[[], object], origin: PluginOrigin) -> Sequence[Backend]:
        """Call a plugin's hook; its backends, or a PluginError saying what is wrong with them."""
        try:
            declared = hook()
        except Exception as exc:
            raise origin.error(f"its quantoracle_backends() hook raised {_describe(exc)}", exc)
        if not isinstance(declared, Sequence) or isinstance(declared, str):
            raise origin.error(
                f"its quantoracle_backends() hook returned {_short(declared)}, not a list of backends"
            )
        for backend in declared:
            if not isinstance(backend, Backend) or not isinstance(backend.spec, BackendSpec):
                raise origin.error(
                    f"its quantoracle_backends() hook returned {_short(backend)}, which is not a "
                    "backend: it needs a `spec: BackendSpec` and `prepare` / `apply` methods"
                )
        return declared


def _strict_from_env() -> bool:
    value = os.environ.get(ENV_STRICT, "")
    if value not in ("", "0", "1"):
        raise OptionError(
            f"{ENV_STRICT}={value!r}: use 1 (a broken plugin raises PluginError) or 0 / unset "
            "(it is recorded in Registry.broken and the other backends keep working)"
        )
    return value == "1"


def _version(distribution: str) -> str | None:
    if distribution == BUILTIN_DISTRIBUTION:  # also when run from a source tree (PYTHONPATH)
        from quantoracle._version import __version__

        return __version__
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry (built-ins plus entry points), created on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
