"""DDP and FSDP2 on 2 CPU ranks (gloo) against one process; DCP checkpoints across world sizes;
a failing rank; the recipe under torchrun and accelerate launch.

One spawn of 2 processes runs every 2-rank check (lora_triton/demos/distributed_checks.py) and
saves what rank 0 measured; the tests below compare it with the same training in this process.
fp32 throughout except the mixed-precision check. Why DDP/FSDP2 and one process differ at all:
the gradient of the global batch is the mean of two half-batch means, all-reduced, instead of one
mean over the whole batch - the same sum in another order - so losses and adapters agree to fp32
rounding (measured: ~1e-7 relative), not bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2's public API: torch >= 2.6)
except ImportError:
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

from lora_triton.demos import distributed_checks as checks  # noqa: E402
from lora_triton.demos.distributed_train import (RunConfig, adapter_tensors, build_model,  # noqa: E402
                                                 run_spawned, train)
from lora_triton.integration import save_adapter  # noqa: E402
from lora_triton.integration.distributed import base_fingerprint, load_checkpoint, save_checkpoint  # noqa: E402
from lora_triton.modules import NF4Linear  # noqa: E402

CFG = RunConfig()
LOSS_TOL, ADAPTER_TOL = 1e-5, 1e-5  # fp32 reduction-order differences are ~1e-7


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training in one process (no process group): step-0 grads, losses, adapters, and
    a DCP checkpoint written at world size 1."""
    out = tmp_path_factory.mktemp("single")
    grads = checks.step0_grads(build_model(CFG), CFG)
    model = build_model(CFG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CFG.lr)
    losses, _ = train(model, CFG, optimizer=optimizer)
    save_checkpoint(model, out / "ws1_checkpoint", optimizer, include_base=True)
    return dict(out=out, step0=grads, losses=losses, adapters=adapter_tensors(model),
                fingerprint=base_fingerprint(model))


@pytest.fixture(scope="module")
def two_ranks(single, tmp_path_factory):
    """Every 2-rank check in one spawn; returns what rank 0 saved, by check name."""
    out = tmp_path_factory.mktemp("two_ranks")
    start = time.perf_counter()
    run_spawned(checks.check_all, 2, (str(out), CFG, str(single["out"] / "ws1_checkpoint")), timeout_s=150,
                workdir=out)
    print(f"2-rank checks: {time.perf_counter() - start:.1f} s")
    results = {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}
    results["out"] = out
    return results


def _assert_tensors_close(got: dict, want: dict, tol: float, what: str) -> float:
    assert got.keys() == want.keys(), what
    worst = 0.0
    for name in want:
        err = float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30))
        worst = max(worst, err)
        assert err <= tol, f"{what}: {name} differs by {err:.2e} (relative)"
    return worst


def _assert_same_training(result: dict, single: dict, what: str) -> None:
    assert abs(result["step0"]["loss"] - single["step0"]["loss"]) <= LOSS_TOL * abs(single["step0"]["loss"]), what
    grad_err = _assert_tensors_close(result["step0"]["grads"], single["step0"]["grads"], ADAPTER_TOL, what + " grads")
    for got, want in zip(result["losses"], single["losses"]):
        assert abs(got - want) <= LOSS_TOL * abs(want), f"{what}: losses {result['losses']} vs {single['losses']}"
    adapter_err = _assert_tensors_close(result["adapters"], single["adapters"], ADAPTER_TOL, what + " adapters")
    print(f"{what}: step-0 grads {grad_err:.1e}, adapters after {CFG.steps} steps {adapter_err:.1e} (relative), "
          f"losses {max(abs(a - b) for a, b in zip(result['losses'], single['losses'])):.1e} (absolute)")


# ----------------------------------------------------------------------------- DDP
def test_ddp_trains_like_one_process(two_ranks, single):
    _assert_same_training(two_ranks["ddp"], single, "DDP")


def test_ddp_neither_broadcasts_nor_buckets_the_base(two_ranks):
    ddp = two_ranks["ddp"]
    assert ddp["holds_only_adapters"]  # DDP's parameters (broadcast, bucketed) are the adapters
    # DDP's start-up broadcast: the adapters and the (rotary) buffers, not one byte of the base.
    assert ddp["broadcast_bytes"] == ddp["adapter_bytes"] + ddp["buffer_bytes"]
    assert "the frozen base differs between ranks" in ddp["refused"] and "weight" in ddp["refused"]


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp2_trains_like_one_process(two_ranks, single):
    assert two_ranks["fsdp"]["wrapper"].startswith("FSDP")
    _assert_same_training(two_ranks["fsdp"], single, "FSDP2")


def test_fsdp2_holds_one_shard_of_the_base_per_rank(two_ranks):
    fsdp = two_ranks["fsdp"]
    logical = fsdp["after_shard"]["logical"]
    for state in (fsdp["after_shard"], fsdp["between"]):  # after sharding, and between steps
        assert state["whole"] == 0
        # 1/2 of the bytes plus at most one byte of padding per parameter
        assert logical / 2 <= state["sharded"] <= logical / 2 + 3 * 14, state
    # Inside the forward, at the start of each decoder layer, only that layer's base is whole.
    assert [i for i, _ in fsdp["inside"]] == list(range(CFG.layers))
    for i, whole in fsdp["inside"]:
        assert fsdp["layer_logical"][i] <= whole <= fsdp["layer_logical"][i] + 3 * 7 * 2, (i, whole)
    print(f"NF4 bytes per rank: {fsdp['between']['sharded']} of {logical}; inside layer i: "
          f"{[w for _, w in fsdp['inside']]} (one layer: {fsdp['layer_logical']})")


def test_fsdp2_mixed_precision_casts_adapters_never_the_nf4_bytes(two_ranks, single):
    bf16 = two_ranks["fsdp_bf16"]
    seen = bf16["seen"]
    assert seen["adapter_dtype"] == torch.bfloat16 and seen["x_dtype"] == torch.bfloat16
    assert seen["packed_equal"] and seen["absmax_equal"] and seen["nested_equal"]
    assert seen["nested_dtype"] == torch.float32
    assert abs(bf16["loss"] - single["step0"]["loss"]) <= 2e-2 * single["step0"]["loss"]
    assert all(g.dtype == torch.float32 for g in bf16["grads"].values())  # reduce_dtype / the fp32 shards
    names = sorted(single["step0"]["grads"])
    got = torch.cat([bf16["grads"][n].flatten() for n in names])
    want = torch.cat([single["step0"]["grads"][n].flatten() for n in names])
    assert float((got - want).norm() / want.norm()) < 0.1  # bf16 compute (measured: 5%)


# ----------------------------------------------------------------------------- checkpoints and export
def test_dcp_round_trip_is_bit_exact_across_world_sizes(two_ranks, single):
    fsdp = two_ranks["fsdp"]
    # saved by 2 ranks, reloaded by 2 ranks into a model built from another seed
    for name in fsdp["adapters"]:
        assert torch.equal(fsdp["same_ws"]["adapters"][name], fsdp["adapters"][name]), name
    assert torch.equal(fsdp["same_ws"]["fingerprint"], fsdp["fingerprint"])
    # saved by 1 process, reloaded by 2 ranks
    for name in single["adapters"]:
        assert torch.equal(fsdp["from_ws1"]["adapters"][name], single["adapters"][name]), name
    assert torch.equal(fsdp["from_ws1"]["fingerprint"], single["fingerprint"])
    # a whole bitsandbytes state dict (every rank holds it) loaded into the shards
    assert fsdp["whole_into_shards"] and "blocksize=64, double_quant=True" in fsdp["printed"]
    # saved by 2 ranks, reloaded in this process (world size 1, no process group), optimizer too
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = build_model(RunConfig(seed=CFG.seed + 5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CFG.lr)
    load_checkpoint(model, two_ranks["out"] / "fsdp_checkpoint", optimizer, include_base=True)
    for name, tensor in adapter_tensors(model).items():
        assert torch.equal(tensor, fsdp["adapters"][name]), name
    reference = build_model(CFG)  # the base bytes, keys and quant states: bitsandbytes' own
    ours, want = model.state_dict(), reference.state_dict()
    base_keys = [k for k in want if ".lora_" not in k]
    assert any(k.endswith(".weight.absmax") for k in base_keys)
    for key in base_keys:
        assert ours[key].dtype == want[key].dtype and torch.equal(ours[key], want[key]), key
    state = get_optimizer_state_dict(model, optimizer)["state"]
    assert state.keys() == fsdp["optimizer"]["state"].keys()
    for name, moments in fsdp["optimizer"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(torch.as_tensor(state[name][k]), torch.as_tensor(v)), (name, k)
    x = torch.randint(0, CFG.vocab, (2, 8))
    trained = build_model(CFG)
    trained.load_state_dict(model.state_dict())
    assert torch.equal(trained(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("source", ["fsdp_adapter", "ddp_adapter"])
def test_peft_export_from_rank0_equals_save_adapter(two_ranks, tmp_path, source):
    from safetensors.torch import load_file

    model = build_model(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(two_ranks[source.split("_")[0]]["adapters"][name])
    save_adapter(model, tmp_path)
    exported = two_ranks["out"] / source
    assert json.loads((exported / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "adapter_config.json").read_text())
    got = load_file(str(exported / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_state_dict_of_the_layer_is_unchanged_by_the_parameter_storage():
    """The NF4 state is held as integer parameters (so FSDP2 can shard it), yet the state dict is
    bitsandbytes' keys, dtypes and bytes, with and without double quantization."""
    from lora_triton.format import NF4Weight

    for double_quant in (True, False):
        w = NF4Weight.quantize(torch.randn(48, 64), 64, double_quant)
        layer = NF4Linear(w)
        assert {n: p.dtype for n, p in layer.named_parameters()} == \
            {"weight": torch.uint8, "weight_absmax": torch.uint8 if double_quant else torch.int32,
             **({"weight_nested_absmax": torch.int32} if double_quant else {})}
        assert not any(p.requires_grad for p in layer.parameters())
        ours, theirs = layer.state_dict(), w.to_bnb_state_dict()
        assert list(ours) == list(theirs)
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
        assert layer.nf4 is w and layer.half().nf4.absmax.dtype == (torch.uint8 if double_quant else torch.float32)


# ----------------------------------------------------------------------------- failure
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    import torch.multiprocessing as mp

    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="injected failure on rank 1 at step 1"):
        run_spawned(checks.check_failing_rank, 2, (CFG,), timeout_s=60, workdir=tmp_path)
    assert time.perf_counter() - start < 45  # the other rank was stopped, not left in its all-reduce


# ----------------------------------------------------------------------------- launchers
def _launch(command: list[str], out: Path, timeout: int = 120) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} not installed next to {sys.executable}")
    return str(path)


def test_torchrun_fsdp2_recipe(tmp_path, single):
    out = tmp_path / "run"
    result = _launch([_bin("torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                      "lora_triton.demos.distributed_train", "--strategy", "fsdp", "--out", str(out)], out)
    assert result["wrapper"].startswith("FSDP") and result["world_size"] == 2
    assert all(abs(a - b) <= LOSS_TOL * b for a, b in zip(result["losses"], single["losses"]))
    assert max(result["nf4_local_bytes_per_rank"]) < 0.51 * result["nf4_logical_bytes"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and any((out / "checkpoint").iterdir())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accelerate_launch_recipe(tmp_path, single, strategy):
    pytest.importorskip("accelerate")
    out = tmp_path / "run"
    result = _launch([_bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_triton.demos.distributed_train",
                      "--launcher", "accelerate", "--strategy", strategy, "--out", str(out)], out)
    assert result["world_size"] == 2 and result["launcher"] == "accelerate"
    assert result["wrapper"] == ("DistributedDataParallel" if strategy == "ddp" else "FSDPLlamaForCausalLM")
    assert all(abs(a - b) <= LOSS_TOL * b for a, b in zip(result["losses"], single["losses"]))
    if strategy == "fsdp":
        assert max(result["nf4_local_bytes_per_rank"]) < 0.51 * result["nf4_logical_bytes"]
