"""Generate text from a checkpoint: ours (out/best, out/latest) or any Hugging Face Llama folder.

    python sample.py --prompt "Once upon a time"
    python sample.py --ckpt path/to/Portimbria-150M --prompt "def fib(n):" --temperature 0
    python sample.py --prompt_file prompts.txt --num_samples 3 --max_new_tokens 100

The continuation streams to stdout; diagnostics go to stderr. Defaults are the model card's:
temperature 0.8, top-p 0.9, repetition penalty 1.1 (Hugging Face semantics). --temperature 0 is
greedy decoding, which gives HF `generate(do_sample=False, repetition_penalty=...)`'s tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import NamedTuple

import torch

import checkpoint
import data
import kernels
from config import SampleConfig, note, parse_config
from model import Llama


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


def greedy(logits, seen, penalty: float):
    """Temperature 0: the most likely token after the repetition penalty, as HF's greedy search."""
    return apply_repetition_penalty(logits, seen, penalty).argmax(-1)


def next_token(logits, seen, temperature: float, top_k: int, top_p: float, penalty: float):
    """logits (B, V) float32 -> next ids (B,); temperature 0 is greedy."""
    if temperature <= 0:
        return greedy(logits, seen, penalty)
    return draw(process_logits(logits, seen, temperature, top_k, top_p, penalty).softmax(-1))


def prefill(model: Llama, ids):
    """The prompts ids (B, P) in one pass from position 0, filling the KV cache: the logits at the
    last position (B, V), float32."""
    return model(ids, start_pos=0)[:, -1].float()


def cache_length(model: Llama, prompt_len: int, max_new: int) -> int:
    """KV cache positions for a prompt and its new tokens, rounded up to a multiple of 512: the
    compiled decode step is specialised to the cache's shape, so prompts of similar length share
    one graph (unrounded, every prompt length compiled anew or fell back to a much slower
    dynamic-shape graph)."""
    context = model.config.max_position_embeddings
    if prompt_len + max_new > context:
        raise ValueError(f"prompt {prompt_len} + {max_new} new tokens exceed the {context}-token context")
    return min(context, -(-(prompt_len + max_new) // 512) * 512)


class Generator:
    """Batched decoding with the model's static KV cache. A decode step (model, repetition
    penalty, sampling, bookkeeping) has fixed shapes, runs all on the device and updates its state
    in place, so it can be compiled and replayed (kernels.compile_generator: on a GPU the steps
    between two host reads are one CUDA graph). The host reads the tokens back every `sync_every`
    steps, to stream them and to stop at EOS."""

    def __init__(self, model: Llama, sync_every: int = 1):
        self.model, self.sync_every = model, sync_every
        self.steps = self.run_steps
        self.compiled = False

    def step(self, tok, pos, seen, out, temperature: float, top_k: int, top_p: float, penalty: float):
        """One step, in place: tok (B, 1) the last token, at position pos (0-d), becomes the next;
        pos + 1; seen (B, V) bool marks it; out (B, cache length) gets it at its position."""
        logits = self.model(tok, start_pos=pos)[:, -1].float()
        nxt = next_token(logits, seen, temperature, top_k, top_p, penalty)[:, None]
        pos += 1
        tok.copy_(nxt)
        seen.scatter_(1, nxt, True)
        out.index_copy_(1, pos.view(1), nxt)

    def prefill(self, ids):
        return prefill(self.model, ids)

    def run_steps(self, n: int, *state_and_settings):
        for _ in range(n):
            self.step(*state_and_settings)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], cfg: SampleConfig, eos_id: int, on_token=None) -> list[list[int]]:
        """cfg.num_samples continuations of prompt_ids, each up to cfg.max_new_tokens and without
        the final eos_id; on_token(tokens so far, per sample) after each read-back."""
        m, dev = self.model, self.model.lm_head.weight.device
        B, P, max_new = cfg.num_samples, len(prompt_ids), cfg.max_new_tokens
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        length = cache_length(m, P, max_new)
        m.setup_cache(B, length, keep_larger=True)
        ids = torch.tensor([prompt_ids] * B, device=dev)
        seen = torch.zeros(B, m.config.vocab_size, dtype=torch.bool, device=dev)
        seen[:, ids[0]] = True
        settings = sampling_settings(cfg)
        logits = self.prefill(ids)
        tok = next_token(logits, seen, *settings)[:, None]
        seen.scatter_(1, tok, True)
        pos = torch.tensor(P, device=dev)
        out = torch.zeros(B, m.cache_len, dtype=torch.long, device=dev)  # tokens by position
        out[:, P] = tok[:, 0]
        made, read, texts, done = 1, 0, [[] for _ in range(B)], [False] * B
        while True:
            for b, row in enumerate(out[:, P + read:P + made].tolist()):
                for x in row:
                    if not done[b]:
                        texts[b].append(x)
                        done[b] = x == eos_id
            read = made
            if on_token:
                on_token(texts)
            if all(done) or made >= max_new:
                break
            n = min(self.sync_every, max_new - made)
            self.steps(n, tok, pos, seen, out, *settings)
            made += n
        return [t[:-1] if t and t[-1] == eos_id else t for t in texts]


class Sampling(NamedTuple):
    """The logits-processing settings, in the order next_token() and process_logits() take them."""
    temperature: float
    top_k: int
    top_p: float
    penalty: float


def sampling_settings(cfg: SampleConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)


# ---------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
# K tokens one at a time, the target scores all of them in one forward pass, and an accept/reject
# rule keeps a prefix of them plus one token of its own, so the output is distributed exactly as
# the target's (token for token the target's at temperature 0).


class SpeculativeGenerator:
    """Decoding with a draft model, one sequence at a time, in rounds that run all on the device:
    the draft proposes K tokens, the target scores them in one forward, accept() keeps a prefix
    of them and adds one token of the target's own. A round has fixed shapes and keeps its state
    in device tensors (the sequence by position, its length, the seen-token mask, counters), so
    rounds can be compiled and replayed with no host work (kernels.compile_speculative: on a GPU
    the rounds between two host reads are one CUDA graph); the host reads the sequence back every
    `sync_every` rounds, to stream it and to stop at EOS. Both models keep static KV caches; a
    rejected proposal's cache entries are not removed: they sit past the accepted positions,
    which attention's position bound hides and later rounds overwrite."""

    def __init__(self, target: Llama, draft: Llama, draft_tokens: int = 4, sync_every: int = 1):
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} ids) is not the "
                             f"target's ({target.config.vocab_size}); a draft must use the target's tokenizer")
        self.target, self.draft, self.k, self.sync_every = target, draft, draft_tokens, sync_every
        self.prefill = {"target": functools.partial(prefill, target), "draft": functools.partial(prefill, draft)}
        self.steady_round = self.round  # a round of self.k proposals (compiled from outside)
        self.rounds = self.run_rounds
        self.compiled = False
        self.reset_stats()

    def reset_stats(self):
        # rounds, proposed and accepted count every round run (past the end of a text too, when
        # several run between two host reads); forwards: the target's, its prompt passes included;
        # tokens: the tokens they made, an ending EOS included.
        self.stats = dict(rounds=0, proposed=0, accepted=0, forwards=0, tokens=0)

    def round(self, seq, n, seen, counts, temperature: float, top_k: int, top_p: float, penalty: float,
              k: int | None = None):
        """One round, in place. seq (1, L): the tokens by position; n (0-d): their count, the last
        one not yet in either cache; seen (1, V): the tokens of seq; counts (3,): rounds, proposed
        and accepted tokens so far. k: proposals (self.k; fewer at the end of the context)."""
        k = self.k if k is None else k
        draft, target = self.draft, self.target
        settings, dev = (temperature, top_k, top_p, penalty), seq.device
        row_seen, proposals, q = [seen], [], []
        if k:
            # The draft catches up on the last two tokens in one forward (the one before the last
            # is new to it after a round that accepted every proposal), then proposes k, one at a time.
            logits = draft(seq[:, n - 2 + torch.arange(2, device=dev)], start_pos=n - 2)[0, -1:].float()
            for i in range(k):
                if temperature > 0:
                    q.append(process_logits(logits, row_seen[-1], *settings).softmax(-1))
                    tok = draw(q[-1])
                else:
                    tok = greedy(logits, row_seen[-1], penalty)
                proposals.append(tok)
                row_seen.append(row_seen[-1].scatter(1, tok[:, None], True))  # row i+1 sees d_0..d_i
                if i < k - 1:
                    logits = draft(tok[:, None], start_pos=n + i)[0].float()
            d = torch.cat(proposals)  # (k,)
            seq.index_copy_(1, n + torch.arange(k, device=dev), d[None])
        else:
            d = torch.zeros(0, dtype=torch.long, device=dev)
        # The target scores the last token and the k proposals in one forward: rows 0..k.
        p_logits = target(seq[:, n - 1 + torch.arange(k + 1, device=dev)], start_pos=n - 1)[0].float()
        row_seen = torch.cat(row_seen)  # (k+1, V)
        j, new = accept(p_logits, row_seen, d, q, settings)
        seq.index_copy_(1, (n + j).view(1), new.view(1, 1))
        seen.copy_(row_seen.index_select(0, j.view(1)).scatter(1, new.view(1, 1), True))
        n += j + 1
        counts += torch.stack([torch.ones_like(j), torch.full_like(j, k), j])

    def run_rounds(self, rounds: int, *state_and_settings):
        for _ in range(rounds):
            self.steady_round(*state_and_settings)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], cfg: SampleConfig, eos_id: int, on_token=None) -> list[list[int]]:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        return [self._one(prompt_ids, cfg, eos_id, on_token if b == 0 else None)
                for b in range(cfg.num_samples)]

    def _one(self, prompt_ids, cfg: SampleConfig, eos_id: int, on_token) -> list[int]:
        target, draft, K = self.target, self.draft, self.k
        dev, V = target.lm_head.weight.device, target.config.vocab_size
        P, max_new = len(prompt_ids), cfg.max_new_tokens
        context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
        if P + max_new > context:  # the draft's context can be the shorter one
            raise ValueError(f"prompt {P} + {max_new} new tokens exceed the {context}-token context of the "
                             f"{'draft' if context < target.config.max_position_embeddings else 'target'}")
        length = min(context, cache_length(target, P, max_new) + 512)  # room for the last round's proposals
        for m in (target, draft):
            m.setup_cache(1, length, keep_larger=True)
        length = min(target.cache_len, draft.cache_len)
        settings = sampling_settings(cfg)
        seq = torch.zeros(1, length, dtype=torch.long, device=dev)
        seq[0, :P] = torch.tensor(prompt_ids, device=dev)
        seen = torch.zeros(1, V, dtype=torch.bool, device=dev)
        seen[0, seq[0, :P]] = True
        # Prefill: the target scores the prompt and picks the first new token; the draft reads the prompt.
        first = next_token(self.prefill["target"](seq[:, :P]), seen, *settings)
        self.prefill["draft"](seq[:, :P])
        seq[0, P] = first[0]
        seen[0, first] = True
        n = torch.tensor(P + 1, device=dev)
        counts = torch.zeros(3, dtype=torch.long, device=dev)
        count, out = P + 1, []
        while True:
            out = seq[0, P:count].tolist()
            if eos_id in out:
                out = out[:out.index(eos_id) + 1]
            out = out[:max_new]
            if on_token:
                on_token([out])
            if len(out) >= max_new or (out and out[-1] == eos_id):
                break
            # No round past the last token: a round makes at most K + 1, so this many are all needed.
            rounds = min(self.sync_every, -(-(max_new - len(out)) // (K + 1)))
            if count + rounds * (K + 1) + K < length:
                self.rounds(rounds, seq, n, seen, counts, *settings)
            elif count < length:  # near the end of the caches: one round at a time, fewer proposals at the end
                self.round(seq, n, seen, counts, *settings, k=min(K, length - 1 - count))
            else:
                break
            count = n.item()
        rounds, proposed, accepted = counts.tolist()
        self.stats["rounds"] += rounds
        self.stats["proposed"] += proposed
        self.stats["accepted"] += accepted
        self.stats["forwards"] += rounds + 1
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
        best = greedy(p_logits, row_seen, penalty)  # (k+1,)
        agree = torch.cat([best[:k] == d, torch.zeros(1, dtype=torch.bool, device=d.device)])
        j = agree.int().cumprod(0).sum()
        return j, best.index_select(0, j.view(1))[0]  # not best[j]: a 0-d index reads j on the host
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
    row = residual.index_select(0, j.view(1))[0]
    # Rounding alone can reject with p <= q everywhere in the row: the residual is then empty (its
    # sum 0), and p itself is what it stands for. draw needs no normalised row.
    row = torch.where(row.sum() > 0, row, p.index_select(0, j.view(1))[0])
    return j, draw(row)


def fit_prompt(ids: list[int], ctx: int, max_new: int) -> tuple[list[int], int]:
    """Fit a prompt and its new tokens into the context, saying what gives way: a --max_new_tokens
    the context cannot hold at all is lowered to the room the prompt leaves (the prompt keeping up
    to half the context), and a prompt too long for the rest keeps its first token (<s>) and its
    last ones."""
    if max_new >= ctx:
        lowered = ctx - min(len(ids), ctx // 2)
        note(f"note: --max_new_tokens {max_new} does not fit the {ctx}-token context; generating at "
             f"most {lowered} tokens after the prompt")
        max_new = lowered
    room = ctx - max_new
    if len(ids) > room:
        note(f"warning: the prompt has {len(ids)} tokens; with --max_new_tokens {max_new} only its first "
             f"(<s>) and its last {room - 1} fit the {ctx}-token context, the rest is dropped")
        ids = ids[:1] + ids[len(ids) - room + 1:]
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
    corpus = open_corpus(cfg.out)
    try:
        model, tok, path = checkpoint.load_for_inference(cfg.ckpt, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    weight = model.lm_head.weight
    note(f"loaded {path} ({model.num_params():,} parameters) on {weight.device} in {str(weight.dtype)[6:]}")
    # The decode kernels always (kernels.py); --compile adds compilation and CUDA graphs.
    if cfg.draft:
        draft = load_draft(cfg, tok)
        try:
            gen = SpeculativeGenerator(model, draft, cfg.draft_tokens)
        except ValueError as e:
            raise SystemExit(f"sample.py: --draft {cfg.draft}: {e}") from None
        if cfg.compile:
            kernels.compile_speculative(gen)
        else:
            kernels.use_decode_kernels(model, measure=False)
            kernels.use_decode_kernels(draft, measure=False)
    else:
        gen = Generator(model)
        if cfg.compile:
            kernels.compile_generator(gen)
        else:
            kernels.use_decode_kernels(model, measure=False)
    eos = model.config.eos_token_id
    for n, prompt in enumerate(prompts):
        ids, max_new = fit_prompt(data.with_bos(tok, prompt, model.config.bos_token_id),
                                  model.config.max_position_embeddings, cfg.max_new_tokens)
        if cfg.draft and len(ids) + max_new > gen.draft.config.max_position_embeddings:
            ctx = gen.draft.config.max_position_embeddings
            raise SystemExit(f"sample.py: --draft {cfg.draft}: its context is {ctx} tokens, shorter than the "
                             f"{len(ids)}-token prompt + {max_new} new tokens; lower --max_new_tokens"
                             + (f" to {ctx - len(ids)}" if ctx > len(ids) else " and shorten the prompt")
                             + " or use a draft with a longer context")
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
        if corpus:  # a line per sample, flushed: an interrupted run keeps what it wrote
            corpus.write("".join(json.dumps({"text": prompt + continuation(o)}, ensure_ascii=False) + "\n"
                                 for o in outs))
            corpus.flush()
        count = sum(len(o) for o in outs)
        note(f"[{count} tokens in {dt:.2f}s, {count / max(dt, 1e-9):.1f} tokens/s"
             + (", including the one-time compilation]" if gen.compiled and n == 0 else "]"))
    if corpus:
        corpus.close()
        note(f"wrote {len(prompts) * cfg.num_samples} samples to {cfg.out}")
    if cfg.draft:
        st = gen.stats
        note(f"[draft: {st['accepted']:,} of {st['proposed']:,} proposed tokens accepted "
             f"({st['accepted'] / max(st['proposed'], 1):.1%}); {st['tokens'] / max(st['forwards'], 1):.2f} "
             f"tokens per target forward over {st['forwards']:,} forwards]")


def open_corpus(path: str | None):
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"sample.py: --out {path}: cannot write it ({e.strerror}); give a writable file") from None


def load_draft(cfg: SampleConfig, tok) -> Llama:
    """The draft model, refused unless its tokenizer is the target's (SpeculativeGenerator checks
    the models' vocabularies)."""
    try:
        draft, draft_tok, path = checkpoint.load_for_inference(cfg.draft, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: --draft: {e}") from None
    if draft_tok.get_vocab() != tok.get_vocab():
        raise SystemExit(f"sample.py: --draft {path}: its tokenizer ({draft_tok.get_vocab_size()} tokens) "
                         f"is not the target's ({tok.get_vocab_size()}); a draft must use the target's tokenizer")
    note(f"draft {path} ({draft.num_params():,} parameters), {cfg.draft_tokens} tokens per round")
    return draft


if __name__ == "__main__":
    main()
