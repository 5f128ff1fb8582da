"""Generate text from a checkpoint: ours (out/best, out/latest) or any Hugging Face Llama folder.

    python sample.py --prompt "Once upon a time"
    python sample.py --ckpt path/to/Portimbria-150M --prompt "def fib(n):" --temperature 0
    python sample.py --prompt_file prompts.txt --num_samples 3 --max_new_tokens 100

The continuation streams to stdout; diagnostics go to stderr. Defaults are the seed card's:
temperature 0.8, top-p 0.9, repetition penalty 1.1 (Hugging Face semantics). --temperature 0 is
greedy decoding, which reproduces HF `generate(do_sample=False)` token for token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from model import Llama

ROOT = Path(__file__).resolve().parent


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """'auto' picks CUDA when it is there; dtype 'auto' is bf16 on a GPU and fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device != "cpu" else "fp32"
    return device, DTYPES[dtype]


def warn(msg):
    print(msg, file=sys.stderr, flush=True)


def find_checkpoint(ckpt: str | None) -> Path:
    if ckpt:
        return Path(ckpt)
    for cand in (ROOT / "out" / "best", ROOT / "out" / "latest", Path("out/best"), Path("out/latest")):
        if (cand / "config.json").is_file():
            return cand
    raise SystemExit("sample.py: no checkpoint in out/best or out/latest; train one with "
                     "`python train.py` or pass --ckpt DIR (any Hugging Face Llama folder)")


def load(ckpt: Path, device: str, dtype: torch.dtype):
    """The model and its tokenizer (the folder's tokenizer.json, else the repo's)."""
    from tokenizers import Tokenizer

    try:
        model = Llama.from_pretrained(ckpt, dtype=dtype, device=device, fp32_edge_blocks=False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: --ckpt {ckpt}: {e}") from None
    tok_file = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").is_file() else ROOT / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file))
    n_tok, n_model = tok.get_vocab_size(), model.config.vocab_size
    if n_tok > n_model:
        raise SystemExit(f"sample.py: {tok_file} has {n_tok} tokens but the model in {ckpt} only "
                         f"{n_model}: they do not belong together")
    if n_tok < n_model:
        warn(f"warning: {tok_file} has {n_tok} tokens, the model {n_model} (padded vocab?); "
             f"ids >= {n_tok} will never be decoded")
    return model.eval(), tok


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
            self.decode = torch.compile(self._decode, fullgraph=True,
                                        mode="reduce-overhead" if self.cuda_graphs else None)

    def _decode(self, tok, pos, seen, temperature: float, top_k: int, top_p: float, penalty: float):
        # tok (B, 1), pos 0-d tensor, seen (B, V) bool -> next tok (B, 1), pos, seen
        logits = self.model(tok, start_pos=pos)[:, -1].float()
        tok = choose(logits, seen, temperature, top_k, top_p, penalty)[:, None]
        return tok, pos + 1, seen.scatter(1, tok, True)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], num_samples: int, max_new_tokens: int,
                 temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.1, eos_id=2,
                 seed=None, on_token=None, sync_every: int | None = None) -> list[list[int]]:
        m, dev = self.model, self.model.lm_head.weight.device
        B, P = num_samples, len(prompt_ids)
        # Each read-back drains the GPU's queue. On an H100 (Portimbria-150M, bf16, --compile)
        # reading every 32 tokens gave 1,099-1,129 tokens/s against 945-1,025 every 8.
        sync_every = sync_every or (32 if dev.type == "cuda" else 1)
        if seed is not None:
            torch.manual_seed(seed)
        if P + max_new_tokens > m.config.max_position_embeddings:
            raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed the "
                             f"{m.config.max_position_embeddings}-token context")
        m.setup_cache(B, P + max_new_tokens)
        ids = torch.tensor([prompt_ids] * B, device=dev)
        seen = torch.zeros(B, m.config.vocab_size, dtype=torch.bool, device=dev)
        seen[:, ids[0]] = True
        settings = (temperature, top_k, top_p, repetition_penalty)
        logits = m(ids, start_pos=0)[:, -1].float()  # prefill the prompt in one pass
        tok = choose(logits, seen, *settings)[:, None]
        seen = seen.scatter(1, tok, True)
        pos = torch.tensor(P, device=dev)
        out, done, pending, made = [[] for _ in range(B)], [False] * B, [tok], 1
        while True:
            if len(pending) >= sync_every or made >= max_new_tokens:
                for b, row in enumerate(torch.cat(pending, 1).tolist()):
                    for x in row:
                        if not done[b] and len(out[b]) < max_new_tokens:
                            out[b].append(x)
                            done[b] = x == eos_id
                pending = []
                if on_token:
                    on_token(out)
                if all(done) or made >= max_new_tokens:
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample text from a Llama checkpoint.")
    ap.add_argument("--prompt", default=None, help="text to continue (empty: start from <s>)")
    ap.add_argument("--prompt_file", default=None, help="one prompt per line")
    ap.add_argument("--ckpt", default=None, help="HF model folder (default out/best, then out/latest)")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=0, help="0: off")
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--repetition_penalty", type=float, default=1.1)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="auto: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--compile", action="store_true", help="compile the decode step: CUDA graphs on a GPU; "
                    "on the CPU about 3x the tokens/s after a one-time compile of ~25 s")
    args = ap.parse_args(argv)

    device, dtype = device_and_dtype(args.device, args.dtype)
    ckpt = find_checkpoint(args.ckpt)
    model, tok = load(ckpt, device, dtype)
    warn(f"loaded {ckpt} ({model.num_params():,} parameters) on {device} in {str(dtype)[6:]}")
    if args.prompt_file:
        try:
            prompts = [line.rstrip("\n") for line in open(args.prompt_file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise SystemExit(f"sample.py: --prompt_file: {e}") from None
    else:
        prompts = [args.prompt or ""]
    gen = Generator(model, compile=args.compile)
    bos = model.config.bos_token_id
    for prompt in prompts:
        ids, max_new = fit_prompt([bos] + tok.encode(prompt, add_special_tokens=False).ids,
                                  model.config.max_position_embeddings,
                                  args.max_new_tokens)
        shown = {"n": 0}
        stream = args.num_samples == 1

        eos = model.config.eos_token_id

        def on_token(out):
            text = tok.decode(out[0][:-1] if out[0][-1:] == [eos] else out[0])
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[shown["n"]:])
                sys.stdout.flush()
                shown["n"] = len(text)

        t0 = time.time()
        if stream:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        outs = gen.generate(ids, args.num_samples, max_new, args.temperature, args.top_k, args.top_p,
                            args.repetition_penalty, model.config.eos_token_id, args.seed,
                            on_token if stream else None)
        dt = time.time() - t0
        if stream:
            sys.stdout.write(tok.decode(outs[0])[shown["n"]:] + "\n")
        else:
            for i, o in enumerate(outs):
                print(f"--- sample {i + 1}\n{prompt}{tok.decode(o)}")
        n = sum(len(o) for o in outs)
        first_compiled = gen.compiled and prompt is prompts[0]
        warn(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s"
             + (", including the one-time compilation]" if first_compiled else "]"))


if __name__ == "__main__":
    main()
