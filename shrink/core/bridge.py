"""A training-free linear bridge over each removed run of layers (ReplaceMe-style), folded into the
MLP down-projection of the kept layer just before the run, so the pruned model stays a standard
checkpoint (same config, same tensor shapes, no extra module).

The algebra (row vectors, one token per row; Llama/Mistral/Qwen2/Qwen3/Phi-3 style layer k)::

    y = x + attn(norm1(x))              residual stream after attention
    u = act(gate(norm2(y))) * up(norm2(y))
    M = u W^T + b                      the MLP output (W = down_proj.weight, [out, in] = [d, f])
    h = y + M                          the output of layer k = the input of the removed run a..b
    z = run(h)                         the output of layer b (in the dense model)

After pruning, layer k's output feeds layer b+1 directly. Only the MLP branch can absorb a linear
map, so the bridge replaces M by M T (d x d):

    y + M T = y + u (W^T T) + b T  =  y + u (T^T W)^T + (T^T b)

i.e. ``down_proj.weight <- T^T @ W`` and ``down_proj.bias <- T^T @ b``: exact, whatever T is. T is
fitted by least squares so that the new layer-k output approximates z:

    min_T ||M T - (z - y)||^2 + lam ||T - I||^2     (lam = ridge * trace(M^T M) / d)
    T = (M^T M + lam I)^-1 (M^T (z - y) + lam I)

The ridge pulls T toward the identity, which is plain pruning (T = I leaves the kept layer as it
was), not toward zero (which would delete the kept layer's MLP): with few tokens, or directions the
calibration text never excites, the bridge falls back to what pruning alone would do. The default
ridge 0.1 was chosen on SmolLM2-135M, angular block 13-18 removed, Austen calibration (32 x 256):
ridge 1e-3 / 0.1 / 1 / 10 gave held-out Austen perplexity 43.9 / 44.1 / 45.6 / 49.2 (pruned 58.5,
dense 36.6) and out-of-domain (tech:calibration) 32.9 / 31.5 / 30.9 / 30.7 (pruned 31.9, dense
17.6): a small ridge fits the calibration domain best, a larger one transfers a little better.
M^T M and M^T (z - y) are accumulated in float64 over the calibration tokens, padding and the first
``skip_first`` tokens of every sample excluded (as in shrink's scorer). When down_proj has a bias,
the fit is affine (a column of ones is appended to M and the constant goes into the bias).

Several runs are bridged one after another, shallowest first: run r is fitted on the model whose
earlier runs are already removed and bridged (so its y and M include their errors), against the
DENSE model's output of layer b (the dense pass uses the original down_proj weights), so each
bridge corrects the drift of the ones before it instead of compounding it blindly. The streamed
fit (:mod:`shrink.streaming.bridge`, one layer in memory at a time) reproduces this order with a
dense and a pruned hidden-state stream, and shares the sums, solve and fold defined here.

Not bridged (the run is still removed, and the result says why):
- a run that starts at layer 0 (no kept layer precedes it);
- architectures that normalise the MLP output before adding it to the residual stream (Gemma 2 and
  3, OLMo 2: ``post_feedforward_layernorm``): RMSNorm(M T) is not linear in M, so no T can be
  folded into down_proj exactly; :func:`check_bridgeable` refuses them with that reason.

A variant, ``method="run"``, fits T on the run's input -> output (``z ~ h T``, ReplaceMe's whole-
block view) and folds the same T into the MLP branch, which is then only approximate (y is not
multiplied by T). Both fit errors are always reported; ``method="mlp"`` is the default because its
folded form is the one that is optimised. Measured in the same setting, "run" was worse on both
texts (held-out Austen 61.2, tech 34.7: worse than no bridge).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.core.dense import DenseStates, batch_key
from shrink.core.errors import ShrinkError
from shrink.core.layers import check_remove, prune_model, without_layers
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar
from shrink.core.scores import check_score_inputs, decoder_base, hidden_states_of, token_masks

METHODS = ("mlp", "run")
DEFAULT_RIDGE = 0.1
# Modules that sit between the MLP and the residual add: the fold cannot pass through them.
_POST_MLP_NORMS = (
    "post_feedforward_layernorm",
    "post_mlp_layernorm",
    "post_ffw_norm",
    "post_feedforward_norm",
)


@dataclass
class BridgeRun:
    """The bridge of one contiguous run of removed layers (numbering of the model given)."""

    layers: list[int]
    folded_into: int | None  # the kept layer whose mlp.down_proj absorbed T; None: no bridge
    fit_error: float | None  # ||M T - (z - y)|| / ||z - y|| on the calibration tokens
    identity_error: float | None  # the same with T = I: plain pruning
    run_fit_error: float | None  # the same for the T of the other method (see module doc)
    tokens: int
    method: str
    ridge: float
    note: str = ""
    transform: torch.Tensor | None = field(default=None, repr=False)  # float64 (d[+1], d)

    @property
    def bridged(self) -> bool:
        return self.folded_into is not None

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "folded_into": self.folded_into,
            "target": f"layers.{self.folded_into}.mlp.down_proj" if self.bridged else None,
            "fit_error": self.fit_error,
            "identity_error": self.identity_error,
            "other_method_fit_error": self.run_fit_error,
            "tokens": self.tokens,
            "method": self.method,
            "ridge": self.ridge,
            "note": self.note,
        }


def contiguous_runs(remove: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 11, 12] -> [[3, 4, 5], [9], [11, 12]]."""
    runs: list[list[int]] = []
    for i in sorted(remove):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def down_proj(layer: nn.Module) -> nn.Linear | None:
    """The layer's ``mlp.down_proj`` when it is a plain linear layer (what the bridge folds into)."""
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    return down if isinstance(down, nn.Linear) else None


def check_bridgeable(model: nn.Module) -> None:
    """Raise ShrinkError, with the reason, for an architecture whose layers cannot absorb a
    linear bridge exactly into ``mlp.down_proj``. Reads module types only: a weightless (meta)
    skeleton is checked the same way."""
    _, _, layers = find_layers(model)
    arch = type(model).__name__
    layer = layers[0]
    for name in _POST_MLP_NORMS:
        if hasattr(layer, name):
            raise ShrinkError(
                f"--bridge linear does not support {arch}: its layers apply an RMSNorm "
                f"({name}) to the MLP output before adding it to the residual stream, and "
                "RMSNorm(M T) is not linear in M, so no linear map can be folded into the "
                "down-projection exactly; prune without a bridge"
            )
    if down_proj(layer) is None:
        raise ShrinkError(
            f"--bridge linear does not support {arch}: its layers have no "
            "mlp.down_proj linear layer to fold the bridge into"
        )


def check_bridge_settings(method: str, ridge: float) -> None:
    if method not in METHODS:
        raise ShrinkError(f"unknown bridge method '{method}'; use one of {', '.join(METHODS)}")
    if ridge < 0:
        raise ShrinkError(f"the bridge's ridge must be >= 0, got {ridge}")


def first_changed_layer(remove: list[int], bridged: bool) -> int:
    """The first layer whose output differs from the dense model's once ``remove`` is removed
    (and bridged: the kept layer before the first run absorbs a bridge)."""
    first = min(remove)
    return max(first - 1, 0) if bridged else first


def bridge_dense_layers(remove: list[int]) -> set[int]:
    """The dense layer outputs :func:`apply_bridges` reads: each bridged run's last layer (the
    target) and the last layer below the first changed one (where the pruned passes start)."""
    wanted = {run[-1] for run in contiguous_runs(remove) if run[0] > 0}
    start = first_changed_layer(remove, True)
    if start > 0:
        wanted.add(start - 1)
    return wanted


def not_bridged_at_zero(run: list[int], method: str, ridge: float) -> BridgeRun:
    """The record of a run that starts at layer 0: removed, with no bridge."""
    return BridgeRun(
        run, None, None, None, None, 0, method, ridge, "no bridge: no kept layer precedes layer 0"
    )


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _run_until(runner: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    try:
        runner(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass


def solve(A: torch.Tensor, B: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_T ||X T - Y||^2 + lam ||T - prior||^2 from A = X^T X, B = X^T Y (float64)."""
    d = prior.shape[1]
    lam = ridge * float(torch.trace(A[:d, :d])) / d
    lhs = A + lam * torch.eye(A.shape[0], dtype=A.dtype)
    rhs = B + lam * prior
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (ridge 0, rank-deficient activations)
        return torch.linalg.lstsq(lhs, rhs).solution


def sq_error(T: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dd: float) -> float:
    """||X T - Y||^2 = tr(T^T A T) - 2 tr(T^T B) + ||Y||^2."""
    return max(float((T * (A @ T)).sum() - 2 * (T * B).sum()) + dd, 0.0)


class BridgeStats:
    """float64 sums over the counted tokens of one run (shared by the in-memory and the streamed
    fits, so both accumulate the same sums in the same order)."""

    def __init__(self, d: int, affine: bool):
        e = d + int(affine)
        self.d = d
        self.affine = affine
        self.A = torch.zeros(e, e, dtype=torch.float64)  # M^T M    (M with a ones column if affine)
        self.B = torch.zeros(e, d, dtype=torch.float64)  # M^T (z - y)
        self.dd = 0.0  # ||z - y||^2
        self.Ah = torch.zeros(d, d, dtype=torch.float64)  # h^T h   (for method "run")
        self.Bh = torch.zeros(d, d, dtype=torch.float64)  # h^T z
        self.tokens = 0

    def add(self, y: torch.Tensor, M: torch.Tensor, z: torch.Tensor) -> None:
        y, M, z = y.double().cpu(), M.double().cpu(), z.double().cpu()
        D = z - y
        h = y + M
        X = torch.cat([M, torch.ones(M.shape[0], 1, dtype=M.dtype)], 1) if self.affine else M
        self.A += X.T @ X
        self.B += X.T @ D
        self.dd += float((D * D).sum())
        self.Ah += h.T @ h
        self.Bh += h.T @ z
        self.tokens += M.shape[0]

    def add_batch(
        self, h: torch.Tensor, M: torch.Tensor, z: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """One batch (B, S, d): kept layer k's output h and MLP output M (so y = h - M), the
        dense output z of the run's last layer; ``valid`` (B, S) selects the counted tokens."""
        h, M, z = h.float(), M.float(), z.float()
        valid = valid.bool().to(h.device)
        self.add((h - M)[valid], M[valid], z[valid])


def fit_run(run: list[int], k: int, stats: BridgeStats, method: str, ridge: float) -> BridgeRun:
    """Solve both methods' T from the run's sums; the result carries the chosen one."""
    d = stats.d
    prior = torch.eye(stats.A.shape[0], d, dtype=torch.float64)
    T_mlp = solve(stats.A, stats.B, prior, ridge)
    T_run = solve(stats.Ah, stats.Bh, torch.eye(d, dtype=torch.float64), ridge)
    if stats.affine:
        T_run = torch.cat([T_run, torch.zeros(1, d, dtype=torch.float64)])
    T = T_mlp if method == "mlp" else T_run
    other = T_run if method == "mlp" else T_mlp
    norm = max(stats.dd, 1e-300) ** 0.5
    err = sq_error(T, stats.A, stats.B, stats.dd) ** 0.5 / norm
    base = sq_error(prior, stats.A, stats.B, stats.dd) ** 0.5 / norm
    err_other = sq_error(other, stats.A, stats.B, stats.dd) ** 0.5 / norm
    return BridgeRun(
        run,
        k,
        err,
        base,
        err_other,
        stats.tokens,
        method,
        ridge,
        "affine (down_proj has a bias)" if stats.affine else "",
        transform=T,
    )


def fold(down: nn.Linear, T: torch.Tensor) -> None:
    """down_proj <- the map u -> (u W^T + b) T (+ c): weight T^T W, bias T^T b (+ c)."""
    d = down.weight.shape[0]
    Tm = T[:d]
    W = down.weight.detach().double().cpu()
    new_w = Tm.T @ W
    down.weight.data.copy_(new_w.to(down.weight.dtype))
    if down.bias is not None:
        b = down.bias.detach().double().cpu()
        new_b = Tm.T @ b + (T[d] if T.shape[0] > d else 0.0)
        down.bias.data.copy_(new_b.to(down.bias.dtype))


@contextmanager
def capture_mlp(layer: nn.Module, state: dict, check: bool = False) -> Iterator[None]:
    """While inside, every forward of ``layer`` stores its MLP output as ``state["M"]`` and, when
    ``check``, its down-projection's output as ``state["down"]`` (see :func:`check_mlp_output`)."""
    hooks = [
        layer.mlp.register_forward_hook(lambda module, args, output: state.__setitem__("M", output))
    ]
    if check:
        hooks.append(
            down_proj(layer).register_forward_hook(
                lambda module, args, output: state.__setitem__("down", output)
            )
        )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def check_mlp_output(state: dict, arch: str) -> None:
    """The fold is exact only when the MLP's output IS the down-projection's output (nothing
    applied after it): checked once, on the first batch's captured tensors."""
    if not torch.equal(state.pop("down"), state["M"]):
        raise ShrinkError(
            f"--bridge linear does not support {arch}: its MLP output is not the "
            "down-projection's output"
        )


@torch.no_grad()
def apply_bridges(
    model: nn.Module,
    remove: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    skip_first: int = 1,
    ridge: float = DEFAULT_RIDGE,
    method: str = "mlp",
    batch_size: int = 4,
    show_progress: bool = False,
    dense: DenseStates | None = None,
) -> tuple[list[BridgeRun], Callable[[], None]]:
    """Fit one bridge per contiguous run of ``remove`` on calibration blocks and fold each into
    the preceding kept layer's ``mlp.down_proj``, in place. The layers are NOT removed here (see
    :func:`bridge_and_prune` and :func:`bridged_without`): only the kept layers' weights change.
    Returns the per-run results and a function that puts the original weights back.

    ``dense`` (recorded on the same blocks and batch size, see :func:`bridge_dense_layers`)
    supplies the dense targets and the unchanged layers below the first bridged one instead of
    computing them again: the results are bit for bit the same."""
    check_bridge_settings(method, ridge)
    check_bridgeable(model)
    _, _, layers = find_layers(model)
    L = len(layers)
    remove = check_remove(list(remove), L)
    attention_mask = check_score_inputs(input_ids, attention_mask, skip_first)
    device = next(model.parameters()).device
    runner = decoder_base(model)
    d = model.config.get_text_config().hidden_size
    originals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def restore() -> None:
        for k, (w, b) in originals.items():
            down = down_proj(layers[k])
            down.weight.data.copy_(w)
            if b is not None:
                down.bias.data.copy_(b)

    @contextmanager
    def dense_weights():
        """The dense model: original down_proj weights in the layers already folded."""
        saved = {
            k: (
                down_proj(layers[k]).weight.data.clone(),
                None
                if down_proj(layers[k]).bias is None
                else down_proj(layers[k]).bias.data.clone(),
            )
            for k in originals
        }
        restore()
        try:
            yield
        finally:
            for k, (w, b) in saved.items():
                down_proj(layers[k]).weight.data.copy_(w)
                if b is not None:
                    down_proj(layers[k]).bias.data.copy_(b)

    results: list[BridgeRun] = []
    runs = contiguous_runs(remove)
    # with ``dense``, each run's pruned passes start where the run before changed the model: at
    # the first changed layer (from the dense states), then at the kept layer that absorbed the
    # previous bridge (from the pruned stream just below it, kept during the previous run)
    resume = (dense, first_changed_layer(remove, True)) if dense is not None else None

    def replay():
        return resume[0].start_at(model, resume[1]) if resume is not None else nullcontext()

    def keep(position: int):
        return chain.keeping(model, position - 1) if resume is not None else nullcontext()

    try:
        for run in progress_bar(runs, "fitting bridges", enabled=show_progress):
            a, b_ = run[0], run[-1]
            if a == 0:
                results.append(not_bridged_at_zero(run, method, ridge))
                continue
            k = a - 1
            position = k - sum(1 for i in remove if i < k)  # of layer k with remove removed
            chain = DenseStates()
            down = down_proj(layers[k])
            stats = BridgeStats(d, affine=down.bias is not None)
            state: dict = {}

            def z_hook(module, args, output, state=state):
                state["z"] = hidden_states_of(output)
                raise _Stop

            def h_hook(module, args, output, state=state):
                state["h"] = hidden_states_of(output)
                raise _Stop

            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device)
                valid = token_masks(mask, skip_first)[0].bool()
                recorded = dense.output(batch_key(ids, mask), b_) if dense is not None else None
                if recorded is not None:  # the dense pass already computed layer b's output
                    state["z"] = hidden_states_of(recorded)
                else:
                    with dense_weights():
                        hz = layers[b_].register_forward_hook(z_hook)
                        try:
                            _run_until(runner, ids, mask)
                        finally:
                            hz.remove()
                hh = layers[k].register_forward_hook(h_hook)
                try:
                    with (
                        capture_mlp(layers[k], state, check=start == 0),
                        without_layers(model, remove),
                        replay(),
                        keep(position),
                    ):
                        _run_until(runner, ids, mask)
                finally:
                    hh.remove()
                if start == 0:
                    check_mlp_output(state, type(model).__name__)
                stats.add_batch(state["h"], state["M"], state["z"], valid)
            originals[k] = (
                down.weight.data.clone(),
                None if down.bias is None else down.bias.data.clone(),
            )
            result = fit_run(run, k, stats, method, ridge)
            fold(down, result.transform)
            results.append(result)
            if resume is not None and position > 0:
                resume = (chain, position)
    except BaseException:
        restore()
        raise
    return results, restore


@torch.no_grad()
def bridge_and_prune(
    model: nn.Module,
    remove: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> list[BridgeRun]:
    """Bridge every removed run (see :func:`apply_bridges`), then remove the layers, in place.
    The bridged layer numbers in the results are the model's numbering before pruning."""
    results, _ = apply_bridges(model, remove, input_ids, attention_mask, **kwargs)
    prune_model(model, remove)
    return results


def prune_with_fitted(model: nn.Module, remove: list[int], runs: list[BridgeRun]) -> None:
    """Fold bridges already fitted on this model for exactly ``remove`` (the automatic
    strategy's winner, with their transforms), then remove the layers, in place: the same
    weights :func:`bridge_and_prune` computes on the same blocks."""
    _, _, layers = find_layers(model)
    if sorted(i for r in runs for i in r.layers) != sorted(remove):
        raise ShrinkError("the fitted bridges are for other layers than the ones removed")
    for r in runs:
        if r.bridged:
            fold(down_proj(layers[r.folded_into]), r.transform)
    prune_model(model, remove)


@contextmanager
def bridged_without(
    model: nn.Module,
    remove: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> Iterator[list[BridgeRun]]:
    """Temporarily bridge and remove ``remove``; the model's weights and layers are restored on
    exit (for what-if measurements such as the automatic strategy)."""
    results, restore = apply_bridges(model, remove, input_ids, attention_mask, **kwargs)
    try:
        with without_layers(model, remove):
            yield results
    finally:
        restore()
