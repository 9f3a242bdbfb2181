"""Continuous-batching KV-cache sampler: our own decode loop over a Hugging Face causal LM.

A fixed number of slots (batch_size) decode together, one token per step, over a preallocated
K/V cache per layer of shape (slots, kv_heads, max_len, head_dim). When sequences finish, the
waiting prompts (sorted by length) are prefilled into the free slots and join the running
batch, so the batch stays full until the queue runs dry; after that it is compacted whenever
half of it has finished. On CUDA the decode step is captured once per batch size in a CUDA
graph and replayed (`cuda_graphs`); elsewhere it runs eagerly.

Cache layout of one slot: a prompt prefilled in a chunk of width W sits left-padded in columns
[start, W) (start = W - len); generated tokens follow at W, W+1, ...; the token in column c has
position c - start. Every forward gets explicit 4-D boolean masks built from (start, col) per
slot and each layer's sliding window (Gemma 3, Mistral), and attention runs through `_slot_attention`
(plain SDPA; grouped query heads share their K/V head without copies while decoding).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import deque
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from fastmgrpo.types import Completion

_ATTN = "fastmgrpo_slots"
_PREFILL_TOKENS = 16384  # prompt tokens per prefill forward: bounds activations on big refills


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
) -> list[Completion]:
    """Sample one completion per prompt.

    prompts: token ids per prompt (non-empty); results come back in the same order.
    temperature: 0 means greedy; logprobs are then taken at temperature 1.
    top_p / top_k: nucleus / top-k truncation of the sampling distribution (1.0 / 0 = off).
        The returned logprobs are under the temperature-scaled distribution BEFORE truncation.
    stop_ids: a sampled id in this set ends the completion (it is kept in token_ids).
    batch_size: concurrent sequences (cache slots).
    generator: a torch.Generator on the model's device, for reproducible sampling.
    progress: called with the number of prompts newly done, as they finish (e.g. tqdm.update).
    cuda_graphs: on CUDA, replay the decode step from a CUDA graph (eager if capture fails).
    refill_fraction: prefill waiting prompts once this fraction of the slots is free.
    stopper: a `stopping.StopStrings`; a completion whose text reaches one of its strings ends
        (finished) and is cut before the string, token ids and logprobs alike.
    Returns Completions with float32-precision logprobs, `finished` True when a stop id or
    string was hit, and `text` left empty (the caller owns the tokenizer).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts or max_new_tokens <= 0:
        return [Completion(token_ids=[], logprobs=[], finished=False) for _ in prompts]
    device = model.get_input_embeddings().weight.device
    engine = _Engine(
        model, slots=min(batch_size, len(prompts)), max_len=max(map(len, prompts)) + max_new_tokens,
        pad_id=pad_id, graphs=cuda_graphs and device.type == "cuda",
    )
    pick = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    queue = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    refill_min = max(1, int(refill_fraction * engine.slots))
    log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per forward: prompt, token, logprob
    count = np.zeros(len(prompts), dtype=np.int64)  # tokens generated per prompt
    finished = np.zeros(len(prompts), dtype=bool)
    history: list[list[int]] = [[] for _ in prompts]  # generated ids per prompt, for `stopper` only

    def emit(rows: np.ndarray, logits: torch.Tensor) -> None:
        """Sample the next token of the sequences in slots `rows` from their logits (n, V)."""
        ids, logp = _pick(logits, **pick)  # (n,), (n,)
        if rows.size == engine.slots:
            engine.ids.copy_(ids)
        else:
            engine.ids[torch.from_numpy(rows).to(device)] = ids
        # One device sync per forward, one copy (ids and flags are exact in float64): the host
        # needs the tokens and the finished rows.
        host = torch.stack([ids.double(), logp.double(), torch.isin(ids, stop).double()]).cpu().numpy()  # (3, n)
        req, hit = engine.req[rows], host[2] > 0
        log.append((req, host[0].astype(np.int64), host[1]))
        count[req] += 1
        if stopper is not None:
            for r, tok in zip(req, host[0].astype(np.int64)):
                history[r].append(int(tok))
            hit = hit | np.array([not h and stopper.hit(history[r]) for r, h in zip(req, hit)], dtype=bool)
        done = hit | (count[req] == max_new_tokens)
        finished[req[done]] = hit[done]
        engine.free(rows[done])
        if progress is not None and done.any():
            progress(int(done.sum()))

    with torch.inference_mode(), _slot_attention_on(model):
        while queue or engine.active.size:
            free = np.flatnonzero(engine.req < 0)
            busy = engine.slots - free.size
            if queue and free.size and (free.size >= refill_min or not busy):
                newcomers = [queue.popleft() for _ in range(min(free.size, len(queue)))]
                for rows, idx in _chunks(free, newcomers, prompts):
                    emit(rows, engine.prefill(rows, idx, [prompts[i] for i in idx]))
            elif not queue and 0 < busy <= engine.slots // 2:
                engine.compact()
            rows = engine.active
            if rows.size:
                emit(rows, engine.decode(rows))
    req, ids, logp = (np.concatenate(x) for x in zip(*log))
    order = np.argsort(req, kind="stable")  # by prompt, each in generation order
    cuts = np.cumsum(count)[:-1]
    out = [Completion(token_ids=t.tolist(), logprobs=lp.tolist(), finished=bool(f))
           for t, lp, f in zip(np.split(ids[order], cuts), np.split(logp[order], cuts), finished)]
    for c in out if stopper is not None else ():
        k = stopper.keep(c.token_ids)
        c.token_ids, c.logprobs = c.token_ids[:k], c.logprobs[:k]
    return out


def _chunks(rows: np.ndarray, idx: list[int], prompts: list[list[int]]):
    """Split newcomers (length-sorted) into prefill forwards of at most _PREFILL_TOKENS padded
    tokens each; yields (slot rows, prompt indices)."""
    start = 0
    for end in range(1, len(idx) + 1):
        if end == len(idx) or (end + 1 - start) * len(prompts[idx[end]]) > _PREFILL_TOKENS:
            yield rows[start:end], idx[start:end]
            start = end


class _SlotCache:
    """Per-layer K/V buffers (slots, kv_heads, max_len, head_dim), allocated on first write.

    Duck-types the `update` of transformers' Cache: in prefill (`cols` None) the chunk's keys
    (n, kv_heads, W, head_dim) go to columns [0, W) of slots `rows` and come straight back;
    in decode each slot's one new key goes to its column `cols[s]`, and the first `width`
    columns of every slot come back.
    """

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None
        self.width = max_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.k:
            shape = (self.slots, key.shape[1], self.max_len, key.shape[3])
            self.k[layer_idx] = key.new_zeros(shape)
            self.v[layer_idx] = value.new_zeros(shape)
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.cols is None:
            width = key.shape[2]
            k[:, :, :width].index_copy_(0, self.rows, key)
            v[:, :, :width].index_copy_(0, self.rows, value)
            return key, value
        at = self.cols.view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])  # (S, Hkv, 1, D)
        k.scatter_(2, at, key)
        v.scatter_(2, at, value)
        return k[:, :, : self.width], v[:, :, : self.width]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the slots `keep` (in that order)."""
        for d in (self.k, self.v):
            for i in d:
                d[i] = d[i].index_select(0, keep)
        self.slots = keep.numel()


class _Engine:
    """Slot bookkeeping (host) around the cache and the model's prefill / decode forwards."""

    def __init__(self, model: torch.nn.Module, *, slots: int, max_len: int, pad_id: int, graphs: bool):
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
        self.model, self.pad_id, self.graphs = model, pad_id, graphs
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name warns until 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = model.get_input_embeddings().weight.device
        self.slots, self.cache = slots, _SlotCache(slots, max_len)
        self.req = np.full(slots, -1)  # prompt index per slot, -1 = free
        self.start = np.zeros(slots, dtype=np.int64)  # first real column per slot
        self.col = np.zeros(slots, dtype=np.int64)  # column of the next token fed per slot
        self.ids = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)  # (S,) next fed
        self.graph: _GraphStep | None = None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    @property
    def active(self) -> np.ndarray:
        return np.flatnonzero(self.req >= 0)

    def free(self, rows: np.ndarray) -> None:
        self.req[rows], self.start[rows], self.col[rows] = -1, 0, 0

    def _masks(self, allowed: torch.Tensor, key_j: torch.Tensor, query_j: torch.Tensor):
        """4-D masks per layer type from `allowed` (n, q, L) and key/query columns broadcastable
        to it: a sliding window w keeps keys with key_j > query_j - w (as transformers does)."""
        masks = {
            t: (allowed if w is None else allowed & (key_j > query_j - w))[:, None]
            for t, w in self.windows.items()
        }
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, masks) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=masks, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: self.cache})
        return out.logits[:, -1].float()  # (n, V)

    def prefill(self, rows: np.ndarray, idx: list[int], seqs: list[list[int]]) -> torch.Tensor:
        """Prefill prompts `seqs` (indices `idx`) into free slots `rows`; return their next-token
        logits (n, V)."""
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (n, W) left-padded
        for r, p in enumerate(seqs):
            ids[r, width - len(p) :] = torch.tensor(p)
        lead = np.array([width - len(p) for p in seqs])  # (n,) left padding
        start = torch.from_numpy(lead).to(self.device)  # (n,)
        j = torch.arange(width, device=self.device)  # (W,)
        pos = (j[None] - start[:, None]).clamp_min(0)  # (n, W)
        # causal over real keys; pad queries see only themselves (an all-masked row is NaN in
        # some SDPA backends, and NaN values would leak through zero attention weights)
        allowed = (j[None, :] <= j[:, None]) & ((j[None, None, :] >= start[:, None, None]) | torch.eye(
            width, dtype=torch.bool, device=self.device))  # (n, W, W)
        self.cache.rows, self.cache.cols = torch.from_numpy(rows).to(self.device), None
        logits = self._forward(ids.to(self.device), pos, self._masks(allowed, j[None, None, :], j[None, :, None]))
        self.req[rows], self.start[rows], self.col[rows] = idx, lead, width
        return logits

    def _step(self, ids: torch.Tensor, start: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """One decode forward of all slots: ids, start, col (S,) -> logits (S, V)."""
        self.cache.cols = col
        j = torch.arange(self.cache.width, device=self.device)[None]  # (1, L)
        allowed = ((j >= start[:, None]) & (j <= col[:, None]))[:, None]  # (S, 1, L)
        return self._forward(ids[:, None], (col - start)[:, None], self._masks(allowed, j[:, None], col[:, None, None]))

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """Feed every slot its next token; return the logits (len(rows), V) of slots `rows`."""
        start_col = torch.from_numpy(np.stack([self.start, self.col])).to(self.device)  # (2, S)
        if self.graphs and self.graph is None:  # graphs attend over all max_len columns (cache.width)
            try:
                self.graph = _GraphStep(self._step, (self.ids, start_col[0], start_col[1]), self.pool)
            except RuntimeError as e:
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=3)
                self.graphs = False
        if self.graph is not None:
            logits = self.graph(self.ids, start_col[0], start_col[1])
        else:
            self.cache.width = int(self.col.max()) + 1
            logits = self._step(self.ids, start_col[0], start_col[1])
        self.col[rows] += 1
        return logits[torch.from_numpy(rows).to(self.device)] if rows.size < self.slots else logits

    def compact(self) -> None:
        """Drop the free slots (the queue is empty): later steps decode a smaller batch."""
        keep = self.active
        at = torch.from_numpy(keep).to(self.device)
        self.cache.select(at)
        self.ids = self.ids[at]
        self.req, self.start, self.col = self.req[keep], self.start[keep], self.col[keep]
        self.slots, self.graph = keep.size, None


class _GraphStep:
    """`step` captured in a CUDA graph; calls copy their tensors into its static inputs and replay.

    The step must be idempotent for the inputs it is captured with (the warm-up run executes it).
    """

    def __init__(self, step: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], pool):
        self.args = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(*self.args)  # lazy initialisation (cuBLAS handles, workspaces) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = step(*self.args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(self.args, args):
            dst.copy_(src)
        self.graph.replay()
        return self.out


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
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the next token per row from fp32 logits (A, V); return ids (A,) and their logprobs
    (A,) under softmax(logits / T) (T = 1 when greedy), before any truncation.

    Device-only and fixed-shape (no host sync, no data-dependent sizes), so it can run inside a
    captured CUDA graph; the draw depends only on `generator`'s state.
    """
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)  # (A, V)
        ids = logp.argmax(dim=-1)
        return ids, logp.gather(1, ids[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (A, V) fp32
    probs = logp.exp()
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (A, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)  # (A, V)
        # drop a token when the mass strictly before it already reaches top_p (the first stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p * sorted_p.sum(-1, keepdim=True)
        probs = probs.scatter(1, sorted_i, sorted_p.masked_fill(drop, 0.0))
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p (Gumbel-max), with
    # no cumulative sum whose rounding over 262k terms would need float64. E = -log U from
    # torch.rand: exponential_() is ~7x slower on CPU. U < 1 keeps E > 0, and truncated tokens
    # (p = 0) score 0, never NaN.
    race = probs / torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()  # (A, V)
    ids = race.argmax(dim=-1)  # (A,)
    return ids, logp.gather(1, ids[:, None]).squeeze(1)
