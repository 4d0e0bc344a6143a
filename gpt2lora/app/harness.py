"""An lm-evaluation-harness model backed by gpt2lora's own GPT-2 (the ``eval`` extra: ``pip install gpt2lora[eval]``).

Importing this module registers the model type ``gpt2lora`` with lm-eval (``lm_eval.api.model_registry``). lm-eval
0.4's ``lm-eval`` command only knows the models in its own ``MODEL_MAPPING`` and those registered by modules
already imported (it reads no entry points), so run its CLI through this module, which registers first::

    python -m gpt2lora.app.harness run --model gpt2lora --model_args pretrained=gpt2,adapter=runs/x/adapter \\
        --tasks lambada_openai

lm-eval's own ``lm_eval run --model gpt2lora`` works when a ``--tasks`` entry is a task YAML path that names
:func:`process_docs` (see there). From Python, ``import gpt2lora.app.harness`` before
``lm_eval.simple_evaluate(model="gpt2lora", ...)``, or pass a :class:`GPT2LoRALM` instance as ``model=``.

Scoring follows lm-eval's transformers backend (``hf``) request by request: the same tokenisation (the
harness's trailing-space rule), left truncation to ``n_positions``, rolling windows for perplexity and stop
strings for generation, so the numbers are the ones ``hf`` gives for the merged export of the same model.
What differs is the work: requests whose model input is identical (multiple choice with one-token answers,
the same context scored twice) run once, batches are sorted by length and bounded in padding, and the LM head
runs on the scored positions only, in blocks reduced to the targets' log-probabilities (no positions × vocab
log-softmax).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor

from ..constants import DEFAULT_LOSS_CHUNK_SIZE, SUMMARY_FILE
from ..devices import resolve_device
from ..errors import ConfigError
from ..model.gpt2 import GPT2
from ..model.hooks import KVCache, row_adapters
from ..model.tokenizer import ENDOFTEXT, load_tokenizer
from ..ops.few_row import few_row_products
from ..peft.files import load_adapter
from .run import load_run_model


def lm_eval_version() -> str:
    """The installed lm-eval's version."""
    import lm_eval

    return lm_eval.__version__


MODEL_TYPE = "gpt2lora"
"""The name lm-eval knows this model by (``--model gpt2lora``)."""

HEAD_CHUNK_ROWS = DEFAULT_LOSS_CHUNK_SIZE
"""Rows of hidden states the LM head turns into logits at a time when scoring (one (rows, vocab) block)."""

MIN_BATCH_TOKENS = 256
"""Real tokens a batch holds before bounded padding may close it: below that a CPU's products slow down."""

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# one scoring request: (context tokens, continuation tokens, adapter name or None for the model as it is)
Scored = tuple[list[int], list[int], str | None]


def _adapters_arg(adapter: str | os.PathLike | Sequence[str | os.PathLike] | dict[str, Any] | None
                  ) -> dict[str, Path]:
    """``adapter`` as {name: folder}: one folder (``"default"``), several folders separated by ``+`` (named by
    their folder), a list of folders, or a mapping."""
    if adapter is None or adapter == "":
        return {}
    if isinstance(adapter, dict):
        return {str(k): Path(v) for k, v in adapter.items()}
    if isinstance(adapter, (str, os.PathLike)):
        parts = str(adapter).split("+")
        if len(parts) == 1:
            return {"default": Path(parts[0])}
        adapter = parts
    named: dict[str, Path] = {}
    for folder in adapter:
        path = Path(folder)
        name = path.name if path.name != "adapter" else path.parent.name
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "adapter"
        if name in named:
            raise ConfigError(f"adapter: two adapter folders are both named {name!r}; pass a mapping "
                              "{name: folder} instead")
        named[name] = path
    return named


def _max_padding_arg(value: float | str | None, device: torch.device) -> float | None:
    """``max_padding`` as a fraction, or None for batches filled to ``batch_size`` whatever their padding.

    ``"auto"``: 0.1 on a CPU, where a padded token costs as much as a real one; None on an accelerator,
    where padding is nearly free and fewer, fuller batches win."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    if isinstance(value, str) and value.lower() == "auto":
        return 0.1 if device.type == "cpu" else None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if not fraction >= 0:
        raise ConfigError(f"max_padding={value!r}: expected a fraction >= 0 (padded tokens per real token a "
                          "batch may add), 'auto' or 'none'")
    return fraction


class GPT2LoRALM(TemplateLM):
    """lm-eval's ``LM`` interface over a gpt2lora GPT-2: a base model, a run, or one or several adapters.

    ``pretrained``: hub id or local folder of the base (its tokenizer is used too). ``adapter``: an adapter
    folder in peft's layout; several (``a+b`` or a list) load as named adapters, and ``adapter_name`` picks
    the one the harness methods use (the others stay available to :meth:`loglikelihood_mixed` and
    :meth:`generate_mixed`, which put rows of different adapters in one batch). ``run``: a run folder
    written by ``gpt2lora train`` (its base model, method and trained tensors). ``model`` + ``tokenizer``:
    objects already built. ``batch_size``: rows per forward pass. ``max_length``: the context window
    (default: the model's ``n_positions``). ``max_padding``: scoring batches close early rather than pad
    more than this fraction of their real tokens (``"auto"``: 0.1 on a CPU, unbounded elsewhere).
    """

    def __init__(self, pretrained: str | os.PathLike | None = None, adapter: Any = None,
                 run: str | os.PathLike | None = None, adapter_name: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, device: str = "auto",
                 dtype: str | torch.dtype | None = None, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, max_gen_toks: int = 256, max_padding: float | str | None = "auto",
                 **unused: Any) -> None:
        super().__init__()
        if sum(x is not None for x in (pretrained, run, model)) != 1:
            raise ConfigError("gpt2lora harness model: pass exactly one of pretrained=, run= or model=")
        if run is not None:
            model, saved = load_run_model(run)
            tokenizer = tokenizer or load_tokenizer(saved["base_model"])
        elif pretrained is not None:
            model = GPT2.from_pretrained(pretrained)
            tokenizer = tokenizer or load_tokenizer(pretrained)
        if not isinstance(model, GPT2):
            raise ConfigError(f"gpt2lora harness model: expected a language model (GPT2), got "
                              f"{type(model).__name__}; a classification run cannot be scored by lm-eval")
        if tokenizer is None:
            raise ConfigError("gpt2lora harness model: model= needs tokenizer= (gpt2lora.load_tokenizer)")
        named = _adapters_arg(adapter)
        for name, folder in named.items():
            load_adapter(model, folder, adapter_name=None if name == "default" and len(named) == 1 else name)
        if adapter_name is not None and len(named) > 1 and adapter_name not in named:
            raise ConfigError(f"adapter_name={adapter_name!r}: not one of the loaded adapters {sorted(named)}")
        self.adapter_name = adapter_name if adapter_name is not None else (
            next(iter(named)) if len(named) > 1 else None)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes cuda:0 by default; its hf backend falls back to the CPU too
            warnings.warn(f"device={device!r}: CUDA is not available, using the CPU", stacklevel=2)
            device = "cpu"
        self._device = resolve_device(device, "device")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        self.model = model.to(self._device, dtype=dtype).eval()
        self.tok = tokenizer
        self._eot = tokenizer.eot_token
        try:
            self.batch_size_per_call = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer") from None
        if self.batch_size_per_call < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
        self._max_length = int(max_length) if max_length else model.config.n_positions
        if not 1 <= self._max_length <= model.config.n_positions:
            raise ConfigError(f"max_length={max_length}: expected 1 to the model's n_positions "
                              f"{model.config.n_positions}")
        self._max_gen_toks = int(max_gen_toks)
        self.max_padding = _max_padding_arg(max_padding, self._device)

    # ------------------------------------------------------------------------------------------ lm-eval API

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.model, "name_or_path", None) or "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """GPT-2's BPE; ``<|endoftext|>`` in the text is the special token, as the transformers tokenizer has it."""
        return self.tok.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` without ``<|endoftext|>`` (transformers' ``skip_special_tokens=True``)."""
        return self.tok.decode([t for t in tokens if t != self._eot])

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        answers = self.score_tokens([(ctx, cont, self.adapter_name) for _, ctx, cont in requests])
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return self.rolling_mixed([req.args[0] for req in requests], [self.adapter_name] * len(requests))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        return self.generate_mixed([a[0] for a in args], [a[1] for a in args], [self.adapter_name] * len(args))

    # ---------------------------------------------------------------------------- several adapters at once

    def loglikelihood_mixed(self, pairs: Sequence[tuple[str, str]], adapter_names: Sequence[str | None]
                            ) -> list[tuple[float, bool]]:
        """``(log-likelihood, is greedy)`` of each ``(context, continuation)`` under its own adapter
        (``"__base__"``: no adapter), rows of different adapters sharing batches."""
        self._check_names(adapter_names, len(pairs))
        encoded = []
        for (context, continuation), name in zip(pairs, adapter_names):
            if context == "":
                cont = self.tok_encode(continuation)
                ctx, cont = ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
            else:
                ctx, cont = self._encode_pair(context, continuation)
            encoded.append((ctx, cont, name))
        return self.score_tokens(encoded)

    def rolling_mixed(self, texts: Sequence[str], adapter_names: Sequence[str | None]) -> list[float]:
        """Summed log-likelihood of each whole text (lm-eval's disjoint rolling windows of ``max_length``)."""
        self._check_names(adapter_names, len(texts))
        windows: list[Scored] = []
        owner: list[int] = []
        for i, (text, name) in enumerate(zip(texts, adapter_names)):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont, name))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.score_tokens(windows, greedy=False)):
            totals[i] += logprob
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_mixed(self, contexts: Sequence[str], gen_kwargs: Sequence[dict[str, Any]],
                       adapter_names: Sequence[str | None]) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) continuations up to the first stop string,
        rows of different adapters sharing batches; rows with the same settings run together."""
        self._check_names(adapter_names, len(contexts))
        groups: dict[str, list[int]] = {}
        for i, kwargs in enumerate(gen_kwargs):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(contexts)
        eos_text = ENDOFTEXT
        for members in groups.values():
            kwargs = normalize_gen_kwargs(gen_kwargs[members[0]], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if kwargs.pop("do_sample", False) or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ConfigError("gpt2lora harness model: only greedy generation (do_sample false, "
                                  "temperature 0) is supported; the task asks to sample")
            window = self.max_length - max_new
            if window <= 0:
                raise ConfigError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length "
                                  f"{self.max_length}")
            encoded = {i: self.tok_encode(contexts[i])[-window:] for i in members}
            order = sorted(members, key=lambda i: (-len(encoded[i]), contexts[i]))
            for start in range(0, len(order), self.batch_size_per_call):
                rows = order[start:start + self.batch_size_per_call]
                texts = self._generate_rows([encoded[i] for i in rows], [adapter_names[i] for i in rows],
                                            until, max_new)
                for i, text in zip(rows, texts):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", (contexts[i], gen_kwargs[i]), out[i])
        return out

    # ----------------------------------------------------------------------------------------------- work

    def _check_names(self, names: Sequence[str | None], count: int) -> None:
        if len(names) != count:
            raise ConfigError(f"adapter_names: {len(names)} names for {count} requests; give one per request")

    def _routing(self, names: Sequence[str | None]) -> Any:
        if all(n is None for n in names):
            return nullcontext()
        if any(n is None for n in names):
            raise ConfigError("adapter_names: name every row's adapter (or '__base__') when any row names one")
        return row_adapters(self.model, list(names), len(names))

    def _length_batches(self, lengths: Sequence[int]) -> list[tuple[int, int]]:
        """``(start, stop)`` runs of ``lengths`` (sorted longest first) that go through the model together.

        At most ``batch_size`` rows; with ``max_padding`` set, a batch also closes before its padding would
        exceed that fraction of its real tokens, once it holds :data:`MIN_BATCH_TOKENS` real tokens (a
        padded token costs as much as a real one on a CPU, while tiny batches waste the matrix products).
        """
        batches, start = [], 0
        while start < len(lengths):
            stop, real = start + 1, lengths[start]
            while stop < len(lengths) and stop - start < self.batch_size_per_call:
                padded = lengths[start] * (stop - start + 1)
                if (self.max_padding is not None and real >= MIN_BATCH_TOKENS
                        and padded > (real + lengths[stop]) * (1 + self.max_padding)):
                    break
                real += lengths[stop]
                stop += 1
            batches.append((start, stop))
            start = stop
        return batches

    @torch.inference_mode()
    def score_tokens(self, requests: Sequence[Scored], greedy: bool = True) -> list[tuple[float, bool]]:
        """``(sum of log-probabilities of the continuation, whether greedy decoding gives it)`` per request.

        The input is ``(context + continuation)`` cut from the left to ``max_length + 1`` tokens minus the
        last, as lm-eval's ``hf`` backend builds it; requests with the same input and adapter run once.
        Inputs run longest first in batches of bounded padding (:meth:`_length_batches`); the LM head runs
        on the scored positions only (:meth:`_target_logprobs`); in a batch of one-token continuations the
        model's last block also finishes only each row's last position. ``greedy=False`` skips the greedy check
        (every flag is then False), as rolling perplexity does not read it.
        """
        groups: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
        for i, (ctx, cont, name) in enumerate(requests):
            if not ctx or not cont or len(cont) > self.max_length:
                raise ConfigError(f"request {i}: expected a non-empty context and a continuation of 1 to "
                                  f"{self.max_length} tokens, got {len(ctx)} and {len(cont)}")
            groups.setdefault((name, tuple((ctx + cont)[-(self.max_length + 1):][:-1])), []).append(i)
        keys = sorted(groups, key=lambda k: -len(k[1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start, stop in self._length_batches([len(k[1]) for k in keys]):
            chunk = keys[start:stop]
            width = len(chunk[0][1])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, inp) in enumerate(chunk):
                ids[row, :len(inp)] = torch.tensor(inp)
            # right padding: a causal row never sees the padding after it, so no mask is needed
            spans = [max(len(requests[i][1]) for i in groups[key]) for key in chunk]
            with self._routing([name for name, _ in chunk]):
                if max(spans) == 1:
                    # one scored position per row (one-token answers): the last block's projection and MLP
                    # run on that position only; the mask tells the model where each row ends
                    lengths = torch.tensor([len(inp) for _, inp in chunk])
                    mask = (torch.arange(width) < lengths[:, None]).long()
                    picked = self.model.transformer(ids.to(self._device), mask.to(self._device),
                                                    last_token_only=True)
                else:
                    hidden = self.model.transformer(ids.to(self._device))
                    picked = torch.cat([hidden[row, len(inp) - span:len(inp)]
                                        for row, ((_, inp), span) in enumerate(zip(chunk, spans))])
                # every request of a key scores the last len(cont) positions of its input, each against
                # its own continuation token there: (row of the scored positions, target) per token
                offset, query_rows, query_tokens, owners = 0, [], [], []
                for key, span in zip(chunk, spans):
                    for i in groups[key]:
                        cont = requests[i][1]
                        query_rows.extend(range(offset + span - len(cont), offset + span))
                        query_tokens.extend(cont)
                        owners.append((i, len(cont)))
                    offset += span
                logprobs, is_greedy = self._target_logprobs(
                    picked, spans, torch.tensor(query_rows, device=picked.device),
                    torch.tensor(query_tokens, device=picked.device), greedy)
            for (i, _), lp, hit in zip(owners, logprobs.split([c for _, c in owners]),
                                           is_greedy.split([c for _, c in owners])):
                results[i] = (float(lp.sum()), bool(hit.all()) if greedy else False)
        return results

    def _target_logprobs(self, hidden: Tensor, spans: Sequence[int], rows: Tensor, targets: Tensor,
                         greedy: bool) -> tuple[Tensor, Tensor]:
        """Log-probability of ``targets[j]`` after ``hidden[rows[j]]`` (fp32) and whether it is the argmax.

        ``hidden`` holds the scored positions of the batch rows one after the other (``spans[b]`` of row b).
        The head runs :data:`HEAD_CHUNK_ROWS` rows at a time and each block of logits is reduced to the
        targets' values and the rows' log-sum-exp, so no (positions, vocab) tensor exists beyond one block.
        A head routed per batch row (LoRA on ``lm_head`` in a mixed-adapter batch) needs the batch's rows
        at once: it gets them as a (batch, longest span) stack.
        """
        head = self.model.lm_head
        every: Tensor | None = None
        if getattr(head, "routing", None) is not None:
            stack = hidden.new_zeros(len(spans), max(spans), hidden.size(-1))
            batch_row = torch.repeat_interleave(torch.arange(len(spans), device=hidden.device),
                                                torch.tensor(spans, device=hidden.device))
            position = torch.cat([torch.arange(span, device=hidden.device) for span in spans])
            stack[batch_row, position] = hidden
            every = head(stack)[batch_row, position]
        values = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros(targets.numel(), dtype=torch.bool, device=hidden.device)
        order = torch.argsort(rows, stable=True)
        rows, targets = rows[order], targets[order]
        bounds = torch.arange(0, hidden.size(0) + HEAD_CHUNK_ROWS, HEAD_CHUNK_ROWS, device=rows.device)
        edges = torch.searchsorted(rows, bounds.clamp(max=hidden.size(0))).tolist()
        for block, (lo, hi) in enumerate(pairwise(edges)):
            if lo == hi:
                continue
            first = block * HEAD_CHUNK_ROWS
            block_rows = slice(first, first + HEAD_CHUNK_ROWS)
            logits = (head(hidden[block_rows]) if every is None else every[block_rows]).float()
            local, wanted = rows[lo:hi] - first, targets[lo:hi]
            chosen = logits[local, wanted]
            values[order[lo:hi]] = chosen - torch.logsumexp(logits, dim=-1)[local]
            if greedy:
                # greedy: the target holds its row's largest logit and is the first index that does
                # (argmax's rule for ties); the max is a cheaper pass than argmax, which runs on those rows only
                hit = chosen == logits.amax(dim=-1)[local]
                top = hit.nonzero().squeeze(1)
                if top.numel():
                    hit[top] = logits[local[top]].argmax(dim=-1) == wanted[top]
                hits[order[lo:hi]] = hit
        return values, hits

    @torch.inference_mode()
    def _generate_rows(self, prompts: list[list[int]], names: list[str | None], until: list[str],
                       max_new: int) -> list[str]:
        """Greedy continuations of left-padded ``prompts``; a row stops at ``<|endoftext|>`` or once its text
        holds a stop string, and the batch stops when every row has."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self._eot, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        weight = self.model.lm_head.weight
        cache = KVCache(self.model.config, batch, width + max_new, weight.dtype, weight.device)
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        stops = [s for s in until if s]
        with self._routing(names), few_row_products():
            logits = self.model.lm_head(self.model.transformer(ids, mask, kv_cache=cache)[:, -1])
            for step in range(max_new):
                token = logits.argmax(dim=-1)
                for row in range(batch):
                    if done[row]:
                        token[row] = self._eot
                        continue
                    new[row].append(int(token[row]))
                    if new[row][-1] == self._eot or any(s in self.tok_decode(new[row]) for s in stops):
                        done[row] = True
                if all(done) or step == max_new - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                logits = self.model.lm_head(self.model.transformer(token[:, None], mask, kv_cache=cache)[:, -1])
        return [self.tok_decode(tokens) for tokens in new]


# A lazy entry (the class by import path), so running this file as ``python -m`` and importing it register once.
if MODEL_TYPE not in model_registry:
    model_registry.register(MODEL_TYPE, target="gpt2lora.app.harness:GPT2LoRALM")


def process_docs(dataset: Any) -> Any:
    """The task's documents as they are: a task YAML that names this (``process_docs: !function
    gpt2lora.app.harness.process_docs``) makes lm-eval import this module, which registers ``--model gpt2lora``.

    lm-eval's own ``lm_eval run`` resolves the ``!function`` tags of the YAML files given as ``--tasks`` paths
    before it looks the model up, so such a file lets its command line find the model without this module's
    ``run`` wrapper (a task given by name, from lm-eval or ``--include_path``, is read without its functions
    until after the model is built, so it does not).
    """
    return dataset


def harness_command(tasks: Sequence[str], run_dir: str | os.PathLike | None = None, model: str | None = None,
                    num_fewshot: int | None = None, limit: float | None = None,
                    include_path: str | os.PathLike | None = None, batch_size: int = 16,
                    device: str = "cpu") -> dict[str, Any]:
    """``gpt2lora eval [RUN] --harness TASKS``: lm-eval tasks on a run's model (or a base checkpoint).

    The results table is printed; with a run folder, lm-eval's results go to ``harness.json`` there and a
    "Harness" section is appended to its ``summary.md``. ``include_path``: a folder of task YAML files.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if not tasks:
        raise ConfigError("--harness: name at least one lm-eval task")
    if (run_dir is None) == (model is None):
        raise ConfigError("--harness: evaluate a run folder (RUN or --run) or a base model (--model), not both")
    lm = GPT2LoRALM(run=run_dir, pretrained=model, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, batch_size=batch_size, device=device)
    if results is None:
        raise ConfigError(f"--harness {' '.join(tasks)}: lm-eval returned no results")
    table = make_table(results)
    print(table)
    if run_dir is not None:
        folder = Path(run_dir)
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples")
                if k in results}
        keep["config"] = {"tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit,
                          "lm_eval": lm_eval_version()}
        (folder / "harness.json").write_text(json.dumps(keep, indent=2, default=str) + "\n", encoding="utf-8")
        summary = folder / SUMMARY_FILE
        shots = f", {num_fewshot}-shot" if num_fewshot is not None else ""
        cut = f", first {limit:g} documents per task" if limit is not None else ""
        section = (f"\n## Harness (lm-evaluation-harness {keep['config']['lm_eval']}{shots}{cut})\n\n"
                   f"{table}\n")
        with summary.open("a", encoding="utf-8") as f:
            f.write(section)
    return results


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the ``gpt2lora`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
