"""Measured costs that rank the candidates of a token bucket: tuning caches.

A tuning cache is a JSON file written by ``quantoracle tune``: the :class:`Fingerprint` it was
measured under and one :class:`Measurement` (µs) per (layer shape, candidate, token count) of
the ladder :data:`LADDER`. Caches consulted, first match wins:

1. the ``tuning=`` option, or the ``QUANTORACLE_TUNING`` environment variable (a path);
2. the default user cache :func:`user_cache` (where ``tune`` writes);
3. the caches shipped with quantoracle (``quantoracle/oracle/data/tuning_*.json``).

A cache applies only when its fingerprint matches the one of the answer (``match="exact"``: GPU
name, SM count, memory, driver, CUDA, torch, triton and every plugin distribution version;
``match="capability"``, the shipped caches: the compute capability and the versions of the
measured backends' distributions). A cache that does not match is not used, and the answer says
so (:attr:`Tuning.notes`). Within an applicable cache, the measured shape nearest to the
problem (log-distance over n, k, experts, top_k, same kind, scheme and dtype) and the ladder
point nearest to the token count decide; the answer names that measurement.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from quantoracle.errors import TuningCacheError
from quantoracle.oracle.fingerprint import Fingerprint
from quantoracle.oracle.spec import Problem

LADDER: tuple[int, ...] = tuple(2**i for i in range(14))  # 1, 2, 4, ..., 8192
ENV_TUNING = "QUANTORACLE_TUNING"
SHIPPED_DIR = Path(__file__).parent / "data"


class Measurement(BaseModel):
    """One timing: ``candidate`` (``backend`` or ``backend/variant``) serving a layer of this
    kind, served scheme, dtype and unsharded shape at ``tokens`` tokens took ``us`` µs
    (median of CUDA-graph replays)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    scheme: str
    dtype: str
    n: int
    k: int
    experts: int | None = None
    top_k: int | None = None
    tokens: int
    candidate: str
    us: float


class TuningCache(BaseModel):
    """A tuning cache file (``quantoracle tune`` writes it, atomically)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    fingerprint: Fingerprint
    match: Literal["exact", "capability"] = "exact"
    created: str = ""
    command: str = ""
    measurements: tuple[Measurement, ...] = ()

    def mismatch(self, current: Fingerprint, backends: dict[str, tuple[str, ...]]) -> str | None:
        """``None`` when this cache applies to answers made under ``current``, else why not.
        ``backends``: the distributions each backend depends on (its plugin's, its kernel
        libraries')."""
        mine = self.fingerprint
        if self.match == "capability":
            # a measured backend's distributions must be at the measured versions where they
            # are installed here; a backend not installed here serves nothing, so its rows
            # cannot mislead
            fields = ["device"]
            measured = {m.candidate.split("/")[0] for m in self.measurements}
            dists = sorted({d for b, ds in backends.items() if b in measured for d in ds
                            if current.package_version(d) is not None})
        else:
            fields = ["device", "gpu_name", "sm_count", "memory_bytes", "driver", "cuda", "torch", "triton"]
            dists = sorted(dict(mine.packages) | dict(current.packages))
        for name in fields:
            if getattr(mine, name) != getattr(current, name):
                return f"{name} {getattr(mine, name)} != {getattr(current, name)} here"
        for dist in dists:
            if mine.package_version(dist) != current.package_version(dist):
                return f"{dist} {mine.package_version(dist)} != {current.package_version(dist)} here"
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TuningCache":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as err:
            raise TuningCacheError(f"tuning cache {path}: cannot read it ({err.strerror})") from None
        except ValidationError as err:
            e = err.errors()[0]
            raise TuningCacheError(
                f"tuning cache {path}: field {'.'.join(map(str, e['loc']))}: {e['msg']}; "
                "re-run `quantoracle tune` to rewrite it"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a temporary file beside ``path``, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(self.model_dump_json(indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise TuningCacheError(f"tuning cache {path}: cannot write it ({err.strerror})") from None


@dataclass(frozen=True)
class Decision:
    """The measurement that ranks a bucket: the cache, the measured shape and token count, and
    µs per measured candidate."""

    source: str
    shape: str
    tokens: int
    costs: dict[str, float] = field(hash=False)

    def describe(self) -> str:
        costs = ", ".join(f"{c} {us:.1f}" for c, us in sorted(self.costs.items(), key=lambda kv: kv[1]))
        return f"measured at {self.shape}, M={self.tokens} ({self.source}): {costs} µs"


class _Index:
    """A cache's measurements grouped for lookup: (kind, scheme, dtype) -> shape -> tokens ->
    candidate -> µs."""

    def __init__(self, cache: TuningCache) -> None:
        self.groups: dict[tuple, dict[tuple, dict[int, dict[str, float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(dict)))
        for m in cache.measurements:
            self.groups[(m.kind, m.scheme, m.dtype)][(m.n, m.k, m.experts, m.top_k)][m.tokens][m.candidate] = m.us


def _shape_text(kind: str, shape: tuple) -> str:
    n, k, experts, top_k = shape
    return f"moe E={experts} H={k} I={n} top{top_k}" if kind == "moe" else f"linear {n}x{k}"


def _log_distance(a: tuple, b: tuple) -> float:
    return sum(abs(math.log2(x / y)) for x, y in zip(a, b) if x and y)


def nearest_ladder(tokens: int, ladder: tuple[int, ...]) -> int:
    """The ladder point nearest to ``tokens`` in log scale (ties to the smaller)."""
    return min(ladder, key=lambda m: (abs(math.log2(tokens) - math.log2(m)), m))


class Tuning:
    """The caches an answer consults, each with whether it applies and why not.

    Identity-hashed: built once per (options, environment, files), it keys the resolve cache.
    """

    def __init__(self, caches: list[tuple[str, TuningCache]]) -> None:
        self.caches = caches
        self._indexes = [(source, cache, _Index(cache)) for source, cache in caches]

    def applicable(self, current: Fingerprint, backends: dict[str, tuple[str, ...]]) -> tuple[list, list[str]]:
        """(the applicable (source, index) pairs in priority order, a note per cache that is not)."""
        usable, notes = [], []
        for source, cache, index in self._indexes:
            why = cache.mismatch(current, backends)
            if why is None:
                usable.append((source, index))
            elif not (source.startswith("shipped ") and cache.fingerprint.device != current.device):
                # a shipped cache for another device class is not stale, just not for here
                notes.append(f"tuning cache {source} not used: its fingerprint does not match ({why})")
        return usable, notes

    @staticmethod
    def _nearest(usable: list, problem: Problem) -> tuple[str, tuple, dict[int, dict[str, float]]] | None:
        """(source, measured shape, its measurements by token count) of the first applicable
        cache holding the problem's kind, served scheme and dtype: the shape nearest in log scale."""
        key = (problem.kind, problem.scheme.name, problem.dtype)
        want = (problem.n, problem.k, problem.experts, problem.top_k)
        for source, index in usable:
            shapes = index.groups.get(key)
            if shapes:
                shape = min(shapes, key=lambda s: (_log_distance(s, want), s))
                return source, shape, shapes[shape]
        return None

    @staticmethod
    def decide(usable: list, problem: Problem, tokens: int) -> Decision | None:
        """The measurement for ``problem`` at ``tokens``: the nearest shape's (:meth:`_nearest`)
        at the ladder point nearest to ``tokens``."""
        found = Tuning._nearest(usable, problem)
        if found is None:
            return None
        source, shape, by_tokens = found
        m = nearest_ladder(tokens, tuple(sorted(by_tokens)))
        return Decision(source, _shape_text(problem.kind, shape), m, dict(by_tokens[m]))

    @staticmethod
    def breakpoints(usable: list, problem: Problem) -> tuple[int, ...]:
        """The token counts where :meth:`decide`'s answer can change (first M of each ladder
        point's log-nearest range)."""
        found = Tuning._nearest(usable, problem)
        if found is None:
            return ()
        ladder = sorted(found[2])
        # the first M whose nearest point is ladder[i+1]: just above the geometric midpoint
        return tuple(math.floor(math.sqrt(a * b)) + 1 for a, b in zip(ladder, ladder[1:]))


def user_cache() -> Path:
    """Where ``quantoracle tune`` writes by default: ``$XDG_CACHE_HOME/quantoracle/tuning.json``
    (``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantoracle" / "tuning.json"


@lru_cache(maxsize=1)
def _shipped() -> tuple[Path, ...]:
    return tuple(sorted(SHIPPED_DIR.glob("tuning_*.json")))  # installed files: read once


def shipped_caches() -> list[Path]:
    return list(_shipped())


def load_tuning(option: str | os.PathLike[str] | None) -> Tuning:
    """The caches for the ``tuning=`` option (a path; ``"none"`` consults no cache at all),
    else ``$QUANTORACLE_TUNING``, then the user cache and the shipped ones."""
    if option == "none":
        return Tuning([])
    paths: list[Path] = []
    explicit = option or os.environ.get(ENV_TUNING)
    if explicit:
        if not Path(explicit).exists():
            raise TuningCacheError(f"tuning cache {explicit}: no such file (from "
                                   f"{'tuning=' if option else '$' + ENV_TUNING}); run `quantoracle tune --out {explicit}`")
        paths.append(Path(explicit))
    if user_cache().exists():
        paths.append(user_cache())
    paths += shipped_caches()
    return Tuning([(_source_name(p), TuningCache.load(p)) for p in paths])


def _source_name(path: Path) -> str:
    return f"shipped {path.name}" if path.parent == SHIPPED_DIR else str(path)


def cache_key(option: str | os.PathLike[str] | None) -> tuple:
    """What :func:`load_tuning`'s result depends on: the option, the variable, and the
    modification times of the explicit and user caches (a rewritten cache is re-read; the
    shipped ones are installed files). Called on every resolve: a few stats, no globbing."""
    explicit = option or os.environ.get(ENV_TUNING)
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantoracle", "tuning.json")
    return (str(option), str(explicit), _mtime(explicit), user, _mtime(user))


def _mtime(path: str | os.PathLike[str] | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path and path != "none" else None
    except OSError:
        return None


__all__ = ["Decision", "LADDER", "Measurement", "Tuning", "TuningCache", "load_tuning", "nearest_ladder", "user_cache"]
