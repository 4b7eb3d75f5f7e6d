"""Integrations with model libraries. Each submodule imports its library on import; none is a
core dependency (``pip install 'quantoracle[transformers]'`` for
:mod:`quantoracle.integrations.transformers`)."""
