"""Continuous-batching KV-cache sampler: our own decode loop over a Hugging Face causal LM.

A fixed number of slots (batch_size) decode together, one token per step, over preallocated K/V
buffers per layer of shape (slots, kv_heads, max_len, head_dim). When sequences finish, the
waiting prompts (sorted by length) are prefilled into the free slots and join the running batch,
so the batch stays full until the queue runs dry; after that it is compacted into the leading
rows of the same buffers whenever at most half of it is busy, to the next bucket size (the
slot count, then powers of two below it).

Prompts that share a prefix (few-shot exemplars; a question's G samples; layer-2 prompts, which
extend their question's prompt and answer) have it prefilled once (`_Prefixes`, a radix tree):
its K/V are copied into every slot that starts with it, and only the rest of each prompt is
prefilled there (`_Decoder.extend`). The output is the same as prefilling every prompt whole.

One decode step is forward + sampling, entirely on the device: the slot state (next id, first
column, next column, tokens left, live) lives in device tensors that the step itself advances, and
a slot stops advancing on a stop id or at max_new_tokens. The host copies each step's ids and
log-probs (non-blocking, into pinned buffers on CUDA) and looks at them once every `check_every`
steps: that is when stop strings are checked, finished prompts are counted and slots refilled,
so a step costs no host sync. Tokens a slot generates after its stop (at most check_every - 1,
only for stop strings) are discarded, so the output equals checking after every step.

On CUDA the step is captured in a CUDA graph (`cuda_graphs`) once per (bucket, width,
sampling parameters) and replayed, where the width is the attended columns: a power of two that
holds every slot's next 8 columns (`_width`), so early steps do not read the whole cache. Graphs,
K/V buffers and slot state are kept across `sample()` calls for the same model and rounded length
(`release` drops them), so a trainer captures once per shape, not once per call. The step,
forward, draw and state update together, is compiled before its first capture (`compile`; one
compilation with dynamic shapes serves every bucket and width) so elementwise chains fuse and
the draw reads the logits once: it takes its uniforms from a counter-based RNG (`rng.py`), a few
integer ops per logit, where `torch.rand(generator=)` would break the compiled graph. Elsewhere
the step runs eagerly, drawing with `torch.rand`, and attends only over the columns in use.

Cache layout of one slot: a prompt prefilled in a chunk of width W sits left-padded in columns
[start, W) (start = W - len); generated tokens follow at W, W+1, ...; the token in column c has
position c - start. Every forward gets explicit 4-D boolean masks built from (start, col) per
slot and each layer's sliding window (Gemma 3, Mistral), and attention runs through
`_slot_attention` (plain SDPA; grouped query heads share their K/V head without copies while
decoding). Decode from a 16-bit weight copy (`decode_weights.DecodeWeights`), not from fp32
weights under autocast: the cache takes the dtype of the keys it is first given.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from fastmgrpo.rng import CounterRNG, torch_uniform
from fastmgrpo.types import Completion

_ATTN = "fastmgrpo_slots"
_PREFILL_TOKENS = 16384  # prompt tokens per prefill forward: bounds activations on big refills
# A prefill forward's fixed cost (reading every weight once; kernel launches) in prompt tokens of
# compute: a shared prefix, or a forward of its own for prompts of other lengths, pays off above
# it. CPU: Gemma 3 270M on 2 cores reads 1 GB of fp32 weights per forward.
_FORWARD_TOKENS = {"cpu": 64}  # device type -> tokens; others (GPUs: kernel launches) 1024
CHECK_EVERY = 8  # decode steps between host looks: one host sync per 8 steps
_LEN_ROUND = 128  # graph mode: max_len rounded up to this, so calls of similar lengths share graphs
_MIN_WIDTH = 64  # graph mode: the narrowest attention width (columns) a step is captured for
_KEPT = 2  # decoders (K/V buffers + graphs) kept per model: layer-1 and layer-2 lengths differ
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> _Decoder)
# Compiled shapes of the decode step dynamo may keep (its default, 8, is the limit of all
# `torch.compile(_Decoder._logits)` together): a shape per bucket (7 at 64 slots), kept decoder
# length and model; past it a decoder captures its steps uncompiled (with one warning).
_RECOMPILE_LIMIT = 64
COMPILES = {"compiled": 0, "eager": 0}  # decode-step shapes dynamo compiled / left uncompiled at the limit


def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: set[int],
    pad_id: int,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: Callable[[int], object] | None = None,
    cuda_graphs: bool = True,
    refill_fraction: float = 0.125,
    stopper=None,
    check_every: int = CHECK_EVERY,
    compile: bool = True,
    prefix_reuse: bool = True,
) -> list[Completion]:
    """Sample one completion per prompt.

    prompts: token ids per prompt (non-empty); results come back in the same order.
    temperature: 0 means greedy; logprobs are then taken at temperature 1.
    top_p / top_k: nucleus / top-k truncation of the sampling distribution (1.0 / 0 = off).
        The returned logprobs are under the temperature-scaled distribution BEFORE truncation.
    stop_ids: a sampled id in this set ends the completion (it is kept in token_ids).
    batch_size: concurrent sequences (cache slots).
    generator: a torch.Generator on the model's device, for reproducible sampling (with CUDA
        graphs it seeds the sampler's counter-based RNG, `rng.CounterRNG`, once per call: the
        draws follow the same distribution as eager ones, not the same numbers).
    progress: called with the number of prompts newly done, as they finish (e.g. tqdm.update).
    cuda_graphs: on CUDA, replay the decode step from a CUDA graph (eager if capture fails);
        graphs and K/V buffers are then kept for later calls (see `release`).
    refill_fraction: prefill waiting prompts once this fraction of the slots is free.
    stopper: a `stopping.StopStrings`; a completion whose text reaches one of its strings ends
        (finished) and is cut before the string, token ids and logprobs alike.
    check_every: decode steps between host looks at the sampled tokens (stop strings, refills);
        the output does not depend on it.
    compile: with CUDA graphs, `torch.compile` each bucket's decode forward before capturing it
        (eager, with a warning, if compilation fails or dynamo's recompile limit is reached).
    prefix_reuse: prefill every prefix that several prompts share once and copy its K/V into
        their slots (`_Prefixes`); off, each prompt is prefilled whole. The draws do not depend on
        it; the logprobs only through fp rounding.
    Returns Completions with float32-precision logprobs, `finished` True when a stop id or
    string was hit, and `text` left empty (the caller owns the tokenizer).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    if not prompts or max_new_tokens <= 0:
        return [Completion(token_ids=[], logprobs=[], finished=False) for _ in prompts]
    device = model.get_input_embeddings().weight.device
    graphs = cuda_graphs and _graphs_on(device)
    slots = min(batch_size, len(prompts))
    dec = _decoder(model, capacity=batch_size if graphs else slots,
                   max_len=max(map(len, prompts)) + max_new_tokens, graphs=graphs, compile=compile)
    bucket = _bucket(slots, dec.capacity)
    gen = dec.begin(bucket, generator, check_every)
    pick, stop = (temperature, top_p, top_k), tuple(sorted(stop_ids))
    stop_host = np.array(stop, dtype=np.int64)
    queue = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    refill_min = max(1, int(refill_fraction * slots))
    req = np.full(dec.capacity, -1)  # prompt index per slot, -1 = free (or done: device may run on)
    left = np.zeros(dec.capacity, dtype=np.int64)  # tokens each slot may still generate
    log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per step: prompt, token, logprob
    count = np.zeros(len(prompts), dtype=np.int64)  # tokens generated per prompt
    finished = np.zeros(len(prompts), dtype=bool)
    history: list[list[int]] = [[] for _ in prompts]  # generated ids per prompt, for `stopper` only
    shared = _Prefixes(prompts, dec.forward_tokens) if prefix_reuse else None

    def take(rows: np.ndarray, ids: np.ndarray, logp: np.ndarray) -> None:
        """Record one step's tokens of the busy slots `rows`; free the slots that are done."""
        r = req[rows]
        log.append((r, ids, logp))
        count[r] += 1
        left[rows] -= 1
        hit = np.isin(ids, stop_host)
        if stopper is not None:
            for p, tok in zip(r, ids):
                history[p].append(int(tok))
            hit = hit | np.array([not h and stopper.hit(history[p]) for p, h in zip(r, hit)], dtype=bool)
        done = hit | (left[rows] == 0)
        finished[r[done]] = hit[done]
        req[rows[done]] = -1
        if progress is not None and done.any():
            progress(int(done.sum()))

    with torch.inference_mode(), _slot_attention_on(model):
        if shared is not None:
            shared.build(dec, pad_id)
        while queue or (req >= 0).any():
            b = dec.bucket
            free = np.flatnonzero(req[:b] < 0)
            busy = b - free.size
            if queue and free.size and (free.size >= refill_min or not busy):
                newcomers = [queue.popleft() for _ in range(min(free.size, len(queue)))]
                for rows, idx in _chunks(free, newcomers, prompts):
                    req[rows], left[rows] = idx, max_new_tokens
                    known = None if shared is None else shared.take(idx)
                    take(rows, *dec.prefill(rows, [prompts[i] for i in idx], pad_id, pick, gen, stop,
                                            max_new_tokens, known))
            elif not queue and busy and _bucket(busy, dec.capacity) < b:
                keep = np.flatnonzero(req[:b] >= 0)
                dec.compact(keep, _bucket(busy, dec.capacity))
                req[: keep.size], left[: keep.size] = req[keep], left[keep]
                req[keep.size :] = -1
            busy_rows = np.flatnonzero(req[: dec.bucket] >= 0)
            if not busy_rows.size:
                continue
            ids, logp = dec.decode(min(check_every, int(left[busy_rows].max())), pick, gen, stop)  # (n, b)
            for k in range(ids.shape[0]):
                rows = np.flatnonzero(req[: dec.bucket] >= 0)
                if not rows.size:
                    break
                take(rows, ids[k, rows], logp[k, rows])
    req_, ids, logp = (np.concatenate(x) for x in zip(*log))
    order = np.argsort(req_, kind="stable")  # by prompt, each in generation order
    cuts = np.cumsum(count)[:-1]
    out = [Completion(token_ids=t.tolist(), logprobs=lp.tolist(), finished=bool(f))
           for t, lp, f in zip(np.split(ids[order], cuts), np.split(logp[order], cuts), finished)]
    for c in out if stopper is not None else ():
        k = stopper.keep(c.token_ids)
        c.token_ids, c.logprobs = c.token_ids[:k], c.logprobs[:k]
    return out


def release(model: torch.nn.Module) -> None:
    """Drop the K/V buffers and CUDA graphs that `sample` keeps for `model`."""
    _DECODERS.pop(model, None)


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes of the K/V buffers that `sample` keeps for `model` (0 without kept decoders)."""
    return sum(t.numel() * t.element_size() for dec in _DECODERS.get(model, {}).values()
               for buffers in (dec.cache.k, dec.cache.v) for t in buffers.values())


def _width(n: int, max_len: int) -> int:
    """Columns a graph step attends over to cover the first n: the next power of two (at least
    _MIN_WIDTH), or all max_len. Few widths, so their graphs are captured once and kept."""
    return min(max_len, max(_MIN_WIDTH, 1 << (n - 1).bit_length()))


def _bucket(n: int, capacity: int) -> int:
    """Slot count that holds n busy slots: the next power of two, or all `capacity` slots. Few
    sizes, so a graph per size is captured once and kept."""
    return min(capacity, 1 << (n - 1).bit_length())


def _decoder(model, *, capacity: int, max_len: int, graphs: bool, compile: bool) -> _Decoder:
    """The model's kept decoder for this shape (graph mode), else a fresh one."""
    if not graphs:
        return _Decoder(model, capacity=capacity, max_len=max_len, graphs=False, compile=False)
    device = model.get_input_embeddings().weight.device
    cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    kind = (capacity, next(model.parameters()).dtype, cast, compile)
    kept = _DECODERS.setdefault(model, OrderedDict())
    # A kept decoder up to a quarter (at least _LEN_ROUND) longer than needed serves the call:
    # graph steps attend over width buckets of its columns, but a new one costs captures.
    fits = [k for k in kept if k[1:] == kind and max_len <= k[0] <= max_len + max(_LEN_ROUND, max_len // 4)]
    key = min(fits) if fits else (-(-max_len // _LEN_ROUND) * _LEN_ROUND, *kind)
    if key not in kept:
        kept[key] = _Decoder(model, capacity=capacity, max_len=key[0], graphs=True, compile=compile)
        while len(kept) > _KEPT:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


def _chunks(rows: np.ndarray, idx: list[int], prompts: list[list[int]]):
    """Split newcomers (length-sorted) into prefill forwards of at most _PREFILL_TOKENS padded
    tokens each; yields (slot rows, prompt indices)."""
    start = 0
    for end in range(1, len(idx) + 1):
        if end == len(idx) or (end + 1 - start) * len(prompts[idx[end]]) > _PREFILL_TOKENS:
            yield rows[start:end], idx[start:end]
            start = end


def _groups(fresh: list[int], width: list[int], forward_tokens: int) -> list[list[int]]:
    """Prompts (by index) in prefill forwards of similar uncached lengths `fresh`: sorted by it, a
    new forward when padding the current one to the next length would cost more than
    `forward_tokens`, or its rows x longest prompt (`width`) would pass _PREFILL_TOKENS."""
    groups: list[list[int]] = []
    for i in sorted(range(len(fresh)), key=fresh.__getitem__):
        g = groups[-1] if groups else []
        if (g and len(g) * (fresh[i] - fresh[g[-1]]) <= forward_tokens
                and (len(g) + 1) * max(width[j] for j in (*g, i)) <= _PREFILL_TOKENS):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _common(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _intervals(lcp: list[int]) -> list[tuple[int, int, int]]:
    """The lcp intervals of sorted sequences with adjacent common-prefix lengths `lcp`: (length,
    first, last) for every widest run of sorted positions first..last (at least two) that
    share their first `length` > 0 tokens. Runs nest or are disjoint (a radix tree)."""
    out, stack = [], [(0, 0)]
    for i, cur in enumerate([*lcp, 0], start=1):
        first = i - 1
        while cur < stack[-1][0]:
            length, first = stack.pop()
            out.append((length, first, i - 1))
        if cur > stack[-1][0]:
            stack.append((cur, first))
    return out


class _Prefixes:
    """The prefixes several prompts share, each prefilled once (a radix tree over the prompts).

    A prompt's last token is always prefilled in its slot (its logits give the first draw), so
    the tree is over the prompts less their last tokens. Its nodes are the longest common
    prefixes of groups of them (`_intervals`); a node holds the K/V of its own tokens, those
    after its parent's, and a prompt's cached context is the path to its deepest node. K/V do
    not depend on the column they sit in (positions count from a slot's first column) nor,
    causal masking, on what follows them, sliding windows included: a node's K/V are copied
    into every slot that starts with it (`_SlotCache.put`) exactly as prefilling it there
    would compute them, up to fp rounding.
    """

    def __init__(self, prompts: list[list[int]], forward_tokens: int):
        """forward_tokens: a node is kept when the tokens it saves, (prompts through it - 1) x
        its own length, reach this (a level of nodes costs a forward); else its tokens go to
        its children's."""
        keys = [p[:-1] for p in prompts]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        lcp = [_common(keys[a], keys[b]) for a, b in zip(order, order[1:])]
        deepest = [-1] * len(keys)  # per sorted position: its deepest kept node so far
        self.end, self.parent, self.users, self.tokens = [], [], [], []  # per node
        for end, first, last in sorted(_intervals(lcp)):  # shorter first: parents before children
            parent, users = deepest[first], last - first + 1  # users: prompts through it
            if (users - 1) * (end - (self.end[parent] if parent >= 0 else 0)) < forward_tokens:
                continue
            self.parent.append(parent)
            self.end.append(end)
            self.users.append(users)
            self.tokens.append(keys[order[first]][:end])
            deepest[first : last + 1] = [len(self.end) - 1] * users
        self.node = [0] * len(keys)  # per prompt: its deepest kept node, -1 = none
        for s, i in enumerate(order):
            self.node[i] = deepest[s]
        self.kv: list[dict | None] = [None] * len(self.end)  # per node: {layer: (k, v)} of its own tokens
        self.forward_tokens = forward_tokens

    def _begin(self, node: int) -> int:
        return 0 if self.parent[node] < 0 else self.end[self.parent[node]]

    def _path(self, node: int) -> list[dict]:
        out = []
        while node >= 0:
            out.append(self.kv[node])
            node = self.parent[node]
        return out[::-1]

    def build(self, dec: _Decoder, pad_id: int) -> None:
        """Prefill every node's own tokens after its parent's cached K/V, a tree level at a time."""
        depth: list[int] = []
        for p in self.parent:
            depth.append(0 if p < 0 else depth[p] + 1)
        for d in range(max(depth, default=-1) + 1):
            level = [i for i, x in enumerate(depth) if x == d]
            for g in _groups([self.end[i] - self._begin(i) for i in level], [self.end[i] for i in level],
                             self.forward_tokens):
                nodes = [level[k] for k in g]
                width = max(self.end[i] for i in nodes)
                cache = _SlotCache(len(nodes), width)
                known = [(self._begin(i), self._path(self.parent[i])) for i in nodes]
                dec.extend(cache, np.arange(len(nodes)), [self.tokens[i] for i in nodes], known, pad_id, logits=False)
                for r, i in enumerate(nodes):
                    own = slice(width - self.end[i] + self._begin(i), width)
                    self.kv[i] = {layer: (cache.k[layer][r, :, own].clone(), cache.v[layer][r, :, own].clone())
                                  for layer in cache.k}

    def take(self, idx: list[int]) -> list[tuple[int, list[dict]]]:
        """Cached contexts (length, K/V segments) of prompts `idx`, which go to slots now; a
        node's K/V is dropped once its last prompt has taken it."""
        out = []
        for i in idx:
            node = self.node[i]
            out.append((0 if node < 0 else self.end[node], self._path(node)))
            while node >= 0:
                self.users[node] -= 1
                if not self.users[node]:
                    self.kv[node] = None
                node = self.parent[node]
        return out


class _SlotCache:
    """Per-layer K/V buffers (slots, kv_heads, max_len, head_dim), allocated on first write.

    Duck-types the `update` of transformers' Cache: in prefill (`cols` None) the chunk's keys
    (n, kv_heads, S, head_dim) go to the last S of the first `width` columns of slots `rows`
    (all but the columns `keep` marks: cached context already there) and those slots' first
    `width` columns come back; in decode the first `n` slots take part, each slot's one new key
    goes to its column `cols[s]`, and the first `width` columns of those slots come back.
    """

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len, self.n = slots, max_len, slots
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # prefill: (n, 1, S, 1) True where context is cached
        self.width = max_len

    def _buffers(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Layer `layer_idx`'s buffers, allocated like `key`/`value` (..., kv_heads, any, head_dim)."""
        if layer_idx not in self.k:
            shape = (self.slots, key.shape[-3], self.max_len, key.shape[-1])
            self.k[layer_idx] = key.new_zeros(shape)
            self.v[layer_idx] = value.new_zeros(shape)
        return self.k[layer_idx], self.v[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._buffers(layer_idx, key, value)
        if self.cols is None:
            return self._write(k, key), self._write(v, value)
        # index_put_ into the whole buffer: inductor re-inplaces it, while a compiled scatter_, or
        # a write into a view of the first n slots, copies the buffer (or view) out and back
        at = (torch.arange(self.n, device=k.device), slice(None), self.cols)  # slot s -> column cols[s]
        k[at] = key[:, :, 0]  # (n, Hkv, D)
        v[at] = value[:, :, 0]
        return k[: self.n, :, : self.width], v[: self.n, :, : self.width]  # views: graphs read the buffers

    def _write(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Prefill: `new` (n, Hkv, S, D) into `buf` as `update` says; returns (n, Hkv, width, D)."""
        if self.keep is None:  # no cached context: the chunk is the slots' whole width
            buf[:, :, : new.shape[2]].index_copy_(0, self.rows, new)
            return new
        dst = buf[:, :, self.width - new.shape[2] : self.width]
        dst.index_copy_(0, self.rows, torch.where(self.keep, dst.index_select(0, self.rows), new))
        return buf[:, :, : self.width].index_select(0, self.rows)

    def put(self, row: int, col: int, segments: list[dict]) -> None:
        """Copy cached K/V `segments` (each {layer: (k, v)}, (kv_heads, len, head_dim)), one after
        the other, into slot `row` from column `col` on."""
        for seg in segments:
            for layer, (k, v) in seg.items():
                bk, bv = self._buffers(layer, k, v)
                bk[row, :, col : col + k.shape[1]] = k
                bv[row, :, col : col + k.shape[1]] = v
            col += k.shape[1]

    def compact(self, keep: torch.Tensor) -> None:
        """Move slots `keep` (in that order) to the leading rows, in place."""
        for d in (self.k, self.v):
            for buf in d.values():
                buf[: keep.numel()] = buf.index_select(0, keep)


class _Decoder:
    """Device side of the sampler for one model and shape: K/V cache, slot state, decode steps.

    Slot state, per slot on the device: `ids` the token fed next (the last one sampled), `start`
    its first real column, `col` the column `ids` goes to, `left` tokens it may still sample,
    `live` whether it is still decoding, `logp` the log-prob of `ids`. A decode step over the
    first `bucket` slots samples every slot and advances the live ones; a slot stops on a stop
    id or when `left` reaches 0, so its column never passes max_len - 1.
    """

    def __init__(self, model, *, capacity: int, max_len: int, graphs: bool, compile: bool):
        cfg = model.config.get_text_config()
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{cfg.model_type} soft-caps attention logits; the sampler's SDPA does not")
        # no layer_types (Llama, Mistral): every layer has the config's sliding window, if any
        uniform = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = getattr(cfg, "layer_types", None) or [uniform] * cfg.num_hidden_layers
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unsupported attention layer types {sorted(unknown)}")
        # one mask per layer type; a single tensor when all layers share it (models without
        # per-type mask mappings accept only a tensor)
        self.windows = {t: cfg.sliding_window if t == "sliding_attention" else None for t in types}
        self.model = weakref.ref(model)  # kept decoders must not keep their model alive
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name warns until 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = device = model.get_input_embeddings().weight.device
        self.capacity, self.max_len, self.bucket = capacity, max_len, capacity
        self.forward_tokens = _FORWARD_TOKENS.get(device.type, 1024)
        self.cache = _SlotCache(capacity, max_len)
        self.ids, self.start, self.col, self.left = (
            torch.zeros(capacity, dtype=torch.long, device=device) for _ in range(4))
        self.live = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.logp = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.hi = 0  # host bound on every slot's `col` (eager steps attend over hi + 1 columns)
        self.graphs, self.compile = graphs, compile
        self.compiled: dict[tuple, Callable[..., None]] = {}  # pick -> compiled `_graph_step`
        self.steps: dict[tuple, Callable[[], object]] = {}  # (bucket, width, pick, stop) -> captured step
        self.stops: dict[tuple[int, ...], torch.Tensor] = {}
        # graph mode draws from a counter-based RNG (device tensors, no generator): it compiles
        # into the step and a captured graph draws anew at each replay; re-seeded once per call
        self.rng = CounterRNG(device) if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs and device.type == "cuda" else None
        self.host_ids = self.host_logp = None  # (check_every, capacity) pinned on CUDA

    def begin(self, bucket: int, generator: torch.Generator | None, check_every: int) -> Callable:
        """Start a `sample` call on `bucket` free slots; return the uniform draw (shape -> float32
        in (0, 1)) that prefills and eager steps sample with."""
        self.bucket, self.hi = bucket, 0
        self.live.zero_()
        self.col.zero_()
        self.start.zero_()
        if self.host_ids is None or self.host_ids.shape[0] < check_every:
            pin = self.device.type == "cuda"
            self.host_ids = torch.zeros((check_every, self.capacity), dtype=torch.long, pin_memory=pin)
            self.host_logp = torch.zeros((check_every, self.capacity), dtype=torch.float32, pin_memory=pin)
        if self.rng is None:
            return torch_uniform(generator, self.device)
        self.rng.seed(generator)
        return self.rng

    def _forward(self, model, ids: torch.Tensor, pos: torch.Tensor, masks,
                 cache: _SlotCache | None = None) -> torch.Tensor:
        out = model(input_ids=ids, position_ids=pos, attention_mask=masks, use_cache=True, logits_to_keep=1,
                    **{self.cache_kw: self.cache if cache is None else cache})
        return out.logits[:, -1].float()  # (n, V)

    def _masks(self, allowed: torch.Tensor, key_j: torch.Tensor, query_j: torch.Tensor):
        """4-D masks per layer type from `allowed` (n, q, L) and key/query columns broadcastable
        to it: a sliding window w keeps keys with key_j > query_j - w (as transformers does)."""
        masks = {
            t: (allowed if w is None else allowed & (key_j > query_j - w))[:, None]
            for t, w in self.windows.items()
        }
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def prefill(self, rows: np.ndarray, seqs: list[list[int]], pad_id: int, pick: tuple, gen,
                stop: tuple[int, ...], max_new: int, known: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prefill prompts `seqs` into free slots `rows` and sample their first tokens; return
        those tokens (n,) int64 and logprobs (n,) on the host (one sync per prefill).

        known: per prompt its cached context (`_Prefixes.take`): only the tokens after it are
        prefilled, in forwards of similar lengths (`_groups`); None: one forward of whole prompts.
        """
        groups = [list(range(len(seqs)))] if known is None else _groups(
            [len(p) - c for p, (c, _) in zip(seqs, known)], list(map(len, seqs)), self.forward_tokens)
        parts = []
        for g in groups:
            logits, start, width = self.extend(self.cache, rows[g], [seqs[i] for i in g],
                                               None if known is None else [known[i] for i in g], pad_id)
            at = torch.from_numpy(rows[g]).to(self.device)
            self.start[at], self.col[at] = start, width
            self.hi = max(self.hi, width)
            parts.append(logits)
        order = np.argsort(np.concatenate(groups), kind="stable")
        logits = torch.cat(parts)[torch.from_numpy(order).to(self.device)]  # (n, V) in row order
        new, logp = _pick(logits, *pick, gen)  # one draw per chunk, grouped or not
        at = torch.from_numpy(rows).to(self.device)
        self.ids[at] = new
        self.left[at] = max_new - 1
        self.live[at] = (self.left[at] > 0) & ~_is_stop(new, self._stop(stop))
        host = torch.stack([new.double(), logp.double()]).cpu().numpy()  # (2, n): ids are exact
        return host[0].astype(np.int64), host[1]

    def extend(self, cache: _SlotCache, rows: np.ndarray, seqs: list[list[int]], known: list | None,
               pad_id: int, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """One prefill forward of prompts `seqs` into slots `rows` of `cache`, each after its
        cached context.

        known: per prompt (C, K/V segments of its first C tokens), or None (C = 0). Prompt r sits
        left-padded in columns [start_r, W) of the W = longest prompt's; its context is copied
        in, and the queries are the last S columns (S the most uncached tokens of a prompt),
        pad tokens where a prompt has fewer, whose K/V leave the cached context as it is.
        Returns (logits of each prompt's last token (n, V) fp32, or None without `logits`: no LM
        head, whose weights are much of a small model's; start (n,); W).
        """
        width = max(map(len, seqs))
        cached = [0] * len(seqs) if known is None else [c for c, _ in known]
        fresh = max(len(p) - c for p, c in zip(seqs, cached))
        ids = torch.full((len(seqs), fresh), pad_id, dtype=torch.long)  # (n, S)
        for r, (p, c) in enumerate(zip(seqs, cached)):
            ids[r, fresh - len(p) + c :] = torch.tensor(p[c:])
            if c:
                cache.put(int(rows[r]), width - len(p), known[r][1])
        start = torch.tensor([width - len(p) for p in seqs], device=self.device)  # (n,) left padding
        j = torch.arange(width, device=self.device)  # (W,) key columns
        q = j[width - fresh :]  # (S,) query columns
        pos = (q[None] - start[:, None]).clamp_min(0)  # (n, S)
        # causal over real keys; pad queries see only themselves (an all-masked row is NaN in
        # some SDPA backends, and NaN values would leak through zero attention weights)
        allowed = (j[None, None] <= q[None, :, None]) & (
            (j[None, None] >= start[:, None, None]) | (j[None, None] == q[None, :, None]))  # (n, S, W)
        cache.rows, cache.cols, cache.width = torch.from_numpy(np.asarray(rows)).to(self.device), None, width
        cache.keep = None
        if any(cached):
            c = torch.tensor(cached, device=self.device)
            cache.keep = ((q[None] >= start[:, None]) & (q[None] < (start + c)[:, None]))[:, None, :, None]
        masks = self._masks(allowed, j[None, None, :], q[None, :, None])
        if not logits:
            self.model().get_decoder()(input_ids=ids.to(self.device), position_ids=pos, attention_mask=masks,
                                       use_cache=True, **{self.cache_kw: cache})
            return None, start, width
        return self._forward(self.model(), ids.to(self.device), pos, masks, cache), start, width

    def _stop(self, stop: tuple[int, ...]) -> torch.Tensor:
        """Stop ids on the device (n_stop,), made once: a pageable host copy would sync. No stop
        ids is (-1,), which no token has: an empty tensor would be a shape of its own to compile."""
        if stop not in self.stops:
            self.stops[stop] = torch.tensor(stop or (-1,), dtype=torch.long, device=self.device)
        return self.stops[stop]

    def _logits(self, model, b: int, width: int) -> torch.Tensor:
        """One decode forward of the first b slots over `width` columns -> logits (b, V) fp32."""
        ids, start, col = self.ids[:b], self.start[:b], self.col[:b]
        self.cache.n, self.cache.cols, self.cache.width = b, col, width
        j = torch.arange(width, device=self.device)[None]  # (1, L)
        allowed = ((j >= start[:, None]) & (j <= col[:, None]))[:, None]  # (b, 1, L)
        return self._forward(model, ids[:, None], (col - start)[:, None],
                             self._masks(allowed, j[:, None], col[:, None, None]))

    def _advance(self, b: int, new: torch.Tensor, logp: torch.Tensor, stop: torch.Tensor) -> None:
        """Take sampled tokens new, logp (b,) into the state of the first b slots (device only)."""
        live = self.live[:b]
        step = live.long()
        self.col[:b] += step
        self.left[:b] -= step
        self.ids[:b].copy_(new)
        self.logp[:b].copy_(logp)
        live &= ~_is_stop(new, stop) & (self.left[:b] > 0)

    def decode(self, n: int, pick: tuple, gen, stop: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Run n decode steps of the current bucket; return their sampled ids (n, bucket) int64
        and logprobs (n, bucket) float32 on the host, after one sync."""
        # graph steps attend over a width bucket that holds every column of the n steps
        b, step = self.bucket, self._step(pick, gen, stop, _width(min(self.hi + n, self.max_len), self.max_len))
        for k in range(n):
            step()
            self.hi = min(self.hi + 1, self.max_len - 1)
            self.host_ids[k, :b].copy_(self.ids[:b], non_blocking=True)
            self.host_logp[k, :b].copy_(self.logp[:b], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one host sync per n steps
        return self.host_ids[:n, :b].numpy(), self.host_logp[:n, :b].numpy()

    def _step(self, pick: tuple, gen, stop: tuple[int, ...], width: int) -> Callable[[], object]:
        """The decode step of the current bucket (graphs: over `width` columns): a kept graph, a
        new capture, or eager (over the columns in use)."""
        b, stop_t = self.bucket, self._stop(stop)
        if not self.graphs:
            return lambda: self._decode_step(self.model(), b, self.hi + 1, pick, stop_t, gen)
        key = (b, width, pick, stop)
        if key not in self.steps:
            step = self._capture(b, width, pick, stop_t)
            if step is None:
                return self._step(pick, gen, stop, width)  # capture failed: self.graphs is now False
            self.steps[key] = step
        return self.steps[key]

    def _decode_step(self, model, b: int, width: int, pick: tuple, stop: torch.Tensor, uniform) -> None:
        """One decode step of the first b slots over `width` columns: forward, draw with
        `uniform`, advance the slot state (device only)."""
        self._advance(b, *_pick(self._logits(model, b, width), *pick, uniform), stop)

    def _graph_step(self, model, b: int, width: int, pick: tuple, stop: torch.Tensor) -> None:
        """`_decode_step` drawing from the decoder's counter-based RNG: the function graph mode
        compiles and captures, sampling included."""
        self._decode_step(model, b, width, pick, stop, self.rng)

    def _capture(self, b: int, width: int, pick: tuple, stop: torch.Tensor) -> Callable[[], object] | None:
        """Capture the decode step of b slots over `width` columns (the graph's shapes are
        fixed), sampling included; None (and eager decoding from now on) if capture fails."""
        step_fn = self._compiled(b, width, pick, stop) if self.compile else self._graph_step
        device_type = self.device.type

        def run():
            # autocast must not hand the graph its cache of cast weights (freed when autocast exits)
            with _uncached_autocast(device_type):
                step_fn(self.model(), b, width, pick, stop)

        try:
            with self._state_kept(b):  # the warm-up run advances the state and the draw count
                return _GraphStep(run, self.pool)
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=4)
            self.graphs = False
            return None

    def _compiled(self, b: int, width: int, pick: tuple, stop: torch.Tensor):
        """torch.compile'd `_graph_step` for sampling parameters `pick` (one function for every
        bucket and width: dynamic shapes), run once at (b, width) so any compiling happens now,
        under our recompile limit. `_graph_step` itself, and no more compiling for this decoder,
        if that fails (with a warning) or the limit is reached (`_RECOMPILE_LIMIT`; one warning
        a process)."""
        from torch._dynamo.exc import FailOnRecompileLimitHit  # lazy: importing dynamo takes seconds
        from torch._dynamo.utils import counters

        fn = self.compiled.get(pick) or _compile(self._graph_step)
        traced = counters["stats"]["unique_graphs"]
        try:
            # the limit counts every compiled shape of the step, across decoders; at it, dynamo
            # would run the step eagerly without a word: fail instead, and say so below
            with (self._state_kept(b), _uncached_autocast(self.device.type),
                  torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)):
                fn(self.model(), b, width, pick, stop)  # compiles if new; K/V only where a step rewrites
        except FailOnRecompileLimitHit:
            COMPILES["eager"] += 1
            if COMPILES["eager"] == 1:
                warnings.warn(f"the sampler's decode step reached torch.compile's recompile limit ({_RECOMPILE_LIMIT}"
                              f" shapes, {COMPILES['compiled']} compiled here); new shapes decode uncompiled",
                              stacklevel=5)
            self.compile = False
            return self._graph_step
        except Exception as e:  # dynamo/inductor raise many types; eager decoding still works
            warnings.warn(f"torch.compile of the decode step failed, capturing it uncompiled: {e}", stacklevel=5)
            self.compile = False
            return self._graph_step
        if counters["stats"]["unique_graphs"] > traced:  # else a graph dynamo traced before served
            COMPILES["compiled"] += 1
        self.compiled[pick] = fn
        return fn

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.start, self.col, self.left, self.live, self.logp

    @contextlib.contextmanager
    def _state_kept(self, b: int):
        """Run a block that may advance the first b slots' state (a warm-up or compiling call)
        and put that state back afterwards, whether the block succeeds or raises."""
        saved = [t[:b].clone() for t in self._state()]
        count = None if self.rng is None else self.rng.count.clone()
        try:
            yield
        finally:
            for t, s in zip(self._state(), saved):
                t[:b].copy_(s)
            if count is not None:
                self.rng.count.copy_(count)

    def compact(self, keep: np.ndarray, bucket: int) -> None:
        """Move busy slots `keep` to rows [0, len(keep)) (the queue is empty); later steps decode
        the first `bucket` slots only. Rows [len(keep), bucket) become idle."""
        at, n = torch.from_numpy(keep).to(self.device), keep.size
        for t in self._state():
            t[:n] = t[at]
            t[n:bucket] = 0  # idle: not live, attends to column 0 only
        self.cache.compact(at)
        self.bucket = bucket


def _graphs_on(device: torch.device) -> bool:
    """Whether CUDA graphs can run on `device` (tests stand an eager graph in on CPU)."""
    return device.type == "cuda"


def _is_stop(ids: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Whether each id (n,) is in stop (k,): fixed-shape, no host sync (graph-safe)."""
    return (ids[:, None] == stop[None]).any(-1)


def _compile(fn):
    """Fuse the decode step's elementwise chains. Dynamic shapes: one compilation serves every
    bucket, width and decoder length (a static one per shape cost a cold compile each, a minute
    at 270M; CUDA graphs still capture each shape). The draw's integer hash is a long chain: past
    inductor's default of 30 ops it would be written out as a (slots, V) int64 tensor; at 100 it
    stays inside the kernel that reads the logits."""
    return torch.compile(fn, dynamic=True, fullgraph=False, options={"realize_opcount_threshold": 100})


def _uncached_autocast(device_type: str):
    """The enclosing autocast (if any) with its weight-cast cache off."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class _GraphStep:
    """`step` (no arguments; reads and writes static tensors only) captured in a CUDA graph; a
    call replays it."""

    def __init__(self, step: Callable[[], None], pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # lazy initialisation (cuBLAS handles, workspaces) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            step()

    def __call__(self) -> None:
        self.graph.replay()


def _slot_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA with the sampler's boolean mask; query (B, H, q, D), key/value (B, Hkv, L, D).

    Decoding (q = 1), the G = H / Hkv query heads of one K/V head become G query rows against
    that head, so grouped-query K/V are never repeated. Returns (B, q, H, D) like transformers.
    """
    b, h, q, d = query.shape
    g = h // key.shape[1]
    if q == 1:
        out = F.scaled_dot_product_attention(query.view(b, -1, g, d), key, value, attn_mask=attention_mask,
                                             scale=scaling)  # (B, Hkv, G, D)
        return out.reshape(b, h, 1, d).transpose(1, 2), None
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _slot_attention_on(model: torch.nn.Module):
    """Register `_slot_attention` with transformers and route the model's attention through it
    for the duration."""
    AttentionInterface.register(_ATTN, _slot_attention)
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = _ATTN
    try:
        yield
    finally:
        cfg._attn_implementation = old


def _pick(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, uniform: Callable[[tuple], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the next token per row from fp32 logits (A, V); return ids (A,) and their logprobs
    (A,) under softmax(logits / T) (T = 1 when greedy), before any truncation.

    uniform: shape -> float32 draws in (0, 1) on the logits' device (`torch.rand` with a
    generator, or a `rng.CounterRNG`); the draw depends only on what it returns. Device-only and
    fixed-shape (no host sync, no data-dependent sizes), so it runs inside the captured decode
    step. The logprob is z[id] - logsumexp(z) for z = logits / T: one fp32 reduction, no (A, V)
    log-softmax tensor.
    """
    z = logits / temperature if temperature not in (0, 1) else logits  # (A, V) fp32
    lse = torch.logsumexp(z, dim=-1)  # (A,)
    if temperature == 0:
        ids = z.argmax(dim=-1)
    elif (top_k <= 0 or top_k >= z.shape[-1]) and top_p >= 1.0:
        # Gumbel-max: argmax_i z_i - log E_i with E_i = -log U_i ~ Exp(1) is a draw from
        # softmax(z), with no cumulative sum whose rounding over 262k terms would need float64.
        # Uniforms, not exponential_(): ~7x faster on CPU. U = 0 gives -inf, never chosen.
        ids = (z - uniform(z.shape).log_().neg_().log_()).argmax(dim=-1)  # (A,)
    else:
        probs = (z - lse[:, None]).exp()  # (A, V)
        if 0 < top_k < probs.shape[-1]:
            kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (A, 1)
            probs = probs.masked_fill(probs < kth, 0.0)
        if top_p < 1.0:
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)  # (A, V)
            # drop a token when the mass strictly before it already reaches top_p (the first stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p * sorted_p.sum(-1, keepdim=True)
            probs = probs.scatter(1, sorted_i, sorted_p.masked_fill(drop, 0.0))
        # Exponential race: argmax_i p_i / E_i, E_i ~ Exp(1), is a draw from p; truncated
        # tokens (p = 0) score 0, never NaN (U < 1 keeps E > 0).
        race = probs / uniform(probs.shape).log_().neg_()  # (A, V)
        ids = race.argmax(dim=-1)
    return ids, z.gather(1, ids[:, None]).squeeze(1) - lse
