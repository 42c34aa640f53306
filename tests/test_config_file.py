"""`run.py train --config FILE`: train flags from a TOML file or a run's config.json; explicit flags win (issue 18)."""
import json

import pytest

import run
import train.loop
from conftest import train_args


def one_line_exit(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_toml_keys_with_dashes_or_underscores_and_explicit_flags_win(tmp_path):
    config = tmp_path / "judge.toml"
    config.write_text('rank = 4\n"batch-size" = 2\nlr = 1e-3\neager = true\ngrad_checkpoint = 3\n'
                      'lora-dropout = 0.1\ntemplate = "original"\nquant = "none"\n')
    args = run.parse_args(["train", "--data", "t.csv", "--config", str(config), "--rank", "8"])
    assert (args.rank, args.batch_size, args.lr, args.eager, args.grad_checkpoint) == (8, 2, 1e-3, True, 3)
    assert (args.lora_dropout, args.template, args.quant, args.data) == (0.1, "original", "none", "t.csv")
    assert not hasattr(args, "config")


def test_a_runs_config_json_reproduces_its_flags(tiny_llama3, tables, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    run_dir = train.loop.train(train_args(tiny_llama3, tables[0], tmp_path / "run", "--lora-layers", "1"))
    flags = json.loads((run_dir / "config.json").read_text())["flags"]
    again = vars(run.parse_args(["train", "--config", str(run_dir / "config.json"), "--out", str(tmp_path / "b")]))
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in flags.items() if k != "out"}
    assert again["out"] == str(tmp_path / "b")


def test_unknown_keys_are_one_line(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('rank = 4\nlearning_rate = 1e-3\n"warmup" = 3\n')
    err = one_line_exit(["train", "--config", str(config)], capsys)
    assert "unknown train flag(s) learning_rate, warmup" in err and str(config) in err


@pytest.mark.parametrize("name,text,message", [
    ("bad.toml", "rank = -1\n", "--rank: must be positive, got -1"),
    ("bad.toml", "eager = 1\n", "eager=1 must be true or false"),
    ("bad.toml", "rank = [\n", "not a TOML file"),
    ("config.json", '{"flags": [1]}', '"flags" is list, not an object'),
    ("config.json", '{"flags": null}', '"flags" is NoneType, not an object'),
    ("config.json", '[1]', "not a TOML file or a run's config.json"),
    ("config.json", '{"rank": 4}', "not a TOML file or a run's config.json"),
])
def test_bad_values_are_one_line(name, text, message, tmp_path, capsys):
    config = tmp_path / name
    config.write_text(text)
    assert message in one_line_exit(["train", "--config", str(config)], capsys)


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert "No such file" in one_line_exit(["train", "--config", str(tmp_path / "none.toml")], capsys)


def test_a_saved_value_that_looks_like_a_flag_stays_a_value(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"flags": {"group_col": "-x", "data": "t.csv", "grad_checkpoint": true, "eager": false}}')
    assert run.config_file_flags(config) == ["--group-col=-x", "--data=t.csv", "--grad-checkpoint"]
    args = run.parse_args(["train", "--config", str(config)])
    assert args.group_col == "-x" and args.grad_checkpoint is True and args.eager is False
