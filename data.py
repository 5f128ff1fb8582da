"""Data: text -> cleaned -> tokenized -> packed token shards, and shards -> training batches.

    python data.py                       # the bundled demo corpus -> data/demo/
    python data.py --source web=/data/fineweb-hq/*.parquet --source code='/data/starcoder/*.jsonl.gz' \
                   --source math=/data/finemath/*.parquet --out data/mix

Layout of an output directory:
    DIR/meta.json                         tokenizer hash, vocab size, every source's shards
    DIR/<source>/train_000000.bin ...     header + tokens, documents as <s> ... </s>, back to back
    DIR/<source>/val_000000.bin           held-out documents (chosen by a hash of the document's
                                          file and position: deterministic, never in train)
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import shutil
import json
import os
import struct
import sysconfig
import time
import unicodedata
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import BOS_ID, EOS_ID, TOKENIZER_FILE, DataConfig, load_tokenizer, note, parse_config

ROOT = Path(__file__).resolve().parent

# Shard file: a 32-byte little-endian header, then `count` tokens.
MAGIC = b"PTMBTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ")  # magic, version, vocab_size, token bytes (2|4), reserved, count
TOKEN_DTYPES = {2: np.uint16, 4: np.uint32}  # by token bytes


# ---------------------------------------------------------------------------------------------
# Tokenizer and cleaning


def with_bos(tok, text: str, bos_id: int = BOS_ID) -> list[int]:
    """<s> and the text's tokens: how every stored document and every prompt starts."""
    return [bos_id] + tok.encode(text, add_special_tokens=False).ids


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def clean(text: str, kind: str) -> str:
    """The model card's cleaning: NFKC, CRLF -> LF; code keeps its line breaks and indentation
    (trailing spaces go), every other kind collapses all whitespace runs to one space."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    if kind == "code":
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Reading documents from .txt[.gz], .jsonl[.gz] and .parquet files


def _open(path: Path):
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw)


class Utf8Policy:
    """What to do with a document that is not valid UTF-8: 'error' stops with the file and byte
    offset, 'replace' keeps it with U+FFFD for the bad bytes, 'skip' leaves it out. Counts what
    it did."""

    def __init__(self, mode: str = "error"):
        self.mode, self.count = mode, 0

    def decode(self, raw: bytes, path: Path, offset: int) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.mode == "error":
                raise ValueError(f"{path}: not UTF-8 at byte {offset + e.start:,} ({e.reason}); convert "
                                 f"the file to UTF-8, or pass --bad_utf8 replace or --bad_utf8 skip") from None
            self.count += 1
            return raw.decode("utf-8", errors="replace") if self.mode == "replace" else None


def iter_documents(path: Path, progress, key_root: Path | None = None, utf8: Utf8Policy | None = None):
    """Yield (key, text) for each document in a file; progress(bytes_read_of_this_file).

    The key (file path relative to key_root, and the document's index in the file) decides the
    train/val split, so the split does not depend on where the corpus sits on disk."""
    utf8 = utf8 or Utf8Policy()
    name = path.name.lower()
    path_key = str(path.relative_to(key_root)) if key_root else path.name
    if name.endswith((".txt", ".txt.gz", ".py", ".md")):
        raw, f = _open(path)
        with raw, f:
            text = utf8.decode(f.read(), path, 0)
            progress(raw.tell())
            if text is not None:
                yield path_key, text
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        raw, f = _open(path)
        offset = 0
        with raw, f:
            for i, line in enumerate(f):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                line = utf8.decode(line, path, start)
                if line is None:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
                text = obj.get("text", obj.get("content")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    fields = ", ".join(list(obj)[:10]) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{path}:{i + 1}: no string field 'text' or 'content' ({fields})")
                if i % 256 == 0:
                    progress(raw.tell())
                yield f"{path_key}:{i}", text
            progress(raw.tell())
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
        pf = pq.ParquetFile(path)
        cols = pf.schema_arrow.names
        col = "text" if "text" in cols else "content" if "content" in cols else None
        if col is None:
            raise ValueError(f"{path}: no column 'text' or 'content' (columns: {', '.join(cols[:10])})")
        kind = pf.schema_arrow.field(col).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise ValueError(f"{path}: column '{col}' holds {kind}, not text")
        size, i = path.stat().st_size, 0
        for g in range(pf.num_row_groups):  # one row group in memory at a time
            for text in pf.read_row_group(g, columns=[col]).column(0).to_pylist():
                if text:
                    yield f"{path_key}:{i}", text
                i += 1
            progress(size * (g + 1) // pf.num_row_groups)
    else:
        raise ValueError(f"{path}: unsupported file type; use .txt, .jsonl, .jsonl.gz or .parquet")


def read_documents(path: Path, progress, key_root: Path, utf8: Utf8Policy):
    """iter_documents, with every error that does not say which file it is about given the path
    (a truncated .gz, a file that is not gzip or not Parquet, a read error)."""
    try:
        yield from iter_documents(path, progress, key_root, utf8)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: damaged or truncated compressed file ({e}); re-download it") from None
    except (OSError, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


def is_val(key: str, val_frac: float) -> bool:
    """Held-out membership by a hash of the document's key: the same on every run and machine."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < val_frac


# ---------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Streams tokens into DIR/{split}_NNNNNN.bin. Each shard is written under a temporary name,
    fsynced, then renamed: an interrupted run leaves no file that looks like a finished shard."""

    def __init__(self, out: Path, split: str, vocab_size: int, shard_tokens: int):
        self.out, self.split, self.vocab_size, self.shard_tokens = out, split, vocab_size, shard_tokens
        self.itemsize = 2 if vocab_size <= 65536 else 4
        self.shards: list[dict] = []
        self.f = None

    def _open(self):
        self.name = f"{self.split}_{len(self.shards):06d}.bin"
        self.file = AtomicFile(self.out / self.name)
        self.f = self.file.f
        self.f.write(b"\0" * HEADER.size)
        self.count = self.docs = 0

    def add(self, docs: list[list[int]]):
        for ids in docs:
            if self.f is None:
                self._open()
            arr = np.empty(len(ids) + 2, dtype=TOKEN_DTYPES[self.itemsize])
            arr[0], arr[1:-1], arr[-1] = BOS_ID, ids, EOS_ID
            self.f.write(arr.tobytes())
            self.count += len(arr)
            self.docs += 1
            if self.count >= self.shard_tokens:
                self._close()

    def _close(self):
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, VERSION, self.vocab_size, self.itemsize, 0, self.count))
        self.file.commit()
        self.shards.append({"file": self.name, "documents": self.docs, "tokens": self.count})
        self.f = None

    def finish(self) -> list[dict]:
        if self.f is not None:
            self._close()
        return self.shards


class AtomicFile:
    """A file written as PATH.tmp and renamed to PATH once complete and fsynced, so a reader never
    sees a half-written file under the real name. As a context manager it commits on success and
    removes the .tmp file on an error."""

    def __init__(self, path: Path, mode: str = "wb"):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        self.f = open(self.tmp, mode)

    def commit(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.f.close()
            self.tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj):
    with AtomicFile(path, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")


def fsync_dir(path: Path):
    """Make a rename inside path durable (the directory entry, not only the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(path: Path, write, twins: tuple[Path, Path] | None = None):
    """write(tmp) fills a temporary folder, which is fsynced and renamed over path; only then is
    the old folder removed. A kill at any moment leaves a complete folder at path or at its old
    twin, which the readers accept. A failed write removes the temporary folder (a full disk must
    not stay full) and an OSError says the free space. twins: the temporary and the old folder's
    paths (default PATH.tmp, PATH.old). Returns what write returned."""
    tmp, old = twins or (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a write that failed, e.g. ENOSPC
            raise OSError(f"{e}; {free_space(path.parent)} in {path.parent}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return result


def free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e9:.1f} GB free" if free >= 1e9 else f"{free / 1e6:.1f} MB free"


def expand(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = []
    for p in paths:
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return files


def prepare_source(name: str, kind: str, files: list[Path], out: Path, tok, tok_hash: str,
                   val_frac: float, shard_tokens: int, bad_utf8: str = "error") -> dict:
    """Clean, tokenize and shard one source into a staging folder; only when it is complete does
    it replace OUT/name, so a failed or killed run never destroys finished shards. A failed run
    removes its staging folder (a full disk does not stay full)."""
    try:
        return replace_folder(out / name, lambda stage: _write_source(
            name, kind, files, stage, tok, tok_hash, val_frac, shard_tokens, bad_utf8),
                              twins=(out / f".{name}.staging", out / f".{name}.old"))
    except OSError as e:
        if e.filename is None:
            raise OSError(f"writing {out / name}: {e}") from None
        raise


class Progress:
    """One source's progress line on stderr (bytes read of all its files, documents, tokens,
    speed, ETA), at most every 2 s and once at the end."""

    def __init__(self, name: str, files: list[Path]):
        self.name, self.total = name, sum(f.stat().st_size for f in files) or 1
        self.done_bytes = self.in_file = self.docs = self.tokens = 0
        self.t0, self.last = time.time(), 0.0

    def at(self, offset: int):
        """Called by the reader with its offset in the current file."""
        self.in_file = offset
        self.report()

    def file_done(self, path: Path):
        self.done_bytes, self.in_file = self.done_bytes + path.stat().st_size, 0

    def report(self, final=False):
        now = time.time()
        if not final and now - self.last < 2:
            return
        self.last = now
        read = self.done_bytes + self.in_file
        el = max(now - self.t0, 1e-9)
        eta = (self.total - read) / max(read / el, 1e-9)
        note(f"[{self.name}] {read / self.total:6.1%}  docs {self.docs:,}  tokens "
             f"{self.tokens / 1e6:,.1f}M  {read / el / 1e6:.1f} MB/s  "
             f"{'done in' if final else 'ETA'} {el if final else eta:.0f}s")


def _batches(files, kind, val_frac, utf8, progress: Progress, size: int):
    """The sources' documents, cleaned, in batches of up to size: (texts, their splits)."""
    key_root = Path(os.path.commonpath([f.resolve() for f in files]))
    key_root = key_root.parent if key_root.is_file() else key_root
    texts, splits = [], []
    for path in files:
        for key, text in read_documents(path.resolve(), progress.at, key_root, utf8):
            text = clean(text, kind)
            if not text:
                continue
            texts.append(text)
            splits.append("val" if is_val(key, val_frac) else "train")
            progress.docs += 1
            if len(texts) >= size:
                yield texts, splits
                texts, splits = [], []
        progress.file_done(path)
    if texts:
        yield texts, splits


def _write_source(name, kind, files, src_dir: Path, tok, tok_hash, val_frac, shard_tokens, bad_utf8,
                  batch_docs: int = 512) -> dict:
    """Tokenizing (Rust, all cores, GIL released) runs in a background thread while this thread
    reads and cleans the next batch."""
    utf8 = Utf8Policy(bad_utf8)
    vocab = tok.get_vocab_size()
    writers = {s: ShardWriter(src_dir, s, vocab, shard_tokens) for s in ("train", "val")}
    progress = Progress(name, files)

    def tokenize(texts, splits):
        # encode_batch_fast: the same ids as encode_batch without computing character
        # offsets, which packing never needs (faster: BENCHMARKS.md, Data preparation).
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        for split in ("train", "val"):
            writers[split].add([e.ids for e, s in zip(encs, splits) if s == split])
        progress.tokens += sum(len(e.ids) + 2 for e in encs)

    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for texts, splits in _batches(files, kind, val_frac, utf8, progress, batch_docs):
            # One batch in flight: wait for the previous one (re-raising its error), then hand
            # this one over and go back to reading.
            if pending is not None:
                pending.result()
            pending = worker.submit(tokenize, texts, splits)
        if pending is not None:
            pending.result()
    progress.report(final=True)
    if not progress.docs:
        raise ValueError(f"--source {name}: its {len(files):,} file(s) ({files[0]}{', ...' if len(files) > 1 else ''}) "
                         f"hold no document (all empty after cleaning); check the pattern and the files")
    if utf8.count:
        note(f"[{name}] {utf8.count:,} document(s) not valid UTF-8: "
             f"{'replaced bad bytes with U+FFFD' if utf8.mode == 'replace' else 'skipped'}")
    meta = {"kind": kind, "files": [str(f) for f in files], "tokenizer_sha256": tok_hash,
            "vocab_size": vocab, "train": writers["train"].finish(), "val": writers["val"].finish()}
    if not meta["val"]:
        note(f"[{name}] warning: none of its {progress.docs:,} documents was held out at --val_frac "
             f"{val_frac}: train.py evaluates on the other sources only, or fails if none has "
             f"any; raise --val_frac or add documents")
    atomic_write_json(src_dir / "meta.json", meta)  # written last: marks the source complete
    return meta


def demo_sources() -> dict[str, list[Path]]:
    """Shakespeare (web) and the running Python's standard library (code)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    code = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    return {"web": sorted((ROOT / "corpus" / "shakespeare").glob("*.txt.gz")), "code": code}


def prepare(sources: dict[str, list[Path]], out: Path, val_frac: float, shard_tokens: int,
            force: bool = False, bad_utf8: str = "error"):
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer()
    tok_hash = file_sha256(TOKENIZER_FILE)
    metas = {}
    for name, files in sources.items():
        if not files:
            raise SystemExit(f"--source {name}: no files matched")
        if not (out / name).exists() and (out / f".{name}.old").is_dir():
            os.replace(out / f".{name}.old", out / name)  # killed between prepare_source's renames
        done = out / name / "meta.json"
        if done.is_file() and not force:
            m = json.loads(done.read_text())
            if m.get("tokenizer_sha256") == tok_hash and m.get("files") == [str(f) for f in files]:
                note(f"[{name}] already prepared in {out / name} (use --force to redo)")
                metas[name] = m
                continue
        # a source's name is its kind: clean() keeps the line breaks and indentation of "code"
        metas[name] = prepare_source(name, name, files, out, tok, tok_hash, val_frac, shard_tokens, bad_utf8)
    summary = {"tokenizer_sha256": tok_hash, "vocab_size": tok.get_vocab_size(),
               "sources": {n: {s: sum(x["tokens"] for x in m[s]) for s in ("train", "val")}
                           for n, m in metas.items()}}
    atomic_write_json(out / "meta.json", summary)
    for n, c in summary["sources"].items():
        note(f"{n}: {c['train']:,} train tokens, {c['val']:,} val tokens")
    return summary


# ---------------------------------------------------------------------------------------------
# Reading shards


def open_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map one shard's tokens, checking its header against the file."""
    hint = "re-run `python data.py` for this data directory"
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad magic {head[:8]!r}); {hint}")
    _, version, vocab, itemsize, _, count = HEADER.unpack(head)
    if version != VERSION or itemsize not in TOKEN_DTYPES:
        raise ValueError(f"{path}: shard format version {version} / token size {itemsize} is not "
                         f"supported (this code reads version {VERSION}); {hint}")
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"{path}: tokenized with a {vocab}-token vocabulary, the model has "
                         f"{vocab_size}; prepare the data with the model's tokenizer")
    size = path.stat().st_size
    if size != HEADER.size + count * itemsize:
        raise ValueError(f"{path}: truncated or padded: header says {count} tokens "
                         f"({HEADER.size + count * itemsize} bytes), file has {size} bytes; {hint}")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[itemsize], mode="r", offset=HEADER.size, shape=(count,))
    if count and int(tokens.max()) >= vocab:  # one pass per shard: an embedding lookup would crash
        raise ValueError(f"{path}: holds token id {int(tokens.max())}, but its vocabulary has {vocab} "
                         f"ids; the shard is damaged: {hint}")
    return tokens


class TokenWindows:
    """All (seq_len+1)-token windows of one source's shards, at stride seq_len, never crossing
    a shard boundary."""

    def __init__(self, files: list[Path], seq_len: int, vocab_size: int | None):
        self.seq_len = seq_len
        self.shards = [open_shard(f, vocab_size) for f in files]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.cumsum([0] + counts)
        self.n = int(self.starts[-1])

    def get(self, w: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, w, side="right")) - 1
        off = (w - int(self.starts[k])) * self.seq_len
        return self.shards[k][off:off + self.seq_len + 1]


def find_sources(data_dir, split: str, seq_len: int, vocab_size: int | None) -> dict[str, TokenWindows]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data directory; prepare one with "
                                f"`python data.py` (demo) or `python data.py --source ... --out {data_dir}`")
    out = {}
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        listed = complete_shards(d, split)  # {shard: its token count in meta.json}
        if listed:
            tw = TokenWindows(list(listed), seq_len, vocab_size)
            for f, shard in zip(listed, tw.shards):
                if len(shard) != listed[f]:
                    raise ValueError(f"{f}: holds {len(shard):,} tokens, {d / 'meta.json'} says "
                                     f"{listed[f]:,}; {_redo(d)}")
            if tw.n == 0:
                raise ValueError(f"{d}: {split} shards hold fewer than {seq_len + 1} tokens; "
                                 f"use a shorter --seq_len or more data")
            out[d.name] = tw
    if not out:
        raise FileNotFoundError(f"{data_dir}: no {split}_*.bin shards in any source folder; "
                                f"prepare them with `python data.py --out {data_dir}`")
    return out


def _redo(src: Path) -> str:
    return f"finish it with the data.py command that made {src.parent} (it redoes unfinished sources)"


def complete_shards(src: Path, split: str) -> dict[Path, int]:
    """The split's shards of a source that data.py finished, as its meta.json lists them, with
    their token counts; an unfinished source or a listed shard that is missing is refused with
    the command that fixes it."""
    redo = _redo(src)
    if not (src / "meta.json").is_file():
        if any(src.glob("*.bin")):
            raise ValueError(f"{src}: an unfinished source (shards but no meta.json); {redo}")
        return {}
    try:
        listed = json.loads((src / "meta.json").read_text())[split]
        files = [(src / s["file"], int(s["tokens"])) for s in listed]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{src / 'meta.json'}: damaged ({type(e).__name__}: {e}); {redo}") from None
    for f, _ in files:
        if not f.is_file():
            raise ValueError(f"{f}: listed in {src / 'meta.json'} but missing; {redo}")
    return dict(files)


@dataclass
class Mixture:
    """Mixture weights by source name (renormalised over the sources present), switching to the
    anneal weights from step anneal_step on (the card's late code/math upweighting)."""
    weights: dict[str, float]
    anneal_weights: dict[str, float]
    anneal_step: int

    def at(self, step: int, names: list[str]) -> np.ndarray:
        w = self.anneal_weights if step >= self.anneal_step else self.weights
        v = np.array([w.get(n, 0.0) for n in names], dtype=np.float64)
        if v.sum() <= 0:  # sources without a configured weight share equally
            v = np.ones(len(names))
        return v / v.sum()


# The last entry of the seed sequence of a source's window order, which keeps that random
# stream apart from the mixture's ([seed, step]).
SHUFFLE_STREAM = 7


class MixtureLoader:
    """Training batches, a pure function of (seed, step, rank, world_size).

    Step s draws how many of its global batch (batch_size * world_size * grad_accum windows)
    come from each source (multinomial with the step's weights, seeded by (seed, s)), shuffles
    them, and hands rank r the slots r, r+world, ... Each source walks through a seeded
    permutation of its windows epoch by epoch, so ranks read disjoint windows and resuming at
    step k replays exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, data_dir, batch_size: int, seq_len: int, mixture: Mixture, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, vocab_size: int | None = None):
        self.sources = find_sources(data_dir, "train", seq_len, vocab_size)
        self.names = list(self.sources)
        self.B, self.T, self.mix, self.seed = batch_size, seq_len, mixture, seed
        self.rank, self.world, self.accum = rank, world_size, grad_accum
        self.consumed = np.zeros(len(self.names), dtype=np.int64)  # windows used before `step`
        self.step = 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _counts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.B * self.world * self.accum
        rng = np.random.default_rng([self.seed, step])
        counts = rng.multinomial(g, self.mix.at(step, self.names))
        order = rng.permutation(np.repeat(np.arange(len(self.names)), counts))
        return counts, order

    def seek(self, step: int):
        """Position the loader at `step` (replays the per-step source counts: cheap)."""
        if step < self.step:
            self.consumed[:] = 0
            self.step = 0
        while self.step < step:
            self.consumed += self._counts(self.step)[0]
            self.step += 1

    def _window(self, src: int, j: int) -> np.ndarray:
        tw = self.sources[self.names[src]]
        epoch, i = divmod(j, tw.n)
        key = (src, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != src}
            self._perms[key] = np.random.default_rng([self.seed, src, epoch, SHUFFLE_STREAM]).permutation(tw.n)
        return tw.get(int(self._perms[key][i]))

    def get_batch(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's grad_accum micro-batches for `step`: [(x, y)] of int64 (B, T)."""
        self.seek(step)
        counts, order = self._counts(step)
        nth = np.zeros(len(self.names), dtype=np.int64)
        slot_window = []
        for src in order:  # global slot -> (source, that source's consumption index)
            slot_window.append((src, self.consumed[src] + nth[src]))
            nth[src] += 1
        micro = []
        for a in range(self.accum):
            rows = []
            for b in range(self.B):
                slot = (a * self.B + b) * self.world + self.rank
                rows.append(self._window(*slot_window[slot]))
            arr = np.stack(rows).astype(np.int64)
            micro.append((np.ascontiguousarray(arr[:, :-1]), np.ascontiguousarray(arr[:, 1:])))
        self.consumed += counts
        self.step = step + 1
        return micro


def val_windows(data_dir, seq_len: int, max_samples: int, rank: int = 0, world_size: int = 1,
                vocab_size: int | None = None) -> list[np.ndarray]:
    """Held-out windows: up to max_samples in total, taken round-robin over the sources in a
    fixed order, this rank's share (i % world_size == rank)."""
    sources = find_sources(data_dir, "val", seq_len, vocab_size)
    tws = list(sources.values())
    picked, i = [], 0
    while len(picked) < max_samples and any(i < tw.n for tw in tws):
        for tw in tws:
            if i < tw.n and len(picked) < max_samples:
                picked.append(tw.get(i))
        i += 1
    return [w.astype(np.int64) for k, w in enumerate(picked) if k % world_size == rank]


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv, __doc__, DataConfig())
    if cfg.source:
        sources = {}
        for s in cfg.source:
            name, eq, pattern = s.partition("=")
            if not eq or not name:
                raise SystemExit(f"data.py: --source {s!r}: expected NAME=PATH_OR_GLOB, "
                                 f"e.g. web='/data/fw/*.parquet'")
            sources.setdefault(name, []).extend(expand(pattern))
        out = Path(cfg.out or "data/mix")
        val_frac = 0.005 if cfg.val_frac is None else cfg.val_frac
    else:
        sources, out = demo_sources(), Path(cfg.out or "data/demo")
        val_frac = 0.1 if cfg.val_frac is None else cfg.val_frac
    try:
        prepare(sources, out, val_frac, cfg.shard_tokens, cfg.force, cfg.bad_utf8)
    except (ValueError, OSError) as e:  # a bad input file: say which, without a traceback
        raise SystemExit(f"data.py: {e}") from None


if __name__ == "__main__":
    main()
