"""The plugin contract. A plugin is any module or object with functions named like these,
marked ``@quantoracle.oracle.hookimpl`` (a marked function of another name is reported as a broken
plugin); the built-in backends are plugins of exactly this kind."""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from quantoracle.oracle.spec import Backend

PROJECT = "quantoracle"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def quantoracle_backends() -> Sequence[Backend]:
    """Return the backends this plugin provides, as a list or tuple.

    Each element carries ``spec`` (a :class:`~quantoracle.oracle.spec.BackendSpec`, pure data) and
    implements ``prepare(weights, problem)`` and ``apply(prepared, x, topk_weights=None,
    topk_ids=None, *, variant=None)`` (see :class:`~quantoracle.oracle.spec.Backend`).

    Called by the registry once after plugins change, never per resolve; results of all plugins
    are collected (not ``firstresult``). Importing the plugin and calling this hook must be
    cheap and must not touch a GPU: declare requirements in ``spec.requires`` and the device
    rules instead of probing here. Backend names must be unique across all plugins.

    Each plugin is isolated: if its module fails to import (a ``BackendSpec`` that fails
    validation at import included), its hook has another signature, raises, returns something
    other than a list or tuple of backends, or declares a name an earlier plugin (built-ins
    first, then entry points by distribution and name) already declared, the registry records a
    :class:`~quantoracle.errors.PluginError` in ``Registry.broken``, logs it once and leaves
    the whole plugin out; the other plugins keep working. ``QUANTORACLE_STRICT_PLUGINS=1`` (or
    ``Registry(strict=True)``) raises it instead.
    """
