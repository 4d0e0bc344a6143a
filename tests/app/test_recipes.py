"""Recipes: every shipped recipe parses, names its sources and runs in --smoke mode; the report puts the
published figures and this run's side by side; train --config runs users' files; bad recipes fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO, VOCAB, require_shared

from gpt2lora import GPT2, GPT2Config, GPT2ForSequenceClassification, count_parameters, prepare_model
from gpt2lora.app.cli import main
from gpt2lora.app.recipes import (
    FIGURES,
    RecipeOptions,
    load_recipe,
    parse_recipe,
    read_recipe,
    row_config,
    run_recipe,
    shipped_recipes,
)
from gpt2lora.data.tasks import TASKS
from gpt2lora.errors import ConfigError

RECIPE_FILES = sorted((REPO / "gpt2lora" / "app" / "recipes").glob("*.toml"))
CS_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")


def smoke_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    require_shared(DATA)
    return ["reproduce", name, "--smoke", "--data", str(DATA), "--vocab", str(VOCAB), "--device", "cpu",
            "--out", str(tmp_path), "--run-name", "r", *extra]


# ---------------------------------------------------------------------------------------------- shipped recipes

def test_one_recipe_per_published_table_ships_as_package_data():
    assert {p.stem for p in RECIPE_FILES} == set(shipped_recipes())
    names = set(shipped_recipes())
    for expected in ("rotten_tomatoes", "sst2_methods", "squad", "tweet_emoji", "cs7643_table2_token_count",
                     "cs7643_table3_full_vs_lora", "cs7643_table4_rank_medium", "cs7643_table5_blocks_medium",
                     "cs7643_warmup", "cs7643_optimizers"):
        assert expected in names
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"recipes/*.toml"' in section


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_with_sources(path):
    recipe = read_recipe(path)
    assert recipe.title and recipe.rows
    references = {p.name for p in (REPO.parent / "shared" / "references").glob("*")}
    for row in recipe.rows:
        assert row.settings.get("task") in TASKS
        if row.published:
            assert row.source is not None and row.source["table"]
            if references:  # the cited report is one of the five in ../shared/references
                assert row.source["report"] in references
        if row.method == "lora":
            row.lora_config()  # valid LoRAConfig
    if path.stem.startswith("cs7643"):
        lora_rows = [r for r in recipe.rows if r.method == "lora"]
        assert all(r.lora_config().style == "from_scratch" and r.lora_config().targets == CS_TARGETS
                   for r in lora_rows)


def test_figures_match_the_reports():
    rt = load_recipe("rotten_tomatoes")
    assert [r.name.split(" (")[0] for r in rt.rows] == ["Foundation", "Training 1", "Training 2", "Training 3"]
    assert rt.rows[1].published["accuracy"] == pytest.approx(0.6951)
    assert (rt.rows[1].lora_config().rank, rt.rows[1].settings["lr"]) == (4, 2e-5)
    assert (rt.rows[3].lora_config().rank, rt.rows[3].settings["lr"]) == (8, 5e-6)
    squad = load_recipe("squad").rows[0]
    lora = squad.lora_config()
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (8, 16, 0.1, ("attn.c_attn",))
    assert (squad.settings["batch_size"], squad.settings["lr"], squad.settings["epochs"]) == (4, 2e-4, 3)
    table4 = load_recipe("cs7643_table4_rank_medium")
    assert len(table4.rows) == 20
    ranks = {r.lora_config().rank: r.published["judge_score"] for r in table4.rows if "judge_score" in r.published}
    assert ranks == {2: 19.92, 4: 27.10, 8: 29.56, 16: 36.35, 32: 33.57}
    optimizers = {r.settings["optimizer"]: r.published["judge_score"] for r in load_recipe("cs7643_optimizers").rows}
    assert optimizers == {"adamw": 36.35, "sgd": 14.96, "sgd_momentum": 21.69}
    warmup = {r.settings["warmup_ratio"] for r in load_recipe("cs7643_warmup").rows}
    assert warmup == {0.01, 0.2}
    tokens = {(r.settings["model"], r.settings["max_length"]): r.published["accuracy"]
              for r in load_recipe("cs7643_table2_token_count").rows}
    assert tokens == {("gpt2", 256): 0.905, ("gpt2", 1024): 0.926, ("gpt2-medium", 256): 0.932,
                      ("gpt2-medium", 1024): 0.942}
    prelayer = {r.method for r in load_recipe("sst2_methods").rows if r.name.startswith("PreLayer")}
    assert prelayer == {"embeddings", "prompt"}


def _meta_model(row):
    config = GPT2Config.from_preset(row.settings.get("model", "gpt2"))
    preset = TASKS[row.settings["task"]]
    with torch.device("meta"):
        if preset.kind in ("classification", "nli"):
            return GPT2ForSequenceClassification(config, num_labels=len(preset.label_names))
        return GPT2(config)


def _published_counts():
    for path in RECIPE_FILES:
        for row in read_recipe(path).rows:
            if "trainable_params" in row.published and row.method in ("lora", "prompt"):
                yield pytest.param(row, id=f"{path.stem}:{row.name}")


@pytest.mark.parametrize("row", list(_published_counts()))
def test_recipe_settings_give_the_published_trainable_counts(row):
    """Built at the real size on the meta device: exact counts must match exactly, rounded ones (148K, 14M,
    8M, 2M, 46K) to within their last significant digit (the reports round some and truncate others)."""
    model = _meta_model(row)
    if row.method == "prompt":
        from gpt2lora.peft.prompt import PromptConfig

        prepare_model(model, "prompt", prompt=PromptConfig(num_virtual_tokens=row.settings["num_virtual_tokens"]))
    else:
        prepare_model(model, "lora", lora=row.lora_config())
    trainable = count_parameters(model).trainable
    if row.method == "prompt":  # the report's 46K is the prompt alone (60 x 768); the 2-class head trains besides
        trainable -= sum(p.numel() for n, p in model.named_parameters() if n.startswith("score"))
    published = int(row.published["trainable_params"])
    significant = len(str(published).rstrip("0"))
    if len(str(published)) - significant < 3:  # printed in full (294,912; 987,298): the exact integer
        assert trainable == published
    else:  # printed rounded (148K, 14M, 2M, 46K): within its last significant digit
        step = 10 ** (len(str(published)) - significant)
        assert abs(trainable - published) < step, (trainable, published)  # rounded or truncated
    if "trainable_pct" in row.published:  # the share, to the digits the report printed (rounded or truncated)
        total = count_parameters(model).total
        text = f"{row.published['trainable_pct']:g}"
        unit = 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)
        ours = 100 * trainable / total
        # CS 7643 derived its shares from its rounded counts over the base model (8M / 355M = 2.25% -> "2.3")
        from_their_count = 100 * published / (total - trainable)
        assert min(abs(ours - row.published["trainable_pct"]), abs(from_their_count - row.published["trainable_pct"])) \
            < unit, (ours, from_their_count, row.published["trainable_pct"])


# ---------------------------------------------------------------------------------------------- commands

def test_reproduce_list_names_every_recipe(capsys):
    assert main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(shipped_recipes())
    for line in lines:
        name, title = line.split(maxsplit=1)
        assert title == read_recipe(shipped_recipes()[name]).title


def _check_report(folder: Path, recipe_name: str) -> dict:
    report = (folder / "report.md").read_text(encoding="utf-8")
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert "| Row | Figure | Published | This run | Difference |" in report
    assert "Machine: platform" in report and "torch" in report and "Smoke run" in report
    recipe = load_recipe(recipe_name)
    published = [(r.name, f) for r in recipe.rows for f in r.published]
    compared = [(line["row"], line["figure"]) for line in results["comparison"] if line["published"] is not None]
    assert compared == published  # every published figure has a line, in order
    for line in results["comparison"]:
        assert f"| {line['row']} | {line['label']} | {line['published_text']} | {line['this_run_text']} |" in report
    return results


def test_reproduce_smoke_writes_published_and_this_run_side_by_side(tmp_path, capsys):
    assert main(smoke_args(tmp_path, "tweet_emoji")) == 0
    results = _check_report(tmp_path / "r", "tweet_emoji")
    by_key = {(line["row"], line["figure"]): line for line in results["comparison"]}
    accuracy = by_key[("GPT-2 (full fine-tuning)", "accuracy")]
    assert accuracy["published_text"] == "47.32%"
    measured = results["results"][0]["accuracy"]
    assert accuracy["this_run"] == pytest.approx(measured)
    assert accuracy["difference"] == f"{100 * (measured - 0.4732):+.2f} pp"
    train_time = by_key[("PEFT (LoRA)", "train_time_s")]
    assert train_time["published"] == 5100 and train_time["this_run"] > 0
    # every row trained for real: a run folder with an adapter and a history per row
    for result in results["results"]:
        run = Path(result["run_dirs"][0])
        assert (run / "adapter").is_dir() and (run / "history.jsonl").is_file()
        assert result["train_loss"] is not None
    assert "report:" in capsys.readouterr().out


def test_train_config_runs_a_users_recipe_and_maps_missing_local_tasks(tmp_path, capsys):
    require_shared(DATA)
    (tmp_path / "mydata").mkdir()
    rows = [json.loads(line) for line in (DATA / "sms_spam" / "train.jsonl").read_text().splitlines()[:40]]
    for split in ("train", "validation"):
        (tmp_path / "mydata" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "mine.toml"
    recipe.write_text('''title = "my spam runs"
[defaults]
method = "lora"
lora = { rank = 2 }
[[rows]]
name = "own files"
data = "mydata"
[[rows]]
name = "enron via smoke"
task = "enron_spam"
method = "head"
published = { accuracy = 0.9 }
source = { report = "my notes", table = "1" }
''')
    args = ["train", "--config", str(recipe), "--smoke", "--data-root", str(DATA), "--vocab", str(VOCAB),
            "--device", "cpu", "--out", str(tmp_path / "runs"), "--run-name", "mine"]
    assert main(args) == 0
    report = (tmp_path / "runs" / "mine" / "report.md").read_text()
    assert "enron_spam has no local copy; --smoke ran it on sms_spam" in report
    results = json.loads((tmp_path / "runs" / "mine" / "results.json").read_text())
    first = results["results"][0]
    assert first["train_rows"] == 24  # smoke cap on the user's 40 rows, read from the relative path
    assert json.loads((Path(first["run_dirs"][0]) / "config.json").read_text())["lora"]["rank"] == 2
    assert results["results"][1]["task"] == "sms_spam"
    # a row without published figures still shows what was measured
    assert any(line["row"] == "own files" and line["published_text"] == "not published"
               for line in results["comparison"])


def test_train_config_refuses_run_flags_on_the_command_line(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('title = "t"\n[[rows]]\nname = "a"\ntask = "sst2"\n')
    assert main(["train", "--config", str(recipe), "--lr", "0.1", "--epochs", "3"]) == 1
    err = capsys.readouterr().err
    assert "--epochs, --lr given on the command line" in err and str(recipe) in err


def test_a_rows_placement_settings_hold_unless_the_command_gives_them(tmp_path):
    """``device``, ``threads``, ``vocab``, ``data_root`` and ``data_source`` in a row (what ``--print-config``
    writes) are used; a flag the command gives replaces them for every row (before: always replaced, silently)."""
    recipe = parse_recipe({"title": "t", "defaults": {"task": "sst2", "threads": 1},
                           "rows": [{"name": "a", "device": "cpu", "vocab": "v", "data_source": "local",
                                     "data_root": "d"},
                                    {"name": "b", "threads": 2}]}, tmp_path / "r.toml")
    a, b = (row_config(recipe, row, 0, RecipeOptions())[0] for row in recipe.rows)
    assert (a.train.device, a.threads, a.source) == ("cpu", 1, "local")
    assert (a.vocab, a.data_root) == (str(tmp_path / "v"), str(tmp_path / "d"))  # relative to the recipe file
    assert (b.train.device, b.threads, b.vocab, b.source) == ("auto", 2, None, "auto")
    given = RecipeOptions(device="auto", threads=3, vocab="w", source="hub", data_root="e")
    a = row_config(recipe, recipe.rows[0], 0, given)[0]
    assert (a.train.device, a.threads, a.vocab, a.source, a.data_root) == ("auto", 3, "w", "hub", "e")


def test_a_smoke_row_without_smoke_on_the_command_is_refused_by_name(tmp_path):
    recipe = parse_recipe({"title": "t", "rows": [{"name": "tiny", "task": "sst2", "smoke": True},
                                                  {"name": "full", "task": "sst2"}]}, tmp_path / "r.toml")
    with pytest.raises(ConfigError, match=r"r\.toml: rows tiny say smoke = true; .* pass --smoke"):
        run_recipe(recipe, RecipeOptions(out=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_reproduce_errors_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPT2LORA_DATA", raising=False)
    assert main(["reproduce", "no_such_recipe"]) == 1
    assert "not a shipped recipe" in capsys.readouterr().err
    assert main(["reproduce", "squad", "--smoke", "--out", str(tmp_path)]) == 1
    assert "--smoke reads local rows: pass --data DIR" in capsys.readouterr().err
    assert main(["reproduce"]) == 1
    assert "name a recipe" in capsys.readouterr().err
    assert main(["reproduce", "squad", "--judge-model", "x", "--data", str(tmp_path)]) == 1
    assert "--judge-endpoint and --judge-model go together" in capsys.readouterr().err


@pytest.mark.slow
def test_every_shipped_recipe_runs_in_smoke_mode(tmp_path):
    """All 15 recipes (87 rows), a few training steps each."""
    for name in sorted(shipped_recipes()):
        out = tmp_path / name
        assert main(smoke_args(out, name)) == 0, name
        _check_report(out / "r", name)


# ---------------------------------------------------------------------------------------------- bad recipes

BASE = {"title": "t", "source": {"report": "r.md", "table": "T1"}, "rows": [{"name": "a", "task": "sst2"}]}


def _with(**changes):
    data = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        target = data
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(("data", "expected"), [
    (_with(colour="red"), "colour: expected a known top-level key"),
    (_with(defaults={"learning_rate": 1e-4}), "defaults.learning_rate: expected a known key"),
    (_with(rows__0__lr_max=1e-4), "rows[0].lr_max: expected a known key"),
    (_with(rows__0__lora={"rnk": 4}), "rows[0].lora.rnk: expected a known key"),
    (_with(rows__0__lr="fast"), "rows[0].lr: expected a number > 0, got 'fast'"),
    (_with(rows__0__epochs=1.5), "rows[0].epochs: expected a positive integer, got 1.5"),
    (_with(rows__0__epochs=True), "rows[0].epochs: expected a positive integer, got True"),
    (_with(rows__0__lora={"targets": "attn.c_attn"}), "rows[0].lora.targets: expected a list of layer names"),
    (_with(rows__0__lora={"targets": ["attn.qq"]}), "rows[0] (a): lora.targets: expected one of attn.c_attn"),
    (_with(rows__0__task=_DELETE), "rows[0] (a).task: expected a task"),
    (_with(rows__0__task="sst3"), "rows[0] (a).task: expected a task preset"),
    (_with(rows__0__method="qlora"), "rows[0] (a).method: expected one of lora, full"),
    (_with(rows__0__lr=1e-4, rows__0__min_lr=1e-3), "rows[0] (a): TrainConfig.min_lr"),
    (_with(rows__0__published={"accuracy": 0.9}, source=_DELETE),
     "rows[0] (a).published: expected a source for the published figures"),
    (_with(rows__0__published={"acc": 0.9}), "rows[0] (a).published.acc: expected a known figure"),
    (_with(rows__0__published={"accuracy": "90%"}), "rows[0] (a).published.accuracy: expected a number, got '90%'"),
    (_with(source={"report": "r.md"}), "source.table: expected a non-empty string"),
    (_with(rows=[]), "rows: expected one or more [[rows]] tables"),
    (_with(rows=[{"name": "a", "task": "sst2"}, {"name": "a", "task": "sst2"}]),
     "rows[1].name: expected a name no other row has"),
    (_with(title=_DELETE), "title: expected a one-line string"),
    (_with(rows__0__method="last_n_full"), "rows[0] (a).last_n_blocks: expected the number of blocks"),
])
def test_bad_recipes_name_file_key_and_expectation(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_recipe(data, "my/recipe.toml")
    message = str(info.value)
    assert message.startswith("my/recipe.toml: ")
    assert expected in message


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('title = "t"\n[[rows]\n')
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        read_recipe(broken)
    with pytest.raises(ConfigError, match=r"missing\.toml: no such recipe file"):
        read_recipe(tmp_path / "missing.toml")
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('title = "t"\n[defaults]\nbatch_size = "16"\n[[rows]]\nname = "a"\ntask = "sst2"\n')
    with pytest.raises(ConfigError, match=r"wrong\.toml: defaults\.batch_size: expected a positive integer, "
                                          r"got '16'"):
        read_recipe(wrong_type)


def test_every_figure_name_is_documented_once():
    assert len({f.label for f in FIGURES.values()}) == len(FIGURES)


def test_reports_show_the_memory_training_added_beside_the_published_peak():
    from gpt2lora.app.recipes import comparison_rows

    recipe = load_recipe("sst2_methods")
    results = [{"peak_memory_mb": 2048.0 + i, "memory_added_mb": 512.0 + i, "accuracy": 0.5} for i in
               range(len(recipe.rows))]
    lines = comparison_rows(recipe, results)
    for i, row in enumerate(recipe.rows):
        figures = [line["figure"] for line in lines if line["row"] == row.name]
        if "peak_memory_gb" not in row.published:
            continue
        assert figures[figures.index("peak_memory_gb") + 1] == "memory_added_gb"
        added = next(line for line in lines if line["row"] == row.name and line["figure"] == "memory_added_gb")
        assert added["published_text"] == "not published" and added["this_run"] == pytest.approx((512 + i) / 1024)
