"""Tensor- and expert-parallel NVFP4 layers on torch.distributed (gloo, CPU processes).

Every sharding of :class:`NVFP4Linear` and :class:`NVFP4FusedMoE` built with
``from_checkpoint(..., parallel=ParallelConfig(...), group=...)`` computes what the unsharded
layer computes on the same checkpoint (W4A16, and W4A4 under ``activation_fallback="emulate"``,
float32 activations, reference backend), and shardings that cannot work are typed errors.

Rank mapping. A sharded layer runs on a process group of ``tp * ep`` ranks; group rank ``r`` is
``tp_rank = r % tp``, ``ep_rank = r // tp``, i.e. ``r = ep_rank * tp + tp_rank``
(:func:`parallel_for`; the layers check it): the tensor-parallel ranks of one expert shard are
neighbours, as in Megatron and vLLM. A MoE layer all-reduces over its whole group (every rank
holds a partial sum: a slice of the intermediate dimension of some experts); a Linear's group is
its tensor-parallel group. Here the groups are consecutive ranks of the world.

One process group per world size (2 and 4) runs every check (a module fixture spawns both worlds
at once); each rank writes its measurements to a JSON file that the tests below read.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from quantoracle import (
    Device,
    NoBackendError,
    NVFP4FusedMoE,
    NVFP4Linear,
    ParallelConfig,
    Problem,
    ProblemError,
    W4A16_NVFP4,
    resolve,
)
from quantoracle.demo import FloatModel, ToyConfig, make_model
from quantoracle.schemes.checkpoint import Checkpoint, write_checkpoint

TOY = ToyConfig(layers=1, experts=8, hidden=64, intermediate=64, top_k=2, tokens=32)
EXPERTS = "model.layers.0.mlp.experts"
WIDE = "model.layers.0.wide_proj"  # Linear, K=64 -> N=128
BACK = "model.layers.0.back_proj"  # Linear, K=128 -> N=64: WIDE's output is its input
NARROW = "model.layers.0.narrow_proj"  # Linear, K=48: K/2 = 24 holds no whole scale block
LINEAR_SHAPE = {WIDE: (128, 64), BACK: (64, 128), NARROW: (32, 48)}  # [N, K]
SCHEMES = {"w4a16": "w4a16_nvfp4", "w4a4": "w4a4_nvfp4"}  # served with activation_fallback="emulate"
WORLDS = (2, 4)
DEADLINE_S = 120  # a hung collective fails the test instead of the CI job

# Equal "to fp32 rounding", not bitwise: a tensor-parallel row split (row-parallel Linear, the
# MoE down projection over I/tp) computes partial dot products per rank and the all-reduce adds
# them, so (a+b)+(c+d) replaces ((a+b)+c)+d; expert parallelism sums the top-k expert outputs of
# a token on different ranks, then across ranks; and BLAS picks its blocking (the order of the
# K-loop) by shape, so even a column split may round differently. Float addition is not
# associative: each reordering moves a result by an ulp or two (|out| < 4 here; ulp(4) = 4.8e-7).
RTOL = ATOL = 1e-5


@dataclass(frozen=True)
class Sharding:
    """One sharded layer: groups of ``tp * ep`` consecutive ranks each run it independently."""

    layer: Literal["linear", "moe", "pair"]  # pair: column-parallel WIDE feeding row-parallel BACK
    tp: int = 1
    ep: int = 1
    tp_dim: Literal["column", "row"] = "column"

    @property
    def ranks(self) -> int:
        return self.tp * self.ep

    def __str__(self) -> str:
        dim = f" {self.tp_dim}" if self.layer == "linear" else ""
        split = "x".join(f"{name}{size}" for name, size in (("tp", self.tp), ("ep", self.ep)) if size > 1)
        return f"{self.layer}{dim} {split}"


SHARDINGS = (
    Sharding("linear", tp=2, tp_dim="column"),
    Sharding("linear", tp=2, tp_dim="row"),
    Sharding("moe", tp=2),
    Sharding("moe", ep=2),
    Sharding("linear", tp=4, tp_dim="column"),
    Sharding("linear", tp=4, tp_dim="row"),
    Sharding("moe", tp=4),
    Sharding("moe", ep=4),
    Sharding("moe", tp=2, ep=2),
    Sharding("pair", tp=2),
    Sharding("pair", tp=4),
)
# Every sharding runs in every world it fits: in world 4 the 2-rank shardings run on the
# subgroups {0, 1} and {2, 3}, which checks that a layer uses the group it is given.
CHECKS = [(world, s) for world in WORLDS for s in SHARDINGS if s.ranks <= world]


def parallel_for(local_rank: int, sharding: Sharding) -> ParallelConfig:
    """The ParallelConfig of local rank ``local_rank`` (0 .. tp*ep-1) of a sharding's group."""
    return ParallelConfig.for_rank(local_rank, sharding.tp, sharding.ep, sharding.tp_dim)


def _inputs(kind: str) -> list[tuple[torch.Tensor, ...]]:
    """The same inputs on every rank: a Linear sees ``[3, 5, K]`` and ``[1, K]``; the MoE one token
    (most ranks of EP4 then hold no routed expert) and 24, with router logits."""
    gen = torch.Generator().manual_seed(7)
    if kind in ("linear", "pair"):
        return [(torch.randn(3, 5, 64, generator=gen),), (torch.randn(1, 64, generator=gen),)]
    return [(torch.randn(m, TOY.hidden, generator=gen), torch.randn(m, TOY.experts, generator=gen)) for m in (1, 24)]


class _Pair:
    """WIDE column-parallel without the all-gather, its output shard fed straight to BACK
    row-parallel (``gather_output=False`` / ``input_is_parallel=True``): the Megatron MLP pairing."""

    def __init__(self, checkpoint: Checkpoint, options: dict[str, Any]) -> None:
        parallel = options.pop("parallel")
        self.first = NVFP4Linear.from_checkpoint(
            checkpoint, WIDE, gather_output=False, parallel=parallel.model_copy(update={"tp_dim": "column"}), **options)
        self.second = NVFP4Linear.from_checkpoint(
            checkpoint, BACK, input_is_parallel=True, parallel=parallel.model_copy(update={"tp_dim": "row"}), **options)
        self.backend, self.resolution = self.second.backend, self.second.resolution

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _build(kind: str, checkpoint: Checkpoint, parallel: ParallelConfig = ParallelConfig(), group: Any = None):
    options = dict(dtype=torch.float32, activation_fallback="emulate", parallel=parallel, group=group)
    if kind == "pair":
        return _Pair(checkpoint, options)
    if kind == "linear":
        return NVFP4Linear.from_checkpoint(checkpoint, WIDE, **options)
    return NVFP4FusedMoE.from_checkpoint(checkpoint, EXPERTS, top_k=TOY.top_k, **options)


def _shard_read(layer) -> dict[str, int]:
    """What this rank read from disk (the reference backend's ``prepare`` keeps the tensors)."""
    if isinstance(layer, _Pair):
        return {"rows": layer.first.prepared.state.rows, "cols": layer.second.prepared.state.cols}
    weights = layer.prepared.state
    if isinstance(layer, NVFP4Linear):
        return {"rows": weights.rows, "cols": weights.cols}
    return {"first_expert": weights.first_expert, "experts": weights.experts, "intermediate": weights.intermediate}


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    diff = (got - want).abs().max().item()
    return {
        "shape": list(got.shape),
        "max_abs": diff,
        "max_rel": diff / want.abs().max().item(),
        "close": torch.allclose(got, want, rtol=RTOL, atol=ATOL),
        "bitwise": torch.equal(got, want),
        "digest": hashlib.sha256(got.contiguous().numpy().tobytes()).hexdigest()[:16],
    }


def _check(sharding: Sharding, checkpoint: Checkpoint, unsharded, rank: int, groups: dict) -> dict[str, Any]:
    start = rank - rank % sharding.ranks
    parallel = parallel_for(rank - start, sharding)
    layer = _build(sharding.layer, checkpoint, parallel, groups.get((start, sharding.ranks)))
    return {
        "group": start // sharding.ranks,
        "parallel": parallel.model_dump(),
        "read": _shard_read(layer),
        "backend": layer.backend,
        "fallback": layer.resolution.fallback,
        "outputs": [_compare(layer(*args), unsharded(*args)) for args in _inputs(sharding.layer)],
    }


def _misuse(checkpoint: Checkpoint, rank: int) -> dict[str, str | None]:
    """Layers built on a group that does not match their ParallelConfig (world 4): the error each
    rank gets, or None. Nothing runs a collective: ranks that pass would wait for those that fail."""
    probes = {
        # a 2-way tensor-parallel MoE on the default 4-rank group would add each half of I twice
        "tp2 on 4 ranks": ParallelConfig(tp_size=2, tp_rank=rank % 2),
        # tp and ep swapped: ranks 1 and 2 claim each other's shard
        "tp2xep2 transposed": ParallelConfig(tp_size=2, tp_rank=rank // 2, ep_size=2, ep_rank=rank % 2),
    }
    errors: dict[str, str | None] = {}
    for probe, parallel in probes.items():
        try:
            _build("moe", checkpoint, parallel)
            errors[probe] = None
        except ProblemError as error:
            errors[probe] = str(error)
    return errors


def _worker(rank: int, world: int, rendezvous: str, checkpoints: dict[str, str], out_dir: str) -> None:
    """One rank: every check of this world, on every checkpoint; writes ``rank{rank}.json``, or
    ``rank{rank}.error`` (the traceback) and exits non-zero."""
    torch.set_num_threads(1)  # 6 processes share CI's 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        # new_group is collective: every rank creates every subgroup, in the same order.
        sizes = sorted({s.ranks for _, s in CHECKS if s.ranks < world})
        groups = {
            (start, n): dist.new_group(list(range(start, start + n))) for n in sizes for start in range(0, world, n)
        }
        results: dict[str, Any] = {}
        for label, directory in checkpoints.items():
            with Checkpoint.open(directory) as checkpoint:
                unsharded = {kind: _build(kind, checkpoint) for kind in ("linear", "moe", "pair")}
                for sharding in (s for w, s in CHECKS if w == world):
                    unsharded_layer = unsharded[sharding.layer]
                    results[f"{label} {sharding}"] = _check(sharding, checkpoint, unsharded_layer, rank, groups)
                if world == 4:
                    results[f"{label} misuse"] = _misuse(checkpoint, rank)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The toy model (8 experts, hidden 64, intermediate 64) plus two Linears, written once as
    ModelOpt W4A16 and W4A4 checkpoints (W4A4 input scales from a float calibration pass)."""
    state = make_model(TOY)
    gen = torch.Generator().manual_seed(3)
    for name, shape in LINEAR_SHAPE.items():
        state[f"{name}.weight"] = (torch.randn(*shape, generator=gen) / shape[1] ** 0.5).bfloat16()
    calibration = FloatModel(TOY, state, torch.device("cpu"))
    calibration(torch.randn(TOY.tokens, TOY.hidden, generator=gen))
    amax = {**calibration.amax, **dict.fromkeys(LINEAR_SHAPE, 4.0)}
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        label: write_checkpoint(root / label, state, scheme, input_amax=amax, progress=False)
        for label, scheme in SCHEMES.items()
    }


def _rank_errors(directories) -> str:
    """Every rank's traceback, first failure first: the rank that failed first is the cause, the
    others usually lost a peer in a collective."""
    errors = sorted((e for d in directories for e in d.glob("rank*.error")), key=lambda e: e.stat().st_mtime)
    return "\n".join(f"---- {e.parent.name} {e.stem}:\n{e.read_text()}" for e in errors)


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    """Per world size, each rank's results. Both worlds run at once; a rank's exception fails
    every test here with its traceback; ranks still running at the deadline are killed.

    The ranks are forked: a spawned process spends ~5 s importing torch, forked ones share the
    parent's modules (each sets one intra-op thread before its first torch op, so no OpenMP
    pool crosses the fork)."""
    paths = {label: str(path) for label, path in checkpoints.items()}
    contexts = {}
    for world in WORLDS:
        out = tmp_path_factory.mktemp(f"world{world}")
        args = (world, str(out / "rendezvous"), paths, str(out))
        context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="fork")
        contexts[world] = (out, context)
    deadline = time.monotonic() + DEADLINE_S
    failure: Exception | None = None
    try:
        for world, (_, context) in contexts.items():
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"world {world}: ranks still running after {DEADLINE_S} s (a hung collective?)")
    except (TimeoutError, ProcessException) as error:  # a rank raised, died, or hangs
        failure = error
    finally:
        for _, context in contexts.values():
            for process in context.processes:
                if process.is_alive():
                    process.kill()
    if failure is not None:
        pytest.fail(f"{failure}\n{_rank_errors(out for out, _ in contexts.values())}", pytrace=False)
    return {
        world: [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]
        for world, (out, _) in contexts.items()
    }


def test_rank_mapping_puts_tensor_parallel_ranks_side_by_side():
    sharding = Sharding("moe", tp=2, ep=3)
    configs = [parallel_for(rank, sharding) for rank in range(6)]
    assert [(p.tp_rank, p.ep_rank) for p in configs] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert [p.group_rank for p in configs] == list(range(6))
    with pytest.raises(ProblemError, match="rank=6"):
        parallel_for(6, sharding)


@pytest.mark.parametrize("label", SCHEMES)
@pytest.mark.parametrize(("world", "sharding"), CHECKS, ids=[f"world{w}-{s}" for w, s in CHECKS])
def test_sharded_layer_equals_the_unsharded_layer(results, label, world, sharding):
    ranks = [rank[f"{label} {sharding}"] for rank in results[world]]
    for rank, got in enumerate(ranks):
        local = rank % sharding.ranks
        assert got["group"] == rank // sharding.ranks
        assert got["parallel"] == parallel_for(local, sharding).model_dump()
        assert (got["backend"], got["fallback"]) == ("reference", None if label == "w4a16" else "emulate")
        for out in got["outputs"]:
            assert out["close"], f"rank {rank}: max |diff| {out['max_abs']:.3g}, relative {out['max_rel']:.3g}"
    # Every rank of a group returns the same bytes (the next layer runs replicated).
    for group in range(world // sharding.ranks):
        members = ranks[group * sharding.ranks : (group + 1) * sharding.ranks]
        assert len({tuple(o["digest"] for o in m["outputs"]) for m in members}) == 1


@pytest.mark.parametrize(("world", "sharding"), CHECKS, ids=[f"world{w}-{s}" for w, s in CHECKS])
def test_each_rank_reads_only_its_shard(results, world, sharding):
    """Column-parallel: N/tp rows; row-parallel: K/tp columns; MoE: E/ep whole experts starting at
    ep_rank*E/ep, each with I/tp of the intermediate dimension."""
    n, k = LINEAR_SHAPE[WIDE]
    for rank, got in enumerate(r[f"w4a16 {sharding}"] for r in results[world]):
        p = parallel_for(rank % sharding.ranks, sharding)
        if sharding.layer == "linear":
            column = p.tp_dim == "column"
            want = {"rows": n // p.tp_size if column else n, "cols": k if column else k // p.tp_size}
        elif sharding.layer == "pair":  # WIDE's rows and BACK's columns: the same N/tp slice
            want = {"rows": n // p.tp_size, "cols": n // p.tp_size}
        else:
            local = TOY.experts // p.ep_size
            want = {"first_expert": p.ep_rank * local, "experts": local, "intermediate": TOY.intermediate // p.tp_size}
        assert got["read"] == want


def test_a_group_that_does_not_match_the_parallel_config_is_an_error(results):
    misuse = [rank["w4a16 misuse"] for rank in results[4]]
    assert all(m["tp2 on 4 ranks"] and "2 ranks" in m["tp2 on 4 ranks"] for m in misuse)
    assert [m["tp2xep2 transposed"] is not None for m in misuse] == [False, True, True, False]


def test_gather_and_parallel_input_options_belong_to_their_split(checkpoints):
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint:
        with pytest.raises(ProblemError, match="gather_output=False is for column-parallel"):
            NVFP4Linear.from_checkpoint(checkpoint, BACK, dtype=torch.float32, gather_output=False,
                                        parallel=ParallelConfig(tp_dim="row"))
        with pytest.raises(ProblemError, match="input_is_parallel=True for row-parallel"):
            NVFP4Linear.from_checkpoint(checkpoint, WIDE, dtype=torch.float32, input_is_parallel=True)


def test_a_sharded_layer_needs_torch_distributed(checkpoints):
    assert not dist.is_initialized()  # the ranks run in child processes
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint, pytest.raises(ProblemError, match="init_process_group"):
        _build("linear", checkpoint, ParallelConfig(tp_size=2))


# ---- shardings that cannot work: typed errors, through the public API ----


def _problem(kind: str, n: int, k: int, **parallel: Any) -> Problem:
    moe = dict(experts=TOY.experts, top_k=TOY.top_k) if kind == "moe" else {}
    return Problem(kind=kind, scheme=W4A16_NVFP4, device=Device.parse("cpu"), dtype="float32",
                   n=n, k=k, parallel=ParallelConfig(**parallel), **moe)


@pytest.mark.parametrize(("kind", "n", "k", "parallel", "found"), [
    ("linear", 32, 48, dict(tp_size=2, tp_dim="row"), "24"),  # K/tp = 24
    ("moe", 64, 64, dict(tp_size=8), "8"),  # down's K = I/tp = 8
    ("moe", 48, 64, dict(tp_size=2, ep_size=2), "24"),  # I/tp = 24
])
def test_a_shard_without_whole_scale_blocks_is_rejected_by_block_alignment(kind, n, k, parallel, found):
    problem = _problem(kind, n, k, **parallel)
    with pytest.raises(NoBackendError) as error:
        resolve(problem)
    assert error.value.rejections, "every registered backend is listed"
    for name, failures in error.value.rejections.items():
        alignment = [f for f in failures if f.code == "block_alignment"]
        assert alignment and alignment[0].found == found and alignment[0].accepted == "multiple of 16", name


@pytest.mark.parametrize(("kind", "parallel"), [
    ("linear", ParallelConfig(tp_size=2, tp_dim="row")),  # narrow_proj: K/tp = 24
    ("moe", ParallelConfig(tp_size=8)),  # I/tp = 8
])
def test_from_checkpoint_rejects_a_misaligned_shard_like_resolve(checkpoints, kind, parallel):
    """Before reading anything: the same report as resolve, not the reader's ProblemError."""
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint, pytest.raises(NoBackendError) as error:
        if kind == "linear":
            NVFP4Linear.from_checkpoint(checkpoint, NARROW, dtype=torch.float32, parallel=parallel)
        else:
            NVFP4FusedMoE.from_checkpoint(checkpoint, EXPERTS, top_k=2, dtype=torch.float32, parallel=parallel)
    assert all(any(f.code == "block_alignment" for f in fs) for fs in error.value.rejections.values())


def test_experts_not_divisible_by_ep_size_is_a_problem_error(checkpoints):
    with pytest.raises(ProblemError, match="experts=8 is not divisible by ep_size=3"):
        _problem("moe", 64, 64, ep_size=3)
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint, pytest.raises(ProblemError, match="ep_size=3"):
        NVFP4FusedMoE.from_checkpoint(checkpoint, EXPERTS, top_k=2, parallel=ParallelConfig(ep_size=3, ep_rank=1))


@pytest.mark.parametrize("parallel", [
    dict(tp_size=2, tp_rank=2), dict(tp_size=2, tp_rank=-1), dict(ep_size=4, ep_rank=4), dict(tp_size=0),
])
def test_a_rank_out_of_range_is_a_problem_error(checkpoints, parallel):
    with pytest.raises(ProblemError, match="out of range|at least 1"):
        ParallelConfig(**parallel)
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint, pytest.raises(ProblemError):
        NVFP4FusedMoE.from_checkpoint(checkpoint, EXPERTS, top_k=2, parallel=ParallelConfig(**parallel))


def test_a_linear_with_expert_parallelism_is_a_problem_error(checkpoints):
    with Checkpoint.open(checkpoints["w4a16"]) as checkpoint, pytest.raises(ProblemError, match="ep_size"):
        NVFP4Linear.from_checkpoint(checkpoint, WIDE, parallel=ParallelConfig(ep_size=2))


def test_an_indivisible_row_split_names_k():
    with pytest.raises(ProblemError, match=r"^k=48 is not divisible by tp_size=5"):
        _problem("linear", 48, 48, tp_size=5, tp_dim="row")
