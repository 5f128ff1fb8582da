"""A Llama-family decoder, written out in full: GQA attention with RoPE, SwiGLU MLP, RMSNorm,
tied embeddings, and a static KV cache for decoding. Module names are Hugging Face's, so
`state_dict()` keys are the keys of an HF `LlamaForCausalLM` checkpoint and checkpoint.py maps
weights by name alone.

This is the plain model. What exists only for a device or for speed (fused kernels, the chunked
loss, activation checkpointing) lives in kernels.py and train.py and is applied from outside.
This file imports torch and the standard library only.
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


def attention(q, k, v, pos=None):
    """softmax(q k^T / sqrt(hd)) v, causal. q (B, H, T, hd); k, v (B, KV, S, hd) keep their KV
    heads, each shared by H/KV consecutive query heads (enable_gqa, HF's order). pos=None: q, k, v
    are one whole sequence. pos (T,): cached decoding, k and v are the cache and query t sees its
    slots 0..pos[t]."""
    if pos is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = torch.arange(k.shape[2], device=q.device) <= pos[:, None]  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv, max_len, hd). Writes go through index_copy_ at the
    given positions, so every decode step has the same shapes: one compiled graph, one CUDA graph."""

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
    def __init__(self, cfg: ModelConfig, linear=nn.Linear):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = linear(d, self.n_head * self.hd, bias=False)
        self.k_proj = linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = linear(self.n_head * self.hd, d, bias=False)
        self.kv_cache: KVCache | None = None  # Llama.setup_cache
        self.attend = attention  # kernels.py installs fused kernels here

    def forward(self, x, cos, sin, pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:  # decoding: the new keys/values go into the cache, attention reads all of it
            k, v = self.kv_cache.update(pos, k, v)
        y = self.attend(q, k.to(q.dtype), v.to(q.dtype), pos)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, linear=nn.Linear):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, linear=nn.Linear):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32)
        self.self_attn = Attention(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32)
        self.mlp = MLP(cfg, linear)

    def forward(self, x, cos, sin, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class FP32Linear(nn.Linear):
    """nn.Linear that bf16 autocast leaves alone: it multiplies in the weight's dtype (fp32 in
    training)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.weight.dtype), self.weight)


class FP32Block(Block):
    """The recipe's first and last blocks (fp32_edge_blocks): under bf16 autocast their
    projections, norms and residual adds run in fp32. The attention core stays in bf16, as
    autocast casts SDPA's inputs: fp32 SDPA has no tensor-core kernel and slowed the whole step
    by a third. fp32_edge_attention runs the core in fp32 too (autocast off for the block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, FP32Linear)
        self.fp32_core = cfg.fp32_edge_attention

    def forward(self, x, cos, sin, pos=None):
        if not self.fp32_core:
            return super().forward(x, cos, sin, pos)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x, cos, sin, pos)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        n = cfg.num_hidden_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(FP32Block(cfg) if cfg.fp32_edge_blocks and i in (0, n - 1) else Block(cfg)
                                 for i in range(n)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cache_len = 0  # positions of the KV cache (setup_cache), 0: none
        self.build_rope()
        self.reset_parameters()

    def build_rope(self, device=None):
        device = device or self.model.embed_tokens.weight.device
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings,
                               self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """The recipe's init: N(0, 0.02) for embeddings and Linear weights; the two projections
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
        x = self.hidden(idx, start_pos)  # (B, T, d)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        return self.loss(x, targets)

    def loss(self, x, targets):
        """Mean cross-entropy of the head's logits at x (B, T, d) against targets (B, T); -100 is
        not counted."""
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def hidden(self, idx, start_pos=None):
        """idx (B, T) -> the final norm's output (B, T, d), what the head turns into logits.
        eval_ppl.score applies the head to the scored positions only."""
        B, T = idx.shape
        if start_pos is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            pos, cos, sin = None, self.rope_cos[:T], self.rope_sin[:T]
        else:
            if not self.cache_len:
                raise RuntimeError("cached decoding needs model.setup_cache(batch, max_len) first")
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.model.embed_tokens(idx)  # (B, T, d)
        for block in self.model.layers:
            x = block(x, cos, sin, pos)
        return self.model.norm(x)

    def setup_cache(self, batch_size: int, max_len: int, keep_larger: bool = False):
        """Preallocate a KV cache for batch_size sequences of up to max_len positions, in the
        weights' dtype. keep_larger: keep the present cache if it has that batch and room enough
        (new cache tensors would make compiled decode steps and their CUDA graphs recompile)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        cache = self.model.layers[0].self_attn.kv_cache
        if keep_larger and cache is not None and cache.k.shape[0] == batch_size and self.cache_len >= max_len:
            return
        w = self.lm_head.weight
        for block in self.model.layers:
            a = block.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv, max_len, a.hd, w.dtype, w.device)
        self.cache_len = max_len

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None
        self.cache_len = 0
