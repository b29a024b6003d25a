"""Multiple-choice scoring with a shared context: lm-eval's ``HFLM`` with prefix sharing.

lm-eval scores each (context, continuation) request as its own sequence, so a four-choice question runs its
context four times, and it computes and log-softmaxes the logits of every position although only the
continuation's are read. ``PrefixSharingLM`` keeps lm-eval's tokenization (``TemplateLM.loglikelihood`` and
``_encode_pair`` run unchanged, empty contexts included) and replaces only the token-level scoring
(``_loglikelihood_tokens``):

1. Requests are grouped by their context token ids. A group with several distinct continuations shares the
   context's first ``len(context) - 1`` tokens (the prefix); each continuation becomes a row
   ``[last context token] + continuation[:-1]`` whose logits predict the continuation — the positions lm-eval
   reads. A group with one distinct row (BoolQ's one-token " yes"/" no", which lm-eval already scores on one
   run through its ``logits_cache``) runs as one full row without a prefix.
2. Batch by length: groups are sorted by prefix length and taken a window at a time (a budget of cached
   tokens). The window's prefixes run once, in batches of similar length, right-padded without a mask as
   lm-eval pads; each prefix's keys/values are right-aligned in one tensor per layer. Then the window's rows,
   sorted by length, run in batches on top of their group's cache (``DynamicCache``), with an attention mask
   over the left padding and explicit ``position_ids`` (from the prefix length on). A row's real tokens are
   contiguous, so rotary and learned positions and sliding windows (index distance = position distance) are
   those of the plain sequence.
3. Only the scored positions reach the LM head (``logits_to_keep`` as a boolean mask) and the log-softmax
   (lm-eval's ``softmax_dtype``); each request gets lm-eval's (sum of log-probabilities, all tokens greedy) in
   its own order, and the ``cache_hook`` receives it as lm-eval's own path does.

What takes lm-eval's own path (``HFLM._loglikelihood_tokens``, unchanged): requests lm-eval would left-truncate
(context + continuation longer than ``max_length`` + 1), ``loglikelihood_rolling`` and ``generate_until``,
non-causal backends, cache layers other than plain and sliding-window dynamic ones, and a model whose forward
takes no ``past_key_values``/``position_ids``/``attention_mask``. On a sliding-window model a prefix never
exceeds the window minus one token (the cache then keeps all of it). Before the first batch, a probe built from
the tokens of one request (a long shared prefix, a shorter one and a row without prefix in one batch) is scored
both ways; if they disagree (an architecture that ignores ``position_ids`` with a cache, say) a warning says so
and every request takes lm-eval's path.

The log-likelihoods equal lm-eval's up to float rounding (other matmul shapes; ~1e-5 on sums of ~-50 in
float32); ``tests/test_fastlm.py`` checks per-request values and that the task metrics are identical.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Requests with one context: a shared prefix and the distinct rows that run on top of it."""

    prefix: tuple[int, ...]
    rows: list[tuple[int, ...]] = field(default_factory=list)
    keep_from: list[int] = field(default_factory=list)  # per row: first position whose logits are read
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (request index, row, first scored position)
    slot: int = -1  # index in its window's prefix cache (-1: no prefix)


class PrefixSharingLM(HFLM):
    """``HFLM`` scoring the choices of a multiple-choice request on one run of their shared context.

    Budgets per forward, from lm-eval's ``batch_size`` b unless given: ``max_tokens`` input tokens (128·b),
    ``max_rows`` rows (16·b), ``max_kv`` rows × (prefix + row) cached tokens (512·b; a window's prefix cache
    holds twice that). Within them, batches minimise padded tokens plus ``forward_cost`` tokens per forward
    (16 on CPU, where a forward of SmolLM2-135M costs ~35 ms + 2.5 ms per token on one thread; 256 elsewhere, a
    guess). ``check``: score a probe both ways before the first batch and fall back to lm-eval's path if they
    disagree.
    """

    def __init__(self, *args, max_tokens: int | None = None, max_rows: int | None = None,
                 max_kv: int | None = None, forward_cost: float | None = None, check: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 8
        self.max_tokens = max_tokens or 128 * size
        self.max_rows = max_rows or 16 * size
        self.max_kv = max_kv or 512 * size
        self.forward_cost = forward_cost if forward_cost is not None else 16 if self.device.type == "cpu" else 256
        self._check_pending = check
        self._plain_only = False
        self.stats = {"requests": 0, "plain_requests": 0, "prefix_tokens": 0, "row_tokens": 0, "padded_tokens": 0,
                      "forwards": 0, "max_check_diff": None}
        self._sliding, self._keep_arg = None, False
        self._unsupported = self._why_unsupported()

    # -- what runs where --------------------------------------------------------------------------------------------
    def _why_unsupported(self) -> str | None:
        if self.backend != "causal":
            return f"backend {self.backend}"
        params = inspect.signature(self.model.forward).parameters
        missing = [p for p in ("past_key_values", "position_ids", "attention_mask") if p not in params]
        if missing:
            return f"{type(self.model).__name__}.forward takes no {', '.join(missing)}"
        self._keep_arg = "logits_to_keep" in params
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception as e:  # noqa: BLE001 - a config the cache cannot read: lm-eval's path
            return f"no dynamic cache for this config ({e})"
        kinds = {type(layer) for layer in layers}
        if not kinds <= {DynamicLayer, DynamicSlidingWindowLayer}:
            return "cache layers " + ", ".join(sorted(k.__name__ for k in kinds))
        windows = [layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)]
        self._sliding = min(windows) if windows else None
        return None

    def _off(self, why: str) -> None:
        self._unsupported = why
        log.warning("prefix sharing is off for %s (%s): scoring as lm-eval does", type(self.model).__name__, why)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._plain_only = True  # rolling windows share nothing; they call _loglikelihood_tokens
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._plain_only = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._plain_only or self._unsupported:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list = [None] * len(requests)
        plain = [i for i, (_, ctx, cont) in enumerate(requests)
                 if not ctx or not cont or len(ctx) + len(cont) > self.max_length + 1]
        self._plain(requests, plain, results)
        todo = sorted(set(range(len(requests))) - set(plain))
        bar = tqdm(total=len(todo), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared contexts)")
        if self._check_pending and todo:
            self._check_pending = False
            self._check(requests[max(todo, key=lambda i: len(requests[i][1]))])
        for window in self._windows(self._groups(requests, todo)):
            cache = None if self._unsupported else self._prefill(window)
            for rows in self._row_batches(window):
                members = [m for g, r in rows for m in g.members if m[1] == r]
                answers = None if self._unsupported else self._answers(requests, rows, cache)
                if answers is None:
                    self._plain(requests, [i for i, _, _ in members], results)
                else:
                    for i, answer in answers.items():
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(members))
        bar.close()
        self.stats["requests"] += len(requests)
        return results

    def _plain(self, requests, indices: list[int], results: list) -> None:
        """lm-eval's own scoring of ``requests[indices]`` (it feeds the cache hook itself)."""
        if not indices:
            return
        out = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm=True)
        for i, answer in zip(indices, out, strict=True):
            results[i] = answer
        self.stats["plain_requests"] += len(indices)

    # -- planning ----------------------------------------------------------------------------------------------------
    def _groups(self, requests, indices: list[int]) -> list[_Group]:
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i in indices:
            by_context.setdefault(tuple(requests[i][1]), []).append(i)
        groups = []
        for ctx, members in by_context.items():
            inputs = {(ctx + tuple(requests[i][2]))[:-1] for i in members}
            shared = len(ctx) - 1 if len(inputs) > 1 else 0  # one distinct row: nothing to share
            if self._sliding is not None:
                shared = min(shared, self._sliding - 1)  # the sliding layers' cache keeps all of it
            group = _Group(prefix=ctx[:shared])
            row_of: dict[tuple[int, ...], int] = {}
            for i in members:
                row = (ctx + tuple(requests[i][2]))[shared:-1]
                first = len(ctx) - 1 - shared  # this position's logits predict the continuation's first token
                if row not in row_of:
                    row_of[row] = len(group.rows)
                    group.rows.append(row)
                    group.keep_from.append(first)
                r = row_of[row]
                group.keep_from[r] = min(group.keep_from[r], first)
                group.members.append((i, r, first))
            groups.append(group)
        return groups

    def _windows(self, groups: list[_Group]):
        """Groups by decreasing prefix length, a window at a time: its prefix cache (groups × longest prefix)
        within twice ``max_kv`` tokens."""
        groups = sorted(groups, key=lambda g: (-len(g.prefix), g.prefix))
        window: list[_Group] = []
        for g in groups:
            if window and (len(window) + 1) * len(window[0].prefix) > 2 * self.max_kv:
                yield window
                window = []
            window.append(g)
        if window:
            yield window

    def _partition(self, lengths: list[int], prefixes: list[int]) -> list[tuple[int, int]]:
        """Cut items sorted by decreasing length into batches [start, end) of least cost: padded input tokens plus
        ``forward_cost`` per forward, within ``max_rows``, ``max_tokens`` (rows × longest) and ``max_kv``
        (rows × (longest prefix + longest row)). Dynamic programming over the cut points."""
        n = len(lengths)
        best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
        for end in range(1, n + 1):
            prefix = 0
            for start in range(end - 1, max(-1, end - 1 - self.max_rows), -1):
                rows, longest = end - start, lengths[start]
                prefix = max(prefix, prefixes[start])
                if rows > 1 and (rows * longest > self.max_tokens or rows * (prefix + longest) > self.max_kv):
                    break  # longer items only come earlier: every earlier start is over budget too
                cost = best[start] + rows * longest + self.forward_cost
                if cost < best[end]:
                    best[end], cut[end] = cost, start
        batches, end = [], n
        while end > 0:
            batches.append((cut[end], end))
            end = cut[end]
        return batches[::-1]

    def _row_batches(self, window: list[_Group]):
        """The window's rows by decreasing length, cut by ``_partition``."""
        rows = sorted(((g, r) for g in window for r in range(len(g.rows))),
                      key=lambda gr: (-len(gr[0].rows[gr[1]]), -len(gr[0].prefix), gr[0].slot, gr[1]))
        for start, end in self._partition([len(g.rows[r]) for g, r in rows], [len(g.prefix) for g, _ in rows]):
            yield rows[start:end]

    # -- scoring -----------------------------------------------------------------------------------------------------
    def _forward(self, **kwargs):
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            return self.model(**kwargs)

    @torch.no_grad()
    def _prefill(self, window: list[_Group]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Stage A: every prefix of the window once. Per layer, keys and values [groups, heads, width, dim] with
        each group's prefix at the right end (``g.slot`` indexes them); None if the window has no prefix."""
        from transformers.cache_utils import DynamicCache

        shared = [g for g in window if g.prefix]
        if not shared:
            return None
        width = len(shared[0].prefix)  # the longest: groups come by decreasing prefix length
        layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for start, end in self._partition([len(g.prefix) for g in shared], [0] * len(shared)):
            w, count, chunk = len(shared[start].prefix), end - start, shared[start:end]
            ids = torch.zeros(len(chunk), w, dtype=torch.long, device=self.device)  # right-padded, as lm-eval
            for k, g in enumerate(chunk):
                ids[k, :len(g.prefix)] = torch.tensor(g.prefix, dtype=torch.long)
                g.slot = start + k
            cache = DynamicCache(config=self.model.config)
            self._forward(input_ids=ids, past_key_values=cache, use_cache=True,
                          **({"logits_to_keep": 1} if self._keep_arg else {}))
            # roll each row so that its prefix ends at the right edge: index j of row k reads j - (w - len_k) mod w
            shift = torch.tensor([w - len(g.prefix) for g in chunk], device=self.device)
            index = (torch.arange(w, device=self.device)[None, :] - shift[:, None]) % w
            if layers is None:
                layers = []
                for layer in cache.layers:
                    if getattr(layer, "keys", None) is None or layer.keys.dim() != 4 or layer.keys.shape[-2] != w:
                        self._off("unexpected cache layout")
                        return None
                    shape = (len(shared), layer.keys.shape[1], width, layer.keys.shape[-1])
                    layers.append((layer.keys.new_zeros(shape), layer.values.new_zeros(shape)))
            for (keys, values), layer in zip(layers, cache.layers, strict=True):
                if layer.keys.shape[-2] != w:
                    self._off("unexpected cache layout")
                    return None
                gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                keys[start:start + count, :, width - w:] = layer.keys.gather(2, gather)
                values[start:start + count, :, width - w:] = layer.values.gather(2, gather)
            self.stats["prefix_tokens"] += sum(len(g.prefix) for g in chunk)
            self.stats["padded_tokens"] += ids.numel()
            self.stats["forwards"] += 1
        return layers

    @torch.no_grad()
    def _row_logprobs(self, rows: list[tuple[_Group, int]], prefill) -> tuple[torch.Tensor, list[int]] | None:
        """Stage B: log-probabilities of every kept position of ``rows``, flattened row by row, and each row's
        offset into them (minus its first kept position)."""
        from transformers.cache_utils import DynamicCache

        device = self.device
        width = max(len(g.prefix) for g, _ in rows)
        longest = max(len(g.rows[r]) for g, r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width + longest, dtype=torch.long, device=device)
        positions = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        keep = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
        offsets, flat = [], 0
        for n, (g, r) in enumerate(rows):
            row, p = g.rows[r], len(g.prefix)
            ids[n, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[n, width - p:width + len(row)] = 1
            positions[n, :len(row)] = torch.arange(p, p + len(row))
            keep[n, g.keep_from[r]:len(row)] = True
            offsets.append(flat - g.keep_from[r])
            flat += len(row) - g.keep_from[r]
        cache = None
        if width:  # rows without a prefix read slot 0 and mask it out
            slots = torch.tensor([max(g.slot, 0) for g, _ in rows], device=device)
            full = prefill[0][0].shape[2]
            cache = DynamicCache(ddp_cache_data=[(k[slots, :, full - width:], v[slots, :, full - width:])
                                                 for k, v in prefill], config=self.model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None, **({"logits_to_keep": keep} if self._keep_arg else {})).logits
        if out.dim() == 3 and out.shape[:2] == keep.shape:  # no logits_to_keep: every position's logits
            out = out[keep]
        if out.dim() != 2 or out.shape[0] != flat:
            self._off("unexpected logits layout")
            return None
        self.stats["row_tokens"] += sum(len(g.rows[r]) for g, r in rows)
        self.stats["padded_tokens"] += ids.numel()
        self.stats["forwards"] += 1
        return F.log_softmax(out, dim=-1, dtype=self.softmax_dtype), offsets

    def _answers(self, requests, rows: list[tuple[_Group, int]], prefill) -> dict[int, tuple[float, bool]] | None:
        if any(g.prefix for g, _ in rows) and prefill is None:
            return None
        scored = self._row_logprobs(rows, prefill)
        if scored is None:
            return None
        logprobs, offsets = scored
        answers = {}
        for n, (g, r) in enumerate(rows):
            for i, row, first in g.members:
                if row != r:
                    continue
                cont = requests[i][2]
                start = offsets[n] + first
                picked = logprobs[start:start + len(cont)].unsqueeze(0)  # [1, len(cont), vocab], as lm-eval slices
                target = torch.tensor(cont, dtype=torch.long, device=picked.device).unsqueeze(0)
                greedy = bool((picked.argmax(dim=-1) == target).all())
                answers[i] = (float(torch.gather(picked, 2, target.unsqueeze(-1)).squeeze(-1).sum()), greedy)
        return answers

    def _check(self, request) -> None:
        """Score a few requests built from ``request``'s tokens both ways, in one batch that holds every layout
        (a long shared prefix, a shorter one, a row without prefix); a disagreement turns this path off."""
        ctx, cont = list(request[1][-48:]), list(request[2][:8])
        if len(ctx) < 4:
            return
        longer = (cont * 2)[:len(cont) + 1]  # a second distinct row for each shared context
        short = ctx[:len(ctx) // 2]
        probe = [(None, c, k) for c, k in ((ctx, cont), (ctx, longer), (short, cont), (short, longer),
                                            (ctx[len(ctx) // 4:], cont))]
        groups = sorted(self._groups(probe, list(range(len(probe)))), key=lambda g: -len(g.prefix))
        counts = dict(self.stats)
        prefill = self._prefill(groups)
        rows = [(g, r) for g in groups for r in range(len(g.rows))]
        answers = None if self._unsupported else self._answers(probe, rows, prefill)
        self.stats.update(counts)  # the probe's tokens are not the requests'
        if answers is None:
            return
        reference = super()._loglikelihood_tokens(probe, disable_tqdm=True)
        diffs = [abs(answers[i][0] - ref[0]) for i, ref in enumerate(reference)]
        self.stats["max_check_diff"] = max(diffs)
        exact = next(iter(self.model.parameters())).dtype in (torch.float32, torch.float64) \
            and self.mixed_precision_dtype is None
        tolerance = 1e-3 if exact else 5e-2
        if any(d > tolerance * (1 + abs(ref[0])) for d, ref in zip(diffs, reference, strict=True)):
            self._off(f"its log-likelihoods differ from lm-eval's by up to {max(diffs):.3g} on a probe")
