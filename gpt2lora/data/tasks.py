"""Task data: read rows (JSONL / CSV / TSV / parquet, local or from the hub), validate them, format
prompts, and tokenise them into the examples ``gpt2lora.data.batching`` pads into batches.

A row becomes a *record* with the fields of its task kind:

=================  ===========================================
``classification``  ``text: str``, ``label: int``
``nli``             ``premise: str``, ``hypothesis: str``, ``label: int``
``instruction``     ``instruction: str``, ``input: str``, ``output: str``
``qa``              ``context: str``, ``question: str``, ``answers: list[str]``
=================  ===========================================

Every malformed row raises :class:`~gpt2lora.errors.DataError` naming the file, the line (or row)
and the field.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..constants import LABEL_NAMES_FILE
from ..errors import ConfigError, DataError, SplitNotFoundError

KINDS = ("classification", "nli", "instruction", "qa")
#: Task kinds trained with a classification head (the rest are language-model tasks).
CLASSIFICATION_KINDS = ("classification", "nli")
#: Fields of a record, by task kind.
FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "nli": ("premise", "hypothesis", "label"),
    "instruction": ("instruction", "input", "output"),
    "qa": ("context", "question", "answers"),
}
SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
#: Environment variable naming the folder that holds ``<name>/{train,validation,test}.jsonl``.
DATA_ROOT_ENV = "GPT2LORA_DATA"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


class Tokenizer(Protocol):
    """What gpt2lora needs of a tokenizer: ``tiktoken.Encoding`` has it, so does the quickstart's."""

    eot_token: int

    def encode_ordinary(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


# --------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face hub: a dataset repo (and config) and how its columns map.

    Which files hold a split is read from the repository itself (its card's ``configs``, else the hub's
    file naming conventions, else its parquet conversion): see :mod:`gpt2lora.data.hub_datasets`.
    """

    repo: str
    """Dataset repository id, e.g. ``stanfordnlp/sst2``."""
    config: str | None = None
    """The dataset config (subset), e.g. ``plain_text``; None for the card's default."""
    columns: Mapping[str, str] = field(default_factory=dict)
    """Record field -> column of the file, where the names differ."""
    split_names: Mapping[str, str] = field(default_factory=dict)
    """gpt2lora split -> the dataset's split, where the names differ (MNLI's ``validation_matched``)."""
    drop_labels: tuple[int, ...] = (-1,)
    """Label values that mean "no gold label" on the hub (GLUE test sets, SNLI); such rows are skipped."""


@dataclass(frozen=True)
class TaskPreset:
    """A named task: its kind, label names, hub source and folder name under the local data root."""

    name: str
    kind: str
    label_names: tuple[str, ...] = ()
    hub: HubSource | None = None
    local: str | None = None
    description: str = ""

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) or None


_SENTIMENT = ("negative", "positive")
_NLI = ("entailment", "neutral", "contradiction")
_EMOJI = ("❤", "😍", "😂", "💕", "🔥", "😊", "😎", "✨", "💙", "😘", "📷", "🇺🇸", "☀", "💜", "😉", "💯", "😁",
          "🎄", "📸", "😜")

#: Built-in tasks: repository, config and column names on the hub (the files are looked up there).
TASKS: dict[str, TaskPreset] = {p.name: p for p in [
    TaskPreset("sst2", "classification", _SENTIMENT, local="sst2", description="SST-2 sentence sentiment",
               hub=HubSource("stanfordnlp/sst2", columns={"text": "sentence"})),
    TaskPreset("rotten_tomatoes", "classification", _SENTIMENT, local="rt_polarity",
               description="Rotten Tomatoes sentence polarity",
               hub=HubSource("cornell-movie-review-data/rotten_tomatoes")),
    TaskPreset("imdb", "classification", _SENTIMENT, local="imdb", description="IMDB review sentiment",
               hub=HubSource("stanfordnlp/imdb", "plain_text")),
    TaskPreset("enron_spam", "classification", ("ham", "spam"), description="Enron e-mail spam",
               hub=HubSource("SetFit/enron_spam")),
    TaskPreset("tweet_emoji", "classification", _EMOJI, local="tweet_emoji",
               description="TweetEval emoji prediction (20 classes)",
               hub=HubSource("cardiffnlp/tweet_eval", "emoji")),
    TaskPreset("mnli", "nli", _NLI, local="mnli", description="MultiNLI",
               hub=HubSource("nyu-mll/glue", "mnli", split_names={"validation": "validation_matched",
                                                                  "test": "test_matched"})),
    TaskPreset("snli", "nli", _NLI, local="snli", description="Stanford NLI",
               hub=HubSource("stanfordnlp/snli", "plain_text")),
    # The CS 7643 report cites presencesw/all_nli_med_v1. Its columns are assumed to be premise / hypothesis /
    # label (map others with --column FIELD=COLUMN).
    TaskPreset("medical_nli", "nli", _NLI, description="Medical-domain NLI (all_nli_med, ~100K pairs)",
               hub=HubSource("presencesw/all_nli_med")),
    TaskPreset("alpaca", "instruction", local="alpaca_2k", description="Stanford Alpaca instructions",
               hub=HubSource("tatsu-lab/alpaca")),
    TaskPreset("squad", "qa", local="squad_v1", description="SQuAD 1.1 as answer generation",
               hub=HubSource("rajpurkar/squad", "plain_text")),
    # Local-only names of the shared benchmark folders.
    TaskPreset("rt_polarity", "classification", _SENTIMENT, local="rt_polarity"),
    TaskPreset("sms_spam", "classification", ("ham", "spam"), local="sms_spam", description="SMS spam"),
    TaskPreset("sick", "nli", _NLI, local="sick", description="SICK entailment"),
    TaskPreset("squad_v1", "qa", local="squad_v1"),
    TaskPreset("alpaca_2k", "instruction", local="alpaca_2k"),
    TaskPreset("alpaca_gpt4_demo", "instruction", local="alpaca_gpt4_demo"),
    TaskPreset("llms_from_scratch_instruct", "instruction", local="llms_from_scratch_instruct"),
]}


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local benchmark folder: ``explicit``, else ``$GPT2LORA_DATA``, else none."""
    value = explicit if explicit is not None else os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


# --------------------------------------------------------------------------------------------------
# Reading raw rows


def _decode_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: expected one row per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None
    # only \n (or \r\n) ends a row: str.splitlines() would also split inside values at U+2028, U+0085, \f ...
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        yield f"line {number}", row


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    lines = _decode_lines(path)
    reader = csv.DictReader(io.StringIO("\n".join(lines) + "\n"), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path} line 1: expected a header row naming the columns")
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num}: more values than the "
                                f"{len(reader.fieldnames)} header columns")
            yield f"line {reader.line_num}", row
    except csv.Error as err:  # e.g. a NUL byte or a stray carriage return inside a field
        # the csv module's field limit is process-wide state, so it is left alone: say so (JSONL has none)
        limit = csv.field_size_limit()
        long = next((i for i, line in enumerate(lines, start=1) if len(line) > limit), None)
        if long is not None:
            raise DataError(f"{path} line {long}: a value longer than {limit:,} characters, the most Python's "
                            "CSV reader takes; save such rows as JSONL") from None
        raise DataError(f"{path} line {reader.line_num}: not readable as {'CSV' if delimiter == ',' else 'TSV'} "
                        f"({err})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, a dependency of gpt2lora that is not installed: "
                        "pip install pyarrow (or reinstall gpt2lora)") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable parquet file: {err}") from None
    if table.num_rows == 0:
        raise DataError(f"{path} is empty: the parquet file has no rows")
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` pairs of a JSONL / CSV / TSV / parquet file; ``where`` is "line N" or "row N"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: expected a .jsonl, .csv, .tsv or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "," if suffix == ".csv" else "\t")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def split_file(folder: Path, split: str) -> Path:
    """The file of ``split`` inside a data folder (``train.jsonl``, ``validation.csv``, ...)."""
    found = [folder / f"{split}{suffix}" for suffix in SUFFIXES if (folder / f"{split}{suffix}").exists()]
    if found and not found[0].is_file():
        raise DataError(f"{found[0]} is a folder; expected the {split} split's data file")
    if not found:
        present = sorted(p.name for p in folder.iterdir() if p.suffix in SUFFIXES)
        raise SplitNotFoundError(f"{folder} has no {split} split: expected {split}.jsonl (or .csv/.tsv/.parquet); "
                        f"found: {', '.join(present) or 'no data files'}")
    return found[0]


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class Dataset:
    """The validated records of one split of one task."""

    name: str
    split: str
    kind: str
    records: list[dict[str, Any]]
    label_names: tuple[str, ...] = ()
    source: str = ""
    """File (or hub repo/file) the records came from."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_labels(self) -> int | None:
        """Number of classes: the label names, else the largest label seen + 1 (None for LM tasks)."""
        if self.kind not in CLASSIFICATION_KINDS:
            return None
        if self.label_names:
            return len(self.label_names)
        return max((r["label"] for r in self.records), default=-1) + 1


def infer_kind(columns: Sequence[str], where: str) -> str:
    """The task kind whose fields a row's columns cover."""
    present = set(columns)
    for kind in ("nli", "qa", "instruction", "classification"):
        needed = set(FIELDS[kind]) - ({"input"} if kind == "instruction" else set())
        if needed <= present:
            return kind
    raise DataError(f"{where}: cannot tell the task from the columns {', '.join(sorted(present))}; expected "
                    "text+label, premise+hypothesis+label, instruction+input+output or "
                    "context+question+answers (or pass a task / column mapping)")


#: Class indices must be below this: a stray huge label would otherwise size the classification head.
MAX_CLASSES = 10_000


def _label(value: Any, label_names: Sequence[str], where: str, column: str) -> int:
    if isinstance(value, bool) or value is None:
        label = None
    elif isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    elif isinstance(value, str) and value.strip() in label_names:
        label = list(label_names).index(value.strip())
    else:
        label = None
    if label is None:
        names = f" or one of {', '.join(label_names)}" if label_names else ""
        raise DataError(f"{where}: field 'label' (column {column!r}) must be a class index{names}, "
                        f"got {value!r}")
    if label_names and not 0 <= label < len(label_names):
        raise DataError(f"{where}: field 'label' (column {column!r}) is {label}, outside the label set "
                        f"0..{len(label_names) - 1} ({', '.join(label_names)})")
    if label < 0:
        raise DataError(f"{where}: field 'label' (column {column!r}) is {label}; labels must be >= 0")
    if label >= MAX_CLASSES:
        raise DataError(f"{where}: field 'label' (column {column!r}) is {label}; class indices must be below "
                        f"{MAX_CLASSES:,} (the head gets one output per class)")
    return label


def _answers(value: Any, where: str, column: str) -> list[str]:
    if isinstance(value, Mapping) and "text" in value:  # the hub's {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: field 'answers' (column {column!r}) must be a non-empty list of strings, "
                        f"got {value!r}")
    return list(value)


def to_record(row: Mapping[str, Any], kind: str, columns: Mapping[str, str], label_names: Sequence[str],
              where: str) -> dict[str, Any]:
    """Validate one raw row and return it as a record of ``kind``."""
    record: dict[str, Any] = {}
    for name in FIELDS[kind]:
        column = columns.get(name, name)
        if column not in row or row[column] is None:
            if name == "input":  # an Alpaca row may leave out its empty input
                record[name] = ""
                continue
            shown = f"field {name!r}" + (f" (column {column!r})" if column != name else "")
            raise DataError(f"{where}: {shown} is missing; the row has columns "
                            f"{', '.join(map(str, row)) or '(none)'}")
        value = row[column]
        if name == "label":
            record[name] = _label(value, label_names, where, column)
        elif name == "answers":
            record[name] = _answers(value, where, column)
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} (column {column!r}) must be a string, "
                            f"got {type(value).__name__}")
        else:
            record[name] = value
    return record


def _check_label_set(records: list[dict[str, Any]], wheres: dict[int, str]) -> None:
    """Without label names the classes are 0..K-1 by the largest label: refuse a stray label that would
    make most of those classes ones no row has."""
    present = {r["label"] for r in records}
    top = max(present)
    if top + 1 > max(2 * len(present), 10):
        others = sorted(present - {top})
        raise DataError(f"{wheres[top]}: field 'label' is {top}, but the other rows use {others[:10]}"
                        f"{' ...' if len(others) > 10 else ''}; without label names the classes are 0..{top}, "
                        f"{top + 1 - len(present)} of them with no row (fix the label, or add label_names.json)")


def _read_label_names(folder: Path) -> tuple[str, ...]:
    path = folder / LABEL_NAMES_FILE
    if not path.is_file():
        return ()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a JSON list of label names")
    return tuple(names)


def read_records(path: str | os.PathLike | Sequence[str | os.PathLike], kind: str | None = None,
                 columns: Mapping[str, str] | None = None, label_names: Sequence[str] = (),
                 drop_labels: Sequence[int] = (), limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """``(kind, records)`` of one file, or of several (the shards of one split, read in order).

    The kind is inferred from the first row when not given. ``columns`` maps record fields to the
    file's column names. Rows whose raw label is in ``drop_labels`` are skipped. ``limit`` keeps the
    first N records.
    """
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    columns = dict(columns or {})
    records: list[dict[str, Any]] = []
    first_where: dict[int, str] = {}  # where each label value first appears, for messages
    for file in paths:
        for where, row in read_rows(file):
            if kind is None:
                renamed = {k: k for k in row} | {f: f for f, c in columns.items() if c in row}
                kind = infer_kind(list(renamed), f"{file} {where}")
            if drop_labels and "label" in FIELDS[kind]:
                raw = row.get(columns.get("label", "label"))
                if isinstance(raw, int) and raw in drop_labels:
                    continue
            records.append(to_record(row, kind, columns, label_names, f"{file} {where}"))
            if "label" in records[-1]:
                first_where.setdefault(records[-1]["label"], f"{file} {where}")
            if limit is not None and len(records) >= limit:
                break
        if limit is not None and len(records) >= limit:
            break
    if kind is None or not records:
        raise DataError(f"{', '.join(map(str, paths))} {'has' if len(paths) == 1 else 'have'} no usable rows")
    if first_where and not label_names:
        _check_label_set(records, first_where)
    return kind, records


def load_split(task: str | os.PathLike, split: str = "train", path: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None, source: str = "auto",
               columns: Mapping[str, str] | None = None, kind: str | None = None,
               limit: int | None = None, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> Dataset:
    """One split of a task, validated.

    ``task`` is a preset name (see :data:`TASKS`) or a data path. A path is a file or a folder with
    ``<split>.jsonl`` (or .csv/.tsv/.parquet) and optionally ``label_names.json``. With a preset,
    ``path`` overrides where the rows come from; otherwise ``source`` picks: ``local`` (the preset's
    folder under ``root`` / ``$GPT2LORA_DATA``), ``hub`` (every file of the split, found and downloaded by
    :func:`gpt2lora.data.hub_datasets.split_files`; ``revision`` pins the dataset) or ``auto`` (local when that
    folder exists, else hub).
    """
    if source not in ("auto", "local", "hub"):
        raise ConfigError(f"source: expected auto, local or hub, got {source!r}")
    preset = TASKS.get(str(task))
    if preset is None:
        candidate = Path(task)
        if not candidate.exists():
            raise ConfigError(f"unknown task {str(task)!r}: not a preset ({', '.join(TASKS)}) and no such "
                              "file or folder")
        path = candidate
    label_names: tuple[str, ...] = preset.label_names if preset else ()
    kind = kind or (preset.kind if preset else None)
    name = preset.name if preset else Path(task).stem
    drop: tuple[int, ...] = ()
    files: list[Path] | None = None
    source_text = ""
    if path is None and preset is not None:
        folder = data_root(root) / preset.local if preset.local and data_root(root) else None
        if source == "local" or (source == "auto" and folder is not None and folder.is_dir()):
            if folder is None or not folder.is_dir():
                raise DataError(f"task {preset.name!r}: local folder {folder or preset.local!r} not found; set "
                                f"--data-root / ${DATA_ROOT_ENV} to the folder holding {preset.local!r}")
            path = folder
        else:
            if preset.hub is None:
                raise DataError(f"task {preset.name!r} has no hub source; it reads the local folder "
                                f"{preset.local!r} under --data-root / ${DATA_ROOT_ENV}")
            from .hub_datasets import split_files

            found = split_files(preset.hub.repo, preset.hub.split_names.get(split, split), preset.hub.config,
                                revision=revision, cache_dir=cache_dir, where=f"task {preset.name!r}")
            files, source_text = list(found.paths), found.describe()
            columns = {**preset.hub.columns, **(columns or {})}
            drop = preset.hub.drop_labels
    if files is None:
        path = Path(path)
        if path.is_dir():
            folder_names = _read_label_names(path)
            if folder_names and label_names and len(folder_names) != len(label_names):
                raise DataError(f"{path / LABEL_NAMES_FILE} lists {len(folder_names)} labels but task "
                                f"{name!r} has {len(label_names)}")
            label_names = label_names or folder_names
            path = split_file(path, split)
        files, source_text = [path], str(path)
    kind, records = read_records(files, kind, columns, label_names, drop, limit)
    return Dataset(name=name, split=split, kind=kind, records=records, label_names=label_names,
                   source=source_text)


# --------------------------------------------------------------------------------------------------
# Formatting and tokenisation


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; the no-input variant when ``input`` is empty."""
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _fit(head: list[int], tail: list[int], max_length: int) -> list[int]:
    """``head + tail`` cut to ``max_length`` by shortening ``head`` first (the tail matters more)."""
    room = max(max_length - len(tail), 0)
    return (head[:room] + tail)[:max_length]


def nli_ids(tok: Tokenizer, premise: str, hypothesis: str, max_length: int) -> list[int]:
    """``Premise: ...\\nHypothesis: ...``; a long premise is cut so the hypothesis survives."""
    return _fit(tok.encode_ordinary(f"Premise: {premise}"),
                tok.encode_ordinary(f"\nHypothesis: {hypothesis}"), max_length)


def qa_prompt_ids(tok: Tokenizer, context: str, question: str, max_length: int) -> list[int]:
    """``Context: ...\\nQuestion: ...\\nAnswer:``; a long context is cut so the question survives."""
    return _fit(tok.encode_ordinary(f"Context: {context}"),
                tok.encode_ordinary(f"\nQuestion: {question}\nAnswer:"), max_length)


def prompt_ids(tok: Tokenizer, record: Mapping[str, Any], kind: str, max_length: int) -> list[int]:
    """Token ids of what the model reads before it answers (the whole input for classification)."""
    if kind == "classification":
        return tok.encode_ordinary(record["text"])[:max_length]
    if kind == "nli":
        return nli_ids(tok, record["premise"], record["hypothesis"], max_length)
    if kind == "instruction":  # keep the end: "### Response:" must stay next to the answer
        return tok.encode_ordinary(alpaca_prompt(record["instruction"], record["input"]))[-max_length:]
    if kind == "qa":
        return qa_prompt_ids(tok, record["context"], record["question"], max_length)
    raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def response_text(record: Mapping[str, Any], kind: str) -> str:
    """The target an LM task learns to write after the prompt."""
    if kind == "instruction":
        return record["output"]
    if kind == "qa":
        return " " + record["answers"][0]
    raise ConfigError(f"{kind} records have no response text")


def encode(dataset: Dataset, tok: Tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenise every record into a batching example.

    Classification / NLI: ``{"input_ids", "label"}`` truncated to ``max_length``. Instruction / QA:
    prompt + response + EOS with the prompt masked out of ``labels`` (-100), via
    :func:`gpt2lora.data.batching.lm_example`; for QA the context is shortened first so the answer fits.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length: expected an integer >= 2, got {max_length!r}")
    kind = dataset.kind
    if kind in CLASSIFICATION_KINDS:
        examples = [{"input_ids": prompt_ids(tok, r, kind, max_length), "label": r["label"]}
                    for r in dataset.records]
        empty = next((i for i, e in enumerate(examples) if not e["input_ids"]), None)
        if empty is not None:  # named here, where the file is known, not later as "example N" of a batch
            raise DataError(f"{dataset.source}: record {empty + 1} of the {dataset.split} split has no tokens "
                            f"(its text is {dataset.records[empty].get('text', '')!r}); expected some text")
        return examples
    from .batching import lm_example

    examples = []
    for record in dataset.records:
        response = tok.encode_ordinary(response_text(record, kind))
        # Keep room for the response (and EOS) when the prompt is long: the prompt is cut instead.
        room = max(max_length - len(response) - 1, max_length // 2)
        examples.append(lm_example(prompt_ids(tok, record, kind, room), response, tok.eot_token, max_length))
    return examples
