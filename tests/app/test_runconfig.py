"""The run configuration: one set of defaults, every flag a field, command line <-> recipe TOML round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import DATA, REPO, VOCAB, require_shared

from gpt2lora.app.cli import build_parser, run_config
from gpt2lora.app.recipes import parse_recipe, recipe_toml
from gpt2lora.app.runconfig import PLACEMENT_KEYS, SETTINGS, RunConfig, from_settings, to_toml
from gpt2lora.config import DEFAULT_LR, LoRAConfig, TrainConfig
from gpt2lora.errors import ConfigError

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11 is not supported
    tomllib = None


def config_of(*argv: str) -> RunConfig:
    return run_config(build_parser().parse_args(["train", *argv]))


def print_config(*argv: str, cwd=REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", "train", *argv, "--print-config"], check=True,
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return proc.stdout


def test_a_bare_command_line_trains_on_the_library_defaults():
    config = config_of().resolved()
    assert config.lora == LoRAConfig() and config.lora.alpha == config.lora.rank == 8
    assert config.train == TrainConfig(lr=DEFAULT_LR["lora"])
    assert config_of("--method", "full").resolved().train.lr == DEFAULT_LR["full"] == 5e-5
    assert config.task == "sst2" and config_of("--data", "x").resolved().task is None


# one non-default command-line value per setting, and what the resolved config must then hold
FLAG_VALUES = {
    "int": ("3", 3), "int0": ("7", 7), "float": ("0.25", 0.25), "float0": ("0.5", 0.5), "prob": ("0.5", 0.5),
    "clip": ("0", None), "pair": (["0.8", "0.9"], (0.8, 0.9)), "map": ("text=sentence", (("text", "sentence"),)),
}
SPECIAL = {"model": ("gpt2-medium", "gpt2-medium"), "device": ("cpu", "cpu"), "precision": ("fp32", "fp32"),
           "task": ("snli", "snli"), "data": ("/tmp/rows", "/tmp/rows"), "data_root": ("/tmp/d", "/tmp/d"),
           "vocab": ("/tmp/v", "/tmp/v"), "data_source": ("hub", "hub"), "eval_split": ("test", "test"),
           "method": ("full", "full"), "targets": (["attn.c_attn"], ("attn.c_attn",)),
           "lora_style": ("from_scratch", "from_scratch"), "lora_train_bias": ("all", "all"),
           "schedule": ("constant", "constant"), "optimizer": ("sgd", "sgd"), "best_metric": ("accuracy", "accuracy"),
           "prompt_init": ("random", "random"), "out": ("elsewhere", "elsewhere"), "run_name": ("r1", "r1"),
           "resume": ("auto", "auto"), "revision": ("v1", "v1"), "model_revision": ("abc", "abc"),
           "report_to": ("tensorboard,wandb", ("tensorboard", "wandb")), "lora_init": ("gaussian", "gaussian"),
           "distributed": ("fsdp", "fsdp"), "device_memory": ("16GB", "16GB")}


def _read(config: RunConfig, setting):
    owner = {"run": config, "train": config.train, "lora": config.lora, "prompt": config.prompt}[setting.section]
    return getattr(owner, setting.field)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_every_train_flag_reaches_the_resolved_configuration(setting):
    if setting.type == "bool":
        argv, expected = [setting.option], not setting.option.startswith("--no-")
    else:
        text, expected = SPECIAL.get(setting.key) or FLAG_VALUES[setting.type]
        argv = [setting.option, *([text] if isinstance(text, str) else text)]
    extra = ["--last-n-blocks", "2"] if setting.key == "method" else []  # nothing else needs a companion
    config = config_of(*argv, *extra)
    assert _read(config, setting) == expected
    assert _read(config, setting) != _read(RunConfig(), setting) or setting.key == "lr"


@pytest.mark.parametrize("argv", [
    [], ["--method", "full", "--lr", "1e-5"], ["--method", "last_n_full", "--last-n-blocks", "2"],
    ["--method", "head"], ["--method", "embeddings"], ["--method", "prompt", "--num-virtual-tokens", "8"],
    ["--method", "none"], ["--rank", "4", "--lora-style", "from_scratch", "--targets", "attn.q", "attn.v"],
    ["--rank", "16", "--alpha", "32", "--rslora", "--last-n-blocks", "3", "--grad-clip", "0", "--betas", "0.8",
     "0.95", "--column", "text=sentence", "--data", "my_reviews", "--seed", "3"],
], ids=["defaults", "full", "last_n_full", "head", "embeddings", "prompt", "none", "from_scratch", "many"])
def test_print_config_round_trips_byte_for_byte(argv, tmp_path):
    (tmp_path / "my_reviews").mkdir()
    first = print_config(*argv, cwd=tmp_path)
    assert tomllib.loads(first)["rows"][0]["method"] == (argv[argv.index("--method") + 1] if "--method" in argv
                                                        else "lora")
    recipe = tmp_path / "row.toml"
    recipe.write_text(first, encoding="utf-8")
    assert print_config("--config", str(recipe), cwd=tmp_path) == first
    # the file's row resolves to the same configuration as the command line
    parsed = parse_recipe(tomllib.loads(first), recipe)
    from_file = parsed.rows[0].config(parsed.rows[0].seeds[0], relative_to=tmp_path).resolved()
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert from_file == config_of(*argv).resolved()
    finally:
        os.chdir(here)


def test_a_recipe_row_and_its_command_line_resolve_equal():
    recipe = parse_recipe(tomllib.loads('''title = "t"
[defaults]
task = "sms_spam"
lora = { rank = 4, style = "from_scratch" }
[[rows]]
name = "a"
lr = 0.001
warmup_ratio = 0.2
batch_size = 8
last_n = 2
'''), "r.toml")
    row = recipe.rows[0].config(0).resolved()
    cli = config_of("--task", "sms_spam", "--rank", "4", "--lora-style", "from_scratch", "--lr", "0.001",
                    "--warmup-ratio", "0.2", "--batch-size", "8", "--last-n-blocks", "2").resolved()
    assert row == cli and row.lora.last_n_blocks == 2 and row.lora.alpha == 4
    assert recipe_toml(recipe) == to_toml([("a", row)], "t")


def test_alpha_follows_the_rank_unless_given():
    assert config_of("--rank", "16").lora.alpha == 16
    assert config_of("--rank", "16", "--alpha", "8").lora.alpha == 8
    assert from_settings({"lora": {"rank": 2}}).lora.alpha == 2


def test_placement_flags_are_settings_and_the_rest_refused_with_config(tmp_path, capsys):
    from gpt2lora.app.cli import main

    keys = {s.key for s in SETTINGS}
    assert set(PLACEMENT_KEYS) <= keys
    recipe = tmp_path / "r.toml"
    recipe.write_text('title = "t"\n[[rows]]\nname = "a"\ntask = "sst2"\n')
    assert main(["train", "--config", str(recipe), "--rank", "4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rank given on the command line" in err


@pytest.mark.parametrize("values, message", [
    ({"lr": 0}, "lr: expected a number > 0, got 0"),
    ({"method": "qlora"}, "method: expected one of lora, full"),
    ({"lora": {"rank": 0}}, "lora.rank: expected a positive integer, got 0"),
    ({"targets": ["attn.c_attn"]}, "targets: expected a known key"),
    ({"method": "last_n_full"}, "RunConfig.last_n_blocks: method last_n_full needs"),
    ({"task": "sst3"}, "RunConfig.task: expected a task preset"),
    ({"columns": {"text": 3}}, "columns: expected a table of FIELD = COLUMN strings"),
])
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=None) as info:
        from_settings(values, where="x.toml: ")
    assert message in str(info.value) and str(info.value).startswith("x.toml: ")


def test_subcommands_show_only_the_flags_they_use():
    helps = {name: subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", name, "--help"], capture_output=True, check=True,
                                  text=True, cwd=REPO, timeout=120, env={"PYTHONPATH": str(REPO),
                                                                         "PATH": "/usr/bin:/bin"}).stdout
             for name in ("generate", "eval", "merge", "train")}
    for flag in ("--train-rows", "--eval-rows", "--eval-split", "--rank", "--lr"):
        assert flag not in helps["generate"] and flag not in helps["merge"]
    assert "--train-rows" not in helps["eval"] and "--eval-rows" in helps["eval"]
    for flag in ("--lora-style", "--schedule", "--lora-train-bias", "--print-config", "--betas"):
        assert flag in helps["train"]
    # the help shows the RunConfig defaults, since the flags have none of their own
    flat = " ".join(helps["train"].split())
    for text in ("LoRA rank r (default: 8)", "(default: 0.05)", ("(default: attn.c_attn attn.c_proj mlp.c_fc "
                 "mlp.c_proj)"), "(default: cosine)", "(default: 16)"):
        assert text in flat, text


def test_pack_trains_an_lm_task_and_is_refused_for_classification(tmp_path, capsys):
    """`--pack` reaches the batches of a QA run (fewer, fuller rows; the padding share left is reported); on a
    classification task it is one clear line naming the setting."""
    import json

    from gpt2lora.app.cli import main

    common = ["--smoke", "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)),
              "--out", str(tmp_path), "--quiet", "--max-steps", "2", "--train-rows", "40", "--eval-rows", "8"]
    qa = tmp_path / "short_qa"  # answers of a few tokens: several examples fit one 64-token row
    qa.mkdir()
    rows = [{"context": f"Item {i} is {'red' if i % 2 else 'blue'}{' and small' * (i % 4)}.",
             "question": f"What colour is item {i}?", "answers": ["red" if i % 2 else "blue"]} for i in range(40)]
    for split in ("train", "validation"):
        (qa / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["train", "--data", str(qa), *common, "--run-name", "packed", "--pack"]) == 0
    assert main(["train", "--data", str(qa), *common, "--run-name", "plain"]) == 0
    packed = json.loads((tmp_path / "packed" / "metrics.json").read_text())["result"]
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["result"]
    # 40 short examples, 16 rows per batch: 3 batches unpacked, 1 when 4-5 examples share a 64-token row
    assert packed["train_batches"] < plain["train_batches"] == 3
    assert 0 <= packed["padding_share"] < 1 and "packed into rows" in (tmp_path / "packed" / "summary.md").read_text()
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["settings"]["pack"] is True
    capsys.readouterr()
    assert main(["train", "--task", "sst2", *common, "--run-name", "cls", "--pack"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pack" in err and "classification" in err
