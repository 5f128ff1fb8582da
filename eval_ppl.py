"""Perplexity of a checkpoint on held-out shards or on any text file.

    python eval_ppl.py --ckpt out/best                         # data/demo's val shards
    python eval_ppl.py --ckpt out/best --data_dir data/mix --seq_len 4096
    python eval_ppl.py --ckpt path/to/Portimbria-150M --text book.txt --stride 2048

Progress goes to stderr; the last line on stdout is a JSON object
{"loss": mean next-token cross-entropy in nats over the predicted tokens, "ppl": exp(loss),
 "tokens": how many tokens were predicted, "windows": how many windows}.

On val shards the windows are those train.py evaluates (seq_len + 1 tokens each, taken in the
same order), so `--seq_len` and `--max_samples` equal to training's `--seq_len` and
`--max_eval_samples` give training's validation loss (up to bf16 autocast in training).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
from config import EvalConfig, note, parse_config


def text_windows(ids: list[int], ctx: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows over a long sequence: (window ids, how many of its last targets to score).
    Each token after the first is predicted exactly once, with up to ctx-1 tokens of context;
    consecutive windows start `stride` tokens apart, so a scored token sees at least
    ctx - stride tokens of context (as in HF's perplexity guide)."""
    # A window's first token has no context inside it, so windows overlap by at least one.
    stride = min(stride, ctx - 1)
    out, prev_end = [], 1  # position 0 (BOS) is never a target
    for begin in range(0, max(1, len(ids) - 1), stride):
        end = min(begin + ctx, len(ids))
        out.append((ids[begin:end], end - prev_end))
        prev_end = end
        if end == len(ids):
            break
    return out


@torch.no_grad()
def score(model, windows: list[tuple[list[int], int]], batch_size: int, device, progress=True):
    """Next-token NLL summed per window (float64, in the windows' order) and the count of scored
    tokens. windows: (token ids, how many of the last targets to score), ids as a list or a numpy
    array. eval_tasks.py scores each answer of a multiple-choice item as one window."""
    nll, count, t0, last = np.zeros(len(windows)), 0, time.time(), 0.0
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # batch equal lengths
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        group = [windows[i] for i in rows]
        T = max(len(w) for w, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), -100, dtype=torch.long)
        for r, (w, n_target) in enumerate(group):
            w = torch.as_tensor(np.asarray(w, dtype=np.int64))
            x[r, :len(w)] = w
            y[r, len(w) - 1 - n_target:len(w) - 1] = w[len(w) - n_target:]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        h = model.hidden(x[:, :-1] if T > 1 else x)  # (B, T-1, d)
        yy = y[:, :-1] if T > 1 else y
        scored = yy != -100
        # The head on the scored positions only: eval_tasks.py scores a few answer tokens per
        # window, and (B, T, vocab) fp32 logits of a long batch run to gigabytes.
        logits = model.lm_head(h[scored]).float()  # (N, vocab)
        per_token = F.cross_entropy(logits, yy[scored], reduction="none")
        rows_nll = torch.zeros(len(group), dtype=torch.float32, device=h.device)
        rows_nll.index_add_(0, scored.nonzero()[:, 0], per_token)
        nll[rows] = rows_nll.double().cpu().numpy()
        count += int(scored.sum())
        now = time.time()
        if progress and (now - last > 2 or k + batch_size >= len(order)):
            last = now
            done = nll[order[:k + batch_size]].sum()
            note(f"  {min(k + batch_size, len(order))}/{len(order)} windows | {count:,} tokens | "
                 f"loss {done / max(count, 1):.4f} | {count / (now - t0):,.0f} tokens/s")
    return nll, count


def main(argv=None):
    cfg = parse_config(argv, __doc__, EvalConfig())
    try:
        model, tok, path = checkpoint.load_for_inference(cfg.ckpt, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval_ppl.py: {e}") from None
    ctx = cfg.seq_len or model.config.max_position_embeddings
    if ctx > model.config.max_position_embeddings:
        raise SystemExit(f"eval_ppl.py: --seq_len {ctx} exceeds the model's context "
                         f"{model.config.max_position_embeddings}")
    if cfg.text:
        try:
            with open(cfg.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"eval_ppl.py: --text {cfg.text}: {e} (expected UTF-8 text)") from None
        ids = data.with_bos(tok, text, model.config.bos_token_id)
        if len(ids) < 2:
            raise SystemExit(f"eval_ppl.py: --text {cfg.text} is empty")
        stride = cfg.stride or max(1, ctx // 2)
        if not 0 < stride < ctx:
            raise SystemExit(f"eval_ppl.py: --stride must be in 1..{ctx - 1} (windows must overlap)")
        windows = text_windows(ids, ctx, stride)
        what = f"{cfg.text} ({len(ids):,} tokens, window {ctx}, stride {stride})"
    else:
        try:
            # ctx + 1 tokens: ctx inputs and their ctx next tokens, as train.py's windows
            vals = data.val_windows(cfg.data_dir, ctx, cfg.max_samples, vocab_size=model.config.vocab_size)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"eval_ppl.py: {e}") from None
        windows = [(w, len(w) - 1) for w in vals]
        what = f"{len(windows)} val windows of {ctx} tokens from {cfg.data_dir}"
    note(f"evaluating {path} on {what}")
    nll, count = score(model, windows, cfg.batch_size, model.lm_head.weight.device)
    loss = nll.sum() / count
    print(json.dumps({"loss": round(loss, 6), "ppl": round(math.exp(loss), 4), "tokens": count,
                      "windows": len(windows)}))


if __name__ == "__main__":
    main()
