"""octav_kernels.distributed with the gloo backend on CPU: 2 and 3 processes holding uneven
shards of one global tensor (one of them empty) must reach the scale single-process OCTAV
gives on the whole tensor, bit-identical on every rank; the Quantizer's process_group option
(dynamic training and static calibration) likewise."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_scale_close, make_data

import octav_kernels as ok
from octav_kernels import distributed

N = 3001  # rows of the global data


def global_data():
    """The same on every process: a 1-D tensor, an unsigned one and a [N, 7] activation."""
    return {"flat": make_data((N,), seed=1), "relu": make_data((N,), signed=False, seed=2),
            "act": make_data((N, 7), seed=3), "large": make_data((20 * N,), seed=4)}


def feature_importance():
    """A [7] importance of the activation's features, the fourth 0."""
    return torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0, 0.25, 1.5])


def element_importance():
    """A per-element importance of the flat data."""
    return torch.linspace(0.0, 2.0, N) ** 2


def shard_bounds(world: int, rank: int, n: int = N) -> tuple[int, int]:
    """Uneven shards of n rows; with 3 ranks the middle one is empty."""
    cuts = {2: [0, n // 3, n], 3: [0, 2 * n // 3, 2 * n // 3, n]}[world]
    return cuts[rank], cuts[rank + 1]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    lo, hi = shard_bounds(world, rank)
    data = {k: v[lo:hi] for k, v in global_data().items()}
    full = global_data()
    r = {}
    r["flat"] = distributed.octav_scale(data["flat"], 4, return_all_reduces=True)
    r["relu"] = distributed.octav_scale(data["relu"], 3, signed=False, return_all_reduces=True)
    r["channel"] = distributed.octav_scale(data["act"], 4, dim=1, return_all_reduces=True)
    r["narrow8"] = distributed.octav_scale(data["flat"], 8, narrow=True,
                                           return_all_reduces=True)
    warm = ok.octav_scale(full["flat"], 4)
    r["warm"] = distributed.octav_scale(data["flat"], 4, init=warm, return_all_reduces=True)
    # Importance-weighted: a per-feature importance (one feature of importance 0: the fallback)
    # and a per-element one, sliced with the data.
    r["weighted_channel"] = distributed.octav_scale(data["act"], 4, dim=1,
                                                    importance=feature_importance(),
                                                    return_all_reduces=True)
    r["weighted_flat"] = distributed.octav_scale(data["flat"], 4,
                                                 importance=element_importance()[lo:hi],
                                                 return_all_reduces=True)
    lo, hi = shard_bounds(world, rank, 20 * N)
    r["large"] = distributed.octav_scale(full["large"][lo:hi], 4, return_all_reduces=True)
    r["max"] = distributed.max_scale(data["act"], dim=1)
    r["mean"] = distributed.all_reduce_mean(torch.tensor([rank + 1.0, 2.0 * rank]))
    # A data-parallel activation quantizer: training forward, and static calibration.
    q = ok.QuantAct(4, process_group="world").train()
    q(data["act"])
    r["quantizer"] = (q.scale.clone(), q.signed)
    c = ok.Quantizer(4, mode="static", process_group="world")
    with ok.calibration(c):
        c(data["flat"][: len(data["flat"]) // 2])
        c(data["flat"][len(data["flat"]) // 2:])
    r["calibrated"] = c.scale.clone()
    r["ddp_nan_raised"] = _ddp_nan_raised(rank, world, full["act"])
    torch.save(r, os.path.join(out, f"{rank}.pt"))
    dist.barrier()
    # Not destroy_process_group and a normal exit: once a process has run DDP, torch 2.13's
    # gloo teardown aborts ("terminate called without an active exception") in about one run
    # in four, a plain nn.Linear under DDP too. The results are saved.
    os._exit(0)


def _ddp_nan_raised(rank: int, world: int, act: torch.Tensor) -> bool:
    """Whether check_finite raises on this rank after two DDP steps, the first with a NaN on
    the last rank. DDP broadcasts buffers from rank 0 at every forward: the GPU NaN/inf flag
    (the deferred path, forced here on the CPU) must not be one, or that NaN would be erased."""
    ok.Quantizer.deferred_check = ("cpu",)
    torch.manual_seed(0)
    model = ok.quantize_model(torch.nn.Sequential(torch.nn.Linear(7, 3)), first_last_bits=None,
                              act_signed=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    bad = act[:8].clone()
    if rank == world - 1:
        bad[0, 0] = float("nan")
    ddp(bad).sum().backward()
    ddp(act[8:16]).sum().backward()
    try:
        ok.check_finite(model)
        return False
    except ValueError:
        return True


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    """The results of every rank of one gloo run."""
    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(out / "store"), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"{r}.pt") for r in range(world)]


def test_scales_match_single_process_and_are_identical_on_every_rank(ranks):
    full = global_data()
    expected = {"flat": ok.octav_scale(full["flat"], 4),
                "relu": ok.octav_scale(full["relu"], 3, signed=False),
                "channel": ok.octav_scale(full["act"], 4, dim=1),
                "narrow8": ok.octav_scale(full["flat"], 8, narrow=True),
                "warm": ok.octav_scale(full["flat"], 4),
                "large": ok.octav_scale(full["large"], 4),
                "weighted_channel": ok.octav_scale(full["act"], 4, dim=1,
                                                   importance=feature_importance()),
                "weighted_flat": ok.octav_scale(full["flat"], 4,
                                                importance=element_importance())}
    for key, want in expected.items():
        got, calls = ranks[0][key]
        assert_scale_close(got, want, torch.float32)
        for other in ranks[1:]:
            assert torch.equal(other[key][0], got) and other[key][1] == calls, key
    # A warm start at the answer needs one all-reduce; a cold start about one per iteration
    # (+ 1 for the start); a large tensor starts from a histogram: 3-4 in all.
    assert ranks[0]["warm"][1] == 1
    _, iterations = ok.reference.octav_scale(full["flat"], 4, return_iterations=True)
    assert ranks[0]["flat"][1] <= int(iterations) + 2
    _, iterations = ok.reference.octav_scale(full["large"], 4, return_iterations=True)
    assert ranks[0]["large"][1] <= 4 < int(iterations) + 1


def test_max_and_mean(ranks):
    full = global_data()
    world = len(ranks)
    for r in ranks:
        assert torch.equal(r["max"], full["act"].abs().amax(0))
        want = torch.tensor([sum(range(1, world + 1)) / world,
                             2.0 * sum(range(world)) / world])
        torch.testing.assert_close(r["mean"], want)


def test_quantizer_with_process_group(ranks):
    full = global_data()
    scale, signed = ranks[0]["quantizer"]
    assert signed is True  # decided from all ranks' data
    assert_scale_close(scale, ok.octav_scale(full["act"], 4), torch.float32)
    # Static calibration: each batch's scale is computed over all ranks' share of it (one
    # collective OCTAV per batch); the batches' scales are averaged.
    for r in ranks:
        assert torch.equal(r["quantizer"][0], scale)
        assert torch.equal(r["calibrated"], ranks[0]["calibrated"])
    world = len(ranks)
    shards = [full["flat"][slice(*shard_bounds(world, rank))] for rank in range(world)]
    batches = [torch.cat([x[: len(x) // 2] for x in shards]),
               torch.cat([x[len(x) // 2:] for x in shards])]
    want = sum(ok.octav_scale(b, 4).double() for b in batches) / 2
    assert_scale_close(ranks[0]["calibrated"], want.float(), torch.float32)


def test_ddp_buffer_broadcast_keeps_each_ranks_nan_flag(ranks):
    """The rank whose batch had a NaN raises at check_finite; DDP's broadcast of rank 0's
    buffers did not erase its flag (issue 29, item 8)."""
    assert [r["ddp_nan_raised"] for r in ranks] == [i == len(ranks) - 1 for i in range(len(ranks))]


def test_bad_arguments_and_no_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.octav_scale(torch.ones(4), 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.max_scale(torch.ones(4))
    with pytest.raises(ValueError, match="bits must be in 2..16"):
        distributed.octav_scale(torch.ones(4), 17)
    with pytest.raises(TypeError, match="x must be float32"):
        distributed.octav_scale(torch.ones(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="dim=1 is out of range"):
        distributed.octav_scale(torch.ones(4), 4, dim=1)
    with pytest.raises(ValueError, match=r"init must have shape \[\]"):
        distributed.octav_scale(torch.ones(4), 4, init=torch.ones(2))
    with pytest.raises(ValueError, match="group_size"):
        distributed.octav_scale(torch.ones(4), 4, group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        ok.Quantizer(4, group_size=2, process_group="world")
    with pytest.raises(ValueError, match="process_group works with"):
        ok.Quantizer(4, calibrator="percentile", process_group="world")
