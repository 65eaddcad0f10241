"""Text sources -> fixed-length token blocks.

A source is one of:
- ``austen:calibration`` / ``austen:healing`` / ``austen:evaluation`` (the shipped corpus, split by
  novel so that no text is reused across roles), or ``austen:<novel>`` for one novel;
- ``tech:evaluation`` / ``tech:calibration``: a second, out-of-domain text (modern technical prose:
  CPython's reference documentation, PSF licence; see shrink/corpus/tech/SOURCE.md), split into two
  disjoint halves by topic;
- a ``.txt`` file, a folder of ``.txt`` files, or a ``.jsonl`` file with a ``text`` field;
- several sources joined with ``+`` (``austen:calibration+tech:calibration``): the blocks are
  shared out evenly among them;
- ``hf:NAME[:CONFIG][:SPLIT]``, read with the ``datasets`` library (needs network).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from shrink.core.errors import ShrinkError, first_line

NOVELS = [
    "emma",
    "northanger-abbey",
    "pride-and-prejudice",
    "sense-and-sensibility",
    "mansfield-park",
    "persuasion",
]
SPLITS: dict[str, list[str]] = {
    "calibration": ["emma", "northanger-abbey"],
    "healing": ["pride-and-prejudice", "sense-and-sensibility", "mansfield-park"],
    "evaluation": ["persuasion"],
}
CALIBRATION = "austen:calibration"
HEALING = "austen:healing"
EVALUATION = "austen:evaluation"
TECH_SPLITS = ("evaluation", "calibration")
TECH_EVALUATION = "tech:evaluation"


@dataclass
class TokenBlocks:
    """``input_ids`` of shape (samples, seq_len) and where they came from."""

    input_ids: torch.Tensor
    source: str
    seq_len: int
    seed: int
    available: int  # how many blocks the source could give

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "samples": int(self.input_ids.shape[0]),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": self.num_tokens,
            "blocks_available": self.available,
        }


def _reflow(text: str) -> str:
    """Join hard-wrapped lines into paragraphs (Project Gutenberg style text)."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


def _novel(name: str) -> str:
    f = resources.files("shrink") / "corpus" / "austen" / f"{name}.txt.gz"
    with f.open("rb") as fh:
        return _reflow(gzip.decompress(fh.read()).decode("utf-8"))


def _tech(part: str) -> list[str]:
    f = resources.files("shrink") / "corpus" / "tech" / f"{part}.txt.gz"
    with f.open("rb") as fh:
        return [d for d in gzip.decompress(fh.read()).decode("utf-8").split("\n\f\n") if d.strip()]


def load_texts(source: str) -> list[str]:
    """Documents of a text source, as a list of strings."""
    if source.startswith("tech:"):
        part = source.split(":", 1)[1]
        if part not in TECH_SPLITS:
            raise ShrinkError(
                f"unknown corpus part '{source}'; use tech:evaluation or tech:calibration"
            )
        return _tech(part)
    if source.startswith("austen:"):
        key = source.split(":", 1)[1]
        names = SPLITS.get(key) or ([key] if key in NOVELS else None)
        if names is None:
            raise ShrinkError(
                f"unknown corpus part '{source}'; use austen:calibration, "
                f"austen:healing, austen:evaluation or austen:<novel> ({', '.join(NOVELS)})"
            )
        return [_novel(n) for n in names]
    if source.startswith("hf:"):
        return _hf_texts(source)
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if not f.is_dir())
        if not files:
            raise ShrinkError(f"no .txt files in folder '{source}'")
        texts = [_read_text_file(f, str(f)).decode("utf-8", errors="replace") for f in files]
        if not any(t.strip() for t in texts):
            raise ShrinkError(f"text source '{source}': every .txt file in it is empty")
        return texts
    if not p.exists():
        raise ShrinkError(
            f"no such text source '{source}' (a .txt, .jsonl, folder, "
            "austen:<split>, tech:<split> or hf:NAME[:CONFIG][:SPLIT])"
        )
    raw = _read_text_file(p, source)
    if p.suffix == ".jsonl":
        return _jsonl_texts(raw, source)
    return [raw.decode("utf-8", errors="replace")]


MAX_TEXT_FILE = 2 << 30  # shrink reads a text source whole: a larger file is a mistake
MAX_LINE = 16 << 20


def _read_text_file(p: Path, source: str) -> bytes:
    """The bytes of a text file, refusing what is not text: not a regular file (a FIFO or a
    device would block or never end), larger than MAX_TEXT_FILE, empty, binary (NUL bytes), or
    with a line of MAX_LINE bytes or more (checked in half-size windows: each must hold a
    newline)."""
    import stat

    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ShrinkError(
                f"text source '{source}' is not a regular file (a FIFO, socket or "
                "device); give a .txt or .jsonl file or a folder"
            )
        if st.st_size > MAX_TEXT_FILE:
            raise ShrinkError(
                f"text source '{source}' is {st.st_size / 1e9:.1f} GB, more than "
                f"the {MAX_TEXT_FILE / 1e9:.1f} GB shrink reads; give a sample of it"
            )
        raw = p.read_bytes()
    except OSError as e:
        raise ShrinkError(f"cannot read text source '{source}': {first_line(e)}") from None
    if not raw.strip():
        raise ShrinkError(f"text source '{source}' is empty")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ShrinkError(
            f"text source '{source}' is a binary file (a NUL byte at offset {nul}), not text"
        )
    half = MAX_LINE // 2
    for start in range(0, len(raw) - half + 1, half):
        if raw.find(b"\n", start, start + half) < 0:
            line = raw.count(b"\n", 0, start) + 1
            raise ShrinkError(
                f"text source '{source}' has a line of more than {half >> 20} MB "
                f"(line {line}); split it into lines or documents"
            )
    return raw


def _jsonl_texts(raw: bytes, source: str) -> list[str]:
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise ShrinkError(
            f"{source} is not UTF-8 text (line {line_no}, byte {e.start}: "
            f"{e.reason}); .jsonl files must be UTF-8: convert it, e.g. "
            "iconv -f latin1 -t utf-8"
        ) from None
    texts = []
    for i, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise ShrinkError(f"{source} line {i} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            keys = ", ".join(sorted(map(str, row))[:5]) if isinstance(row, dict) else ""
            raise ShrinkError(
                f"{source} line {i} has no string field 'text'"
                + (f" (its fields: {keys})" if keys else "")
            )
        texts.append(row["text"])
    if not texts:
        raise ShrinkError(f"{source} holds no JSON lines")
    return texts


def _hf_texts(source: str) -> list[str]:
    parts = source[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise ShrinkError(
            "hf: text sources need the 'datasets' package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        raise ShrinkError(f"cannot load dataset {source}: {str(e).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise ShrinkError(f"dataset {source} has no 'text' column ({', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t]


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself starts every encoding with BOS (Llama-2 style), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


# Token streams of the embedded corpora, by (tokenizer fingerprint, source). A build tokenizes
# the same novels for scoring, auto's held-out blocks, healing, the importance matrix and every
# evaluation: about 6 s on a 2-core CPU for SmolLM2, 2.5 s of it needed. Only the embedded
# corpora are kept (package data that cannot change under a running process; a few MB of ids).
_STREAMS: dict[tuple[str, str], tuple[int, ...]] = {}


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """What decides a fast tokenizer's ids: its serialized pipeline and EOS id (None for a slow
    tokenizer, which is not memoized)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(f"|{type(tokenizer).__name__}|{getattr(tokenizer, 'eos_token_id', None)}".encode())
    return h.hexdigest()


def token_stream(tokenizer, source: str) -> list[int]:
    """The source's documents tokenized and joined with the EOS token (no BOS)."""
    memo = source.startswith(("austen:", "tech:"))
    key = (_tokenizer_fingerprint(tokenizer), source) if memo else None
    if key is not None and key[0] is not None and key in _STREAMS:
        return list(_STREAMS[key])
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in load_texts(source):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    if key is not None and key[0] is not None:
        _STREAMS[key] = tuple(stream)
    return stream


def token_blocks(
    tokenizer, source: str, samples: int, seq_len: int, seed: int = 0, at_most: bool = False
) -> TokenBlocks:
    """Tokenize a text source into ``samples`` non-overlapping blocks of ``seq_len`` tokens
    (with ``at_most``, as many as the source holds when that is fewer; none is not an error).

    Documents are joined with the EOS token; blocks are picked at random (``seed``) among all the
    non-overlapping blocks, then kept in text order. A tokenizer that prepends BOS gets BOS at the
    start of every block, as the model sees text in use.
    """
    if samples < 1 or seq_len < 2:
        raise ShrinkError(f"need samples >= 1 and seq-len >= 2 (got {samples} and {seq_len})")
    if "+" in source:  # a mix: the blocks are shared out evenly among the parts, in order
        parts = [s.strip() for s in source.split("+") if s.strip()]
        counts = [samples // len(parts) + (i < samples % len(parts)) for i in range(len(parts))]
        got = [
            token_blocks(tokenizer, s, n, seq_len, seed, at_most)
            for s, n in zip(parts, counts)
            if n
        ]
        return TokenBlocks(
            torch.cat([g.input_ids for g in got]),
            source,
            seq_len,
            seed,
            sum(g.available for g in got),
        )
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    stream = token_stream(tokenizer, source)
    available = len(stream) // body
    if at_most:
        samples = min(samples, available)
    elif available < samples:
        raise ShrinkError(
            f"text source '{source}' has {len(stream)} tokens: only {available} "
            f"blocks of {seq_len} tokens are possible, {samples} asked for"
        )
    picks = sorted(random.Random(seed).sample(range(available), samples))
    rows = [prefix + stream[i * body : (i + 1) * body] for i in picks]
    return TokenBlocks(torch.tensor(rows, dtype=torch.long), source, seq_len, seed, available)
