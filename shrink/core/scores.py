"""Layer importance scores: ShortGPT Block Influence, Gromov angular distance, relative magnitude,
and the perplexity cost of removing each layer.

Block Influence, relative magnitude and angular distance come out of ONE forward pass over the
calibration blocks, taken with forward hooks on every decoder layer (the layer's own input and
output: ``output_hidden_states`` is not used because its last entry is after the final norm).
Statistics are accumulated in float32 as running sums; no activation is kept beyond one layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar


@dataclass
class LayerScores:
    """Scores of every decoder layer of one model, in the model's layer numbering.

    - ``bi[i]``: 1 - mean cosine(input of layer i, output of layer i) over all counted tokens.
    - ``relmag[i]``: mean of |f(x)| / |x + f(x)| (f(x) = the layer's update of the residual stream).
    - ``angular[n-1][l]``: mean over samples of arccos(cos(x_l, x_l+n)) / pi on the last token,
      x_l = the input of layer l (x_L = the output of the last layer), for l = 0 .. L-n.
    - ``ppl[i]``: perplexity of the model without layer i minus the dense perplexity (optional).
    Low scores mean "less important" for every metric.
    """

    model: str
    num_layers: int
    bi: list[float]
    relmag: list[float]
    angular: list[list[float]]
    tokens: int
    samples: int
    settings: dict = field(default_factory=dict)
    ppl: list[float] | None = None
    dense_ppl: float | None = None

    def values(self, metric: str) -> list[float]:
        if metric == "bi":
            return self.bi
        if metric == "relmag":
            return self.relmag
        if metric == "ppl":
            if self.ppl is None:
                raise ShrinkError("perplexity scores were not computed (use --metric ppl)")
            return self.ppl
        raise ShrinkError(f"metric '{metric}' has no per-layer score; use one of bi, relmag, ppl")

    def lowest(self, metric: str, n: int) -> list[int]:
        """The n least important layers by a per-layer metric (ties: lower index first)."""
        vals = self.values(metric)
        return sorted(sorted(range(len(vals)), key=lambda i: (vals[i], i))[:n])

    def best_block(self, n: int) -> tuple[int, float]:
        """Gromov et al.: the start l* of the contiguous block of n layers whose removal changes
        the last-token representation least, and its angular distance."""
        if not 1 <= n <= self.num_layers:
            raise ShrinkError(f"block size must be 1..{self.num_layers}, got {n}")
        row = self.angular[n - 1]
        best = min(range(len(row)), key=lambda l: (row[l], l))
        return best, row[best]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerScores:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def hidden_states_of(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def decoder_base(model: nn.Module) -> nn.Module:
    """The module that owns the layer list (e.g. LlamaModel): running it skips the LM head."""
    from transformers import PreTrainedModel

    parent, _, _ = find_layers(model)
    return parent if isinstance(parent, PreTrainedModel) else model


def check_score_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, skip_first: int
) -> torch.Tensor:
    """Validate scorer inputs; return the attention mask (all ones when none is given)."""
    if input_ids.dim() != 2:
        raise ShrinkError("input_ids must be (samples, seq_len)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if skip_first < 0:
        raise ShrinkError(f"--skip-first must be >= 0, got {skip_first}")
    if skip_first >= int(attention_mask.sum(-1).min()):
        raise ShrinkError(f"--skip-first {skip_first} leaves no tokens in the shortest sample")
    return attention_mask


def token_masks(mask: torch.Tensor, skip_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens counted by BI/relmag as a float mask, index of each row's last real token)."""
    real = mask.bool()
    position = real.long().cumsum(-1)  # 1-based index among non-padding tokens
    valid = (real & (position > skip_first)).float()
    last_idx = torch.stack([r.nonzero().max() for r in real])
    return valid, last_idx


class ScoreAccumulator:
    """Running float64 sums behind LayerScores, shared by the in-memory and streamed scorers."""

    def __init__(self, num_layers: int):
        self.L = num_layers
        self.bi_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.rm_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.ang_sum = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.tokens = 0
        self.samples = 0

    def add_layer(
        self, i: int, x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """One batch through layer i: input and output residual streams (B, T, d)."""
        x_in, x_out = x_in.float(), x_out.float()
        cos = F.cosine_similarity(x_in, x_out, dim=-1, eps=1e-12)
        rel = (x_out - x_in).norm(dim=-1) / x_out.norm(dim=-1).clamp_min(1e-12)
        self.bi_sum[i] += ((1.0 - cos) * valid).sum().item()
        self.rm_sum[i] += (rel * valid).sum().item()

    def add_samples(self, last: torch.Tensor, valid: torch.Tensor) -> None:
        """A batch's last-token states (B, L+1, d): x_0 .. x_L, and its counted-token mask."""
        unit = F.normalize(last.float(), dim=-1)
        cos = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)
        self.ang_sum += (torch.arccos(cos) / math.pi).sum(0).double().cpu()
        self.samples += last.shape[0]
        self.tokens += int(valid.sum().item())

    def result(self, model_name: str, settings: dict) -> LayerScores:
        L = self.L
        ang = self.ang_sum / self.samples
        angular = [[float(ang[l, l + n]) for l in range(L - n + 1)] for n in range(1, L + 1)]
        return LayerScores(
            model=model_name,
            num_layers=L,
            bi=(self.bi_sum / self.tokens).tolist(),
            relmag=(self.rm_sum / self.tokens).tolist(),
            angular=angular,
            tokens=self.tokens,
            samples=self.samples,
            settings=settings,
        )


@torch.no_grad()
def score_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_size: int = 4,
    skip_first: int = 1,
    model_name: str = "",
    settings: dict | None = None,
    show_progress: bool = True,
) -> LayerScores:
    """Block Influence, relative magnitude and angular distances of every layer in one pass.

    ``skip_first`` leaves the first K non-padding tokens of every sample out of BI and relmag
    (the BOS / attention-sink token behaves unlike text; see the README). Padding (attention_mask
    == 0) is never counted; the angular distance uses the last non-padding token of each sample.
    """
    attention_mask = check_score_inputs(input_ids, attention_mask, skip_first)
    _, _, layers = find_layers(model)
    L = len(layers)
    device = next(model.parameters()).device
    acc = ScoreAccumulator(L)
    state: dict = {}

    def pre_hook(idx):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            state["in"] = x
            state["last"][:, idx] = x[state["rows"], state["last_idx"]].float()

        return hook

    def post_hook(idx):
        def hook(module, args, kwargs, output):
            x_out = hidden_states_of(output)
            acc.add_layer(idx, state.pop("in"), x_out, state["valid"])
            if idx == L - 1:
                state["last"][:, L] = x_out[state["rows"], state["last_idx"]].float()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    runner = decoder_base(model)
    hidden = model.config.get_text_config().hidden_size
    try:
        batches = range(0, input_ids.shape[0], batch_size)
        for start in progress_bar(batches, "scoring layers", enabled=show_progress):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            valid, last_idx = token_masks(mask, skip_first)
            B = ids.shape[0]
            state.update(
                valid=valid,
                rows=torch.arange(B, device=device),
                last_idx=last_idx,
                last=torch.zeros(B, L + 1, hidden, device=device, dtype=torch.float32),
            )
            runner(input_ids=ids, attention_mask=mask, use_cache=False)
            acc.add_samples(state["last"], valid)
    finally:
        for h in handles:
            h.remove()
    return acc.result(
        model_name, {"skip_first": skip_first, "batch_size": batch_size, **(settings or {})}
    )


@torch.no_grad()
def removal_perplexity(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 4, show_progress: bool = True
) -> tuple[float, list[float]]:
    """Perplexity increase when each single layer is removed (L+1 passes: slow)."""
    from shrink.core.layers import without_layers
    from shrink.core.perplexity import perplexity

    _, _, layers = find_layers(model)
    dense = perplexity(model, input_ids, batch_size=batch_size, show_progress=False).perplexity
    out = []
    for i in progress_bar(
        range(len(layers)), "perplexity without each layer", enabled=show_progress
    ):
        with without_layers(model, [i]):
            out.append(
                perplexity(model, input_ids, batch_size=batch_size, show_progress=False).perplexity
                - dense
            )
    return dense, out
