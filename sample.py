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


def choose(logits, seen, temperature: float, top_k: int, top_p: float, penalty: float):
    """logits (B, V) float32 -> next ids (B,); temperature 0 is greedy. Sampling draws with the
    exponential-race trick (argmax of p / Exp(1) noise is a draw from p): no host sync, and it
    can live inside a CUDA graph."""
    if temperature <= 0:
        return apply_repetition_penalty(logits, seen, penalty).argmax(-1)
    probs = process_logits(logits, seen, temperature, top_k, top_p, penalty).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


class DecodeLinear(nn.Linear):
    """nn.Linear for compiled decoding. At one token x @ W.T is a matrix-vector product, bound by
    reading W once; written as multiply-and-sum, inductor compiles it to one loop that streams W,
    faster than the BLAS GEMV it replaces on the GPU and the CPU (README, Benchmarks). Inductor's
    own rewrite (coordinate_descent_tuning) is GPU-only."""

    def forward(self, x):
        if x.shape[-2] == 1 and self.bias is None and torch.compiler.is_compiling():
            return (x.unsqueeze(-2) * self.weight).sum(-1)  # (B, 1, 1, in) * (out, in) -> (B, 1, out)
        return F.linear(x, self.weight, self.bias)


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
            for module in model.modules():
                if type(module) is nn.Linear:
                    module.__class__ = DecodeLinear  # same weights, the decode-time forward
            self.decode = torch.compile(self._decode, fullgraph=True,
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
        if P + max_new > m.config.max_position_embeddings:
            raise ValueError(f"prompt {P} + {max_new} new tokens exceed the "
                             f"{m.config.max_position_embeddings}-token context")
        m.setup_cache(B, P + max_new)
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


if __name__ == "__main__":
    main()
