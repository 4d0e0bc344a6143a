"""Weights on 2 MB pages (gpt2lora.model.pages, ``GPT2.from_pretrained(..., huge_pages=True)``): the advice
asked of the system, the memory it lands in, and a load whose model equals the default one."""

from __future__ import annotations

import gc
import io
import sys

import pytest
import torch
from helpers import make_hf_checkpoint

from gpt2lora import GPT2, save_pretrained
from gpt2lora.model import pages
from gpt2lora.model.pages import HUGE_PAGE, MADV_HUGEPAGE, empty_on_huge_pages, huge_page_mode


@pytest.mark.parametrize(("text", "mode"), [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                            ("always madvise [never]\n", "never"), ("garbled", "")])
def test_huge_page_mode_is_the_bracketed_word_of_the_setting(tmp_path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert huge_page_mode(setting) == mode
    assert huge_page_mode(tmp_path / "missing") == ""


@pytest.fixture
def advice(monkeypatch) -> list[tuple[int, int, int]]:
    """The madvise calls made, none of them passed to the system."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(pages, "_madvise", lambda: lambda start, length, what: calls.append((start, length, what)) or 0)
    return calls


@pytest.mark.parametrize("mode", ["madvise", "always"])
def test_a_large_tensor_starts_on_a_2mb_boundary_with_storage_of_its_own_bytes(advice, mode):
    shape = (3, 1_000_001)  # 12 MB: 5 whole 2 MB pages, and a tail
    t = empty_on_huge_pages(shape, torch.float32, mode=mode)
    size = 3 * 1_000_001 * 4
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    assert t.untyped_storage().nbytes() == size  # saving it writes its own bytes, no alignment slack
    expected = [(t.data_ptr(), size // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)] if mode == "madvise" else []
    assert advice == expected
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(shape))
    assert t[2, -1].item() == t.numel() - 1


@pytest.mark.parametrize(("shape", "mode"), [((1000, 500), "madvise"), ((8 << 20,), "never"), ((8 << 20,), "")])
def test_small_tensors_and_systems_without_huge_pages_get_plain_memory(advice, shape, mode):
    t = empty_on_huge_pages(shape, torch.bfloat16, mode=mode)
    assert t.shape == shape and t.dtype == torch.bfloat16 and advice == []


def test_no_mapping_to_be_had_gives_plain_memory(advice, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(pages.mmap, "mmap", refuse)
    t = empty_on_huge_pages((8 << 20,), torch.float32, mode="madvise")
    assert t.shape == (8 << 20,) and t.dtype == torch.float32 and advice == []


def vma_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping of this process holding ``address`` (None when no mapping holds it)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux") or huge_page_mode() != "madvise",
                    reason="needs Linux with transparent huge pages in 'madvise' mode")
def test_the_system_takes_the_advice_and_the_memory_goes_with_the_tensor():
    t = empty_on_huge_pages((8 << 20,), torch.float32)  # 32 MB
    address = t.data_ptr()
    assert "hg" in vma_flags(address)  # the kernel's mark of a region advised MADV_HUGEPAGE
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * (8 << 20)
    del t
    gc.collect()
    assert vma_flags(address) is None  # unmapped with the last tensor on it


def test_a_model_loaded_on_huge_pages_equals_the_default_load_and_saves_the_same(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "ckpt", vocab_size=50257, n_positions=128)  # a 12.9 MB embedding
    plain = GPT2.from_pretrained(folder).eval()
    huge = GPT2.from_pretrained(folder, huge_pages=True).eval()
    wte = huge.transformer.wte.weight
    assert wte.data_ptr() % HUGE_PAGE == 0 and wte.untyped_storage().nbytes() == wte.numel() * 4
    assert huge.lm_head.weight is wte  # still tied
    for (name, a), b in zip(plain.state_dict().items(), huge.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride(), name
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids), huge(ids))
    assert torch.equal(plain.generate(ids, max_new_tokens=5), huge.generate(ids, max_new_tokens=5))
    sizes = []
    for model, name in ((plain, "plain"), (huge, "huge")):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        sizes.append((len(buffer.getvalue()), save_pretrained(model, tmp_path / name).joinpath(
            "model.safetensors").stat().st_size))
    assert sizes[0][1] == sizes[1][1] and abs(sizes[0][0] - sizes[1][0]) < 4096


def test_a_load_for_another_device_does_not_ask_for_huge_pages(tiny_checkpoint, monkeypatch):
    """The CPU copies of a load for another device are dropped once moved: no 2 MB page is asked for them."""
    from gpt2lora.model import hub

    asked = []
    monkeypatch.setattr(hub, "empty_on_huge_pages", lambda shape, dtype: asked.append(shape) or torch.empty(shape))
    GPT2.from_pretrained(tiny_checkpoint, huge_pages=True, device="meta")
    assert asked == []
    GPT2.from_pretrained(tiny_checkpoint, huge_pages=True, device="cpu")
    assert len(asked) > 10  # every tensor of the CPU load went through it
