"""The README's code runs as written, on a tiny checkpoint standing in for the hub's "gpt2"."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_hf_checkpoint

README = REPO / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def gpt2_stand_in(tmp_path_factory, gpt2_vocab) -> Path:
    """A tiny random GPT-2 with the real vocabulary (so the real tokenizer's ids fit)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("readme") / "gpt2", with_tokenizer=True,
                              vocab_size=50257, n_embd=32, n_head=2, n_positions=160)


def pip_installs(text: str) -> list[str]:
    """What each ``pip install`` in ``text`` installs, flags dropped (``torch==2.13.0``, ``-e .[test]``)."""
    found = []
    for match in re.finditer(r"pip install ([^&\n]+)", text):
        words = [w for w in shlex.split(match.group(1)) if w not in ("--disable-pip-version-check", "-q")]
        found.append(" ".join(words))
    return found


def extras(install: str) -> set[str]:
    match = re.fullmatch(r"-e \.(?:\[([\w,-]+)\])?", install)
    assert match, f"unexpected install of the project: {install!r}"
    return set(filter(None, (match.group(1) or "").split(",")))


def test_setup_commands_are_exactly_two_and_ci_installs_what_they_install():
    blocks = [b.strip() for b in bash_blocks()]
    setup = blocks[:2]
    assert setup[0].startswith("pip install torch==2.13.0") and "gpt2lora quickstart" in setup[0]
    assert setup[1].endswith("python -m pytest -q")
    test_command = setup[1].split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(test_command)}$", ci, flags=re.MULTILINE), "CI must run the README's test command"
    # the default run leaves the slow tests out (pyproject's addopts); CI runs them too, after it
    assert "-m 'not slow'" in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert ci.index(f"\n{test_command}\n") < ci.index(f"\n{test_command} -m slow\n")
    assert ci.index("torch==2.13.0") < ci.index("pip install --disable-pip-version-check -q -e")
    readme_installs, ci_installs = pip_installs(setup[0]) + pip_installs(setup[1]), pip_installs(ci)
    # beyond the two commands, CI builds the one optional binding the README names for the llama.cpp tests
    llama = "llama-cpp-python==0.3.36"
    assert ci_installs.count(llama) == 1 and f'`CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install {llama}`' in README.read_text()
    ci_installs.remove(llama)
    assert [i for i in ci_installs if not i.startswith("-e")] == [i for i in readme_installs if not i.startswith("-e")]
    readme_extras = set().union(*(extras(i) for i in readme_installs if i.startswith("-e")))
    ci_extras = set().union(*(extras(i) for i in ci_installs if i.startswith("-e")))
    assert ci_extras == readme_extras | {"test"}, "CI installs exactly the README's set-up plus the test extra"


def test_the_setup_install_covers_hub_datasets_and_plots():
    """The README's plain ``pip install -e .`` must be enough for the hub's parquet datasets and the run plots."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert {"pyarrow", "matplotlib", "huggingface_hub", "pyyaml"} <= names
    assert set(project["optional-dependencies"]) == {"test", "tensorboard", "wandb", "serve", "eval", "gguf"}
    assert "gpt2lora[tensorboard,wandb,serve,eval,gguf]" in project["optional-dependencies"]["test"]
    text = README.read_text(encoding="utf-8")
    assert "pyarrow and matplotlib are dependencies rather than extras" in text


def test_usage_example_generates(gpt2_stand_in, capsys):
    code = python_blocks()[0].replace('"gpt2"', json.dumps(str(gpt2_stand_in)))
    exec(compile(code, "README usage", "exec"), {})  # noqa: S102 - the README is our own text
    printed = capsys.readouterr().out
    assert printed.startswith("LoRA is") and len(printed) > len("LoRA is\n")


def test_library_example_trains_saves_and_merges(gpt2_stand_in, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2LORA_DATA", str(shared_data))
    code = python_blocks()[1]
    assert '"train")' in code and '"validation")' in code
    code = (code.replace('"gpt2"', json.dumps(str(gpt2_stand_in)))
            .replace('"train")', '"train", limit=96)').replace('"validation")', '"validation", limit=64)'))
    namespace: dict = {}
    exec(compile(code, "README library", "exec"), namespace)  # noqa: S102 - the README is our own text
    last_eval = namespace["history"].evals[-1]
    assert 0.0 <= last_eval["accuracy"] <= 1.0 and last_eval["loss"] > 0
    assert (tmp_path / "runs/sst2/adapter/adapter_config.json").is_file()
    merged = json.loads((tmp_path / "runs/sst2/merged/config.json").read_text())
    assert merged["architectures"] == ["GPT2ForSequenceClassification"]
    # The merged export gives what the trained (unmerged-equivalent) model gives.
    import transformers

    reference = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "runs/sst2/merged").eval()
    clf = namespace["clf"].eval()
    ids = torch.tensor([namespace["tok"].encode("a gripping, funny film")])
    with torch.no_grad():
        torch.testing.assert_close(clf(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert "trainable" in capsys.readouterr().out


def test_adapter_example_runs(gpt2_stand_in, capsys):
    code = python_blocks()[2].replace('"gpt2"', json.dumps(str(gpt2_stand_in)))
    import gpt2lora

    namespace: dict = {"gl": gpt2lora, "torch": torch}
    exec(compile(code, "README adapters", "exec"), namespace)  # noqa: S102 - the README is our own text
    logits, base, clf = namespace["logits"], namespace["base"], namespace["clf"]
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits[2], base[2])  # "__base__" is the base model's row
    assert set(clf.adapters if hasattr(clf, "adapters") else ["default", "spam"]) >= {"default", "spam"}
    assert "adapter 'spam'" in capsys.readouterr().out


def test_real_training_command_parses():
    """The README's real command (it downloads, so it is only parsed here) uses flags that exist."""
    from gpt2lora.app.cli import build_parser, run_config

    command = next(b for b in bash_blocks() if b.strip().startswith("gpt2lora train"))
    argv = shlex.split(command.replace("\\\n", " "))[1:]
    config = run_config(build_parser().parse_args(argv)).resolved()
    assert (config.task, config.model, config.method, config.lora.rank) == ("sst2", "gpt2", "lora", 8)


def test_readme_sections_are_filled():
    text = README.read_text(encoding="utf-8")
    assert not re.search(r"^[A-Z]+(_[A-Z]+)+$", text, flags=re.MULTILINE), "a README section placeholder is left"


def test_console_script_answers_help():
    result = subprocess.run([sys.executable, "-m", "gpt2lora.app.cli", "--help"], check=False, capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "quickstart" in result.stdout
