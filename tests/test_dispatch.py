"""Dispatch as data (lora_triton/ops/dispatch.py): the shipped table, its loader and the rule."""

from __future__ import annotations

import json

import pytest
import torch

from lora_triton.ops import dispatch


def _table(points, gpu="Some GPU"):
    return {"format": 1, "gpus": {gpu: {"forward": points}}}


def _point(m_bucket, candidate, n=4096, k=4096, r=16, config=None):
    return {"m_bucket": m_bucket, "n": n, "k": k, "r": r, "candidate": candidate, "config": config}


def test_shipped_table_parses_and_names_the_h200():
    table = dispatch.load_table()
    assert "NVIDIA H200" in table["gpus"]
    assert all(p["candidate"] in dispatch.CANDIDATES for p in table["gpus"]["NVIDIA H200"]["forward"])


def test_nearest_m_bucket_of_the_same_shape_decides():
    table = _table([_point(1, "skinny", config={"split_k": 4}), _point(16, "skinny"), _point(1024, "dequant")])
    problem = lambda m, n=4096: dispatch.Problem(torch.device("cpu"), m, n, 4096, 16)  # noqa: E731
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(1))["config"] == {"split_k": 4}
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(8))["m_bucket"] == 16
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(600))["candidate"] == "dequant"
    assert dispatch.measured_choice(table, "Some GPU", "forward", problem(8, n=11008)) is None
    assert dispatch.measured_choice(table, "Other GPU", "forward", problem(8)) is None


def test_choose_uses_the_rule_without_a_table_and_reference_without_triton(device, monkeypatch):
    problem = dispatch.Problem(device, 3, 64, 128, 8)
    assert dispatch.choose(problem, table=_table([])) == (dispatch.RULE["forward"], None)
    import lora_triton.kernels.runtime as runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    assert dispatch.choose(dispatch.Problem(torch.device("cpu"), 3, 64, 128, 8))[0] == "torch"


def test_a_winner_that_does_not_support_the_problem_falls_back_to_the_rule(monkeypatch, device):
    monkeypatch.setattr(dispatch.Problem, "gpu", property(lambda self: "Some GPU"))
    table = _table([_point(64, "skinny", n=64, k=128, r=8)])
    assert dispatch.choose(dispatch.Problem(device, 64, 64, 128, 8), table=table)[0] == "skinny"
    assert dispatch.choose(dispatch.Problem(device, 512, 64, 128, 8), table=table)[0] == dispatch.RULE["forward"]


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
    assert table["gpus"] == {}


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
    from lora_triton.kernels import lora_forward as lf, nf4_skinny

    cuda = torch.device("cuda")  # the benchmark's GPU rows: the default plus every SKINNY_CONFIGS entry
    names = list(forward.skinny_configs(cuda))
    assert names[0] == "skinny" and len(names) == 1 + len(lf.SKINNY_CONFIGS)
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
    assert point["candidate"] == "skinny" and point["config"] == lf.SKINNY_CONFIGS[1]
    nf4_skinny.check_config({**point["config"], "split_k": 1, "table": "gather"})  # a config the kernel takes
