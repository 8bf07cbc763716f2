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
    assert (cfg.tokenizer, cfg.runs_dir, cfg.save_every, cfg.run_name) == ("gpt2", "elsewhere", 7, "r1")


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


# What the README's preset table says each recipe is, written out here rather than read from
# config.PRESETS: a preset that drifts from its documented recipe fails.
DOCUMENTED = {
    "grokking": dict(task="modular", operation="add", modulus=113, frac_train=0.3, num_blocks=1, num_heads=4,
                     embedding_dim=128, mlp_dim=512, activation="relu", norm="none", tie_embeddings=True,
                     batch_size=0, use_muon=False, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.5,
                     decay_all_params=False, target_val_acc=0.99),
    "grokking_muon": dict(num_blocks=1, num_heads=4, embedding_dim=128, mlp_dim=512, use_muon=True, muon_lr=0.3,
                          muon_weight_decay=0.5, lr=3e-3, weight_decay=1.0),
    "nanda": dict(num_blocks=1, num_heads=4, embedding_dim=128, mlp_dim=512, tie_embeddings=False, batch_size=0,
                  use_muon=False, lr=1e-3, weight_decay=1.0, decay_all_params=True, beta1=0.9, beta2=0.98,
                  warmup_steps=10, init_std=0.8 / 128**0.5, max_steps=40000),
    "dyck": dict(task="dyck", dyck_types=2, dyck_max_depth=6, dyck_max_len=30, num_blocks=2, norm="layernorm"),
    "shakespeare_char": dict(task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384,
                             context_len=256, batch_size=64, dropout=0.2, use_muon=True, muon_lr=0.02, lr=1e-3,
                             max_steps=2000, lr_schedule="cosine", min_lr_frac=0.1, eval_every=250),
    "shakespeare_char_adamw": dict(task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384,
                                   context_len=256, batch_size=64, dropout=0.2, use_muon=False, lr=1e-3,
                                   max_steps=5000, lr_schedule="cosine", min_lr_frac=0.1),
    "finetune": dict(use_muon=False, lr=3e-5, lr_schedule="constant", batch_size=32, dropout=0.0, max_steps=200,
                     eval_every=20),
    "shakespeare_char_modern": dict(task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384,
                                    context_len=256, batch_size=64, dropout=0.2, positional="rope", qk_norm=True,
                                    activation="relu2", norm="rmsnorm", norm_weights=False, zero_init_outputs=True,
                                    logit_softcap=15.0, bias=False, use_muon=True, muon_lr=0.02, warmup_steps=20,
                                    lr=3e-3, tie_embeddings=True, max_steps=2000),
}


def test_the_documented_presets_are_the_presets():
    assert sorted(DOCUMENTED) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_preset_validates_to_its_documented_recipe(name):
    cfg, _ = parse_config(["--preset", name])
    assert cfg.preset == name
    assert {key: getattr(cfg, key) for key in DOCUMENTED[name]} == DOCUMENTED[name]


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


def test_the_runs_folder_keeps_its_old_name_in_flags_and_config_files(tmp_path):
    """train.py's --save_model_dir is --runs_dir now; the old flag and config.json files written
    before the rename (runs/<run>/config.json, --config) still name the same folder."""
    cfg, explicit = parse_config(["--save_model_dir", "elsewhere"])
    assert cfg.runs_dir == "elsewhere" and "runs_dir" in explicit
    old = dict(dataclasses.asdict(Config()))
    old["save_model_dir"] = old.pop("runs_dir")
    old["save_model_dir"] = "older"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert parse_config(["--config", str(path)])[0].runs_dir == "older"
