"""Documents of a corpus, in a fixed order, as batches of texts, without loading it whole.

A source is a .txt / .jsonl / .json / .parquet file, a folder of such files (the rules of
``slimmoe.io.data._list_files``), a glob of such files, or a hub dataset id / packaged
builder name (``json``, ``text``, ``parquet``) with ``name``, ``split``, ``data_files`` and
``streaming``. Local files are read with ``datasets.load_dataset(builder, data_files=f,
streaming=True)``: an ``IterableDataset`` that parses the file as it is iterated and writes
no Arrow cache (https://huggingface.co/docs/datasets/stream). ``.iter(batch_size)`` yields
dicts of columns (https://huggingface.co/docs/datasets/package_reference/main_classes).
A whole .txt file is one document (``sample_by="document"``), as ``load_blocks`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slimmoe.errors import UserError
from slimmoe.io.data import _BUILDERS, _list_files, _looks_like_path, _one_line, glob_files, is_glob


@dataclass(frozen=True)
class SourceSpec:
    """What to read: ``source`` plus the hub options (ignored for local files)."""

    source: str
    text_field: str = "text"
    name: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    streaming: bool = False

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "text_field": self.text_field, "name": self.name, "split": self.split,
                "data_files": list(self.data_files) if self.data_files else None, "streaming": self.streaming}


def local_files(spec: SourceSpec, field: str) -> list[Path] | None:
    """The files of a local source (file, folder or glob), in order; None for a hub id."""
    path = Path(spec.source).expanduser()
    if path.exists():
        files = _list_files(path, field)
    elif is_glob(spec.source):
        files = glob_files(spec.source, field)
    elif _looks_like_path(spec.source):
        raise UserError(f"{field}: no such file or folder: {spec.source}")
    else:
        return None
    if spec.data_files:
        raise UserError(f"--data-files: only with a hub dataset id or a builder name (json, text, parquet), "
                        f"not with the local {field} {spec.source}")
    return files


def iter_text_batches(spec: SourceSpec, field: str, cache_dir: str | None = None,
                      batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of document texts (None read as ""), in the source's order."""
    files = local_files(spec, field)
    if files is None:
        yield from _checked(_open_hub(spec, field, cache_dir), spec.text_field, f"{field}: {spec.source}", batch_size)
        return
    for f in files:
        if f.stat().st_size == 0:  # no documents (datasets' json reader cannot open an empty file)
            continue
        builder = _BUILDERS[f.suffix.lower()]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = _load(builder, f"{field}: {f}", data_files=str(f), split="train", streaming=True, **kwargs)
        text_field = "text" if builder == "text" else spec.text_field
        yield from _checked(ds, text_field, f"{field}: {f}", batch_size)


def _open_hub(spec: SourceSpec, field: str, cache_dir: str | None):
    kwargs = {"data_files": list(spec.data_files)} if spec.data_files else {}
    return _load(spec.source, f"{field}: {spec.source}", name=spec.name, split=spec.split, streaming=spec.streaming,
                 cache_dir=cache_dir, **kwargs)


def _load(path: str, where: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files and unknown ids
        raise UserError(f"{where}: cannot be loaded ({_one_line(e)})") from None


def _checked(ds, text_field: str, where: str, batch_size: int) -> Iterator[list[str]]:
    """``ds.iter(batch_size)``'s text column, checked to exist and to hold strings."""
    try:
        for batch in ds.iter(batch_size=batch_size):
            if text_field not in batch:
                raise UserError(f"{where}: has no field {text_field!r} (--text-field); columns: {', '.join(batch)}")
            texts = batch[text_field]
            bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
            if bad is not None:
                raise UserError(f"{where}: field {text_field!r} (--text-field) is not text (a {type(bad).__name__})")
            yield [t if t is not None else "" for t in texts]
    except UserError:
        raise
    except Exception as e:  # a parse error part-way through a file
        raise UserError(f"{where}: cannot be read ({_one_line(e)})") from None
