""""Did LoRA learn?": per-layer update sizes, what the targets matched, and what the adapter changes.

:func:`diagnose` reports on an adapter of a model in memory; :func:`inspect_adapter` on a saved adapter folder
or a run folder (``gpt2lora inspect``), loading it onto its base model after checking the folder leniently,
so that a folder ``load_adapter`` would refuse still gets a report saying why. :func:`format_diagnostics`
renders a report as text; :func:`adapter_update_norm` is the one number the Trainer logs per evaluation.

Per layer: ‖A‖_F, ‖B‖_F, ‖ΔW‖_F / ‖W‖_F (ΔW = s B A; with DoRA the merged weight minus the base), the
effective rank of s B A (exp of the entropy of its normalised singular values: 1 for a rank-1 update, r
for r equal directions, 0 for no update) and, with DoRA, the mean relative change of the magnitudes from
the row norms of W. Warnings name the usual failures: every ``lora_B`` still zero, a target that matched no
layer, a file holding LoRA tensors for more layers than match the model, and an adapter that changes no output.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import BLOCK_TARGETS, HEAD_TARGET, LoRAConfig
from ..constants import RUN_CONFIG_FILE
from ..errors import CheckpointError, ConfigError, GPT2LoRAError
from .layers import lora_modules
from .registry import adapter_configs, adapter_registry
from .targets import candidate_layers, lora_layers, target_of

#: Rows of random tokens the output change is measured on when no sample is given.
SAMPLE_ROWS = 4
SAMPLE_LENGTH = 16
_FILE_LAYER = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_(?:[qkv]_)?A(?:\.weight)?$")


@dataclass(frozen=True)
class LayerStats:
    """One wrapped layer's share of an adapter."""

    layer: str
    target: str
    """``attn.c_attn`` ... ``lm_head`` (q/k/v pairs: ``attn.q+attn.v``)."""
    block: int | None
    rank: int
    a_norm: float
    b_norm: float
    delta_norm: float
    """‖ΔW‖_F: of s B A, or with DoRA of (merged weight - base weight)."""
    weight_norm: float
    """‖W‖_F of the base weight (NaN when the model has no such layer)."""
    effective_rank: float
    magnitude_change: float | None = None
    """DoRA: mean |m - ‖W‖_row| / ‖W‖_row; None without DoRA."""

    @property
    def relative_change(self) -> float:
        """‖ΔW‖_F / ‖W‖_F."""
        return self.delta_norm / self.weight_norm if self.weight_norm else math.nan


@dataclass
class AdapterDiagnostics:
    """What :func:`diagnose` / :func:`inspect_adapter` found about one adapter."""

    adapter: str
    config: LoRAConfig | None
    layers: list[LayerStats]
    matched: dict[str, list[int | None]]
    """Target -> blocks it wrapped (``[None]`` for lm_head, which is in no block)."""
    output_change: dict[str, float] | None = None
    """``rows``, ``max_abs`` and ``relative`` change of the logits against the base (and, for a
    classifier, ``changed_predictions``); None when it could not be measured."""
    warnings: list[str] = field(default_factory=list)
    source: str | None = None

    @property
    def untrained(self) -> bool:
        """True when every ``lora_B`` is zero and no DoRA magnitude moved: the adapter is still its init."""
        return bool(self.layers) and all(s.b_norm == 0 and not s.magnitude_change for s in self.layers)

    @property
    def update_norm(self) -> float:
        """sqrt(Σ ‖ΔW‖_F²) over the layers."""
        return math.sqrt(sum(s.delta_norm ** 2 for s in self.layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``config`` as LoRAConfig fields)."""
        return {"adapter": self.adapter, "source": self.source,
                "config": None if self.config is None else {**asdict(self.config),
                                                              "targets": list(self.config.targets)},
                "layers": [{**asdict(s), "relative_change": s.relative_change} for s in self.layers],
                "matched": self.matched, "output_change": self.output_change, "warnings": list(self.warnings),
                "untrained": self.untrained, "update_norm": self.update_norm}


# --- numbers ---------------------------------------------------------------------------------------------

def _singular_values(a: Tensor, b: Tensor) -> Tensor:
    """Singular values of ``b @ a`` (b: (out, R), a: (R, in)) from two small QR factors, never forming it."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    r_a = torch.linalg.qr(a.t()).R  # a^T = Q_a R_a
    r_b = torch.linalg.qr(b).R      # b = Q_b R_b, so b a = Q_b (R_b R_a^T) Q_a^T
    return torch.linalg.svdvals(r_b @ r_a.t())


def effective_rank(singular_values: Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli); 0 for a zero matrix."""
    s = singular_values[singular_values > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def layer_stats(module: nn.Module, layer: str, adapter: str) -> LayerStats:
    """The numbers of adapter ``adapter`` on one wrapped layer (unmerged)."""
    slot = module.slots[adapter]
    a, b = module.effective_factors(adapter)  # scaling folded into b
    sv = _singular_values(a, b)
    weight = module.weight.detach().float()
    a_norm = math.sqrt(sum(float(p[2].detach().float().pow(2).sum()) for p in slot.pieces()))
    b_norm = math.sqrt(sum(float(p[3].detach().float().pow(2).sum()) for p in slot.pieces()))
    magnitude = None
    delta_norm = float(sv.norm())
    if slot.use_dora:
        with torch.no_grad():
            delta_norm = float((module.merged_weight(adapter) - weight).norm())
            rows = weight.norm(dim=1)
            magnitude = float(((slot.magnitude.detach().float() - rows).abs() / rows.clamp_min(1e-12)).mean())
    target, block = target_of(layer, slot.parts)
    return LayerStats(layer=layer, target=target, block=block, rank=slot.rank, a_norm=a_norm, b_norm=b_norm,
                      delta_norm=delta_norm, weight_norm=float(weight.norm()), effective_rank=effective_rank(sv),
                      magnitude_change=magnitude)


def adapter_update_norm(model: nn.Module, adapter: str | None = None) -> float | None:
    """sqrt(Σ ‖s B A‖_F²) of the active (or given) adapter over its layers; None without LoRA.

    Cheap (r x r products only): ``‖B A‖_F² = trace((BᵀB)(A Aᵀ))``. With DoRA it is the low-rank part.
    """
    registry = adapter_registry(model)
    name = adapter or (registry.active_adapter if registry is not None else None)
    total, found = 0.0, False
    with torch.no_grad():
        for _, module in lora_modules(model):
            if name not in module.slots:
                continue
            found = True
            slot = module.slots[name]
            for _, _, a, b in slot.pieces():
                a, b = a.detach().float(), b.detach().float()
                total += float(torch.trace((b.t() @ b) @ (a @ a.t()))) * slot.scaling ** 2
    return math.sqrt(max(total, 0.0)) if found else None


# --- reports ---------------------------------------------------------------------------------------------

def _sample(model: nn.Module, rows: int, seed: int) -> Tensor:
    config = model.transformer.config
    length = min(SAMPLE_LENGTH, config.n_positions)
    return torch.randint(0, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


#: Rows of the sample run through the model at a time: a language model's logits are rows x tokens x vocab.
CHANGE_BATCH = 8


def _output_change(model: nn.Module, adapter: str, sample: Tensor) -> dict[str, float]:
    from .named import disable_adapters, set_adapter

    registry = adapter_registry(model)
    was_training, active = model.training, registry.active
    device = next(model.parameters()).device
    model.eval()
    max_abs, diff_sq, base_sq, changed = 0.0, 0.0, 0.0, 0.0
    try:
        if adapter != active:
            set_adapter(model, adapter)
        with torch.no_grad():
            for chunk in sample.split(CHANGE_BATCH):  # memory bounded by the batch, not by --rows
                chunk = chunk.to(device)
                adapted = model(chunk).float()
                with disable_adapters(model):
                    base = model(chunk).float()
                diff = adapted - base
                max_abs = max(max_abs, float(diff.abs().max()))
                diff_sq += float(diff.double().square().sum())
                base_sq += float(base.double().square().sum())
                if adapted.dim() == 2:  # a classifier: (rows, num_labels)
                    changed += float((adapted.argmax(-1) != base.argmax(-1)).sum())
    finally:
        if registry.active != active:
            set_adapter(model, active)
        model.train(was_training)
    change = {"rows": float(sample.size(0)), "max_abs": max_abs,
              "relative": diff_sq ** 0.5 / max(base_sq ** 0.5, 1e-12)}
    if adapted.dim() == 2:
        change["changed_predictions"] = changed
    return change


def diagnose(model: nn.Module, adapter: str | None = None, sample: Tensor | None = None,
             rows: int = SAMPLE_ROWS, seed: int = 0) -> AdapterDiagnostics:
    """Report on adapter ``adapter`` (default: the active one) of ``model``.

    ``sample`` (token ids, (rows, tokens)) is what the output change is measured on; by default ``rows``
    rows of seeded random tokens. Merged adapters cannot be inspected (unmerge first).
    """
    configs = adapter_configs(model)
    if not configs:
        raise ConfigError("diagnose: the model has no LoRA adapters (apply_lora or load_adapter first)")
    name = adapter or adapter_registry(model).active
    if name not in configs:
        raise ConfigError(f"diagnose: the model has no adapter {name!r}; it has {sorted(configs)}")
    merged = [layer for layer, m in lora_modules(model) if m.merged]
    if merged:
        raise ConfigError(f"diagnose: the model's LoRA is merged ({merged[0]} ...); call unmerge_lora(model) first")
    config = configs[name]
    stats = [layer_stats(m, layer, name) for layer, m in lora_modules(model) if name in m.slots]
    matched: dict[str, list[int | None]] = {}
    for s in stats:
        for target in s.target.split("+"):
            matched.setdefault(target, []).append(s.block)
    report = AdapterDiagnostics(adapter=name, config=config, layers=stats, matched=matched)
    expected = {layer for layer, _ in lora_layers(model, config)}
    missing = sorted(expected - {s.layer for s in stats})
    if missing:
        report.warnings.append(f"{len(missing)} layer(s) the config targets carry no adapter: {missing[:4]}")
    for target in config.targets:
        if target not in matched:
            report.warnings.append(f"target {target!r} matched no layer of this model")
    if report.untrained:
        report.warnings.append("every lora_B is zero (and no DoRA magnitude moved): the adapter is still at "
                               "its initialisation, so it changes nothing; was it trained, or saved before training?")
    try:
        report.output_change = _output_change(model, name, sample if sample is not None else _sample(model, rows, seed))
    except ConfigError as err:  # e.g. a PiSSA residual in the base: there is no base model to compare with
        report.warnings.append(f"output change not measured: {err}")
    if report.output_change is not None and report.output_change["max_abs"] == 0 and not report.untrained:
        report.warnings.append("the adapter changes no output on the sample rows")
    return report


def _resolve(path: Path, model: str | os.PathLike | None) -> tuple[Path, str | None, dict[str, Any]]:
    """(adapter folder, base model, run config) of a run folder or an adapter folder."""
    import json

    run_config: dict[str, Any] = {}
    if (path / "adapter").is_dir() and (path / RUN_CONFIG_FILE).is_file():
        try:
            run_config = json.loads((path / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path / RUN_CONFIG_FILE} is not valid JSON: {err}") from None
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{path / RUN_CONFIG_FILE} is not UTF-8 text ({err.reason})") from None
        if not isinstance(run_config, dict) or not isinstance(run_config.get("base_model", ""), str):
            raise CheckpointError(f"{path / RUN_CONFIG_FILE}: expected a run's config (a JSON object whose "
                                  "base_model is a string)")
        folder = path / "adapter"
    else:
        folder = path
    base = str(model) if model is not None else run_config.get("base_model")
    return folder, base, run_config


def _file_layers(raw: dict[str, Any], tensors: dict[str, Tensor]) -> set[str]:
    found = set()
    for key in tensors:
        match = _FILE_LAYER.fullmatch(key)
        if match is not None:
            found.add(match.group(1).removesuffix(".lora_extra"))
    return found


def _peft_entries(raw: dict[str, Any], model: nn.Module) -> list[str]:
    """Warnings for peft ``target_modules`` entries that match no layer of ``model``."""
    entries = raw.get("target_modules")
    if not isinstance(entries, list):
        return []
    layers = sorted(candidate_layers(model))
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        hits = [n for n in layers if n == entry or n.endswith("." + entry)
                or (entry == HEAD_TARGET and n in ("lm_head", "score"))]
        if not hits:
            out.append(f"target {entry!r} (target_modules) matched no layer of this model; GPT-2's layers are "
                       f"{', '.join(BLOCK_TARGETS)} in each block, and lm_head")
    return out


def inspect_adapter(path: str | os.PathLike, model: str | os.PathLike | None = None, rows: int = SAMPLE_ROWS,
                    seed: int = 0) -> AdapterDiagnostics:
    """Report on a saved LoRA adapter: an adapter folder, or a run folder of ``gpt2lora train`` (its ``adapter``).

    ``model`` is the base checkpoint (hub id or folder) to load it onto; by default the run's base model, or
    the adapter's ``base_model_name_or_path``. Problems ``load_adapter`` would refuse with are reported as
    warnings (with the layer counts and target matches found in the files) instead of raised.
    """
    from ..model.classifier import GPT2ForSequenceClassification
    from ..model.gpt2 import GPT2
    from .adapter_json import read_folder
    from .files import load_adapter

    folder, base, _ = _resolve(Path(path), model)
    raw, tensors, _ = read_folder(folder)
    if raw.get("peft_type") != "LORA" and raw.get("method") != "lora":
        kind = raw.get("peft_type") or raw.get("method")
        raise ConfigError(f"inspect: {folder} holds a {kind!r} adapter; diagnostics cover LoRA adapters only")
    base = base or raw.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"inspect: {folder} does not say its base model; pass model= (--model) with the "
                          "checkpoint it was trained on")
    head = tensors.get("base_model.model.score.weight", tensors.get("score.weight"))
    if raw.get("task_type") == "SEQ_CLS":
        net: nn.Module = GPT2ForSequenceClassification.from_pretrained(
            base, num_labels=int(head.shape[0]) if head is not None else None)
    else:
        net = GPT2.from_pretrained(base)
    warnings = _peft_entries(raw, net)
    held = _file_layers(raw, tensors)
    known = set(candidate_layers(net))
    unmatched = sorted(held - known)
    if unmatched:
        warnings.append(f"the adapter holds LoRA tensors for {len(held)} layers but only {len(held) - len(unmatched)} "
                        f"match this model; unmatched: {unmatched[:4]}{' ...' if len(unmatched) > 4 else ''}")
    try:
        load_adapter(net, folder)
    except GPT2LoRAError as err:
        warnings.append(f"load_adapter refuses this folder on {base}: {err}")
        return AdapterDiagnostics(adapter="default", config=None, layers=[], matched={}, warnings=warnings,
                                  source=str(folder))
    report = diagnose(net, rows=rows, seed=seed)
    report.warnings[:0] = warnings
    report.source = str(folder)
    wrapped = {s.layer for s in report.layers}
    if held and len(wrapped) < len(held):
        report.warnings.append(f"the adapter file holds {len(held)} layers but only {len(wrapped)} were loaded")
    return report


def _blocks(blocks: list[int | None]) -> str:
    values = sorted(b for b in blocks if b is not None)
    if not values:
        return "(no block)"
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"blocks {values[0]}-{values[-1]} ({len(values)})"
    return ("block " if len(values) == 1 else "blocks ") + ",".join(map(str, values))


def format_diagnostics(report: AdapterDiagnostics, max_layers: int | None = None) -> str:
    """The report as text: config, matched layers, a per-layer table, the output change and the warnings."""
    c = report.config
    head = f"adapter {report.adapter!r}" + (f" from {report.source}" if report.source else "")
    if c is not None:
        extras = [f"rank {c.rank}", f"alpha {c.alpha:g}", f"scaling {c.scaling:g}", f"init {c.init}"]
        if c.use_dora:
            extras.append("DoRA")
        head += " (" + ", ".join(extras) + ")"
    lines = [head]
    if report.matched:
        lines.append("matched: " + "; ".join(f"{t}: {_blocks(b)}" for t, b in report.matched.items()))
    if report.layers:
        lines.append(f"{'layer':<34} {'rank':>4} {'|A|':>8} {'|B|':>8} {'|dW|/|W|':>9} {'eff.rank':>8} {'dmag':>7}")
        shown = report.layers if max_layers is None else report.layers[:max_layers]
        for s in shown:
            mag = f"{s.magnitude_change:7.2%}" if s.magnitude_change is not None else f"{'-':>7}"
            lines.append(f"{s.layer:<34} {s.rank:>4} {s.a_norm:>8.3g} {s.b_norm:>8.3g} {s.relative_change:>9.3g} "
                         f"{s.effective_rank:>8.2f} {mag}")
        if len(shown) < len(report.layers):
            lines.append(f"... {len(report.layers) - len(shown)} more layers")
        lines.append(f"update norm sqrt(sum |dW|^2) = {report.update_norm:.4g} over {len(report.layers)} layers"
                     + ("; UNTRAINED" if report.untrained else ""))
    change = report.output_change
    if change is not None:
        text = (f"output change vs base on {int(change['rows'])} rows: max |d logit| {change['max_abs']:.3g}, "
                f"relative {change['relative']:.3g}")
        if "changed_predictions" in change:
            text += f", predictions changed {int(change['changed_predictions'])}/{int(change['rows'])}"
        lines.append(text)
    if report.warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in report.warnings)
    return "\n".join(lines)
