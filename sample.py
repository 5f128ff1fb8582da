"""Generate text from a checkpoint: ours (out/best, out/latest) or any Hugging Face Llama folder.

    python sample.py --prompt "Once upon a time"
    python sample.py --ckpt path/to/Portimbria-150M --prompt "def fib(n):" --temperature 0
    python sample.py --prompt_file prompts.txt --num_samples 3 --max_new_tokens 100

The continuation streams to stdout; diagnostics go to stderr. Defaults are the seed card's:
temperature 0.8, top-p 0.9, repetition penalty 1.1 (Hugging Face semantics). --temperature 0 is
greedy decoding, which gives HF `generate(do_sample=False, repetition_penalty=...)`'s tokens.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from config import SampleConfig, parse_config
from model import Llama


def warn(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Logits processing, in HF's order: repetition penalty, then temperature, top-k, top-p.


def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty as HF applies it: a seen token's logit is divided by the penalty if
    positive, multiplied if negative. seen (B, V) bool marks every token of the context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def process_logits(logits, seen, temperature: float, top_k: int, top_p: float, penalty: float):
    """logits (B, V) float32 -> the logits sampling draws from (filtered ones at -inf)."""
    logits = apply_repetition_penalty(logits, seen, penalty)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # HF: drop the tokens whose cumulative probability (ascending) is <= 1 - top_p,
        # always keeping the most likely one.
        sorted_logits, order = torch.sort(logits, descending=False)
        # Row by row: torch.compile (inductor, torch 2.11 on CUDA) fails to generate the
        # cumsum of a (B>1, 32768) tensor, and the decode step is compiled whole.
        cum = torch.cat([row.softmax(-1).cumsum(-1) for row in sorted_logits.split(1)])
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def draw(probs):
    """A draw from each row of probs (..., V), by the exponential-race trick (argmax of p / Exp(1)
    noise is a draw from p): no host sync, and it can live inside a CUDA graph."""
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def choose(logits, seen, temperature: float, top_k: int, top_p: float, penalty: float):
    """logits (B, V) float32 -> next ids (B,); temperature 0 is greedy."""
    if temperature <= 0:
        return apply_repetition_penalty(logits, seen, penalty).argmax(-1)
    return draw(process_logits(logits, seen, temperature, top_k, top_p, penalty).softmax(-1))


def cache_length(model: Llama, prompt_len: int, max_new: int) -> int:
    """KV cache positions for a prompt and its new tokens, rounded up to a multiple of 512: the
    compiled decode step is specialised to the cache's shape, so prompts of similar length share
    one graph (unrounded, every prompt length compiled anew or fell back to a dynamic-shape graph
    that ran 10x slower on the CPU)."""
    context = model.config.max_position_embeddings
    if prompt_len + max_new > context:
        raise ValueError(f"prompt {prompt_len} + {max_new} new tokens exceed the {context}-token context")
    return min(context, -(-(prompt_len + max_new) // 512) * 512)


class DecodeLinear(nn.Linear):
    """nn.Linear for compiled decoding. At one token x @ W.T is a matrix-vector product, bound by
    reading W once; written as multiply-and-sum, inductor compiles it to one loop that streams W,
    faster than the BLAS GEMV it replaces on the GPU and the CPU (README, Benchmarks). Inductor's
    own rewrite (coordinate_descent_tuning) is GPU-only."""

    def forward(self, x):
        if x.shape[-2] == 1 and self.bias is None and torch.compiler.is_compiling():
            return (x.unsqueeze(-2) * self.weight).sum(-1)  # (B, 1, 1, in) * (out, in) -> (B, 1, out)
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module):
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear  # same weights, the decode-time forward


class Generator:
    """Batched decoding with the model's static KV cache. A decode step (model, repetition
    penalty, sampling, bookkeeping) has fixed shapes and runs all on the device, so with
    compile=True it is one CUDA graph replay on a GPU (one compiled C++ call on the CPU). The host
    reads tokens back every `sync_every` tokens, to stream them and to stop at EOS."""

    def __init__(self, model: Llama, compile: bool = False):
        self.model, self.compiled = model, compile
        self.cuda_graphs = compile and model.lm_head.weight.is_cuda
        self.decode = self._decode
        if compile:
            use_decode_linears(model)
            self.decode = torch.compile(self._decode, fullgraph=True, dynamic=False,
                                        mode="reduce-overhead" if self.cuda_graphs else None)

    def _decode(self, tok, pos, seen, temperature: float, top_k: int, top_p: float, penalty: float):
        # tok (B, 1), pos 0-d tensor, seen (B, V) bool -> next tok (B, 1), pos, seen
        logits = self.model(tok, start_pos=pos)[:, -1].float()
        tok = choose(logits, seen, temperature, top_k, top_p, penalty)[:, None]
        return tok, pos + 1, seen.scatter(1, tok, True)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], cfg: SampleConfig, eos_id: int, on_token=None,
                 sync_every: int | None = None) -> list[list[int]]:
        """cfg.num_samples continuations of prompt_ids, each up to cfg.max_new_tokens and without
        the final eos_id; on_token(tokens so far, per sample) after each read-back."""
        m, dev = self.model, self.model.lm_head.weight.device
        B, P, max_new = cfg.num_samples, len(prompt_ids), cfg.max_new_tokens
        # Each read-back drains the GPU's queue: every 32 tokens, not every 8 (README, Benchmarks).
        sync_every = sync_every or (32 if dev.type == "cuda" else 1)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        m.setup_cache(B, cache_length(m, P, max_new))
        ids = torch.tensor([prompt_ids] * B, device=dev)
        seen = torch.zeros(B, m.config.vocab_size, dtype=torch.bool, device=dev)
        seen[:, ids[0]] = True
        settings = (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
        logits = m(ids, start_pos=0)[:, -1].float()  # prefill the prompt in one pass
        tok = choose(logits, seen, *settings)[:, None]
        seen = seen.scatter(1, tok, True)
        pos = torch.tensor(P, device=dev)
        out, done, pending, made = [[] for _ in range(B)], [False] * B, [tok], 1
        while True:
            if len(pending) >= sync_every or made >= max_new:
                for b, row in enumerate(torch.cat(pending, 1).tolist()):
                    for x in row:
                        if not done[b] and len(out[b]) < max_new:
                            out[b].append(x)
                            done[b] = x == eos_id
                pending = []
                if on_token:
                    on_token(out)
                if all(done) or made >= max_new:
                    break
            tok, pos, seen = self.decode(tok, pos, seen, *settings)
            if self.cuda_graphs:  # CUDA-graph outputs are overwritten by the next replay: keep copies
                tok, pos, seen = tok.clone(), pos.clone(), seen.clone()
            pending.append(tok)
            made += 1
        m.clear_cache()
        return [o[:-1] if o and o[-1] == eos_id else o for o in out]


# ---------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
# K tokens one at a time, the target scores all of them in one forward pass, and an accept/reject
# rule keeps a prefix of them plus one token of its own, so the output is distributed exactly as
# the target's (token for token the target's at temperature 0).


class SpeculativeGenerator:
    """Decoding with a draft model, one sequence at a time. Both models keep their static KV
    caches; a rejected draft token's cache entries are not removed: they sit at positions past
    the accepted ones, which the position mask hides and the next round overwrites."""

    def __init__(self, target: Llama, draft: Llama, draft_tokens: int = 4, compile: bool = False):
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} ids) is not the "
                             f"target's ({target.config.vocab_size}); a draft must share its tokenizer")
        self.target, self.draft, self.k = target, draft, draft_tokens
        self.compiled, self.cuda_graphs = compile, compile and target.lm_head.weight.is_cuda
        self.calls = {}
        for name, m in (("target", target), ("draft", draft)):
            self.calls[name] = m
            if compile:
                use_decode_linears(m)
                self.calls[name + "-compiled"] = torch.compile(
                    m, fullgraph=True, dynamic=False, mode="reduce-overhead" if self.cuda_graphs else None)
        self.reset_stats()

    def reset_stats(self):
        self.stats = dict(rounds=0, proposed=0, accepted=0, tokens=0)

    def _logits(self, name: str, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """(n, V) float32 logits of tokens (1, n) fed at positions pos.. . Two shapes run compiled,
        a draft step (one token) and a verification (k + 1 tokens); the rest (the prompt, the last
        shorter rounds) eagerly, so each model compiles one graph."""
        n = tokens.shape[1]
        steady = n == 1 if name == "draft" else n == self.k + 1
        compiled = self.calls.get(name + "-compiled") if steady else None
        start = torch.tensor(pos, device=tokens.device)
        logits = (compiled if compiled is not None else self.calls[name])(tokens, start_pos=start)[0].float()
        return logits.clone() if compiled is not None and self.cuda_graphs else logits

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], cfg: SampleConfig, eos_id: int, on_token=None) -> list[list[int]]:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        return [self._one(prompt_ids, cfg, eos_id, on_token if b == 0 else None)
                for b in range(cfg.num_samples)]

    def _one(self, prompt_ids, cfg: SampleConfig, eos_id: int, on_token) -> list[int]:
        T, D = self.target, self.draft
        dev, V = T.lm_head.weight.device, T.config.vocab_size
        P, max_new = len(prompt_ids), cfg.max_new_tokens
        for m in (T, D):
            length = cache_length(m, P, max_new)
            cache = m.model.layers[0].self_attn.kv_cache
            if cache is None or cache.k.shape[2] < length:
                # Kept from prompt to prompt: new cache tensors would make the compiled graphs
                # (and their CUDA graphs) recompile.
                m.setup_cache(1, length)
        settings = (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
        ids = list(prompt_ids)
        seen = torch.zeros(1, V, dtype=torch.bool, device=dev)
        seen[0, torch.tensor(ids, device=dev)] = True
        target_done = draft_done = 0  # leading tokens of ids whose keys/values each cache holds
        out = []
        while len(out) < max_new and (not out or out[-1] != eos_id):
            k = min(self.k, max_new - len(out) - 1)
            drafted, q = [], []
            if k:  # the draft catches up on the tokens it has not seen, then proposes k, one at a time
                behind = ids[draft_done:]
                if len(behind) > 2:  # the prompt: one pass
                    logits = self._logits("draft", torch.tensor([behind], device=dev), draft_done)[-1:]
                else:  # the last round's one or two tokens: the compiled one-token step
                    for i, t in enumerate(behind):
                        logits = self._logits("draft", torch.tensor([[t]], device=dev), draft_done + i)
                draft_seen = seen.clone()
                for i in range(k):
                    if cfg.temperature > 0:
                        q.append(process_logits(logits, draft_seen, *settings).softmax(-1))
                        tok = draw(q[-1])
                    else:
                        tok = apply_repetition_penalty(logits, draft_seen, cfg.repetition_penalty).argmax(-1)
                    drafted.append(tok)
                    draft_seen = draft_seen.scatter(1, tok[:, None], True)
                    if i < k - 1:
                        logits = self._logits("draft", tok[:, None], len(ids) + i)
            d = torch.cat(drafted) if k else torch.zeros(0, dtype=torch.long, device=dev)
            # The target scores the last token and the k proposals in one pass: rows 0..k.
            feed = torch.cat([torch.tensor(ids[target_done:], device=dev), d])[None]
            p_logits = self._logits("target", feed, target_done)[-(k + 1):]
            # Row i's penalty sees the context and the proposals before it.
            row_seen = seen.repeat(k + 1, 1)
            for i in range(k):
                row_seen[i + 1:, d[i]] = True
            j, new = accept(p_logits, row_seen, d, q, settings)
            j, new, *d = torch.cat([j[None], new[None], d]).tolist()  # the round's one host read
            accepted = d[:j] + [new]
            self.stats["rounds"] += 1
            self.stats["proposed"] += k
            self.stats["accepted"] += j
            target_done = len(ids) + j
            if k:
                draft_done = len(ids) + min(j, k - 1)
            ids += accepted
            seen[0, torch.tensor(accepted, device=dev)] = True
            out += accepted
            if eos_id in out:
                out = out[:out.index(eos_id) + 1]
            out = out[:max_new]
            if on_token:
                on_token([out])
        self.stats["tokens"] += len(out)
        return out[:-1] if out and out[-1] == eos_id else out


def accept(p_logits, row_seen, d, q, settings):
    """How many of the k proposals d the target keeps (j), and its own next token.

    p_logits (k+1, V): the target's logits at the k proposals and one past them; q: the draft's
    k processed distributions (None at temperature 0). Greedy: keep proposals while they are the
    target's choice. Sampling: keep d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection draw from max(0, p_i - q_i) renormalised, after k acceptances from p_{k+1}: the
    result is distributed as the target alone would sample (Leviathan et al. 2023, Theorem 1)."""
    temperature, top_k, top_p, penalty = settings
    k = d.shape[0]
    if temperature <= 0:
        best = apply_repetition_penalty(p_logits, row_seen, penalty).argmax(-1)  # (k+1,)
        agree = torch.cat([best[:k] == d, torch.zeros(1, dtype=torch.bool, device=d.device)])
        j = agree.int().cumprod(0).sum()
        return j, best[j]
    p = process_logits(p_logits, row_seen, temperature, top_k, top_p, penalty).softmax(-1)  # (k+1, V)
    if k:
        q = torch.cat(q)  # (k, V)
        rows = torch.arange(k, device=d.device)
        ratio = p[rows, d] / q[rows, d]
        keep = torch.rand(k, device=d.device) < ratio
        j = torch.cat([keep, torch.zeros(1, dtype=torch.bool, device=d.device)]).int().cumprod(0).sum()
        residual = torch.cat([(p[:k] - q).clamp(min=0), p[k:]])  # row j is where the new token comes from
    else:
        j, residual = torch.zeros((), dtype=torch.long, device=d.device), p
    row = residual[j]
    return j, draw(row / row.sum())


def fit_prompt(ids: list[int], ctx: int, max_new: int) -> tuple[list[int], int]:
    """Keep the last tokens of a prompt too long for the context (warn), and cap max_new."""
    max_new = min(max_new, ctx - 1)
    room = ctx - max_new
    if len(ids) > room:
        warn(f"warning: the prompt has {len(ids)} tokens; with --max_new_tokens {max_new} only the "
             f"last {room} fit the {ctx}-token context, the rest is dropped")
        ids = ids[-room:]
    return ids, max_new


def read_prompts(cfg: SampleConfig) -> list[str]:
    if not cfg.prompt_file:
        return [cfg.prompt]
    try:
        with open(cfg.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"sample.py: --prompt_file {cfg.prompt_file}: {e} (expected UTF-8 text, "
                         f"one prompt per line)") from None
    if not prompts:
        raise SystemExit(f"sample.py: --prompt_file {cfg.prompt_file} has no non-empty line")
    return prompts


def main(argv=None):
    cfg = parse_config(argv, __doc__, SampleConfig())
    prompts = read_prompts(cfg)
    try:
        model, tok, path = checkpoint.load_for_inference(cfg.ckpt, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    dev = model.lm_head.weight
    warn(f"loaded {path} ({model.num_params():,} parameters) on {dev.device} in {str(dev.dtype)[6:]}")
    if cfg.draft:
        draft = load_draft(cfg, model, tok)
        gen = SpeculativeGenerator(model, draft, cfg.draft_tokens, compile=cfg.compile)
    else:
        gen = Generator(model, compile=cfg.compile)
    eos = model.config.eos_token_id
    for n, prompt in enumerate(prompts):
        ids, max_new = fit_prompt([model.config.bos_token_id] + tok.encode(prompt, add_special_tokens=False).ids,
                                  model.config.max_position_embeddings, cfg.max_new_tokens)
        run = dataclasses.replace(cfg, max_new_tokens=max_new)
        # The new text is the decoded whole sequence minus the decoded prompt: decoding the new
        # tokens alone would drop the space that starts them ("ROMEO:" + "▁and" -> "ROMEO:and").
        prompt_text = tok.decode(ids)

        def continuation(new_ids):
            return tok.decode(ids + new_ids)[len(prompt_text):]

        shown = 0

        def on_token(out):
            nonlocal shown
            text = continuation(out[0][:-1] if out[0][-1:] == [eos] else out[0])
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)

        stream = cfg.num_samples == 1
        t0 = time.time()
        if stream:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        outs = gen.generate(ids, run, eos, on_token if stream else None)
        dt = time.time() - t0
        if stream:
            sys.stdout.write(continuation(outs[0])[shown:] + "\n")
        else:
            for i, o in enumerate(outs):
                print(f"--- sample {i + 1}\n{prompt}{continuation(o)}")
        count = sum(len(o) for o in outs)
        warn(f"[{count} tokens in {dt:.2f}s, {count / max(dt, 1e-9):.1f} tokens/s"
             + (", including the one-time compilation]" if gen.compiled and n == 0 else "]"))
    if cfg.draft:
        st = gen.stats
        warn(f"[draft: {st['accepted']:,} of {st['proposed']:,} proposed tokens accepted "
             f"({st['accepted'] / max(st['proposed'], 1):.1%}); {st['tokens'] / max(st['rounds'], 1):.2f} "
             f"tokens per target forward over {st['rounds']:,} forwards]")


def load_draft(cfg: SampleConfig, target: Llama, tok) -> Llama:
    """The draft model, refused unless it shares the target's vocabulary and tokenizer."""
    try:
        draft, draft_tok, path = checkpoint.load_for_inference(cfg.draft, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: --draft: {e}") from None
    if draft.config.vocab_size != target.config.vocab_size or draft_tok.get_vocab() != tok.get_vocab():
        raise SystemExit(f"sample.py: --draft {path}: its vocabulary ({draft.config.vocab_size} ids, "
                         f"{draft_tok.get_vocab_size()} in its tokenizer) is not the target's "
                         f"({target.config.vocab_size}, {tok.get_vocab_size()}); a draft must use the "
                         f"target's tokenizer")
    warn(f"draft {path} ({draft.num_params():,} parameters), {cfg.draft_tokens} tokens per round")
    return draft


if __name__ == "__main__":
    main()
