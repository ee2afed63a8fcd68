"""Rollouts for GRPO: a batched KV-cache sampler returning completions and their per-token log-probs.

Each prompt is prefilled once and its cache copied to its `num_samples` rows; all rows then decode
together out of one static, preallocated cache, sampling on the device and checking "all finished?"
only every `sync_every` steps. On CUDA the one-token decode step is replayed as a CUDA graph.

Layout: prompts are LEFT-padded to a common length Tp. Every row then writes its next token to the
same cache slot (one index for the whole batch, which keeps the CUDA graph static), each row counts
its positions from its first real token (position = slot - pad[row]), and a key mask hides the pads.
The trainer sees none of this: it gets token lists back and re-scores them right-padded.
"""

import contextlib
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .model import CausalLM, KVCache


@dataclass
class Rollouts:
    """R = len(prompts) * num_samples rows; the rows of one prompt are adjacent."""
    completions: list[list[int]]  # [R] sampled ids, each ending at its first EOS (included)
    logprobs: list[list[float]]   # [R] python floats aligned with completions: log softmax(logits / T)
                                  #     at the sampled token, before top-k/top-p (raw logits when greedy)
    truncated: list[bool]         # [R] hit max_new_tokens without an EOS
    prompt_index: list[int]       # [R] which prompt each row continues
    steps: int = 0                # decode steps run (the loop stops early once every row has ended)
    compactions: int = 0          # times finished rows were dropped from the batch
    captures: int = 0             # CUDA graphs captured by this call (0 when a pool had them)
    prefill_seconds: float = 0.0
    seconds: float = 0.0          # total wall time

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.completions))


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, draw=None):
    """logits: [R, V] float32 -> (tokens [R], logprobs [R]). logprobs come from the plain
    temperature-scaled distribution (what the trainer recomputes), whatever top-k/top-p keep.
    draw: (total, rows [R]): draw `total` uniforms and use those of `rows` (the batch's rows among the
    whole step's, so that a rank samples what one process would); None: one per row."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    probs = logp.exp()
    if top_k > 0:
        kth = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > top_p * cum[:, -1:]  # mass ranked above it already exceeds p; the top token always stays
        probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
    # Inverse CDF with one uniform per row, all on the device (no host sync), and cheap on CPU too:
    # the argmax(p / E), E ~ Exp(1) race needs V random numbers per row, ~5 ms a step on 2 cores.
    # The float64 cumsum keeps rounding from moving probability between neighbouring tokens.
    cdf = probs.double().cumsum(-1)                                                    # [R, V]
    if draw is None:
        u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    else:
        u = torch.rand(draw[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)[draw[1]]
    u = u * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)  # first i with cdf_i > u
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def current(device: torch.device):
    """`device` as the current CUDA device (streams and graphs belong to the current device, which with
    --device cuda:1 is not the tensors' own); a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class DecodeStep:
    """One decode step for every row: previous tokens [R] -> next-token logits [R, V] float32.
    Writes the tokens' keys/values at cache slot `slot` (a 1-element device tensor that the caller
    advances in place) and attends to slots pad[row]..slot."""
    BUCKET = 256  # graph mode: one graph per this many attended slots

    def __init__(self, model: CausalLM, cache: KVCache, pad, slot, max_len: int, cuda_graph: bool):
        self.model, self.cache, self.pad, self.slot, self.max_len = model, cache, pad, slot, max_len
        self.padded = bool((pad > 0).any())
        self.graphs = {} if cuda_graph else None  # attended length -> (graph, static tokens, static logits)
        self.captures = 0

    def run(self, tok, length: int, static: bool):
        """static=True: shapes and the mask depend only on `length` (graph-capturable); else the mask
        is skipped when no row is padded."""
        R = tok.shape[0]
        mask = None
        if static or self.padded:
            keys = torch.arange(length, device=tok.device)
            mask = keys >= self.pad[:, None]
            if static:  # the bucket reaches past the current slot: hide the not-yet-written entries
                mask = mask & (keys <= self.slot)
            mask = mask.view(R, 1, 1, length)
        pos = (self.slot - self.pad)[:, None]
        logits = self.model(tok[:, None], positions=pos, cache=self.cache, slots=self.slot, mask=mask, length=length)
        return logits[:, -1]  # float32: the head's output

    def __call__(self, tok, slot: int):
        if self.graphs is None:
            return self.run(tok, slot + 1, static=False)
        # One graph per bucket of attended length, so short sequences don't read the whole cache.
        length = min(self.max_len, (slot // self.BUCKET + 1) * self.BUCKET)
        if length not in self.graphs:
            try:
                self.graphs[length] = self.capture(tok, length)
                self.captures += 1
            except Exception as e:  # never lose a rollout to a capture problem
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                self.graphs = None
                return self.run(tok, slot + 1, static=False)
        graph, static_tok, out = self.graphs[length]
        static_tok.copy_(tok)
        with current(tok.device):
            graph.replay()
        return out

    def capture(self, tok, length):
        # The model's device becomes the current one: streams and graphs belong to the current device,
        # and with --device cuda:1 that is not the device the tensors live on.
        with current(tok.device):
            static_tok = tok.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, cuBLAS/SDPA kernel choice);
                self.run(static_tok, length, static=True)  # it writes this step's k/v, which the replay rewrites
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.run(static_tok, length, static=True)
        return graph, static_tok, out

    def reset(self, pre: KVCache, pad, first_slot: int) -> None:
        """Reuse for a new batch of the same shape: the prompts' cache in front, the new pads, the slot.
        Everything a captured graph reads stays at the same address; entries past the prompt are zeroed
        (a masked key still multiplies its value by a zero weight, and 0 * NaN = NaN)."""
        G = self.cache.k.shape[1] // pre.k.shape[1]
        Tp = pre.k.shape[3]
        self.cache.k[:, :, :, :Tp] = pre.k.repeat_interleave(G, dim=1)
        self.cache.v[:, :, :, :Tp] = pre.v.repeat_interleave(G, dim=1)
        self.cache.k[:, :, :, Tp:].zero_()
        self.cache.v[:, :, :, Tp:].zero_()
        self.pad.copy_(pad)
        self.padded = bool((pad > 0).any())
        self.slot.fill_(first_slot)


class DecoderPool:
    """CUDA-graph decode steps kept across `generate` calls, keyed by (model, rows, cache length).

    Capturing a graph syncs the device, runs the garbage collector and empties the allocator cache;
    done on every call it cost 2-4 captures per training step. With a pool each (rows, cache
    length) is captured once and replayed by every later step and evaluation chunk. The cache length
    is rounded up to DecodeStep.BUCKET so prompts of nearby lengths share an entry. Each entry holds
    its KV cache (~3 GB for 80 rows x 1.3k tokens at 1.5B): at most `max_entries` are kept (least
    recently used dropped first)."""

    def __init__(self, max_entries: int = 2):
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, DecodeStep] = OrderedDict()

    def get(self, model: CausalLM, rows: int, max_len: int, device, dtype) -> DecodeStep:
        key = (id(model), rows, max_len, dtype)
        step = self.entries.pop(key, None)
        if step is None or step.model is not model:
            cache = KVCache.empty(model.cfg, rows, max_len, device, dtype)
            pad = torch.zeros(rows, dtype=torch.long, device=device)
            slot = torch.zeros(1, dtype=torch.long, device=device)
            step = DecodeStep(model, cache, pad, slot, max_len, cuda_graph=True)
        self.entries[key] = step
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return step

    @property
    def captures(self) -> int:
        return sum(s.captures for s in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()


@torch.inference_mode()
def generate(model: CausalLM, prompts: list[list[int]], *, max_new_tokens: int, num_samples=1, temperature=1.0,
             top_p=1.0, top_k=0, eos_token_id=None, seed=None, sync_every=16, use_cuda_graph=None,
             pool: DecoderPool | None = None, row_offset: int = 0, total_rows: int | None = None) -> Rollouts:
    """Sample `num_samples` completions of up to max_new_tokens for each prompt (lists of token ids).

    temperature=0 is greedy (top_k/top_p then don't matter). eos_token_id: None, an int or a list.
    seed: a fixed seed reproduces the samples (None draws one from torch's global RNG).
    use_cuda_graph: default on for CUDA; if capture fails it warns and decodes eagerly.
    pool: graph mode keeps its decode steps (graphs, KV cache) there for the next call; without
    one, each call captures its own graphs.
    In eager mode, finished rows are dropped from the batch once at least half have finished
    (checked every `sync_every` steps); the loop stops as soon as every row has ended.
    row_offset, total_rows: these rows are rows row_offset.. of a batch of total_rows split across
    processes (distributed.py); each step draws the whole batch's random numbers and uses its own, so
    the samples do not depend on how the batch was split.
    """
    t0 = time.perf_counter()
    if not prompts:
        return Rollouts([], [], [], [])
    if max_new_tokens < 1 or min(map(len, prompts)) < 1:
        raise ValueError("generate needs max_new_tokens >= 1 and at least one token in every prompt")
    dev, dtype = next(model.parameters()).device, model.compute_dtype  # bf16 under autocast: so is the cache
    P, G = len(prompts), num_samples
    R, Tp = P * G, max(map(len, prompts))
    S = Tp + max_new_tokens
    eos = eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [] if eos_token_id is None else [eos_token_id]
    eos = torch.tensor(sorted({int(e) for e in eos}), dtype=torch.long, device=dev)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen = torch.Generator(device=dev).manual_seed(seed)
    use_cuda_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph

    # prefill: each distinct prompt once, left-padded
    pad = torch.tensor([Tp - len(x) for x in prompts], device=dev)                       # [P]
    ids = torch.tensor([[0] * (Tp - len(x)) + list(x) for x in prompts], device=dev)     # [P, Tp]
    slots = torch.arange(Tp, device=dev)
    mask = None  # prompts all as long: plain causal attention, for which SDPA has its fastest kernels
    if any(len(x) < Tp for x in prompts):
        mask = (slots[:, None] >= slots[None, :]) & (slots[None, None, :] >= pad[:, None, None])  # [P, Tp, Tp]
        mask |= torch.eye(Tp, dtype=torch.bool, device=dev)  # pad queries see themselves: an all-masked row is NaN
        mask = mask[:, None]
    pre = KVCache.empty(model.cfg, P, Tp, dev, dtype)
    logits = model(ids, positions=(slots - pad[:, None]).clamp(min=0), cache=pre, slots=slots, mask=mask,
                   length=Tp, last_only=True)[:, -1]                                        # [P, V] float32
    # copy each prompt's cache to its G rows
    pad = pad.repeat_interleave(G)
    slot = torch.full((1,), Tp, device=dev)  # cache index the next token goes to
    if use_cuda_graph and pool is not None:
        S = -(-S // DecodeStep.BUCKET) * DecodeStep.BUCKET
        step_fn = pool.get(model, R, S, dev, dtype)
        step_fn.reset(pre, pad, Tp)
        cache, pad, slot = step_fn.cache, step_fn.pad, step_fn.slot
    else:
        cache = KVCache.empty(model.cfg, R, S, dev, dtype)
        cache.k[:, :, :, :Tp] = pre.k.repeat_interleave(G, dim=1)
        cache.v[:, :, :, :Tp] = pre.v.repeat_interleave(G, dim=1)
        step_fn = DecodeStep(model, cache, pad, slot, S, use_cuda_graph)
    del pre
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_prefill = time.perf_counter() - t0

    out_tok = torch.zeros(R, max_new_tokens, dtype=torch.long, device=dev)
    out_lp = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=dev)
    rows = torch.arange(R, device=dev)  # output row of each batch row (changes when compacting)
    draw = None if total_rows is None else (total_rows, row_offset + torch.arange(R, device=dev))
    tok, lp = sample_next(logits.repeat_interleave(G, dim=0), temperature, top_k, top_p, gen, draw)
    out_tok[:, 0], out_lp[:, 0] = tok, lp
    done = torch.isin(tok, eos)
    steps, compactions, captures_before = 1, 0, step_fn.captures
    for step in range(1, max_new_tokens):
        if step % sync_every == 0:  # the only host syncs of the loop
            live = int((~done).sum())
            if live == 0:
                break
            if not use_cuda_graph and live <= len(rows) // 2:
                # On CPU a step costs ~rows; on GPU it costs ~the weight read whatever the rows, so
                # the graph path keeps its static batch.
                keep = (~done).nonzero()[:, 0]
                cache, rows, tok, done = cache.select(keep), rows[keep], tok[keep], done[keep]
                step_fn = DecodeStep(model, cache, pad[keep], slot, S, False)
                pad, compactions = pad[keep], compactions + 1
        logits = step_fn(tok, Tp + step - 1)
        slot += 1
        tok, lp = sample_next(logits, temperature, top_k, top_p, gen,
                              None if total_rows is None else (total_rows, row_offset + rows))
        out_tok[rows, step], out_lp[rows, step] = tok, lp
        done |= torch.isin(tok, eos)
        steps += 1

    # cut each row at its first EOS; rows without one are truncated
    out_tok, out_lp = out_tok[:, :steps].cpu(), out_lp[:, :steps].cpu()
    is_eos = torch.isin(out_tok, eos.cpu())
    ended = is_eos.any(1)
    length = torch.where(ended, is_eos.float().argmax(1) + 1, steps).tolist()
    toks, lps = out_tok.tolist(), out_lp.tolist()
    return Rollouts(
        completions=[t[:n] for t, n in zip(toks, length)], logprobs=[l[:n] for l, n in zip(lps, length)],
        truncated=(~ended).tolist(), prompt_index=[r // G for r in range(R)], steps=steps,
        compactions=compactions, captures=step_fn.captures - captures_before, prefill_seconds=t_prefill,
        seconds=time.perf_counter() - t0)
