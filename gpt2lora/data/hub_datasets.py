"""Which files of a hub dataset repository hold a split, found the way the hub finds them.

1. The dataset card (``README.md``) YAML ``configs:`` list: the chosen config's ``data_files`` maps each
   split to glob patterns (``*`` within a folder, ``**`` across folders), optionally under ``data_dir``.
2. Without ``configs``, the hub's naming conventions: ``{config}/{split}-*``, ``data/{split}-*``,
   ``{split}.*``, ``{split}/**`` ... (with the usual aliases: ``dev`` / ``valid`` / ``val`` for validation).
3. When neither finds anything on the default branch, the hub's parquet conversion
   (revision ``refs/convert/parquet``, files ``{config}/{split}/*.parquet``).

The repository's files are listed at the revision through ``huggingface_hub``; every shard of the split
is downloaded (into the usual hub cache). When the hub cannot be reached, or ``HF_HUB_OFFLINE`` is set,
the cached snapshot of that revision is listed instead. Every error names the repository, revision,
split and the files that were there.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import CARD_FILE
from ..errors import DataError, SplitNotFoundError
from ..model.hub import hub_error_reason

#: File types gpt2lora reads (see :func:`gpt2lora.data.tasks.read_rows`).
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
PARQUET_REVISION = "refs/convert/parquet"
#: Names the hub accepts for the standard splits in file and folder names.
SPLIT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHOWN = 12


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split of a hub dataset, downloaded."""

    repo: str
    revision: str
    """The revision asked for (branch, tag or commit; ``refs/convert/parquet`` after the fallback)."""
    commit: str
    config: str | None
    split: str
    files: tuple[str, ...]
    """Paths inside the repository, in name order (shard order)."""
    paths: tuple[Path, ...]
    """The local (cached) copies of ``files``."""
    how: str
    """``card``, ``conventions`` or ``parquet conversion``."""

    def describe(self) -> str:
        return f"hub dataset {self.repo}@{self.commit[:12]} ({self.how}): {', '.join(self.files)}"


@dataclass(frozen=True)
class _Listing:
    revision: str
    commit: str
    files: tuple[str, ...]
    cached: str = ""
    """Why the listing is the cached snapshot (the hub could not be asked); empty when the hub listed it."""

    def shown(self) -> str:
        if self.cached:
            return f"the files cached for that revision ({_shown(self.files)}; {self.cached})"
        return f"the repository's files ({_shown(self.files)})"


def _shown(files: Sequence[str]) -> str:
    if not files:
        return "no files"
    more = f" ... ({len(files) - _SHOWN} more)" if len(files) > _SHOWN else ""
    return ", ".join(files[:_SHOWN]) + more


def glob_regex(pattern: str) -> re.Pattern:
    """A hub ``data_files`` glob as a regex over repository paths: ``*`` and ``?`` stay inside one folder,
    ``**`` crosses folders, ``[...]`` is a character class."""
    out, i = [], 0
    pattern = pattern.lstrip("/").removeprefix("./")
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end].replace("\\", "\\\\")  # ranges (0-9) stay ranges
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body.replace("^", "\\^", 1)) + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def match_files(patterns: Sequence[str], files: Sequence[str]) -> list[str]:
    """The files any of ``patterns`` matches, in name order."""
    regexes = [glob_regex(p) for p in patterns]
    return sorted(f for f in files if any(r.fullmatch(f) for r in regexes))


# --------------------------------------------------------------------------------------------------
# The dataset card


def read_card(path: Path, where: str) -> dict[str, Any]:
    """The YAML header of a dataset card (``{}`` when it has none)."""
    import yaml  # a dependency of huggingface_hub

    text = path.read_text(encoding="utf-8-sig")
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.DOTALL)
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"{where}: the dataset card {CARD_FILE} has invalid YAML ({first})") from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: the dataset card {CARD_FILE} header must be a YAML mapping, got "
                        f"{type(meta).__name__}")
    return meta


def _patterns(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{where}: expected a glob pattern or a list of them, got {value!r}")


def _data_files(value: Any, where: str) -> dict[str, list[str]]:
    """``data_files`` in any of the card's forms, as split -> patterns (a bare pattern list is ``train``)."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return {"train": _patterns(value, where)}
    if isinstance(value, Mapping):
        return {str(split): _patterns(p, f"{where}.{split}") for split, p in value.items()}
    if isinstance(value, list):
        out: dict[str, list[str]] = {}
        for i, item in enumerate(value):
            if not isinstance(item, Mapping) or "split" not in item or "path" not in item:
                raise DataError(f"{where}[{i}]: expected {{split: NAME, path: PATTERN}}, got {item!r}")
            out.setdefault(str(item["split"]), []).extend(_patterns(item["path"], f"{where}[{i}].path"))
        return out
    raise DataError(f"{where}: expected a pattern, a list or a split mapping, got {value!r}")


def card_config(card: Mapping[str, Any], config: str | None, where: str) -> dict[str, Any] | None:
    """The card's entry for ``config`` (or its default config); None when the card declares no configs."""
    configs = card.get("configs")
    if not configs:
        return None
    if not isinstance(configs, list) or not all(isinstance(c, Mapping) for c in configs):
        raise DataError(f"{where}: the dataset card's 'configs' must be a list of mappings")
    names = [str(c.get("config_name", "default")) for c in configs]
    if config is not None:
        if config not in names:
            raise DataError(f"{where}: the dataset card has no config {config!r} (it lists: {', '.join(names)})")
        return dict(configs[names.index(config)], config_name=config)
    chosen = next((c for c in configs if c.get("default")), None)
    if chosen is None and "default" in names:
        chosen = configs[names.index("default")]
    if chosen is None and len(configs) == 1:
        chosen = configs[0]
    if chosen is None:
        raise DataError(f"{where}: the dataset has several configs ({', '.join(names)}) and none is the default; "
                        "name one (the task's hub config)")
    return dict(chosen, config_name=str(chosen.get("config_name", "default")))


# --------------------------------------------------------------------------------------------------
# Conventions


def _keywords(split: str) -> tuple[str, ...]:
    return SPLIT_KEYWORDS.get(split, (split,))


def convention_patterns(split: str, config: str | None = None, data_dir: str | None = None) -> list[list[str]]:
    """Groups of patterns in the order the hub tries them; the first group that matches a file wins."""
    if data_dir:
        folders = [data_dir.strip("/") + "/"]
    else:
        folders = ([f"{config}/"] if config else []) + ["data/", ""]
    groups = []
    for folder in folders:
        groups.append([f"{folder}{k}[-._ 0-9]*" for k in _keywords(split)]
                      + [f"{folder}{k}/**" for k in _keywords(split)])
    return groups


def _by_convention(split: str, files: Sequence[str], config: str | None,
                   data_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(matched files, patterns tried) for ``split``."""
    tried: list[str] = []
    for group in convention_patterns(split, config, data_dir):
        tried.extend(group)
        found = [f for f in match_files(group, files) if f != CARD_FILE]
        if found:
            return found, tried
    return [], tried


def parquet_patterns(split: str, config: str | None) -> list[str]:
    name = config or "default"
    return [f"{name}/{split}/*.parquet", f"{name}/partial-{split}/*.parquet"]


# --------------------------------------------------------------------------------------------------
# Listing and downloading


def _is_not_found(err: BaseException) -> str | None:
    """``RepoNotFound`` / ``RevisionNotFound`` when the hub said so (a definite answer, not an outage)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if "RevisionNotFoundError" in names:
        return "RevisionNotFound"
    if "RepositoryNotFoundError" in names:
        return "RepoNotFound"
    return None


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


def _cached_listing(repo: str, revision: str, cache_dir: str | os.PathLike | None) -> _Listing | None:
    """The files of the cached snapshot of ``revision`` (the hub cache layout: refs/ and snapshots/)."""
    folder = _cache_dir(cache_dir) / ("datasets--" + repo.replace("/", "--"))
    commit = revision if _COMMIT.fullmatch(revision) else None
    ref = folder / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None
    files = tuple(sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()))
    return _Listing(revision, commit, files)


def list_dataset_files(repo: str, revision: str, cache_dir: str | os.PathLike | None, where: str) -> _Listing:
    """The repository's files at ``revision``: from the hub, else (offline, unreachable) from the cache."""
    from huggingface_hub import HfApi, constants

    error: BaseException | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            api = HfApi()
            commit = api.dataset_info(repo, revision=revision).sha
            files = api.list_repo_files(repo, repo_type="dataset", revision=commit or revision)
            return _Listing(revision, commit or revision, tuple(sorted(files)))
        except Exception as err:  # noqa: BLE001 - the hub raises many types; outages fall back to the cache
            if _is_not_found(err) == "RepoNotFound":
                raise DataError(f"{where}: there is no dataset repository {repo} on the hub "
                                f"({constants.ENDPOINT}), or it is private ({hub_error_reason(err)})") from None
            if _is_not_found(err) == "RevisionNotFound":
                raise DataError(f"{where}: the dataset {repo} has no revision {revision!r} "
                                f"({hub_error_reason(err)})") from None
            error = err
    reason = hub_error_reason(error) if error is not None else "HF_HUB_OFFLINE is set"
    cached = _cached_listing(repo, revision, cache_dir)
    if cached is not None:
        return dataclasses.replace(cached, cached=reason.removesuffix(", and it is not in the cache"))
    if error is None:
        reason = f"HF_HUB_OFFLINE is set and it is not in the cache ({_cache_dir(cache_dir)})"
    raise DataError(f"{where}: could not list the files of the dataset {repo} (revision {revision}): {reason}")


def _download(repo: str, revision: str, filename: str, cache_dir: str | os.PathLike | None, where: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        # the revision as asked (not the commit) so the cache records the branch -> commit ref for offline use
        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset", revision=revision,
                                    cache_dir=cache_dir))
    except Exception as err:  # the hub raises many types; all mean "not available"
        raise DataError(f"{where}: could not download {filename} of the dataset {repo} (revision {revision}): "
                        f"{hub_error_reason(err)}") from err


def _declared_splits(entry: Mapping[str, Any], where: str) -> dict[str, list[str]] | None:
    """split -> patterns of a card config; None when it gives only ``data_dir`` (conventions apply there)."""
    if "data_files" not in entry:
        return None
    patterns = _data_files(entry["data_files"], f"{where} card config {entry['config_name']!r} data_files")
    data_dir = entry.get("data_dir")
    if data_dir:
        patterns = {s: [f"{str(data_dir).strip('/')}/{p.lstrip('/')}" for p in ps] for s, ps in patterns.items()}
    return patterns


def split_files(repo: str, split: str, config: str | None = None, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None, where: str = "") -> SplitFiles:
    """Find and download every file of ``split`` of the hub dataset ``repo`` (see the module docstring)."""
    revision = revision or "main"
    label = f"{where + ': ' if where else ''}dataset {repo} (revision {revision}, split {split!r}" \
            f"{f', config {config!r}' if config else ''})"
    listing = list_dataset_files(repo, revision, cache_dir, label)
    card: dict[str, Any] = {}
    if CARD_FILE in listing.files:
        card = read_card(_download(repo, revision, CARD_FILE, cache_dir, label), label)
    entry = card_config(card, config, label)
    declared = _declared_splits(entry, label) if entry is not None else None
    config_name = entry["config_name"] if entry is not None else config
    how = "card"
    if declared is not None:
        if split not in declared:
            raise SplitNotFoundError(f"{label}: the dataset has no {split!r} split in config {config_name!r} (its card "
                            f"lists: {', '.join(declared)})")
        matched = [f for f in match_files(declared[split], listing.files) if f != CARD_FILE]
        if not matched:
            raise DataError(f"{label}: the card's data_files for {split!r} ({', '.join(declared[split])}) match "
                            f"none of {listing.shown()}")
    else:
        how = "conventions"
        data_dir = entry.get("data_dir") if entry is not None else None
        matched, tried = _by_convention(split, listing.files, config, data_dir)
        if not matched:
            others = [s for s in SPLIT_KEYWORDS if s != split and _by_convention(s, listing.files, config, data_dir)[0]]
            if others:
                raise SplitNotFoundError(f"{label}: the dataset has no {split!r} split (it has: {', '.join(others)}; "
                                f"{listing.shown()})")
            if revision == "main":
                # a pinned revision is honoured exactly: the conversion reflects the default branch only
                found = _from_parquet_conversion(repo, split, config, cache_dir, label)
                if found is not None:
                    return found
            raise DataError(f"{label}: no data files for the split: the card declares no configs, no file "
                            f"follows the hub's naming ({', '.join(tried[:4])} ...), and there is no parquet "
                            f"conversion; {listing.shown()}")
    readable = [f for f in matched if f.lower().endswith(DATA_SUFFIXES)]
    if not readable:
        raise DataError(f"{label}: the split's files ({_shown(matched)}) are of types gpt2lora cannot read; "
                        f"expected {', '.join(DATA_SUFFIXES)}")
    paths = tuple(_download(repo, revision, f, cache_dir, label) for f in readable)
    return SplitFiles(repo, revision, listing.commit, config_name, split, tuple(readable), paths, how)


def _from_parquet_conversion(repo: str, split: str, config: str | None, cache_dir: str | os.PathLike | None,
                             label: str) -> SplitFiles | None:
    try:
        listing = list_dataset_files(repo, PARQUET_REVISION, cache_dir, label)
    except DataError:
        return None
    matched = match_files(parquet_patterns(split, config), listing.files)
    if not matched:
        return None
    paths = tuple(_download(repo, PARQUET_REVISION, f, cache_dir, label) for f in matched)
    return SplitFiles(repo, PARQUET_REVISION, listing.commit, config or "default", split, tuple(matched), paths,
                      "parquet conversion")
