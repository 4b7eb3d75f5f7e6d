"""The plugin contract. A plugin is any module or object with functions named like these,
marked ``@quantoracle.oracle.hookimpl``; the built-in backends are plugins of exactly this kind."""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from quantoracle.oracle.spec import Backend

PROJECT = "quantoracle"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def quantoracle_backends() -> Sequence[Backend]:
    """Return the backends this plugin provides.

    Each element carries ``spec`` (a :class:`~quantoracle.oracle.spec.BackendSpec`, pure data) and
    implements ``prepare(weights, problem)`` and ``apply(prepared, x, topk_weights=None,
    topk_ids=None)`` (see :class:`~quantoracle.oracle.spec.Backend`).

    Called by the registry once after plugins change, never per resolve; results of all plugins
    are collected (not ``firstresult``). Importing the plugin and calling this hook must be
    cheap and must not touch a GPU: declare requirements in ``spec.requires`` and the device
    rules instead of probing here. Backend names must be unique across all plugins.
    """
