"""ShadowLLM's multi-pass criteria (Akhauri et al., 2024): GraSP, NASWOT, jacov and EPE-NAS applied to heads and
FF neurons, as pure functions of a model and one batch.

These are the criteria the reference (abdelfattah-lab/shadow_llm) computes only offline, and that need more than
the single forward/backward of ``criteria.py``: a double backward (grasp), a kernel over the batch's examples
(nwot), or one backward per (layer, head, loss position) (jacov, epenas). Each probe is
``probe(model, input_ids (B, T), targets (B, T) bool, layers=None, **options)`` and returns
``{"heads": {layer: (B or 1, H)}, "neurons": {layer: (B or 1, D)}}`` as float64 on the model's device.

Conventions (shared with ``criteria.py``):

- heads are query heads: a = the attention output projection's input (o_proj / out_proj / c_proj / dense), split
  into H = ``attention_shape(config)[0]`` blocks of d = in_features / H; under grouped-query attention a KV
  group's score is left to the consumer;
- neurons are MLP intermediate channels: u = the pre-activation (gate_proj's output for GLU families, fc1's output
  bias included otherwise) and z = the consumer's input (down_proj / fc2), z = act(u)·up or act(u);
- the loss is per example: L = Σ_b L_b, L_b = mean cross-entropy over example b's target tokens (position t is
  predicted at t − 1, ``targets[:, 0]`` is ignored, as in ``prunekit.pipeline.token_loss``); every example needs a
  target (clear error otherwise). Non-target tokens carry no loss. Examples never interact in a forward pass, so
  L's gradient and Hessian are block-diagonal per example and a per-example score equals the example alone;
- every position of ``input_ids`` is a real token (no attention mask: pass unpadded, equal-length examples);
- probes put the model in eval mode for the call and restore its mode; they need autograd (not inference mode),
  except nwot.

| probe | rows | heads | neurons |
|---|---|---|---|
| grasp | per example (B) | −Σ_{t,d} a ⊙ (H g) | −Σ_t z_j ⊙ (H g)_j |
| nwot | one per batch (1) | logdet K over codes (a_h > 0) | logdet K over codes (u_j > 0) |
| jacov | one per batch (1) | −Σ_i log(λ_i + k) + 1/(λ_i + k) | — (error) |
| epenas | one per batch (1) | Σ_{c,c'} abs(s_c − s_c') / n_classes | — (error) |

**grasp** (GraSP, Wang et al. 2020: S(−θ) = −θ ⊙ Hg). The "parameters" are the activations a unit's removal zeroes:
a head's context a_h and a neuron's z_j (pruning neuron j sets z_j = 0 exactly; u_j = 0 would only by way of
act(0) = 0, and a first-order expansion in u measures another change). Each site s gets an additive perturbation
ε_s = 0 (a' = a + ε); g_s = ∂L/∂ε_s = ∂L/∂a_s and (Hg)_s = ∂(Σ_s' g_s'·stopgrad(g_s'))/∂ε_s by double backward.
``hessian="site"`` (default): H is the block of the site itself, H_ss = ∂²L/∂a_s² (everything upstream of a_s held
fixed): the literal "Hessian of the loss w.r.t. a" — one double backward per site (2 per layer).
``hessian="joint"``: H and g over the sites of *every* layer (head contexts and z, whatever ``layers``/``units``
ask, so a layer's score never depends on the request): GraSP's own full-Hessian Hg, one double backward in all.
Scores sum over all positions and dims. GraSP prunes the *highest* S (removing such a unit increases the
gradient norm ‖g‖², to first order by 2·S), so as an importance it is the *low* end that is kept
(``Probe.keep == "low"``). The double backward needs an attention with a differentiable backward: the call
forces PyTorch's math SDPA backend (``flash_attention_2`` models are not supported).

**nwot** (NASWOT, Mellor et al. 2021). Binary codes c ∈ {0, 1}^N per example, K = c cᵀ + (1 − c)(1 − c)ᵀ (B × B;
K_ij = N − Hamming(c_i, c_j)), score = log det K (−inf when K is singular, e.g. two examples with one code).
Heads: c = (a_h > 0) over all T·d entries of the example's context (the reference's choice). Neurons: c = (u_j > 0)
over the example's T tokens — NASWOT's codes are ReLU on/off patterns (the ReLU's *input* > 0); u > 0 ⇔ act(u) > 0
for ReLU, GELU (either form) and SiLU, so for every family this is "the unit is on", while z > 0 (GLU: act(u)·up)
mixes in up's sign. One kernel per unit (NASWOT sums all ReLUs into one kernel per network). Batch-level: needs
B ≥ 2; ``targets`` is unused (no loss, no gradient).

**jacov** and **epenas** (Mellor et al. 2020 v1; Lopes et al. 2021), heads only. The rows ("inputs" of the NAS
definitions) are the batch's loss positions: (b, p) with ``targets[b, p + 1]``, labelled by the target token
``input_ids[b, p + 1]`` (the reference's choice: tokens as examples, their label token as class).
``jacobian="input"`` (default; the NAS definition, Jacobian of the unit's summed output w.r.t. the network input):
row = ∂(Σ_d a_{b,p,h,d}) / ∂e_b flattened over (T, hidden), e = the token-embedding module's output
(``get_input_embeddings()``; position embeddings are added after it, which leaves the Jacobian unchanged); one
backward per (layer, head, position), all examples at once. ``jacobian="loss"`` (what the reference computes):
row = ∂L/∂a_{b,p,h,:} (d entries), one backward in all. C = the rows' correlation matrix (constant rows make it
undefined: NaN score), k = 1e-5.
jacov = −Σ_i [log(λ_i + k) + 1/(λ_i + k)] over the eigenvalues λ of C (clamped at 0); needs ≥ 2 rows.
epenas: per class c with n_c ≥ ``min_class_size`` rows (default 2: a correlation needs two), s_c = Σ_ij log(|C_c,ij|
+ k) / n_c; score = Σ_{c,c'} |s_c − s_c'| / (number of such classes) — EPE-NAS's branch for > 100 classes, which a
vocabulary always is; a batch without a repeated target token is an error. Both are batch-level (one row).

Reference choices (``llm-interpret/lm-evaluation-harness/lm_eval/base.py``: ``calculate_grasp``, ``calculate_nwot``,
``calculate_jacov``, ``calculate_epenas``; tensors captured in ``llm-interpret/transformers/src/transformers/models/
opt/modeling_opt.py``: ``context_layer_val`` = out_proj input, ``fc1_output`` = fc1's pre-ReLU output flattened
over batch × tokens, ``fc2_output`` = fc2's output) and where this module departs from them:

- grasp: the code marks its own backward "WRONG". Two forwards; the first backward's weight gradients are never
  cleared, so fc1/fc2 ``.grad`` after the last backward is 2g + ∂z/∂W and the "neuron" score is mostly −2W⊙g; the
  head term reads the context gradient hook re-fired by z.backward(), ∂z/∂a with z = Σ_layers mean(g₁ ⊙ g₂) over
  contexts *and* fc weights, so each site's Hg is scaled by 1/numel of its tensor and mixes cross-layer terms;
  heads sum over the batch and average over tokens; "fc2 neurons" are fc2's output rows (residual channels, not
  FF neurons). Here: the definition, per example.
- nwot: heads use only the (1 − c)(1 − c)ᵀ term (c cᵀ is commented out); at batch size 1 K is 1 × 1 and the
  score is log(#non-positive entries); neurons use diag((1 − c)ᵀ(1 − c))/N over all tokens of the batch, i.e.
  log(fraction of tokens where u_j ≤ 0) — no kernel between examples; padded positions count. Here: the
  definition, over the batch's examples.
- jacov: the "Jacobian" is the loss gradient at the head's context, one d-row per token pooled over up to 500
  batches (``.squeeze()`` assumes batch size 1), rows with zero sum dropped, ``np.linalg.eig`` then |λ|. Each
  standardised d-row lies in a (d − 1)-dimensional space, so with thousands of rows the correlation matrix has
  ≥ rows − d + 1 zero eigenvalues, each adding −1/k = −10⁵: the score is about −(rows − d + 1)·10⁵ for every head.
  (``jacobian="loss"`` here has the same limit once a batch has ≥ d loss positions.)
- epenas: same rows, classed by the token *at* the position whose context gradient is taken, although that position
  predicts the next token (off by one; the last continuation token's position predicts nothing, so its row is zero
  in every layer, its class's correlation is NaN and the whole class is skipped); only example 0 of a batch is read;
  classes need > 4 rows (counted at layer 0, head 0); neither EPE-NAS's per-class 1/n_c nor its 1/n_classes
  normalisation; no neuron variant (commented out).

The reference runs these with its lm-eval batch size (``HFLM(batch_size=1)`` by default, ``lm_eval/models/opt.py``)
on up to 500 batches of a task's training split, and keeps the heads with the *highest* score for every criterion
(``torch.sort`` ascending, the first ``head_percent_mask`` % masked) — for grasp the end GraSP prunes. Its own notes
on the criteria are the ``head_importance`` docstring of ``lm_eval/evaluator.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.observe import site

K = 1e-5  # the NAS papers' regulariser in log(λ + k), 1/(λ + k) and log(|C| + k)
UNITS = ("heads", "neurons")
HESSIANS = ("site", "joint")
JACOBIANS = ("input", "loss")


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Probe:
    """A probe and what it needs, so a strategy can check a request before any data (``check``).

    ``units``: which units it scores; ``needs_grad``: runs autograd (not under ``torch.inference_mode``);
    ``min_batch``: examples a batch needs; ``per_example``: rows are examples (else one row per batch); ``keep``:
    the end the source method keeps ("high" or "low"); ``passes``: its cost per batch. Calling a Probe calls its
    function.
    """

    name: str
    fn: Callable[..., dict]
    units: tuple[str, ...]
    needs_grad: bool
    min_batch: int
    per_example: bool
    keep: str
    passes: str
    doc: str = field(default="", compare=False)

    def __call__(self, *args, **kwargs) -> dict:
        return self.fn(*args, **kwargs)


def check(name: str, units: Iterable[str] = ("heads",), batch_size: int | None = None) -> Probe:
    """The probe ``name`` after checking that it scores ``units`` and accepts batches of ``batch_size``."""
    if name not in PROBES:
        raise PrunekitError(f"unknown probe {name!r}; available: {', '.join(sorted(PROBES))}")
    probe = PROBES[name]
    units = tuple(units)
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise PrunekitError(f"probe {name!r}: units must be a non-empty subset of {UNITS}, got {units}")
    missing = [u for u in units if u not in probe.units]
    if missing:
        raise PrunekitError(f"probe {name!r} scores {' and '.join(probe.units)} only, not {', '.join(missing)}: "
                            f"{probe.doc}")
    if batch_size is not None and batch_size < probe.min_batch:
        raise PrunekitError(f"probe {name!r} needs batches of at least {probe.min_batch} examples (its score is a "
                            f"kernel over the batch's examples), got {batch_size}; raise --data.batch_size")
    return probe


# ---------------------------------------------------------------------------------------------- shared plumbing
def example_losses(logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each example over its target tokens (position t predicted at t − 1).

    Only target tokens enter: a non-target token's label changes nothing. Every example needs a target."""
    chosen = targets[:, 1:]
    counts = chosen.sum(1)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise PrunekitError(f"examples {empty} of the batch have no target tokens for the loss (targets marks none "
                            f"after position 0)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                         reduction="none").view_as(chosen)
    return torch.where(chosen, ce, torch.zeros_like(ce)).sum(1) / counts


def _inputs(input_ids: torch.Tensor, targets: torch.Tensor | None, need_targets: bool):
    if input_ids.dim() != 2:
        raise PrunekitError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if targets is None:
        if need_targets:
            raise PrunekitError("this probe needs targets: a (batch, tokens) bool mask of the loss tokens")
        return input_ids, None
    if targets.shape != input_ids.shape:
        raise PrunekitError(f"targets {tuple(targets.shape)} must have the shape of input_ids "
                            f"{tuple(input_ids.shape)}")
    targets = targets.to(input_ids.device).bool()
    if need_targets and not targets[:, 1:].any():
        raise PrunekitError("the batch has no target tokens for the loss (targets marks none after position 0)")
    return input_ids, targets


def _layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = len(adapter_for(model).layers(model))
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise PrunekitError(f"layers {bad} out of range: the model has {n} decoder layers")
    return list(dict.fromkeys(i % n for i in layers))


def _heads(model: nn.Module) -> int:
    return adapter_for(model).attention_shape(model.config)[0]


@contextlib.contextmanager
def _session(model: nn.Module, grad: bool):
    if grad and torch.is_inference_mode_enabled():
        raise PrunekitError("this probe differentiates the model: call it outside torch.inference_mode()")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Tap:
    """Forward hooks reading (and, with ``perturb``, adding a zero leaf ε to) named sites of decoder layers.

    ``sites``: {(kind, layer)} with kind ``heads`` (the attention output projection's input), ``mid`` (the MLP
    consumer's input z) or ``pre`` (u, read only); ``embed``: swap the token embeddings for a leaf that requires
    grad. After the forward, ``seen[(kind, layer)]`` holds the tensor as the model used it, ``eps`` the leaves."""

    _WHERE = {"heads": "attn_context", "mid": "mlp_mid", "pre": "mlp_pre"}

    def __init__(self, model: nn.Module, sites: Iterable[tuple[str, int]], perturb: bool = False,
                 embed: bool = False) -> None:
        self.model, self.sites, self.perturb, self.embed = model, list(dict.fromkeys(sites)), perturb, embed
        self.seen: dict[tuple[str, int], torch.Tensor] = {}
        self.eps: dict[tuple[str, int], torch.Tensor] = {}
        self.embeddings: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> _Tap:
        try:
            for key in self.sites:
                name, where = site(self.model, key[1], self._WHERE[key[0]])
                module = self.model.get_submodule(name)
                if where == "input":
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(key)))
                else:
                    self._handles.append(module.register_forward_hook(self._output_hook(key)))
            if self.embed:
                self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._embed_hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _take(self, key, x: torch.Tensor) -> torch.Tensor:
        if key in self.seen:
            raise PrunekitError(f"the {key[0]} site of layer {key[1]} ran twice in one forward pass")
        if self.perturb:
            eps = torch.zeros_like(x, requires_grad=True)
            self.eps[key] = eps
            x = x + eps
        self.seen[key] = x
        return x

    def _input_hook(self, key):
        def hook(module, args):
            if not args:
                raise PrunekitError(f"cannot read the input of the {key[0]} site of layer {key[1]}: "
                                    f"it was called without positional arguments")
            return (self._take(key, args[0]),) + tuple(args[1:])
        return hook

    def _output_hook(self, key):
        def hook(module, args, out):
            return self._take(key, out)
        return hook

    def _embed_hook(self, module, args, out):
        leaf = out.detach().requires_grad_(True)
        self.embeddings = leaf
        return leaf


def _btf(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """A site's tensor as (B, T, features): some families (OPT) run their MLP on (B·T, features)."""
    return x.reshape(*input_ids.shape, x.shape[-1])


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _math_attention():
    """PyTorch's math SDPA backend: the only one whose backward can be differentiated again."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ---------------------------------------------------------------------------------------------- grasp
def grasp(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, layers: Sequence[int] | None = None,
          *, units: Iterable[str] = UNITS, hessian: str = "site") -> dict:
    """GraSP per example: heads −Σ_{t,d} a ⊙ (Hg) → (B, H), neurons −Σ_t z ⊙ (Hg) → (B, D) (module docstring).

    ``hessian``: ``site`` (H = ∂²L/∂a², the site's own block; one double backward per site) or ``joint`` (H and g
    over the head contexts and z of every layer; one double backward)."""
    units = tuple(units)
    check("grasp", units)
    if hessian not in HESSIANS:
        raise PrunekitError(f"grasp: hessian must be one of {HESSIANS}, got {hessian!r}")
    input_ids, targets = _inputs(input_ids, targets, need_targets=True)
    chosen = _layers(model, layers)
    every = range(len(adapter_for(model).layers(model)))
    if hessian == "joint":
        sites = [(kind, i) for i in every for kind in ("heads", "mid")]
    else:
        sites = [(kind, i) for i in chosen for kind, unit in (("heads", "heads"), ("mid", "neurons")) if unit in units]
    heads = _heads(model)
    with _session(model, grad=True), _Tap(model, sites, perturb=True) as tap, _math_attention():
        logits = model(input_ids=input_ids).logits
        loss = example_losses(logits, input_ids, targets).sum()
        eps = [tap.eps[s] for s in sites]
        grads = torch.autograd.grad(loss, eps, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(e) for g, e in zip(grads, eps)]
        if hessian == "joint":
            flow = sum((g * g.detach()).sum() for g in grads)
            hvs = torch.autograd.grad(flow, eps, allow_unused=True)
        else:
            hvs = [torch.autograd.grad((g * g.detach()).sum(), e, retain_graph=True, allow_unused=True)[0]
                   for g, e in zip(grads, eps)]
        result: dict = {"heads": {}, "neurons": {}}
        for (kind, i), hv in zip(sites, hvs):
            unit = "heads" if kind == "heads" else "neurons"
            if i not in chosen or unit not in units:
                continue
            act = _btf(tap.seen[(kind, i)].detach(), input_ids)
            hv = _btf(hv, input_ids) if hv is not None else torch.zeros_like(act)
            prod = -(act.double() * hv.double())
            result[unit][i] = _split(prod, heads).sum((1, 3)) if unit == "heads" else prod.sum(1)
    return _ordered(result, chosen)


def _ordered(result: dict, chosen: list[int]) -> dict:
    return {unit: {i: table[i] for i in chosen if i in table} for unit, table in result.items()}


# ---------------------------------------------------------------------------------------------- nwot
def _logdet(kernels: torch.Tensor) -> torch.Tensor:
    sign, logabs = torch.linalg.slogdet(kernels)
    return torch.where(sign > 0, logabs, torch.full_like(logabs, float("-inf")))


def _code_kernels(codes: torch.Tensor) -> torch.Tensor:
    """(units, B, N) binary codes → (units, B, B) kernels c cᵀ + (1 − c)(1 − c)ᵀ."""
    off = 1.0 - codes
    return codes @ codes.transpose(1, 2) + off @ off.transpose(1, 2)


def nwot(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
         layers: Sequence[int] | None = None, *, units: Iterable[str] = UNITS) -> dict:
    """NASWOT over the batch's examples: log det of the code kernel per head (codes a_h > 0 over tokens × dims) and
    per neuron (codes u_j > 0 over tokens) → one row (1, H) / (1, D). ``targets`` is unused."""
    units = tuple(units)
    check("nwot", units, input_ids.shape[0] if input_ids.dim() == 2 else None)
    input_ids, _ = _inputs(input_ids, targets, need_targets=False)
    chosen = _layers(model, layers)
    sites = [(kind, i) for i in chosen for kind, unit in (("heads", "heads"), ("pre", "neurons")) if unit in units]
    heads = _heads(model)
    with _session(model, grad=False), _Tap(model, sites) as tap:
        model(input_ids=input_ids)
    result: dict = {"heads": {}, "neurons": {}}
    for kind, i in sites:
        x = _btf(tap.seen[(kind, i)], input_ids)
        if kind == "heads":
            a = _split(x, heads)  # (B, T, H, d)
            codes = (a > 0).permute(2, 0, 1, 3).reshape(heads, a.shape[0], -1).double()
            result["heads"][i] = _logdet(_code_kernels(codes)).unsqueeze(0)
        else:
            codes = (x > 0).permute(2, 0, 1).double()  # (D, B, T)
            result["neurons"][i] = _logdet(_code_kernels(codes)).unsqueeze(0)
    return _ordered(result, chosen)


# ---------------------------------------------------------------------------------------------- jacov / epenas
def _loss_positions(input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) rows (example b, prediction position p) with a target at p + 1, ordered by (b, p); their labels (N,)."""
    where = torch.nonzero(targets[:, 1:])
    return where, input_ids[where[:, 0], where[:, 1] + 1]


def _rows(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, chosen: list[int], jacobian: str,
          where: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """{layer: [(N, F) rows of head h for h in heads]} for the loss positions ``where``."""
    heads = _heads(model)
    sites = [("heads", i) for i in chosen]
    rows: dict[int, list[torch.Tensor]] = {}
    with _session(model, grad=True), _Tap(model, sites, perturb=jacobian == "loss",
                                          embed=jacobian == "input") as tap:
        logits = model(input_ids=input_ids).logits
        if jacobian == "loss":
            loss = example_losses(logits, input_ids, targets).sum()
            grads = torch.autograd.grad(loss, [tap.eps[s] for s in sites], allow_unused=True)
            for i, g in zip(chosen, grads):
                g = _split(_btf(g if g is not None else torch.zeros_like(tap.eps[("heads", i)]), input_ids), heads)
                picked = g[where[:, 0], where[:, 1]].double()  # (N, H, d)
                rows[i] = [picked[:, h] for h in range(heads)]
            return rows
        e = tap.embeddings
        for i in chosen:
            a = _split(_btf(tap.seen[("heads", i)], input_ids), heads)  # (B, T, H, d)
            per_head = [torch.empty(len(where), e[0].numel(), dtype=torch.float64, device=e.device)
                        for _ in range(heads)]
            for p in torch.unique(where[:, 1]).tolist():
                at = torch.nonzero(where[:, 1] == p).flatten()
                for h in range(heads):
                    # examples never interact: example b's block of this gradient is its own Jacobian row
                    (grad,) = torch.autograd.grad(a[:, p, h].sum(), e, retain_graph=True)
                    per_head[h][at] = grad[where[at, 0]].reshape(len(at), -1).double()
            rows[i] = per_head
    return rows


def _jacov_score(rows: torch.Tensor) -> torch.Tensor:
    corr = torch.corrcoef(rows)
    if not torch.isfinite(corr).all():  # a constant row: the correlation is undefined
        return torch.tensor(float("nan"), dtype=torch.float64, device=rows.device)
    lam = torch.linalg.eigvalsh(corr).clamp_min(0)
    return -(torch.log(lam + K) + 1.0 / (lam + K)).sum()


def _epenas_score(rows: torch.Tensor, labels: torch.Tensor, min_class_size: int) -> torch.Tensor:
    values, counts = torch.unique(labels, return_counts=True)
    s = []
    for c in values[counts >= min_class_size]:
        corr = torch.corrcoef(rows[labels == c])
        s.append(torch.log(corr.abs() + K).sum() / corr.shape[0])
    s = torch.stack(s)
    return (s[:, None] - s[None, :]).abs().sum() / len(s)


def _prepare(name: str, model, input_ids, targets, layers, units, jacobian):
    check(name, tuple(units))
    if jacobian not in JACOBIANS:
        raise PrunekitError(f"{name}: jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    input_ids, targets = _inputs(input_ids, targets, need_targets=True)
    where, labels = _loss_positions(input_ids, targets)
    return input_ids, targets, _layers(model, layers), where, labels


def jacov(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, layers: Sequence[int] | None = None,
          *, units: Iterable[str] = ("heads",), jacobian: str = "input") -> dict:
    """Jacobian covariance per head over the batch's loss positions → one row (1, H); heads only."""
    input_ids, targets, chosen, where, labels = _prepare("jacov", model, input_ids, targets, layers, units, jacobian)
    if len(labels) < 2:
        raise PrunekitError(f"jacov correlates the Jacobians of the batch's loss positions and needs at least 2; "
                            f"the batch has {len(labels)} target token")
    rows = _rows(model, input_ids, targets, chosen, jacobian, where)
    return {"heads": {i: torch.stack([_jacov_score(r) for r in rows[i]]).unsqueeze(0) for i in chosen},
            "neurons": {}}


def epenas(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, layers: Sequence[int] | None = None,
           *, units: Iterable[str] = ("heads",), jacobian: str = "input", min_class_size: int = 2) -> dict:
    """EPE-NAS per head, the loss positions classed by their target token → one row (1, H); heads only."""
    if min_class_size < 2:
        raise PrunekitError(f"epenas: min_class_size must be at least 2 (a correlation needs two rows), got "
                            f"{min_class_size}")
    input_ids, targets, chosen, where, labels = _prepare("epenas", model, input_ids, targets, layers, units, jacobian)
    counts = torch.unique(labels, return_counts=True)[1]
    if not (counts >= min_class_size).any():
        raise PrunekitError(f"epenas compares the Jacobian correlations of target tokens that occur at least "
                            f"{min_class_size} times in the batch, and none does ({len(labels)} targets, "
                            f"{len(counts)} distinct): use larger batches")
    rows = _rows(model, input_ids, targets, chosen, jacobian, where)
    return {"heads": {i: torch.stack([_epenas_score(r, labels, min_class_size) for r in rows[i]]).unsqueeze(0)
                      for i in chosen},
            "neurons": {}}


_HEADS_ONLY = ("defined through Jacobians of a head's output (the reference has no neuron variant; its fc1/fc2 "
               "EPE-NAS is commented out)")

PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("grasp", grasp, UNITS, needs_grad=True, min_batch=1, per_example=True, keep="low",
          passes="1 forward, 1 backward, 1 double backward per site (hessian='site': 2 per layer; 'joint': 1)",
          doc="GraSP −a ⊙ Hg on head contexts and z"),
    Probe("nwot", nwot, UNITS, needs_grad=False, min_batch=2, per_example=False, keep="high",
          passes="1 forward without gradients", doc="NASWOT log det of the binary-code kernel over the batch"),
    Probe("jacov", jacov, ("heads",), needs_grad=True, min_batch=1, per_example=False, keep="high",
          passes="1 forward, 1 backward per (layer, head, loss position) (jacobian='loss': 1 backward)",
          doc=f"Jacobian covariance, {_HEADS_ONLY}; needs ≥ 2 loss positions per batch"),
    Probe("epenas", epenas, ("heads",), needs_grad=True, min_batch=1, per_example=False, keep="high",
          passes="1 forward, 1 backward per (layer, head, loss position) (jacobian='loss': 1 backward)",
          doc=f"EPE-NAS, {_HEADS_ONLY}; needs a target token repeated in the batch"),
)}
