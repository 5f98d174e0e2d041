"""Dispatch as data (lora_triton/ops/dispatch.py): the shipped table, its loader and the rule."""

from __future__ import annotations

import json

import pytest
import torch

from lora_triton.ops import candidates, dispatch

CUDA = torch.device("cuda")  # Problems are data: a GPU problem needs no GPU to be chosen for


@pytest.fixture
def some_gpu(monkeypatch):
    monkeypatch.setattr(dispatch.Problem, "gpu", property(lambda self: "Some GPU"))


def _table(points, gpu="Some GPU"):
    return {"format": 1, "gpus": {gpu: {"forward": points}}}


def _point(m_bucket, candidate, n=4096, k=4096, r=16, config=None):
    return {"m_bucket": m_bucket, "n": n, "k": k, "r": r, "candidate": candidate, "config": config}


def test_shipped_table_parses_and_names_the_h200():
    table = dispatch.load_table()
    assert "NVIDIA H200" in table["gpus"]
    assert all(p["candidate"] in candidates.FORWARD for p in table["gpus"]["NVIDIA H200"]["forward"])


def test_nearest_m_bucket_of_the_same_shape_decides():
    table = _table([_point(1, "skinny", config={"split_k": 4}), _point(16, "skinny"), _point(1024, "dequant")])
    problem = lambda m, n=4096: dispatch.Problem(torch.device("cpu"), m, n, 4096, 16)  # noqa: E731
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(1))["config"] == {"split_k": 4}
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(8))["m_bucket"] == 16
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(600))["candidate"] == "dequant"
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(8, n=11008)) is None
    assert dispatch.measured_choice(table, "Other GPU", "forward", problem(8)) is None


def test_choose_uses_the_rule_without_a_table_and_torch_where_triton_cannot_run(some_gpu, monkeypatch):
    rule = candidates.FORWARD[candidates.RULE["forward"][0]]
    assert dispatch.choose("forward", dispatch.Problem(CUDA, 3, 64, 128, 8), table=_table([])) == (rule, None)
    cpu = dispatch.Problem(torch.device("cpu"), 3, 64, 128, 8)
    monkeypatch.setattr(candidates, "can_launch", lambda device: device.type == "cuda")
    assert dispatch.choose("forward", cpu)[0].name == "torch"
    assert dispatch.choose("forward", dispatch.Problem(CUDA, 3, 64, 128, 8, backend="torch"))[0].name == "torch"


def test_a_winner_that_does_not_support_the_problem_falls_back_to_the_rule(some_gpu):
    table = _table([_point(64, "skinny", n=64, k=128, r=8)])
    assert dispatch.choose("forward", dispatch.Problem(CUDA, 64, 64, 128, 8), table=table)[0].name == "skinny"
    chosen = dispatch.choose("forward", dispatch.Problem(CUDA, 512, 64, 128, 8), table=table)[0]
    assert chosen.name == candidates.RULE["forward"][0]


def test_fused_dx_is_not_chosen_beyond_its_int32_panel_offsets(some_gpu):
    from lora_triton.kernels.lora_dx import max_k
    from lora_triton.ops import configs

    widest = max(t.blocks["BLOCK_N"] for t in (*configs.tuned_tiles("dx"), *configs.configs().dx["fixed"]))
    big = max_k(widest) + 4096
    table = {"format": 1, "gpus": {"Some GPU": {"dx": [_point(64, "fused", n=64, k=128, r=8),
                                                        _point(64, "fused", n=64, k=big, r=8)]}}}
    assert dispatch.choose("dx", dispatch.Problem(CUDA, 64, 64, 128, 8), table=table)[0].name == "fused"
    chosen = dispatch.choose("dx", dispatch.Problem(CUDA, 64, 64, big, 8), table=table)[0]
    assert chosen.name == candidates.RULE["dx"][0]


@pytest.mark.parametrize("text,problem", [
    ("{not json", "JSONDecodeError"),
    ('{"format": 2, "gpus": {}}', "format"),
    ('{"format": 1, "gpus": {"G": {"forward": [{"m_bucket": 1}]}}}', "lacks"),
    ('{"format": 1, "gpus": {"G": {"forward": [{"m_bucket": 1, "n": 1, "k": 1, "r": 1, "candidate": "magic"}]}}}',
     "unknown candidate"),
    ('{"format": 1, "gpus": {"G": {"forward": [{"m_bucket": 0, "n": 1, "k": 1, "r": 1, "candidate": "dequant"}]}}}',
     "positive ints"),
    ('{"format": 1, "gpus": {"G": {"backward": []}}}', "unknown operation"),
])
def test_a_corrupt_table_warns_and_gives_the_rule(tmp_path, text, problem):
    path = tmp_path / "table.json"
    path.write_text(text)
    dispatch.load_table.cache_clear()
    with pytest.warns(RuntimeWarning, match=problem):
        table = dispatch.load_table(str(path))
    assert not any(points for ops in table["gpus"].values() for points in ops.values())  # nothing usable


def test_a_missing_table_warns_and_gives_the_rule(tmp_path):
    dispatch.load_table.cache_clear()
    with pytest.warns(RuntimeWarning, match="not used"):
        assert dispatch.load_table(str(tmp_path / "absent.json"))["gpus"] == {}


def test_table_from_benchmark_rows_keeps_the_fastest_correct_candidate(tmp_path):
    row = lambda method, ms, m=1, note="": dict(device="G", K="4096", N="4096", r="16", M=str(m),  # noqa: E731
                                                method=method, ms=str(ms), note=note)
    rows = [row("dequant", 0.035), row("skinny", 0.012), row("dense", 0.001, note="baseline"),
            row("dequant", 0.2, m=1024), row("fused", 1.0, m=1024), row("skinny", "", m=1024),
            row("skinny", 0.011, m=2)]
    table = dispatch.table_from_rows(rows)
    points = {p["m_bucket"]: p["candidate"] for p in table["gpus"]["G"]["forward"]}
    assert points == {1: "skinny", 2: "skinny", 1024: "dequant"}
    merged = dispatch.merge_tables(_table([_point(1, "dequant")], gpu="Kept GPU"), table)
    assert set(merged["gpus"]) == {"Kept GPU", "G"}
    path = tmp_path / "out.json"
    dispatch.write_table(merged, str(path))
    assert dispatch.parse_table(path.read_text()) == json.loads(path.read_text())
    dispatch.load_table.cache_clear()


def test_the_fastest_skinny_config_is_kept_and_chosen(tmp_path):
    from lora_triton.bench import forward
    from lora_triton.ops import configs

    cuda = torch.device("cuda")  # the benchmark's GPU rows: the default plus every benchmark config
    bench_configs = configs.skinny_bench_configs()
    names = list(forward.skinny_configs(cuda))
    assert names[0] == "skinny" and len(names) == 1 + len(bench_configs)
    assert forward.method_and_config("skinny", cuda) == ("skinny", "")
    rows = []
    for name in names:
        method, config = forward.method_and_config(name, cuda)
        rows.append(dict(device="G", K="4096", N="4096", r="16", M="1", method=method, config=config,
                         ms="0.010" if name == "skinny#2" else "0.020", note=""))
    path = tmp_path / "table.json"
    dispatch.write_table(dispatch.table_from_rows(rows), str(path))
    table = dispatch.load_table(str(path))
    dispatch.load_table.cache_clear()
    point = dispatch.measured_choice(table, "G", "forward", dispatch.Problem(torch.device("cpu"), 1, 4096, 4096, 16))
    assert point["candidate"] == "skinny" and point["config"] == dict(bench_configs[1])
    configs.check_skinny_config({**point["config"], "split_k": 1, "table": "gather"})  # a config the kernel takes


def test_dx_rows_become_dx_points_and_forward_rows_forward_points():
    row = lambda op, method, ms, m=16: dict(device="G", K="4096", N="11008", r="64", M=str(m), op=op,  # noqa: E731
                                            method=method, ms=str(ms), config="", note="")
    rows = [row("forward", "dequant", 0.05), row("forward", "skinny", 0.03),
            row("dx", "dx:fused", 0.02), row("dx", "dx:dequant", 0.04),
            row("dx", "dx:fused", 0.5, m=2048), row("dx", "dx:dequant", 0.3, m=2048),
            row("dx", "dx:skinny", 0.001)]  # not a dx candidate: ignored
    both = dispatch.table_from_rows(rows)["gpus"]["G"]
    assert {(p["m_bucket"], p["candidate"]) for p in both["forward"]} == {(16, "skinny")}
    assert {(p["m_bucket"], p["candidate"]) for p in both["dx"]} == {(16, "fused"), (2048, "dequant")}
    assert set(dispatch.table_from_rows(rows, "dx")["gpus"]["G"]) == {"dx"}
    assert set(dispatch.table_from_rows([r for r in rows if r["op"] == "forward"])["gpus"]["G"]) == {"forward"}
    legacy = [{k: v for k, v in r.items() if k != "op"} for r in rows[:2]]  # rows written before the op column
    assert dispatch.table_from_rows(legacy)["gpus"]["G"]["forward"][0]["candidate"] == "skinny"
    with pytest.raises(ValueError, match="operation must be one of"):
        dispatch.table_from_rows(rows, "backward")
    table = dispatch.parse_table(json.dumps(dispatch.table_from_rows(rows)))
    problem = dispatch.Problem(torch.device("cpu"), 20, 11008, 4096, 64)
    assert dispatch.measured_choice(table, "G", "dx", problem)["candidate"] == "fused"


def test_the_crossover_sweep_is_opted_into_by_its_environment_variable(monkeypatch):
    from lora_triton.bench import forward

    monkeypatch.delenv(forward.SWEEP_ENV, raising=False)
    assert forward.plan_for(quick=False) is forward.FULL and not forward.FULL.get("dx")
    monkeypatch.setenv(forward.SWEEP_ENV, "crossover")
    plan = forward.plan_for(quick=False)
    assert plan["ms"] == [16, 32, 64, 128, 256, 512, 1024, 2048] and plan["ranks"] == [16, 64]
    assert plan["shapes"] == forward.LLAMA7B_SHAPES and plan["dx"] is True
    assert forward.plan_for(quick=True)["dx"] is True
    monkeypatch.setenv(forward.SWEEP_ENV, "everything")
    with pytest.raises(ValueError, match=forward.SWEEP_ENV):
        forward.plan_for(quick=False)


def test_dx_rows_of_the_sweep_are_correct_and_name_one_fastest(device):
    from lora_triton.bench import forward

    problem = forward.make_problem(17, 40, 128, 4, torch.float16, device)
    meta = dict(device="test", peak_matmul_tflops="1", peak_copy_gbps="1")
    rows = forward.bench_dx(problem, meta, device, quick=True)
    assert {r["method"] for r in rows} == {f"dx:{name}" for name in candidates.DX}
    assert all(r["op"] == "dx" and float(r["rel_err"]) < 1e-2 and float(r["ms"]) > 0 for r in rows), rows
    assert sum(r["fastest_candidate"] for r in rows) == 1
    assert all(r["dispatch"] == "dx:dequant" for r in rows)  # no table point for this shape: the rule
    points = dispatch.table_from_rows(rows)["gpus"]["test"]["dx"]
    assert len(points) == 1 and points[0]["candidate"] in candidates.DX


def test_a_run_that_measured_a_few_points_replaces_only_those_points():
    old = {"format": 1, "gpus": {"G": {"forward": [_point(1, "dequant"), _point(16, "dequant"),
                                                   _point(1, "dequant", n=11008)],
                                       "dx": [_point(1024, "dequant")]},
                                 "Other": {"forward": [_point(1, "dequant")]}}}
    new = {"format": 1, "gpus": {"G": {"forward": [_point(16, "skinny", config={"split_k": 2}), _point(128, "merged")]}}}
    merged = dispatch.merge_tables(old, new)
    forward = {(p["m_bucket"], p["n"]): p["candidate"] for p in merged["gpus"]["G"]["forward"]}
    assert forward == {(1, 4096): "dequant", (16, 4096): "skinny", (128, 4096): "merged", (1, 11008): "dequant"}
    assert merged["gpus"]["G"]["dx"] == old["gpus"]["G"]["dx"] and merged["gpus"]["Other"] == old["gpus"]["Other"]
    assert dispatch.parse_table(json.dumps(merged)) == merged


def test_cached_choices_follow_the_rule(some_gpu, monkeypatch):
    """Choices with the shipped table are cached per problem; the cache keys on the rule, so a changed
    rule is never answered from a stale entry."""
    problem = dispatch.Problem(CUDA, 4, 64, 128, 8)
    assert dispatch.choose("forward", problem)[0].name == candidates.RULE["forward"][0]
    monkeypatch.setitem(candidates.RULE, "forward", ("skinny", "torch"))
    assert dispatch.choose("forward", problem)[0].name == "skinny"
