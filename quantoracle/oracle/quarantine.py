"""The quarantine: known-bad (backend, device, version, problem) combinations, as data.

An entry rejects every candidate it matches through the ordinary rule ``quarantined``, with its
reason and link. Entries come from three places, all consulted by every resolve:

- shipped with quantoracle (``quantoracle/oracle/data/quarantine.json``);
- a user file: the ``quarantine=`` option or the ``QUANTORACLE_QUARANTINE`` environment variable
  (JSON, or TOML on Python 3.11+: ``[[entry]]`` tables with the fields of :class:`QuarantineEntry`);
- entries the numerics check adds at run time (:func:`add_runtime_entry`; in memory, and written
  to the user file when asked).
"""

from __future__ import annotations

import json
import os
import threading
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from quantoracle.errors import QuarantineError

if TYPE_CHECKING:
    from quantoracle.oracle.spec import Problem

ENV_QUARANTINE = "QUANTORACLE_QUARANTINE"
SHIPPED = Path(__file__).parent / "data" / "quarantine.json"


class QuarantineEntry(BaseModel):
    """One quarantined combination. Every predicate left ``None`` (or empty) matches anything.

    - ``backend`` (required) and ``variant``;
    - ``capabilities``: compute capabilities (``"sm90"``, ``"sm100-sm103"``, ``"sm80+"``);
      ``gpu_name``: a case-insensitive glob of the GPU's name (``"*H200*"``);
    - ``versions``: a PEP 440 specifier set on the backend's distribution version (``"<0.2"``);
    - ``schemes`` (scheme names), ``kinds``, ``dtypes``, and exact shapes ``n``, ``k``,
      ``experts``, ``top_k`` (the unsharded problem's);
    - ``min_tokens`` / ``max_tokens``: the batch sizes it applies to;
    - ``reason`` (required) and ``link``: shown in the rejection. ``source`` is filled in on load.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str
    variant: str | None = None
    capabilities: tuple[str, ...] = ()
    gpu_name: str | None = None
    versions: str | None = None
    schemes: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    n: int | None = None
    k: int | None = None
    experts: int | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    reason: str
    link: str | None = None
    source: str = "runtime"

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from quantoracle.oracle.spec import CapabilityRange

        for text in v:
            CapabilityRange.parse(text)
        return v

    @field_validator("versions")
    @classmethod
    def _versions(cls, v: str | None) -> str | None:
        if v is not None:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            try:
                SpecifierSet(v)
            except InvalidSpecifier:
                raise ValueError(f"versions={v!r}: write a PEP 440 specifier such as '<0.2' or '>=1.0,<1.3'") from None
        return v

    def matches(self, backend: str, variant: str | None, problem: "Problem", tokens: int | None,
                gpu_name: str | None, version: str | None) -> bool:
        """Whether this entry covers ``backend``/``variant`` serving ``problem`` at ``tokens``
        (``None``: some batch size, so any token range overlaps) on a GPU named ``gpu_name``
        with the backend's distribution at ``version``."""
        from quantoracle.oracle.spec import CapabilityRange

        if backend != self.backend or (self.variant is not None and variant != self.variant):
            return False
        cap = problem.device.capability
        if self.capabilities and (cap is None or not any(CapabilityRange.parse(c).contains(cap)
                                                          for c in self.capabilities)):
            return False
        if self.gpu_name is not None and (gpu_name is None or not fnmatchcase(gpu_name.lower(), self.gpu_name.lower())):
            return False
        if self.versions is not None:
            from packaging.specifiers import SpecifierSet

            if version is None or version not in SpecifierSet(self.versions, prereleases=True):
                return False
        if (self.schemes and problem.scheme.name not in self.schemes) or (self.kinds and problem.kind not in self.kinds) \
                or (self.dtypes and problem.dtype not in self.dtypes):
            return False
        for field in ("n", "k", "experts", "top_k"):
            want = getattr(self, field)
            if want is not None and getattr(problem, field) != want:
                return False
        low, high = self.min_tokens or 1, self.max_tokens
        if tokens is None:
            return True  # a request for every batch size overlaps any range
        return low <= tokens and (high is None or tokens <= high)

    @property
    def token_bounds(self) -> tuple[int, ...]:
        """The token counts where this entry starts or stops applying (plan breakpoints)."""
        bounds = [self.min_tokens or 1]
        if self.max_tokens is not None:
            bounds.append(self.max_tokens + 1)
        return tuple(bounds)

    def describe(self) -> str:
        parts = [self.backend + (f"/{self.variant}" if self.variant else "")]
        for field in ("capabilities", "gpu_name", "versions", "schemes", "kinds", "dtypes", "n", "k",
                      "experts", "top_k", "min_tokens", "max_tokens"):
            value = getattr(self, field)
            if value not in (None, ()):
                parts.append(f"{field}={','.join(value) if isinstance(value, tuple) else value}")
        return " ".join(parts)


def load_entries(path: str | os.PathLike[str], source: str | None = None) -> tuple[QuarantineEntry, ...]:
    """The entries of a JSON (``{"entries": [...]}`` or a list) or TOML (``[[entry]]``) file.
    Raises :class:`~quantoracle.errors.QuarantineError` naming the file, entry and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise QuarantineError(f"quarantine file {path}: cannot read it ({err.strerror})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
            key, form = "entry", "[[entry]] tables"
        else:
            data = json.loads(text) if text.strip() else []
            key, form = "entries", '{"entries": [...]} or a list of entries'
    except ImportError:
        raise QuarantineError(f"quarantine file {path}: TOML needs Python 3.11 or newer; write it as JSON") from None
    except ValueError as err:
        raise QuarantineError(f"quarantine file {path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({err})") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {key})
        if unknown:  # a misspelt key would otherwise quarantine nothing, silently
            raise QuarantineError(f"quarantine file {path}: unknown top-level key {', '.join(map(repr, unknown))}; "
                                  f"write {form}")
        data = data.get(key, [])
    if not isinstance(data, list):
        raise QuarantineError(f"quarantine file {path}: expected {form}")
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise QuarantineError(f"quarantine file {path}, entry {i}: expected an object of fields, not {item!r}")
        try:
            entries.append(QuarantineEntry.model_validate({**item, "source": source or str(path)}))
        except ValidationError as err:
            e = err.errors()[0]
            raise QuarantineError(f"quarantine file {path}, entry {i}: field {'.'.join(map(str, e['loc'])) or '(entry)'}: "
                                  f"{e['msg']}") from None
    return tuple(entries)


_runtime: list[QuarantineEntry] = []
_runtime_lock = threading.Lock()
_runtime_generation = 0


def add_runtime_entry(entry: QuarantineEntry, persist_to: str | os.PathLike[str] | None = None) -> None:
    """Quarantine ``entry`` for the rest of this process (the numerics check calls this), and
    append it to the JSON file ``persist_to`` when given (created if absent; a ``.toml`` path is
    a :class:`~quantoracle.errors.QuarantineError`: entries are written as JSON only)."""
    global _runtime_generation
    if persist_to is not None and Path(persist_to).suffix == ".toml":
        raise QuarantineError(f"persist_to={str(persist_to)!r}: run-time entries are written as JSON; "
                              "name a .json file (and pass it as quarantine= or $QUANTORACLE_QUARANTINE)")
    with _runtime_lock:
        _runtime.append(entry)
        _runtime_generation += 1
    if persist_to is not None:
        path = Path(persist_to)
        existing = list(load_entries(path)) if path.exists() else []
        data = [e.model_dump(mode="json", exclude={"source"}, exclude_defaults=True) for e in [*existing, entry]]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"entries": data}, indent=2) + "\n")
        os.replace(tmp, path)


def clear_runtime_entries() -> None:
    """Forget the entries added at run time (tests; a new process starts without them)."""
    global _runtime_generation
    with _runtime_lock:
        _runtime.clear()
        _runtime_generation += 1


def runtime_state() -> tuple[int, tuple[QuarantineEntry, ...]]:
    with _runtime_lock:
        return _runtime_generation, tuple(_runtime)
