"""QAT under FSDP2 (``fully_shard`` per quantized layer and at the root) with gloo on CPU:
2 and 3 processes, each with its share of one batch, must train as one process on the whole
batch, for dynamic, static and learned scales and with oscillation tracking and freezing;
checkpoints (``torch.distributed.checkpoint``) save on N ranks and load on M; the gathered
state dict loads into a one-process model and converts to the same deployed model.

Tolerance of "equal to one process": the only arithmetic that differs is the order of sums
over the batch (the gradient of each weight: FSDP reduce-scatters N per-rank partial sums,
each divided by N; the data-parallel masked sums of OCTAV and of the input importance). A
weight's gradient is a sum of B = 12 float32 terms (one per row), so it differs by at most
about B * 2**-24 relative; SGD with lr LR over K steps of gradients of size ~1 moves weights
at most ~K * LR * B * 2**-24 apart (1.3e-6 here), and the check allows 20x that
(``WEIGHT_ATOL``), which a level flipping between the runs (a change of a quantization step,
>= 1e-2 here) would still break. A learned scale's gradient sums over every element of its
group (up to 12 x 32 inputs): ``SCALE_RTOL`` = K * 384 * 2**-24 relative after K steps. Scales
computed from data are within their op's float32 tolerance (``assert_scale_close``).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_scale_close

import octav_kernels as ok

fsdp = pytest.importorskip("torch.distributed.fsdp")
dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
)

BATCH, STEPS, LR = 12, 6, 0.3  # (enough for some weights to oscillate and freeze)
WEIGHT_ATOL = 20 * STEPS * LR * BATCH * 2.0**-24
SCALE_RTOL = STEPS * 12 * 32 * 2.0**-24
# name: (quantize_model keywords, oscillation control, calibrate before sharding)
SCENARIOS = {
    "dynamic": dict(mode="dynamic"),
    "dynamic_per_tensor": dict(mode="dynamic", weight_granularity="tensor"),
    "weighted": dict(mode="dynamic", weight_calibrator="octav", weight_importance="input"),
    "static": dict(mode="static"),
    "learned": dict(mode="learned"),
    "tracked": dict(mode="dynamic"),
}


def data():
    torch.manual_seed(1)
    return torch.randn(BATCH, 16), torch.randn(BATCH, 5)


def build(name: str, process_group) -> torch.nn.Module:
    """The scenario's quantized MLP (weights of 32, 24 and 5 rows: uneven shards on 3 ranks),
    the same on every process."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24),
                              torch.nn.ReLU(), torch.nn.Linear(24, 5))
    return ok.quantize_model(net, bits=3, first_last_bits=None, act_signed=True,
                             process_group=process_group, **SCENARIOS[name])


def prepare(name: str, model, x) -> "ok.OscillationControl | None":
    """What comes before training: calibration (static and learned scales; over the ranks'
    data when sharded) and the oscillation control."""
    if name in ("static", "learned"):
        ok.calibrate_model(model, [x])
    if name == "tracked":
        return ok.OscillationControl(model, momentum=0.5, freeze=0.3, dampening=1e-3)
    return None


def train(model, control, x, y) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        # (sharded: each rank's dampening loss is its shard's part: not in the logged loss)
        total = loss if control is None else loss + control.dampening_loss()
        total.backward()
        opt.step()
        opt.zero_grad()
        if control is not None:
            control.step()
        logged = loss.detach().clone()
        if dist.is_initialized():  # the mean of the ranks' losses: the whole batch's
            dist.all_reduce(logged)
            logged /= dist.get_world_size()
        losses.append(logged.item())
    return losses


def shard(model, **kwargs):
    for m in model:
        if isinstance(m, ok.QuantLinear):
            fsdp.fully_shard(m, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    return model


def full_state(model) -> dict:
    """The gathered state dict (every rank takes part; CPU tensors)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def state_bytes(model) -> dict:
    """This rank's bytes of Parameters (local shards) and of buffers, by kind."""
    params = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes
                 for p in model.parameters())
    osc = sum((b.to_local() if hasattr(b, "to_local") else b).nbytes
              for n, b in model.named_buffers()
              if ".osc_" in n and not n.endswith("osc_threshold"))
    return {"params": params, "oscillation": osc}


def _worker(rank: int, world: int, store: str, out: str, load_from: str | None,
            train_too: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = data()
    per = BATCH // world
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    r = {}
    if train_too:
        model = shard(build("dynamic", "world"))
        model(x)  # one training forward: the scales of the same weights and batch
        r["first_scales"] = {q: m.scale.clone() for q, m in ok.quantizers(model)}
        for name in SCENARIOS:
            model = shard(build(name, "world"))
            control = prepare(name, model, x)
            losses = train(model, control, x, y)
            r[name] = {"losses": losses, "state": full_state(model), "bytes": state_bytes(model)}
            if name == "tracked":
                r[name]["frozen"] = sum(control.frozen_fraction().values())
            if name == "dynamic":
                ok.save_checkpoint(model, os.path.join(out, "ckpt"))
        r["no_group"] = train(shard(build("dynamic", None)), None, x, y)
        r["errors"] = _bad_setups(x)
        r["bf16"] = _mixed_precision(x, y)
    if load_from is not None:  # a checkpoint saved on another number of ranks
        model = shard(build("dynamic", "world"))
        ok.load_checkpoint(model, load_from)
        r["loaded"] = full_state(model)
        r["loaded_losses"] = train(model, None, x, y)
    if rank == 0:
        torch.save(r, os.path.join(out, "results.pt"))
    dist.barrier()
    os._exit(0)  # (as in test_distributed: torch 2.13's gloo teardown can abort)


def _bad_setups(x) -> dict[str, str]:
    """The messages of the setups that must raise."""
    errors = {}
    # A learned scale first set inside a sharded forward would be lost.
    model = shard(build("learned", "world"))
    try:
        model(x)
    except ValueError as e:
        errors["learned_unset"] = str(e)
    # bfloat16 Parameters: a learned scale of a mixed-precision unit.
    model = build("learned", "world")
    ok.calibrate_model(model, [x])
    mp_policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(model, mp_policy=mp_policy)
    try:
        model(x)
    except ValueError as e:
        errors["bf16_scale"] = str(e)
    try:
        ok.shard_quantizers(build("learned", "world"))
    except ValueError as e:
        errors["shard_unset"] = str(e)
    # A learned scale whose Parameter would appear at the first (sharded) forward.
    try:
        ok.QuantAct(4, mode="learned", dim=1, signed=True).train()(x)
    except ValueError as e:
        errors["late_parameter"] = str(e)
    # The other order: shard, then quantize.
    try:
        ok.quantize_model(shard(torch.nn.Sequential(torch.nn.Linear(4, 4))))
    except ValueError as e:
        errors["shard_first"] = str(e)
    return errors


def _mixed_precision(x, y) -> dict:
    """Learned scales under bfloat16 Parameters, with the quantizers in float32 units."""
    model = build("learned", "world")
    ok.calibrate_model(model, [x])
    ok.shard_quantizers(model)
    mp_policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(model, mp_policy=mp_policy)
    seen = []
    hooks = [q.register_forward_pre_hook(lambda q, args: seen.append(q.scale.dtype))
             for _, q in ok.quantizers(model)]
    losses = train(model, None, x, y)
    for h in hooks:
        h.remove()
    return {"losses": losses, "scale_dtypes": set(seen), "state": full_state(model)}


def _spawn(world: int, out, load_from=None, train_too=True) -> dict:
    mp.spawn(_worker, args=(world, str(out / "store"), str(out), load_from, train_too),
             nprocs=world, join=True)
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Training on 2 and 3 ranks; the 3-rank run loads the 2-rank checkpoint, and one more
    2-rank run loads the 3-rank one."""
    two, three, back = (tmp_path_factory.mktemp(f"fsdp{i}") for i in range(3))
    r2 = _spawn(2, two)
    r3 = _spawn(3, three, load_from=str(two / "ckpt"))
    r2["back"] = _spawn(2, back, load_from=str(three / "ckpt"), train_too=False)
    return {2: r2, 3: r3}


def one_process(name: str):
    """The scenario trained by one process on the whole batch: (model, losses, control)."""
    x, y = data()
    model = build(name, None)
    control = prepare(name, model, x)
    return model, train(model, control, x, y), control


def assert_state_close(got: dict, model, learned: bool = False) -> None:
    want = model.state_dict()
    assert {k for k in got if isinstance(got[k], torch.Tensor)} == {
        k for k in want if isinstance(want[k], torch.Tensor)}
    for key, value in got.items():
        ref = want[key]
        if not isinstance(value, torch.Tensor):
            continue
        if key.endswith("scale"):
            assert value.dtype == torch.float32, key
            if learned:  # trained by SGD
                torch.testing.assert_close(value, ref.detach(), rtol=SCALE_RTOL, atol=0)
            else:
                assert_scale_close(value.reshape(ref.shape), ref, torch.float32)
        elif value.is_floating_point():
            torch.testing.assert_close(value, ref, rtol=0, atol=WEIGHT_ATOL, msg=key)
        else:
            assert torch.equal(value, ref), key


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_training_equals_one_process(runs, world, name):
    got = runs[world][name]
    model, losses, control = one_process(name)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses),
                               rtol=1e-5, atol=0)
    assert_state_close(got["state"], model, learned=name == "learned")
    if name == "tracked":  # the freezing did happen (in both runs alike)
        assert got["frozen"] > 0
        assert got["frozen"] == pytest.approx(sum(control.frozen_fraction().values()))


@pytest.mark.parametrize("world", [2, 3])
def test_first_forward_scales(runs, world):
    """Weight scales come from the all-gathered weight: bit for bit one process's. The input
    scales' masked sums are all-reduced in another order: within the op's tolerance."""
    x, _ = data()
    model = build("dynamic", None)
    model(x)
    for name, q in ok.quantizers(model):
        got = runs[world]["first_scales"][name]
        if "weight" in name:
            assert torch.equal(got, q.scale), name
        else:
            assert_scale_close(got, q.scale, torch.float32)


def test_dynamic_input_scales_need_the_process_group(runs):
    """Without process_group each rank's input scales come from its own share."""
    _, losses, _ = one_process("dynamic")
    assert abs(sum(runs[2]["no_group"]) - sum(losses)) > 1e-4


def test_learned_per_tensor_scales_shard_as_one_element(runs):
    state = runs[2]["learned"]["state"]
    assert state["0.input_quantizer.scale"].shape == (1,)
    assert state["0.weight_quantizer.scale"].shape == (32,)


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_saved_on_n_ranks_loads_on_m(runs, world):
    """DCP: 2 -> 3 and 3 -> 2 ranks give the saving run's state, and training goes on."""
    saved = runs[5 - world]["dynamic"]["state"]
    loaded = (runs[3] if world == 3 else runs[2]["back"])["loaded"]
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
    losses = (runs[3] if world == 3 else runs[2]["back"])["loaded_losses"]
    assert len(losses) == STEPS and all(v == v for v in losses)


def test_full_state_dict_loads_into_one_process_and_converts_alike(runs):
    x, _ = data()
    want, _, _ = one_process("dynamic")
    got = build("dynamic", None)
    got.load_state_dict(runs[2]["dynamic"]["state"])
    got.eval()
    want.eval()
    converted, reference = ok.convert_model(got), ok.convert_model(want)
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=1e-4)


def test_mixed_precision_keeps_learned_scales_float32(runs):
    r = runs[2]["bf16"]
    assert r["scale_dtypes"] == {torch.float32}
    _, losses, _ = one_process("learned")
    # bfloat16 weights and inputs: the losses follow the float32 run's to bfloat16 precision.
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=5e-2,
                               atol=0)


@pytest.mark.parametrize("world", [2, 3])
def test_oscillation_state_is_sharded_like_the_weight(runs, world):
    """Each rank keeps 11 bytes of tracking state per weight of its own rows only (torch.chunk
    of each weight's rows, as FSDP2 shards them)."""
    rank0_rows = [-(-rows // world) for rows in (32, 24, 5)]
    local = sum(r * cols for r, cols in zip(rank0_rows, (16, 32, 24)))
    assert runs[world]["tracked"]["bytes"]["oscillation"] == 11 * local


def test_bad_setups_raise_naming_the_module(runs):
    errors = runs[2]["errors"]
    assert "cannot be set inside a forward" in errors["learned_unset"]
    assert "input_quantizer" in errors["learned_unset"] or "weight_quantizer" in errors[
        "learned_unset"]
    assert "bfloat16" in errors["bf16_scale"] and "shard_quantizers" in errors["bf16_scale"]
    assert "set the learned scale before sharding" in errors["shard_unset"]
    assert "already sharded by FSDP2" in errors["shard_first"]
    assert "give its scale_shape" in errors["late_parameter"]


def test_old_zero_dim_learned_scale_loads():
    """Checkpoints from before the [1] per-tensor learned scale load into it, and back."""
    q = ok.Quantizer(4, mode="learned")
    q.train()(torch.randn(64))
    old = {k: (v.reshape(()) if k == "scale" else v) for k, v in q.state_dict().items()}
    fresh = ok.Quantizer(4, mode="learned")
    fresh.load_state_dict(old)
    assert fresh.scale.shape == (1,) and float(fresh.scale) == float(q.scale)
    static = ok.Quantizer(4, mode="static")
    static.load_state_dict({"scale": q.scale.detach(), "_extra_state": old["_extra_state"]})
    assert static.scale.shape == ()
