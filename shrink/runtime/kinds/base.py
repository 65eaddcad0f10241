"""What an artifact kind is: the one object that knows how to recognise, run, measure, verify and
describe one format of model (see :mod:`shrink.runtime.kinds`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shrink.core.errors import ShrinkError

Stream = Callable[[str], None]
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".gguf", ".bin")


@dataclass
class Card:
    """How a model card presents one artifact of this kind."""

    tags: list[str]
    library: str  # the hub's library_name
    format: str  # in the card's title, e.g. "GGUF Q4_K_M"
    row: str  # this artifact's row in the report's perplexity table
    made: str = ""  # appended to the card's "Made with shrink ..." sentence
    usage: list[str] = field(default_factory=list)  # the "Use" section's lines


@dataclass
class Measure:
    """What a benchmark run asks of an artifact (worker side, one fresh process)."""

    device: str = "cpu"
    prompt_len: int = 128
    gen_len: int = 64
    batch: int = 1
    warmup: int = 1
    ppl_samples: int = 4
    ppl_seq_len: int = 256
    threads: int | None = None


class Kind:
    """One artifact kind. Subclasses set ``name`` and implement the methods they support; the
    defaults say in one line that this kind cannot do it."""

    name = ""
    lm_eval = False  # lm-evaluation-harness runs it (transformers loads it)
    # load_model loads it as a float torch module: perplexity can be measured on (and
    # remembered by) the module's weights
    torch_weights = False

    def detect(self, path: Path) -> bool:
        """Whether ``path`` (an existing file or folder) is an artifact of this kind."""
        raise NotImplementedError

    def _cannot(self, what: str):
        raise ShrinkError(f"{self.name} artifacts cannot {what} in shrink")

    def load(self, path: str | Path, device: str | None = None):
        """The artifact loaded in its runtime, ready to run."""
        self._cannot("be loaded")

    def perplexity(
        self,
        model: str | Path,
        make_blocks,
        *,
        load=None,
        batch_size: int = 4,
        show_progress: bool = True,
    ) -> list:
        """Perplexity on each of ``make_blocks(tokenizer)``'s token blocks, with this kind's
        tokenizer; a list of PerplexityResult whose ``data`` describes its blocks."""
        self._cannot("measure perplexity")

    def generate(
        self,
        path: Path,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stream: Stream | None,
    ) -> str:
        """The continuation of ``prompt``, each new piece of text passed to ``stream``."""
        self._cannot("generate")

    def measure(self, path: Path, m: Measure) -> dict:
        """Time to first token, decode seconds, CPU seconds, threads and peak RSS (and
        perplexity when ``m.ppl_samples``) of one benchmark run, in this process."""
        self._cannot("be benchmarked")

    def verify(self, path: Path, **kw) -> dict:
        """Check the artifact in a fresh process; raise ShrinkError if it fails."""
        self._cannot("be verified")

    def describe(self, path: Path) -> dict:
        """Format, bytes (all files), weight bytes (what a decoded token reads) and precision."""
        return {
            "kind": self.name,
            "format": self.name,
            "bytes": _bytes(path),
            "weight_bytes": weight_bytes(path),
            "precision": None,
        }

    def card(self, report: dict) -> Card:
        """How the model card of a build presents this kind's artifact."""
        self._cannot("get a model card")

    def export_note(self, entry: dict) -> str:
        """One sentence for the card about this kind's export entry in the build report."""
        return f"{self.name}: `{self.name}/`."


def _bytes(path: Path) -> int:
    from shrink.core.outputs import folder_bytes

    p = Path(path)
    return p.stat().st_size if p.is_file() else folder_bytes(p)


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files of a folder (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(
        f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )
