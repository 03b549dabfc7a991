"""``--model ORG/NAME[@REVISION][:QUANT]``: a Hugging Face Hub id resolved to files on disk.

Everything goes through ``huggingface_hub``: its cache (``HF_HOME``, ``HF_HUB_CACHE``), its
offline switch (``HF_HUB_OFFLINE``), its token (``HF_TOKEN``) and its progress bars. A
safetensors repo is fetched with ``snapshot_download`` restricted to the files the loader reads
(config, tokenizer, generation config, then the weights the index names); a GGUF repo gives one
file, named by ``--gguf-file`` or chosen by a quant tag as llama.cpp's ``-hf`` does, fetched
with ``hf_hub_download``.

Invariants: a path that exists on disk is never taken for a Hub id; nothing here reads or
writes the cache by hand; a miss (offline, or the Hub out of reach) raises an error that names
the missing files and the ``hf download`` command that fetches them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

# What a safetensors checkpoint needs besides its weights (fnmatch patterns, as
# snapshot_download's allow_patterns take them).
METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    # Sentence Transformers' pooling of an embedding model, its cross-encoder's activation
    # (models/pooling.py)
    "modules.json",
    "*_Pooling/config.json",
    "config_sentence_transformers.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
ALL_SAFETENSORS = "*.safetensors"
FETCH_COMMAND = "hf download"  # huggingface_hub's CLI (``huggingface-cli download`` before 0.34)
# What the fetch command of a repo missing from the cache asks for (a superset of the above).
FETCH_INCLUDES = ("*.json", "tokenizer*", "merges.txt", "vocab.txt", "*.jinja", ALL_SAFETENSORS)

# ORG/NAME, then @REVISION (a branch, tag or commit; never a ':' in git), then :QUANT.
_HUB_ID = re.compile(
    r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^:@]+))?(?::(?P<quant>[\w.+-]+))?"
)
# llama.cpp's split files: NAME-00001-of-00003.gguf
_GGUF_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubId:
    """A model named on the Hub, as the user typed it (``typed``: the served model name)."""

    typed: str
    repo_id: str
    revision: Optional[str] = None  # None: the default branch
    quant: Optional[str] = None  # a GGUF file whose name contains this tag

    def revision_flag(self) -> str:
        return f" --revision {shlex.quote(self.revision)}" if self.revision else ""


@dataclass(frozen=True)
class ModelSource:
    """What the loader reads: a directory or a .gguf file, and the name to serve it under."""

    path: str
    name: str


def parse_hub_id(model: str) -> Optional[HubId]:
    """``model`` as a Hub id, or None when it cannot be one (a path: absolute, relative with
    ``./``, ``~``, more than one ``/``, or a name the Hub would refuse)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _HUB_ID.fullmatch(model)
    if match is None or model.startswith((".", "~")):
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return HubId(model, match["repo"], match["revision"], match["quant"])


def resolve_model(model: str, gguf_file: Optional[str] = None, weights: bool = True) -> ModelSource:
    """The local files of ``model``: the path itself when it exists, else the Hub id's files
    from huggingface_hub's cache, downloaded first when online. ``weights=False`` fetches only
    the config and tokenizer (random weights: ``--load-format dummy``)."""
    if os.path.exists(model):
        return _local_source(model, gguf_file)
    hub = parse_hub_id(model)
    if hub is None:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    if hub.quant is not None and gguf_file is not None:
        raise ValueError(f"{model!r} names a quant tag and --gguf-file {gguf_file!r}: give one")
    if hub.quant is not None or gguf_file is not None:
        return ModelSource(_gguf_from_hub(hub, gguf_file), hub.typed)
    return ModelSource(_safetensors_from_hub(hub, weights), hub.typed)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_adapter(path: str) -> str:
    """A LoRA adapter's directory: ``path`` itself when it exists, else the Hub id's adapter
    files (``adapter_config.json``, ``adapter_model.safetensors``) from the Hub cache."""
    if os.path.exists(path):
        return path
    hub = parse_hub_id(path)
    if hub is None or hub.quant is not None:
        raise FileNotFoundError(f"LoRA adapter path {path!r} does not exist")
    return _snapshot(hub, ADAPTER_FILES, hub.revision, ADAPTER_FILES, ADAPTER_FILES)


def _local_source(path: str, gguf_file: Optional[str]) -> ModelSource:
    if gguf_file is not None:
        if not os.path.isdir(path):
            raise ValueError(
                f"--gguf-file {gguf_file!r} needs a directory or a Hub id, not {path!r}"
            )
        path = os.path.join(path, gguf_file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path {path!r} does not exist")
    return ModelSource(path, os.path.basename(path.rstrip("/")))


# --- safetensors repos ----------------------------------------------------------------------


def _safetensors_from_hub(hub: HubId, weights: bool) -> str:
    """The snapshot directory: metadata first, then (``weights``) the safetensors files its
    index lists (or every ``*.safetensors`` without an index), both at the same commit."""
    wanted = ["config.json", "the tokenizer files"] + ([ALL_SAFETENSORS] if weights else [])
    folder = _snapshot(hub, METADATA_PATTERNS, hub.revision, wanted, FETCH_INCLUDES)
    commit = os.path.basename(folder)
    has_config = os.path.exists(os.path.join(folder, "config.json"))
    if not weights:
        if not has_config:
            raise FileNotFoundError(f"{hub.repo_id} has no config.json to take shapes from")
        return folder
    if not has_config:
        return _gguf_only_repo(hub, commit)
    shards = _indexed_shards(folder) or [ALL_SAFETENSORS]
    if _missing_weights(hub, folder, shards):  # a commit's cached files never change
        _snapshot(hub, shards, commit, shards, shards)
    missing = _missing_weights(hub, folder, shards)
    if missing and _offline():
        raise _missing_error(hub, missing, _fetch_command(hub, missing), cause=None)
    if missing:  # the Hub listed none, or was out of reach and they are not cached
        raise FileNotFoundError(
            f"{hub.repo_id} at commit {commit}: no {', '.join(missing)} in the cache after "
            "asking the Hub. pagoda loads safetensors checkpoints, or a GGUF file "
            f"({hub.repo_id}:QUANT or --gguf-file); if the repo has them, fetch them with "
            f"{_fetch_command(hub, missing)}"
        )
    return folder


def _indexed_shards(folder: str) -> list[str]:
    """The shards ``model.safetensors.index.json`` names (empty without an index), so that a
    repo holding the same weights twice (consolidated.safetensors beside the shards) gives one."""
    path = os.path.join(folder, SAFETENSORS_INDEX)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def _missing_weights(hub: HubId, folder: str, shards: Sequence[str]) -> list[str]:
    """The weight files the snapshot ``folder`` (a commit's) lacks in the cache."""
    from huggingface_hub import try_to_load_from_cache

    if list(shards) == [ALL_SAFETENSORS]:
        return [] if glob.glob(os.path.join(folder, ALL_SAFETENSORS)) else [ALL_SAFETENSORS]
    commit = os.path.basename(folder)
    cached = [try_to_load_from_cache(hub.repo_id, s, revision=commit) for s in shards]
    return [s for s, path in zip(shards, cached, strict=True) if not isinstance(path, str)]


def _snapshot(
    hub: HubId,
    patterns: Sequence[str],
    revision: Optional[str],
    wanted: Sequence[str],
    includes: Sequence[str],
) -> str:
    """snapshot_download of the files matching ``patterns``; a miss names ``wanted`` and the
    ``hf download --include`` command for ``includes``."""
    from huggingface_hub import snapshot_download

    with _hub_errors(hub, wanted, _fetch_command(hub, includes)):
        folder = snapshot_download(hub.repo_id, revision=revision, allow_patterns=list(patterns))
    return str(folder)


def _fetch_command(hub: HubId, includes: Sequence[str]) -> str:
    patterns = " ".join(shlex.quote(p) for p in includes)
    return f"{FETCH_COMMAND} {hub.repo_id}{hub.revision_flag()} --include {patterns}"


# --- GGUF repos ----------------------------------------------------------------------------


def _gguf_from_hub(hub: HubId, gguf_file: Optional[str]) -> str:
    filename = gguf_file or choose_gguf(_repo_gguf_files(hub), hub.quant or "", hub.repo_id)
    return _download_file(hub, filename, hub.revision)


def _gguf_only_repo(hub: HubId, commit: str) -> str:
    """A repo without config.json given without a quant tag: its one GGUF file, if it has one."""
    files = [f for f in _repo_gguf_files(hub) if not _is_projector(f)]
    if len(files) == 1:
        return _download_file(hub, files[0], commit)
    if not files:
        raise FileNotFoundError(
            f"{hub.repo_id} has neither a config.json (a safetensors checkpoint) nor a .gguf file"
            + (" in the local cache" if _offline() else "")
        )
    raise ValueError(
        f"{hub.repo_id} holds GGUF files, not one: choose with {hub.repo_id}:QUANT or "
        f"--gguf-file FILE among {', '.join(files)}"
    )


def choose_gguf(files: Sequence[str], quant: str, repo_id: str) -> str:
    """The one .gguf file whose name contains ``quant`` (case-insensitive); where several do,
    the ones where it stands between separators (``Q8_0`` rather than ``IQ8_0``). Multimodal
    projector files are never chosen. Errors list the candidates."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and not _is_projector(f)]
    hits = [f for f in ggufs if quant.lower() in os.path.basename(f).lower()]
    if len(hits) > 1:
        delimited = re.compile(rf"(^|[^a-z0-9]){re.escape(quant.lower())}([^a-z0-9]|$)")
        hits = [f for f in hits if delimited.search(os.path.basename(f).lower())] or hits
    if len(hits) == 1 and _GGUF_SPLIT.search(hits[0]) is None:
        return hits[0]
    if hits and all(_GGUF_SPLIT.search(f) for f in hits):
        raise ValueError(
            f"{repo_id}:{quant} is a split GGUF ({', '.join(hits)}); pagoda reads one file"
        )
    if hits:
        raise ValueError(
            f"{repo_id}:{quant} matches several files: {', '.join(hits)}; use --gguf-file"
        )
    found = ", ".join(ggufs) or "none"
    raise FileNotFoundError(
        f"no .gguf file in {repo_id} has {quant!r} in its name (GGUF files: {found})"
    )


def _is_projector(filename: str) -> bool:
    return "mmproj" in os.path.basename(filename).lower()


def _repo_gguf_files(hub: HubId) -> list[str]:
    """The repo's .gguf files: listed by the Hub when online, else those in the local cache."""
    from huggingface_hub import HfApi

    if not _offline():
        try:
            files = HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
            return [f for f in files if f.lower().endswith(".gguf")]
        except Exception as e:
            translated = _translate(hub, e, [], "")
            if translated is not None:
                raise translated from e
            # Out of reach: what the cache holds may do.
            logger.warning(
                "could not list %s on the Hub (%s); looking in the cache", hub.repo_id, e
            )
    files = [f for f in _cached_files(hub) if f.lower().endswith(".gguf")]
    if not files:
        pattern = f"*{hub.quant}*.gguf" if hub.quant else "*.gguf"
        raise _missing_error(hub, [pattern], _fetch_command(hub, [pattern]), cause=None)
    return files


def _cached_files(hub: HubId) -> list[str]:
    """The files of ``hub``'s revision in huggingface_hub's cache, relative to the snapshot."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache named now (scan_cache_dir's default is the one read at its import)
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    wanted = hub.revision or "main"
    for repo in cache.repos:
        if repo.repo_id != hub.repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if rev.commit_hash == wanted or wanted in rev.refs:
                root = str(rev.snapshot_path)
                return sorted(
                    os.path.relpath(f.file_path, root).replace(os.sep, "/") for f in rev.files
                )
    return []


def _download_file(hub: HubId, filename: str, revision: Optional[str]) -> str:
    from huggingface_hub import hf_hub_download

    command = f"{FETCH_COMMAND} {hub.repo_id} {shlex.quote(filename)}{hub.revision_flag()}"
    with _hub_errors(hub, [filename], command):
        path = hf_hub_download(hub.repo_id, filename, revision=revision)
    return str(path)


# --- errors --------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_errors(hub: HubId, wanted: Sequence[str], command: str) -> Iterator[None]:
    """huggingface_hub's errors raised as :func:`_translate` words them."""
    try:
        yield
    except Exception as e:
        translated = _translate(hub, e, wanted, command)
        if translated is None:
            raise
        raise translated from e


def _translate(
    hub: HubId, e: Exception, wanted: Sequence[str], command: str
) -> Optional[FileNotFoundError]:
    """pagoda's error (a FileNotFoundError, which the CLI prints) for a repo or revision that
    does not exist, a gated repo, or files that are not cached; None for any other error."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return FileNotFoundError(
            f"{hub.repo_id} is gated: accept its terms on huggingface.co, then set HF_TOKEN "
            "(or run `hf auth login`)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return FileNotFoundError(
            f"model {hub.typed!r} is neither a path on disk nor a model repo on the Hugging Face "
            "Hub (a private repo needs HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return FileNotFoundError(f"{hub.repo_id} has no revision {hub.revision!r}")
    if isinstance(e, LocalEntryNotFoundError):
        return _missing_error(hub, wanted, command, cause=e)
    return None


def _missing_error(
    hub: HubId, wanted: Sequence[str], command: str, cause: Optional[Exception]
) -> FileNotFoundError:
    """The files ``wanted`` are not cached: say why, where the cache is, and how to fetch them."""
    from huggingface_hub import constants

    tail = ""
    if _offline():
        why, tail = "HF_HUB_OFFLINE is set", "\n(or run once without HF_HUB_OFFLINE)"
    else:
        why = "the Hub could not be reached: " + (str(cause).splitlines()[0] if cause else "?")
    at = f" (revision {hub.revision})" if hub.revision else ""
    return FileNotFoundError(
        f"{hub.repo_id}{at}: {', '.join(wanted)} {'is' if len(wanted) == 1 else 'are'} not in "
        f"the Hugging Face cache "
        f"{constants.HF_HUB_CACHE}, and {why}. Fetch them with network access:\n"
        f"    {command}{tail}"
    )
