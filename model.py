"""A Llama-family decoder, written out in full: GQA attention with RoPE, SwiGLU MLP, RMSNorm,
tied embeddings. Module names are Hugging Face's, so `state_dict()` keys are the keys of an HF
`LlamaForCausalLM` checkpoint and checkpoint.py maps weights by name alone.

This file imports torch and the standard library only (no torch_xla, no transformers).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019). With fp32=True the statistics and the scaling
    run in float32 whatever the input dtype, and the result is rounded back once: in bf16 the mean
    of squares over 768 channels loses enough bits to move the loss."""

    def __init__(self, dim: int, eps: float, fp32: bool = True):
        super().__init__()
        self.eps, self.fp32 = eps, fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        if self.fp32:
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.dtype)).to(dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float, device=None):
    """cos/sin tables (max_pos, head_dim) in HF's rotate-half layout: frequency i drives channels
    i and i + head_dim/2 (not interleaved pairs as in the RoPE paper), so HF weights load as is."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                               / head_dim)
    t = torch.arange(max_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (max_pos, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos/sin (T, hd)
    return x * cos + rotate_half(x) * sin


def sdpa_attention(q, k, v):
    """Causal attention over whole sequences: PyTorch's fused kernels on CUDA and CPU. k and v
    keep their n_kv heads: the kernel shares each among its query heads (enable_gqa), where
    expanding them first costs 1.3 GB of saved activations at 8 x 4096 tokens (README)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class BlockwiseAttention(torch.autograd.Function):
    """Causal attention one block of queries at a time, in plain torch: the (T, T) score matrix
    never exists, only (block, T) slices of it. As in FlashAttention (Dao et al. 2022), backward
    keeps just q, k, v, the output and the log-sum-exp of each row, and recomputes the
    probabilities block by block. It is the stand-in for the Pallas kernel wherever XLA compiles
    the step but Pallas cannot run (XLA:CPU, in the tests): torch_xla 2.9's own SDPA builds the
    full (B, H, T, T) scores, 3.2 GB per layer in fp32 at 8 x 4096 tokens."""

    @staticmethod
    def forward(ctx, q, k, v, block: int):
        # q, k, v (B, H, T, hd); scores and softmax in fp32, matmuls in the input dtype
        T, scale = q.shape[2], q.shape[-1] ** -0.5
        out, lse = [], []
        for i in range(0, T, block):
            e = min(i + block, T)  # causal: queries i..e-1 see keys 0..e-1
            p, row_lse = _block_probs(q[:, :, i:e], k[:, :, :e], i, scale)
            out.append((p.to(v.dtype) @ v[:, :, :e]))
            lse.append(row_lse)
        o, lse = torch.cat(out, 2), torch.cat(lse, 2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.block = block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        T, scale, block = q.shape[2], q.shape[-1] ** -0.5, ctx.block
        delta = (do.float() * o.float()).sum(-1, keepdim=True)  # (B, H, T, 1): rowsum(dO * O)
        dq = []
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i in range(0, T, block):
            e = min(i + block, T)
            qi, doi = q[:, :, i:e], do[:, :, i:e].float()
            p, _ = _block_probs(qi, k[:, :, :e], i, scale, lse[:, :, i:e])
            dv[:, :, :e] += p.transpose(-1, -2) @ doi
            ds = p * (doi @ v[:, :, :e].float().transpose(-1, -2) - delta[:, :, i:e]) * scale
            dq.append(ds @ k[:, :, :e].float())
            dk[:, :, :e] += ds.transpose(-1, -2) @ qi.float()
        return torch.cat(dq, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _block_probs(qi, k, start, scale, lse=None):
    """Softmax probabilities (fp32) of the queries at start.. against keys 0..k.shape[2]-1, and the
    rows' log-sum-exp (given in backward, where only the exponent is recomputed)."""
    s = (qi @ k.transpose(-1, -2)).float() * scale  # (B, H, bq, e)
    causal = torch.ones(qi.shape[2], k.shape[2], dtype=torch.bool, device=qi.device).tril(start)
    s = s.masked_fill(~causal, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.exp(s - lse), lse


def blockwise_attention(q, k, v, block: int = 512):
    return BlockwiseAttention.apply(q, k, v, block)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv, max_len, hd). Writes go through index_copy_ at the
    given positions, so every decode step has the same shapes: one compiled graph under XLA,
    one CUDA graph under torch.compile(mode='reduce-overhead')."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        # pos (T,); k/v (B, n_kv, T, hd)
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, d, bias=False)
        self.kv_cache: KVCache | None = None
        self.kernel = sdpa_attention  # causal attention over whole sequences (Llama.set_attention)

    def forward(self, x, cos, sin, pos=None, mask=None, core_dtype=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:  # decoding: attend over the whole cache, masked by position
            k, v = self.kv_cache.update(pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.n_kv != self.n_head and (mask is not None or self.kernel is not sdpa_attention):
            # Each KV head serves n_head/n_kv consecutive query heads (HF's repeat_kv order).
            # Expanded for the other kernels, and for masked decoding calls: SDPA picks the
            # memory-efficient kernel there, which refuses enable_gqa (bench.py attention).
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        dtype = q.dtype
        if core_dtype is not None:
            q, k, v = q.to(core_dtype), k.to(core_dtype), v.to(core_dtype)
        if mask is None:
            y = self.kernel(q, k, v).to(dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block. With fp32=True (the seed's first and last blocks) it runs in
    fp32 under bf16 autocast, all but the attention core: that still goes through a bf16 fused
    kernel (softmax and accumulation are fp32 inside it), because fp32 SDPA has no tensor-core
    kernel and slows the whole step down by a third (README, The model)."""

    def __init__(self, cfg: ModelConfig, fp32: bool = False):
        super().__init__()
        self.fp32, self.exact_core = fp32, cfg.fp32_edge_attention
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos=None, mask=None):
        dev = x.device.type
        if not (self.fp32 and torch.is_autocast_enabled(dev)):
            return self._forward(x, cos, sin, pos, mask)
        core_dtype = None if self.exact_core else torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return self._forward(x.float(), cos, sin, pos, mask, core_dtype)

    def _forward(self, x, cos, sin, pos, mask, core_dtype=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask, core_dtype)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ w.T against targets (-100: ignored), computed `chunk`
    rows at a time so the full logits never exist: at 8 x 4096 tokens they are 1.07G values, 2.1 GB
    in bf16 and 4.3 GB once cast to fp32. The gradients of x and w are computed chunk by chunk
    in forward and only scaled in backward, the trick of fused linear cross-entropy kernels
    (Liger-Kernel): a loss is always the last op, so its incoming gradient is a scalar.
    Softmax in fp32; the matmuls in the ambient dtype (bf16 under autocast), as nn.Linear."""

    @staticmethod
    def forward(ctx, x, w, targets, chunk: int, with_grad: bool):
        # x (N, d), w (V, d), targets (N,)
        count = (targets != -100).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx, dw = [], torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i in range(0, x.shape[0], chunk):
            xi, ti = x[i:i + chunk], targets[i:i + chunk]
            raw = xi @ w.T  # (n, V), bf16 under autocast
            logits = raw.float()
            lse = torch.logsumexp(logits, -1)
            valid = ti != -100
            tgt = ti.clamp(min=0)
            loss = loss + ((lse - logits.gather(1, tgt[:, None])[:, 0]) * valid).sum()
            if with_grad:  # d loss / d logits = softmax - onehot(target), on the counted rows
                g = torch.exp(logits - lse[:, None]) * valid[:, None]
                g = g.scatter_add(1, tgt[:, None], -valid[:, None].to(g.dtype))
                g = g.to(raw.dtype)  # as the .float() cast's backward rounds it
                dx.append(g @ w)
                dw += g.T @ xi
        if with_grad:
            ctx.save_for_backward(torch.cat(dx) / count, dw / count)
            ctx.x_dtype = x.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (dx * grad).to(ctx.x_dtype), dw * grad, None, None, None


def chunked_cross_entropy(x, w, targets, chunk: int = 1024):
    """Equal to F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100), loss and
    gradients (test_model.py), without materialising the logits."""
    return ChunkedCrossEntropy.apply(x, w, targets, chunk, torch.is_grad_enabled() and
                                     (x.requires_grad or w.requires_grad))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        n = cfg.num_hidden_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, fp32=cfg.fp32_edge_blocks and i in (0, n - 1))
                                 for i in range(n)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpoint = None  # e.g. torch.utils.checkpoint.checkpoint: recompute blocks in backward
        # Rows per chunk of the loss (chunked_cross_entropy), or 0 for the plain loss. train.py
        # chunks on XLA only: on an H100 the compiled plain loss was faster (README, TPU).
        self.loss_chunk = 0
        self.build_rope()
        self.reset_parameters()

    def set_attention(self, kernel):
        """Use kernel(q, k, v) -> y (B, H, T, hd) for causal attention over whole sequences, e.g.
        the Pallas flash-attention kernel on a TPU. Cached decoding keeps SDPA with its mask."""
        for block in self.model.layers:
            block.self_attn.kernel = kernel

    def build_rope(self, device=None):
        device = device or self.model.embed_tokens.weight.device
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings,
                               self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """The seed card's init: N(0, 0.02) for embeddings and Linear weights; the two projections
        that write into the residual stream (o_proj, down_proj) get 0.02/sqrt(2 * layers), as in
        GPT-2, so the residual's variance does not grow with depth; RMSNorm weights 1."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, idx, targets=None, start_pos=None):
        """idx (B, T) token ids -> logits (B, T, vocab), or the mean cross-entropy if targets.

        start_pos (int or 0-d tensor) switches to cached decoding: idx holds the tokens at
        positions start_pos .. start_pos+T-1 and the KV cache (see setup_cache) holds the rest.
        """
        B, T = idx.shape
        x = self.hidden(idx, start_pos)  # (B, T, d)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        if self.loss_chunk:
            return chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                         self.loss_chunk)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1), ignore_index=-100)

    def hidden(self, idx, start_pos=None):
        """idx (B, T) -> the final norm's output (B, T, d), what the head turns into logits.
        eval_ppl.score applies the head to the scored positions only."""
        B, T = idx.shape
        if start_pos is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            pos, mask = None, None
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            if self.model.layers[0].self_attn.kv_cache is None:
                raise RuntimeError("cached decoding needs model.setup_cache(batch, max_len) first")
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            cache_len = self.model.layers[0].self_attn.kv_cache.k.shape[2]
            mask = torch.arange(cache_len, device=idx.device)[None, :] <= pos[:, None]  # (T, S)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]

        x = self.model.embed_tokens(idx)  # (B, T, d)
        for block in self.model.layers:
            if self.checkpoint is not None and self.training:
                x = self.checkpoint(block, x, cos, sin)
            else:
                x = block(x, cos, sin, pos, mask)
        return self.model.norm(x)

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Preallocate a KV cache for batch_size sequences of up to max_len positions."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        w = self.lm_head.weight
        for block in self.model.layers:
            a = block.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv, max_len, a.hd, dtype or w.dtype, device or w.device)

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None
