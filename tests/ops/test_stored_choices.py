"""Kernel choices stored per machine: every process on a machine computes training products with the same kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpt2lora import GPT2, GPT2Config, devices, generate
from gpt2lora.ops import few_row, products, stored_choices
from gpt2lora.ops.stored_choices import ChoiceFile, key_text

ROOT = Path(__file__).resolve().parents[2]


def ticking(costs: dict[str, float], calls: dict[str, int]):
    """Candidates that count their calls and move a fake clock by their cost, and the clock."""
    clock = [0.0]

    def candidate(name):
        def run():
            calls[name] += 1
            clock[0] += costs[name]
            return name
        return run

    def timer() -> float:
        clock[0] += 0.25
        return clock[0]

    return {name: candidate(name) for name in costs}, timer


def test_a_stored_choice_is_reused_without_timing_by_another_chooser(tmp_path):
    store = ChoiceFile(tmp_path / "choices.json")
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 3.0, "other": 1.0}, calls)
    first = few_row.KernelChoice(timer=timer, store=store)
    assert first.decide(("product", 3, 64), candidates) == "other"  # measured: the other is 3x faster
    assert calls["plain"] > 0 and calls["other"] > 0
    stored = json.loads((tmp_path / "choices.json").read_text())
    assert stored["choices"] == {key_text(("product", 3, 64)): "other"}
    assert stored["machine"] == stored_choices.machine_identity()

    # A second process's chooser (here a second object) whose own timings favour the plain kernel: it keeps the
    # stored choice, and runs no candidate to decide.
    calls_after = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 1.0, "other": 3.0}, calls_after)
    second = few_row.KernelChoice(timer=timer, store=store)
    assert second.decide(("product", 3, 64), candidates) == "other"
    assert calls_after == {"plain": 0, "other": 0}
    # A key not in the file is measured by the second chooser, and added beside the first.
    assert second.decide(("product", 4, 64), candidates) == "plain"
    assert set(json.loads((tmp_path / "choices.json").read_text())["choices"]) == {
        key_text(("product", 3, 64)), key_text(("product", 4, 64))}


def test_a_decoding_choice_is_stored_and_a_later_chooser_runs_it_untimed(tmp_path):
    """``pick`` times candidates across calls (decoding's steps); its choice goes to the file too, and another
    chooser's first call of that key runs the stored kernel with no trial, whatever its own timings say."""
    path = tmp_path / "choices.json"
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 3.0, "other": 1.0}, calls)
    first = few_row.KernelChoice(timer=timer, store=ChoiceFile(path))
    while ("decode", 1) not in first.chosen:
        first.pick(("decode", 1), candidates)
    assert first.chosen[("decode", 1)] == "other" and calls["plain"] == first.samples + 1
    assert json.loads(path.read_text())["choices"] == {key_text(("decode", 1)): "other"}

    calls_after = {"plain": 0, "other": 0}
    candidates, _ = ticking({"plain": 1.0, "other": 3.0}, calls_after)

    def no_timing() -> float:
        raise AssertionError("a stored choice is not timed again")

    second = few_row.KernelChoice(timer=no_timing, store=ChoiceFile(path))
    assert [second.pick(("decode", 1), candidates) for _ in range(3)] == ["other"] * 3
    assert calls_after == {"plain": 0, "other": 3}


def test_a_stored_decoding_choice_not_offered_is_timed_and_the_first_stored_choice_stays(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"format": 1, "choices": {key_text(("decode", 2)): "packed"}}))
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 1.0, "other": 2.0}, calls)
    kernels = few_row.KernelChoice(timer=timer, store=ChoiceFile(path))
    while ("decode", 2) not in kernels.chosen:  # no packed candidate on these calls: measured here
        kernels.pick(("decode", 2), candidates)
    assert kernels.chosen[("decode", 2)] == "plain" and calls["other"] == kernels.samples + 1
    # Another process may have stored its choice while this one timed: the file keeps the first.
    assert json.loads(path.read_text())["choices"] == {key_text(("decode", 2)): "packed"}


def test_generation_in_a_later_process_reuses_the_stored_decoding_choices(tmp_path, monkeypatch):
    """Greedy decoding with the process's chooser stores its one-row choices; a new process's chooser (a new
    KERNELS) on the same file decodes the same tokens without timing any product."""
    monkeypatch.setenv(stored_choices.ENVIRONMENT, str(tmp_path / "choices.json"))
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=600, n_positions=64, n_embd=128, n_layer=2, n_head=4)).eval()
    prompt = torch.randint(0, 600, (1, 5), generator=torch.Generator().manual_seed(1))
    first = few_row.KernelChoice(store=ChoiceFile())
    monkeypatch.setattr(few_row, "KERNELS", first)
    tokens = generate(model, prompt, max_new_tokens=40, eos_token_id=None)
    decided = {key_text(key): name for key, name in first.chosen.items()}
    assert len(decided) == 3  # c_fc, the MLP's c_proj and the head: the other weights are too small to time
    stored = json.loads((tmp_path / "choices.json").read_text())["choices"]
    plans = {key_text(("pack plan", key)) for key, name in first.chosen.items() if name in few_row.PACK_KINDS}
    assert set(stored) - set(decided) <= plans  # a kept pack's plan beside its choice
    assert {text: stored[text] for text in decided} == decided

    def no_timing() -> float:
        raise AssertionError("a stored choice is not timed again")

    second = few_row.KernelChoice(timer=no_timing, store=ChoiceFile())
    monkeypatch.setattr(few_row, "KERNELS", second)
    assert torch.equal(generate(model, prompt, max_new_tokens=40, eos_token_id=None), tokens)
    assert {key_text(key): name for key, name in second.chosen.items()} == decided


def test_a_stored_name_that_is_no_longer_offered_is_measured_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"format": 1, "choices": {key_text(("k",)): "gone"}}))
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 1.0, "other": 2.0}, calls)
    assert few_row.KernelChoice(timer=timer, store=ChoiceFile(path)).decide(("k",), candidates) == "plain"
    assert json.loads(path.read_text())["choices"] == {key_text(("k",)): "plain"}


def test_an_unreadable_file_is_kept_aside_with_a_warning_naming_it_and_measured_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{ not json")
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 1.0, "other": 2.0}, calls)
    with pytest.warns(RuntimeWarning, match="choices.json: unreadable kernel choices"):
        name = few_row.KernelChoice(timer=timer, store=ChoiceFile(path)).decide(("k",), candidates)
    assert name == "plain"
    assert (tmp_path / "choices.json.unreadable").read_text() == "{ not json"  # nothing lost
    assert json.loads(path.read_text())["choices"] == {key_text(("k",)): "plain"}


def test_a_file_that_cannot_be_made_warns_naming_it_and_the_choice_is_made_in_memory(tmp_path):
    (tmp_path / "a file").write_text("")
    path = tmp_path / "a file" / "choices.json"  # its folder is a file
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 2.0, "other": 1.0}, calls)
    kernels = few_row.KernelChoice(timer=timer, store=ChoiceFile(path))
    with pytest.warns(RuntimeWarning, match=r"kernel choices are not stored: cannot create .*a file.choices\.json"):
        assert kernels.decide(("k",), candidates) == "other"
    assert kernels.chosen == {("k",): "other"}


def test_the_file_is_per_machine_and_the_variable_moves_or_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.delenv(stored_choices.ENVIRONMENT, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    here = stored_choices.default_path()
    assert here.parent == tmp_path / "cache" / "gpt2lora" / "kernel-choices"
    monkeypatch.setattr(stored_choices, "machine_identity", lambda: "vendor_id: Other; model name: Another CPU")
    assert stored_choices.default_path() != here and stored_choices.default_path().parent == here.parent

    monkeypatch.setenv(stored_choices.ENVIRONMENT, str(tmp_path / "mine.json"))
    assert ChoiceFile().path == tmp_path / "mine.json"  # followed at each use, not fixed at import
    monkeypatch.setenv(stored_choices.ENVIRONMENT, "off")
    assert ChoiceFile().path is None
    calls = {"plain": 0, "other": 0}
    candidates, timer = ticking({"plain": 2.0, "other": 1.0}, calls)
    assert few_row.KernelChoice(timer=timer, store=ChoiceFile()).decide(("k",), candidates) == "other"
    assert not (tmp_path / "mine.json").exists() and not (tmp_path / "cache").exists()


def test_cpu_info_reads_the_first_processor_of_proc_cpuinfo(monkeypatch):
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo on this system")
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    info = devices.cpu_info()
    assert set(info) <= set(devices.CPU_FIELDS)
    for line in first.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in devices.CPU_FIELDS:  # (x86 names all five; ARM's file names none of them)
            assert info[name.strip()] == value.strip()
    if "flags" in info:
        assert f"flags: {info['flags']}" in stored_choices.machine_identity()

    def missing(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", missing)
    assert devices.cpu_info.__wrapped__() == {}


def test_machine_identity_names_the_cpu_torch_and_the_candidate_kernels(tmp_path, monkeypatch):
    identity = stored_choices.machine_identity()
    assert f"torch: {torch.__version__}" in identity and f"cores: {os.cpu_count()}" in identity
    assert f"candidates: {stored_choices.CANDIDATES}" in identity
    if Path("/proc/cpuinfo").exists():
        assert "model name:" in identity and "flags:" in identity
    # choices made among an older set of kernels live in another file: the new set is measured again
    monkeypatch.delenv(stored_choices.ENVIRONMENT, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = stored_choices.default_path()
    monkeypatch.setattr(stored_choices, "CANDIDATES", stored_choices.CANDIDATES - 1)
    stored_choices.machine_identity.cache_clear()
    try:
        assert stored_choices.default_path() != here
    finally:
        stored_choices.machine_identity.cache_clear()


WORKER = textwrap.dedent("""
    import sys, time
    from gpt2lora.ops import few_row
    from gpt2lora.ops.stored_choices import ChoiceFile
    favour, path = sys.argv[1], sys.argv[2]
    clock = [0.0]
    def candidate(name):
        def run():
            time.sleep(0.01)  # long enough that both processes are deciding at once
            clock[0] += 1.0 if name == favour else 3.0
            return name
        return run
    def timer():
        clock[0] += 0.25
        return clock[0]
    kernels = few_row.KernelChoice(timer=timer, store=ChoiceFile(path))
    print(kernels.decide(("product", 7), {"mkl": candidate("mkl"), "onednn": candidate("onednn")}))
""")


def test_two_processes_deciding_one_shape_at_once_keep_the_same_kernel(tmp_path):
    """Each process's own timings favour a different kernel; the file's lock makes the later one read the
    earlier one's choice, so both compute with the same kernel."""
    path = str(tmp_path / "choices.json")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, favour, path], stdout=subprocess.PIPE, text=True,
                                env=environment) for favour in ("mkl", "onednn")]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert outputs[0] == outputs[1] and outputs[0] in ("mkl", "onednn")
    assert json.loads(Path(path).read_text())["choices"] == {key_text(("product", 7)): outputs[0]}


def test_the_process_choices_use_the_file_named_by_the_variable(tmp_path, monkeypatch):
    """``product`` with the process's choices (KERNELS) stores its decision where the variable says."""
    path = tmp_path / "process.json"
    monkeypatch.setenv(stored_choices.ENVIRONMENT, str(path))
    monkeypatch.setattr(few_row.KERNELS, "chosen", {})
    a, b = torch.randn(products.BLOCK_ROWS + 3, 32).bfloat16(), torch.randn(32, 24).bfloat16()
    products.product(a, b)
    (key, name), = few_row.KERNELS.chosen.items()
    assert json.loads(path.read_text())["choices"] == {key_text(key): name}


STEP = textwrap.dedent("""
    import hashlib, sys, time
    import torch
    from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
    from gpt2lora.ops import few_row, products
    slowed = getattr(products, sys.argv[1])
    def slow(*args):  # this process's timings favour the other library
        time.sleep(0.002)
        return slowed(*args)
    setattr(products, sys.argv[1], slow)
    torch.manual_seed(0)
    net = GPT2(GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0,
                          resid_pdrop=0.0, attn_pdrop=0.0))
    apply_lora(net, LoRAConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 97, (6, 110), generator=torch.Generator().manual_seed(3))
    (net.train()(ids, labels=ids) / ids.numel()).backward()
    digest = hashlib.sha256()
    for name, p in sorted(net.named_parameters()):
        if p.grad is not None:
            digest.update(p.grad.numpy().tobytes())
    fp32 = sorted(name for key, name in few_row.KERNELS.chosen.items() if key[0] == "product")
    print(digest.hexdigest(), ",".join(fp32))
""")


@pytest.mark.skipif(not products.onednn_fp32_available(), reason="torch has no oneDNN fp32 linear")
def test_two_processes_whose_timings_disagree_compute_the_same_fp32_step_bit_for_bit(tmp_path):
    """An fp32 LoRA step over 660 tokens (more than BLOCK_ROWS: MKL or oneDNN per product) in two processes: the
    first times MKL as the faster, the second would time oneDNN as faster, yet reads the first's choices, so
    their gradients are identical."""
    environment = {**os.environ, stored_choices.ENVIRONMENT: str(tmp_path / "choices.json"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def step(slowed: str) -> tuple[str, str]:
        done = subprocess.run([sys.executable, "-c", STEP, slowed], env=environment, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        digest, kernels = done.stdout.split()
        return digest, kernels

    first, second = step("_onednn"), step("_whole")
    assert set(first[1].split(",")) == {"whole"}  # MKL's ("whole") kept for every fp32 product shape
    assert second == first  # same kernels, same gradients bit for bit
    environment[stored_choices.ENVIRONMENT] = "off"  # without the file the second process keeps its own timing
    assert set(step("_whole")[1].split(",")) == {"onednn"}
