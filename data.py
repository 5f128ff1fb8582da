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
import io
import json
import os
import struct
import sys
import sysconfig
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import BOS_ID, EOS_ID, DataConfig, parse_args

ROOT = Path(__file__).resolve().parent
TOKENIZER_FILE = ROOT / "tokenizer.json"

# Shard file: a 32-byte little-endian header, then `count` tokens.
MAGIC = b"PTMBTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ")  # magic, version, vocab_size, token bytes (2|4), reserved, count
TOKEN_DTYPES = {2: np.uint16, 4: np.uint32}  # by token bytes


# ---------------------------------------------------------------------------------------------
# Tokenizer and cleaning


def load_tokenizer(path=TOKENIZER_FILE):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def clean(text: str, kind: str) -> str:
    """The seed card's cleaning: NFKC, CRLF -> LF; code keeps its line breaks and indentation
    (trailing spaces go), every other kind collapses all whitespace runs to one space."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    if kind == "code":
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Reading documents from .txt[.gz], .jsonl[.gz] and .parquet files


def _open_text(path: Path):
    raw = open(path, "rb")
    stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
    return raw, io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")


def iter_documents(path: Path, progress, key_root: Path | None = None):
    """Yield (key, text) for each document in a file; progress(bytes_read_of_this_file).

    The key (file path relative to key_root, and the document's index in the file) decides the
    train/val split, so the split does not depend on where the corpus sits on disk."""
    name = path.name.lower()
    path_key = str(path.relative_to(key_root)) if key_root else path.name
    if name.endswith((".txt", ".txt.gz", ".py", ".md")):
        raw, f = _open_text(path)
        with raw, f:
            text = f.read()
            progress(raw.tell())
            yield path_key, text
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        raw, f = _open_text(path)
        with raw, f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
                text = obj.get("text", obj.get("content"))
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{i + 1}: no string field 'text' or 'content' "
                                     f"(fields: {', '.join(list(obj)[:10])})")
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
        size, i = path.stat().st_size, 0
        for g in range(pf.num_row_groups):  # one row group in memory at a time
            for text in pf.read_row_group(g, columns=[col]).column(0).to_pylist():
                if text:
                    yield f"{path_key}:{i}", text
                i += 1
            progress(size * (g + 1) // pf.num_row_groups)
    else:
        raise ValueError(f"{path}: unsupported file type; use .txt, .jsonl, .jsonl.gz or .parquet")


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


def expand(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = []
    for p in paths:
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return files


def prepare_source(name: str, kind: str, files: list[Path], out: Path, tok, tok_hash: str,
                   val_frac: float, shard_tokens: int, batch_docs: int = 512) -> dict:
    """Clean, tokenize and shard one source. Tokenizing (Rust, all cores, GIL released) runs in a
    background thread while this thread reads and cleans the next batch."""
    src_dir = out / name
    src_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(src_dir.glob("*.bin")) + list(src_dir.glob("*.tmp")):
        stale.unlink()  # a rerun of an unfinished source starts it over
    vocab = tok.get_vocab_size()
    writers = {s: ShardWriter(src_dir, s, vocab, shard_tokens) for s in ("train", "val")}
    total_bytes = sum(f.stat().st_size for f in files) or 1
    state = dict(done_bytes=0, cur=0, docs=0, tokens=0, t0=time.time(), last=0.0)

    def report(final=False):
        now = time.time()
        if not final and now - state["last"] < 2:
            return
        state["last"] = now
        read = state["done_bytes"] + state["cur"]
        el = max(now - state["t0"], 1e-9)
        eta = (total_bytes - read) / max(read / el, 1e-9)
        print(f"[{name}] {read / total_bytes:6.1%}  docs {state['docs']:,}  tokens "
              f"{state['tokens'] / 1e6:,.1f}M  {read / el / 1e6:.1f} MB/s  "
              f"{'done in' if final else 'ETA'} {el if final else eta:.0f}s", file=sys.stderr, flush=True)

    def work(texts, splits):
        # encode_batch_fast: the same ids as encode_batch without computing character
        # offsets, which packing never needs (about 20% faster here).
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        for split in ("train", "val"):
            writers[split].add([e.ids for e, s in zip(encs, splits) if s == split])
        state["tokens"] += sum(len(e.ids) + 2 for e in encs)

    key_root = Path(os.path.commonpath([f.resolve() for f in files]))
    key_root = key_root.parent if key_root.is_file() else key_root
    texts, splits, pending = [], [], None
    with ThreadPoolExecutor(max_workers=1) as worker:
        def submit():
            # One batch in flight: wait for the previous one (re-raising its error), then hand
            # this one over and go back to reading.
            nonlocal pending
            if pending is not None:
                pending.result()
            pending = worker.submit(work, texts, splits)

        for path in files:
            def progress(n):
                state["cur"] = n
                report()

            for key, text in iter_documents(path.resolve(), progress, key_root):
                text = clean(text, kind)
                if not text:
                    continue
                texts.append(text)
                splits.append("val" if is_val(key, val_frac) else "train")
                state["docs"] += 1
                if len(texts) >= batch_docs:
                    submit()
                    texts, splits = [], []
            state["done_bytes"] += path.stat().st_size
            state["cur"] = 0
        if texts:
            submit()
        if pending is not None:
            pending.result()
    report(final=True)
    meta = {"kind": kind, "files": [str(f) for f in files], "tokenizer_sha256": tok_hash,
            "vocab_size": vocab, "train": writers["train"].finish(), "val": writers["val"].finish()}
    atomic_write_json(src_dir / "meta.json", meta)  # written last: marks the source complete
    return meta


def demo_sources() -> dict[str, list[Path]]:
    """Shakespeare (web) and the running Python's standard library (code)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    code = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    return {"web": sorted((ROOT / "corpus" / "shakespeare").glob("*.txt.gz")), "code": code}


def prepare(sources: dict[str, list[Path]], out: Path, val_frac: float, shard_tokens: int,
            force: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer()
    tok_hash = file_sha256(TOKENIZER_FILE)
    metas = {}
    for name, files in sources.items():
        if not files:
            raise SystemExit(f"--source {name}: no files matched")
        done = out / name / "meta.json"
        if done.is_file() and not force:
            m = json.loads(done.read_text())
            if m.get("tokenizer_sha256") == tok_hash and m.get("files") == [str(f) for f in files]:
                print(f"[{name}] already prepared in {out / name} (use --force to redo)", file=sys.stderr)
                metas[name] = m
                continue
        kind = "code" if name == "code" else name
        metas[name] = prepare_source(name, kind, files, out, tok, tok_hash, val_frac, shard_tokens)
    summary = {"tokenizer_sha256": tok_hash, "vocab_size": tok.get_vocab_size(),
               "sources": {n: {s: sum(x["tokens"] for x in m[s]) for s in ("train", "val")}
                           for n, m in metas.items()}}
    atomic_write_json(out / "meta.json", summary)
    for n, c in summary["sources"].items():
        print(f"{n}: {c['train']:,} train tokens, {c['val']:,} val tokens", file=sys.stderr)
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
    return np.memmap(path, dtype=TOKEN_DTYPES[itemsize], mode="r", offset=HEADER.size, shape=(count,))


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
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files = sorted(d.glob(f"{split}_*.bin"))
        if files:
            tw = TokenWindows(files, seq_len, vocab_size)
            if tw.n == 0:
                raise ValueError(f"{d}: {split} shards hold fewer than {seq_len + 1} tokens; "
                                 f"use a shorter --seq_len or more data")
            out[d.name] = tw
    if not out:
        raise FileNotFoundError(f"{data_dir}: no {split}_*.bin shards in any source folder; "
                                f"prepare them with `python data.py --out {data_dir}`")
    return out


@dataclass
class Mixture:
    """Mixture weights by source name (renormalised over the sources present), switching to the
    anneal weights from step anneal_step on (the seed's late code/math upweighting)."""
    weights: dict[str, float]
    anneal_weights: dict[str, float]
    anneal_step: int

    def at(self, step: int, names: list[str]) -> np.ndarray:
        w = self.anneal_weights if step >= self.anneal_step else self.weights
        v = np.array([w.get(n, 0.0) for n in names], dtype=np.float64)
        if v.sum() <= 0:  # sources without a configured weight share equally
            v = np.ones(len(names))
        return v / v.sum()


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
            self._perms[key] = np.random.default_rng([self.seed, src, epoch, 7]).permutation(tw.n)
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
    (cfg,), _ = parse_args(argv, __doc__, DataConfig())
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
        prepare(sources, out, val_frac, cfg.shard_tokens, cfg.force)
    except (ValueError, OSError) as e:  # a bad input file: say which, without a traceback
        raise SystemExit(f"data.py: {e}") from None


if __name__ == "__main__":
    main()
