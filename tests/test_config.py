import dataclasses
import json

import pytest

from config import PRESETS, Config, ConfigError, build_parser, parse_config


def test_defaults_are_the_grokking_preset():
    cfg, explicit = parse_config([])
    assert cfg == Config()
    assert explicit == set()
    assert (cfg.task, cfg.modulus, cfg.operation, cfg.frac_train, cfg.preset) == ("modular", 113, "add", 0.3, "grokking")


@pytest.mark.parametrize("argv", [["--lr", "3e-4"], ["--lr=3e-4"]])
def test_space_and_equals_forms(argv):
    cfg, explicit = parse_config(argv)
    assert cfg.lr == 3e-4
    assert explicit == {"lr"}


@pytest.mark.parametrize("argv, expected", [
    (["--torch_compile=False"], False),
    (["--torch_compile", "True"], True),
    (["--torch_compile"], True),
    (["--torch_compile", "0"], False),
    (["--torch_compile=yes"], True),
])
def test_boolean_forms(argv, expected):
    assert parse_config(argv)[0].torch_compile is expected


def test_issue_flags_exist():
    cfg, _ = parse_config([
        "--num_blocks", "2", "--num_heads", "8", "--embedding_dim", "64", "--context_len", "16",
        "--lr", "1e-3", "--epochs", "3", "--max_steps", "0", "--use_muon", "true",
        "--accumulation_steps", "2", "--tokenizer", "gpt2", "--torch_compile=False",
        "--save_model", "True", "--save_model_dir", "elsewhere", "--save_every", "7",
        "--wandb_enabled", "false", "--run", "r1",
    ])
    assert (cfg.num_blocks, cfg.num_heads, cfg.embedding_dim, cfg.context_len) == (2, 8, 64, 16)
    assert (cfg.epochs, cfg.max_steps, cfg.use_muon, cfg.accumulation_steps) == (3.0, 0, True, 2)
    assert (cfg.tokenizer, cfg.save_model_dir, cfg.save_every, cfg.run_name) == ("gpt2", "elsewhere", 7, "r1")


def test_every_field_is_a_flag_with_default_and_help():
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in help_text
        assert f.metadata["help"]
    assert "(default: 113)" in help_text
    assert "--config" in help_text


def test_nanda_preset_is_the_paper_setup():
    cfg, _ = parse_config(["--preset", "nanda"])
    assert (cfg.num_blocks, cfg.num_heads, cfg.embedding_dim, cfg.mlp_dim) == (1, 4, 128, 512)
    assert (cfg.activation, cfg.norm, cfg.tie_embeddings, cfg.use_muon) == ("relu", "none", False, False)
    assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.batch_size) == (1e-3, 1.0, 0.9, 0.98, 0)
    assert cfg.decay_all_params and cfg.modulus == 113 and cfg.frac_train == 0.3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg, _ = parse_config(["--preset", name])
    assert cfg.preset == name
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_flags_override_preset_regardless_of_order():
    for argv in (["--preset", "nanda", "--lr", "5e-4"], ["--lr", "5e-4", "--preset", "nanda"]):
        cfg, _ = parse_config(argv)
        assert cfg.lr == 5e-4 and cfg.weight_decay == 1.0


def test_config_file_reproduces_and_later_flags_override(tmp_path):
    original, _ = parse_config(["--preset", "dyck", "--seed", "7", "--run", "old", "--lr", "2e-3"])
    path = tmp_path / "config.json"
    original.save(str(path))
    again, _ = parse_config(["--config", str(path)])
    # Everything but the run's name comes back; the new run gets its own name.
    assert dataclasses.replace(again, run_name="old") == original
    assert again.run_name == ""
    changed, explicit = parse_config(["--config", str(path), "--lr", "9e-4"])
    assert changed.lr == 9e-4 and changed.seed == 7 and explicit == {"lr"}


@pytest.mark.parametrize("argv, fragment", [
    (["--learning_rate", "1"], "did you mean --lr"),
    (["--num_head", "2"], "did you mean --num_heads"),
    (["--embedding_dim", "100", "--num_heads", "3"], "--num_heads: embedding_dim 100 is not divisible"),
    (["--frac_train", "1.5"], "--frac_train"),
    (["--frac_train", "0"], "--frac_train"),
    (["--context_len", "2"], "--context_len"),
    (["--lr", "fast"], "--lr"),
    (["--save_model", "maybe"], "--save_model"),
    (["--task", "vision"], "--task"),
    (["--preset", "gpt5"], "--preset"),
    (["--operation", "divide", "--modulus", "12"], "not prime"),
    (["--config", "/nonexistent/config.json"], "/nonexistent/config.json"),
])
def test_bad_input_names_the_flag(argv, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(argv)
    assert fragment in str(info.value)


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_blocs": 2}))
    with pytest.raises(ConfigError, match="num_blocs.*did you mean --num_blocks"):
        parse_config(["--config", str(path)])


def test_config_file_with_wrong_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_blocks": "two"}))
    with pytest.raises(ConfigError, match="--num_blocks"):
        parse_config(["--config", str(path)])


def test_run_name_alias_for_torchrun():
    # torchrun claims `--run` for its own `--run-path`; `--run_name` is the field, `--run` its old spelling.
    for argv in (["--run_name", "r7"], ["--run_name=r7"], ["--run", "r7"]):
        cfg, explicit = parse_config(argv)
        assert cfg.run_name == "r7" and explicit == {"run_name"}
