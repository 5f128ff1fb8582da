"""The machine room: attention, loss and projection kernels for particular devices, and the
functions that install them on a plain model.py Llama from outside. Each kernel says its math, its
shapes and the plain-torch form it is tested against (test_model.py).

    use_attention(model, fn)      causal attention over whole sequences (TPU: Pallas; XLA:CPU: blockwise)
    use_chunked_loss(model, n)    the loss n rows at a time, without the full logits (XLA)
    use_decode_kernels(model)     decoding a few tokens: the decode attention, per-shape projections
                                  and blocks of up to 8 tokens of one sequence in six kernels (decode_block)

Triton ships with torch's CUDA wheels; without it (a CPU-only torch) the GPU kernels are absent and
decoding keeps the plain attention.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as plain

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch
    triton = None


def expand_kv(k, n_head: int):
    """(B, KV, S, hd) -> (B, H, S, hd): each KV head repeated for its H/KV query heads, in HF's
    repeat_kv order, for kernels that take as many KV heads as query heads."""
    return k.repeat_interleave(n_head // k.shape[1], dim=1)


def in_autocast_dtype(q, k, v):
    """A custom kernel is not on autocast's op list: cast its inputs as autocast casts SDPA's."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def use_attention(model: plain.Llama, kernel):
    """Causal attention over whole sequences through kernel(q, k, v) -> (B, H, T, hd), with q
    (B, H, T, hd) and k, v (B, H, T, hd) (KV heads expanded, in the autocast dtype). Cached
    decoding (pos given) keeps the model's attention."""
    def attend(q, k, v, pos=None):
        if pos is not None:
            return plain.attention(q, k, v, pos)
        q, k, v = in_autocast_dtype(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]))
        return kernel(q, k, v)

    for block in model.model.layers:
        block.self_attn.attend = attend


# ---------------------------------------------------------------------------------------------
# Attention over whole sequences, for XLA


class BlockwiseAttention(torch.autograd.Function):
    """Causal attention one block of queries at a time, in plain torch: the (T, T) score matrix
    never exists, only (block, T) slices of it. As in FlashAttention (Dao et al. 2022), backward
    keeps just q, k, v, the output and the log-sum-exp of each row, and recomputes the
    probabilities block by block. It is the stand-in for the Pallas kernel wherever XLA compiles
    the step but Pallas cannot run (XLA:CPU, in the tests): torch_xla's own SDPA builds the full
    (B, H, T, T) scores, gigabytes per layer at 8 x 4096 tokens.
    Equal to F.scaled_dot_product_attention(q, k, v, is_causal=True), output and gradients."""

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


def pallas_attention(q, k, v):
    """torch_xla's Pallas flash-attention kernel (TPU only): O(T) memory in forward and backward.
    q, k, v (B, H, T, hd), as many KV heads as query heads. Its sm_scale defaults to 1.0, not
    1/sqrt(head_dim)."""
    try:
        from torch_xla.experimental.custom_kernel import flash_attention
    except ImportError as e:
        raise SystemExit(f"the TPU attention kernel needs jax: pip install 'torch_xla[pallas]==2.9.0' ({e})")
    return flash_attention(q, k, v, causal=True, sm_scale=q.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------
# The loss without the full logits, for XLA


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ w.T against targets (-100: ignored), computed `chunk`
    rows at a time so the full logits never exist: at 8 x 4096 tokens they are 1.07G values.
    The gradients of x and w are computed chunk by chunk in forward and only scaled in backward,
    the trick of fused linear cross-entropy kernels (Liger-Kernel): a loss is always the last op,
    so its incoming gradient is a scalar. Softmax in fp32; the matmuls in the ambient dtype (bf16
    under autocast), as nn.Linear. Equal to F.cross_entropy(F.linear(x, w).float(), targets,
    ignore_index=-100), loss and gradients."""

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
    return ChunkedCrossEntropy.apply(x, w, targets, chunk, torch.is_grad_enabled() and
                                     (x.requires_grad or w.requires_grad))


def use_chunked_loss(model: plain.Llama, chunk: int = 1024):
    """model.loss through chunked_cross_entropy, `chunk` rows at a time."""
    model.loss = lambda x, targets: chunked_cross_entropy(x.flatten(0, 1), model.lm_head.weight,
                                                          targets.flatten(), chunk)


# ---------------------------------------------------------------------------------------------
# Decoding: attention over a static KV cache, and the projections of a few tokens


def decode_attention_reference(q, k, v, pos):
    """The plain-torch form of decode_attention: model.attention with the KV heads expanded."""
    return plain.attention(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]), pos)


if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _let_the_next_kernel_start(PDL: tl.constexpr):
        """Programmatic dependent launch (PDL, Hopper on): a kernel launched with it may start while
        the one before it is still running, once every program of that one has come here. Its
        programs load what no kernel of the chain writes (weights; the positions and RoPE's tables,
        which only kernels launched without PDL write, and those have finished before anything
        after them starts), then _wait_for_the_previous_kernel, so its launch and those loads
        overlap the tail of the kernel before."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def _wait_for_the_previous_kernel(PDL: tl.constexpr):
        """Block until the kernel before has finished and its writes are visible (griddepcontrol.wait).
        Every read of an activation or the cache, and every write, comes after it: a write before it
        could reach a buffer the kernel before still reads."""
        if PDL:
            gdc_wait()

    @triton.jit
    def _slots(K, V, n, d, sks, svs, mask):
        """The keys and values of one sequence's KV head at cache slots n (BLOCK_N,), channels d:
        two (BLOCK_N, HD) tiles, zero where not mask. Both loads are issued before either is used,
        so they wait on memory at once."""
        k = tl.load(K + n[:, None] * sks + d[None, :], mask=mask, other=0.0)
        v = tl.load(V + n[:, None] * svs + d[None, :], mask=mask, other=0.0)
        return k, v

    @triton.jit
    def _decode_attention_split(Q, K, V, POS, O_PART, LSE_PART, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                                T, KV, QK_SCALE: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                                PDL: tl.constexpr = False, READ_AHEAD: tl.constexpr = False):
        """One (sequence, KV head, split of SPLIT cache slots): the G query heads that share the KV
        head and the T new tokens are the BLOCK_M rows of one tile (row m = g * T + t), so each key
        is read once for all of them. Writes the split's normalised output and log2-sum-exp.
        READ_AHEAD: the first block's slots before the first new position, which earlier forwards
        wrote and the kernel before does not, are read before the PDL wait, off the chain's
        critical path (the rest of the block after it)."""
        _let_the_next_kernel_start(PDL)
        bk, s = tl.program_id(0), tl.program_id(1)
        b, kv = bk // KV, bk % KV
        m = tl.arange(0, BLOCK_M)
        g, t = m // T, m % T
        row = m < G * T
        pos = tl.load(POS + t, mask=row, other=-1)  # query t sees slots 0..pos[t]
        first, last = tl.load(POS), tl.load(POS + T - 1)  # positions increase: no row sees past the last one
        d = tl.arange(0, HD)
        start = s * SPLIT
        k_head, v_head = K + b * skb + kv * skh, V + b * svb + kv * svh
        if READ_AHEAD:
            n_old = start + tl.arange(0, BLOCK_N)
            old = (n_old < first)[:, None]
            k_old, v_old = _slots(k_head, v_head, n_old, d, sks, svs, old)
        _wait_for_the_previous_kernel(PDL)  # it wrote this token's key and value (the positions: no chain kernel)
        q = tl.load(Q + b * sqb + (kv * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :],
                    mask=row[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        # Run-time bounds, no block past the last position, and no `if` in the loop: so Triton can
        # pipeline it, and with num_stages > 1 the keys and values arrive through cp.async.
        for n0 in range(start, tl.minimum(start + SPLIT, last + 1), BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            read = (n <= last)[:, None]
            if READ_AHEAD:
                early = old & (n0 == start)  # read before the wait
                read = read & ~early
            kt, vt = _slots(k_head, v_head, n, d, sks, svs, read)
            if READ_AHEAD:
                kt, vt = tl.where(early, k_old, kt), tl.where(early, v_old, vt)
            if IEEE:
                sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(kt))
            sc = tl.where(n[None, :] <= pos[:, None], sc * QK_SCALE, float("-inf"))  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        part = bk * tl.num_programs(1) + s
        tl.store(O_PART + (part * BLOCK_M + m)[:, None] * HD + d[None, :], out)
        tl.store(LSE_PART + part * BLOCK_M + m, lse)

    @triton.jit
    def _decode_attention_combine(O_PART, LSE_PART, OUT, sob, soh, sot, T, KV, NUM_SPLITS, G: tl.constexpr,
                                  HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                                  PDL: tl.constexpr = False):
        """One output row: the splits' outputs weighted by their share of the softmax sum."""
        _let_the_next_kernel_start(PDL)
        _wait_for_the_previous_kernel(PDL)
        bk, m = tl.program_id(0), tl.program_id(1)
        b, kv, g, t = bk // KV, bk % KV, m // T, m % T
        s = tl.arange(0, BLOCK_S)
        part = (bk * NUM_SPLITS + s) * BLOCK_M + m
        lse = tl.load(LSE_PART + part, mask=s < NUM_SPLITS, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds slot 0: the max is finite
        d = tl.arange(0, HD)
        o = tl.load(O_PART + part[:, None] * HD + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0)
        y = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(OUT + b * sob + (kv * G + g) * soh + t * sot + d, y.to(OUT.dtype.element_ty))


def pdl_options(pdl: bool) -> dict:
    """A decode kernel's launch arguments for PDL: the kernel's PDL flag, and Triton's launch_pdl
    only where it is asked for (ROCm's Triton has no such option)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def decode_attention(q, k, v, pos, split: int | None = None, block_n: int = 64, pdl: bool = False,
                     stages: int = 1, read_ahead: bool = False):
    """Attention of a few new tokens over a static KV cache, flash-decoding style (Dao et al.
    2023): the cache is cut into splits of `split` slots, each split's partial softmax is computed
    by its own program, and a second kernel combines them with their log-sum-exp. Splits past the
    last position return at once, so the work follows the filled part of the cache while every
    shape stays static (one CUDA graph at any prompt length). The G query heads of a KV head share
    its loads (no expanded copies).

    q (B, H, T, hd); k, v (B, KV, S, hd), the cache; pos (T,) increasing positions, query t sees
    slots 0..pos[t]. Returns (B, H, T, hd) in q's dtype, laid out as (B, T, H, hd), the order
    o_proj reads it in; equal to decode_attention_reference.
    By default splits of 64 slots (past 4,096 slots, S/64 rounded up to a power of two): a short
    context's few slots are still spread over several programs, each waiting on one load of its
    keys and values, not a chain of them. Splits of 32 slots, the default before, were slower in
    every shape's blocks measured and in the speculative round (BENCHMARKS.md).
    pdl: both kernels launched with programmatic dependent launch (decode_block's chain).
    stages: the split kernel's pipeline stages (Triton's num_stages); from 2 on its keys and values
    go through cp.async into shared memory, one block of them a stage. Which count is fastest was
    measured to depend on the kernels around it, not on the attention alone (attention_settings).
    read_ahead: the split kernel reads the first block's cached slots before its PDL wait (only
    those before the new tokens, which the kernel before it does not write)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    split = split or max(64, triton.next_power_of_2(S) // 64)
    block_n = min(block_n, split)
    G = H // KV
    block_m = max(16, triton.next_power_of_2(G * T))
    n_split = triton.cdiv(S, split)
    o_part = torch.empty(B * KV, n_split, block_m, hd, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * KV, n_split, block_m, dtype=torch.float32, device=q.device)
    _decode_attention_split[(B * KV, n_split)](
        q, k, v, pos, o_part, lse_part, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), T, KV, QK_SCALE=hd ** -0.5 * math.log2(math.e),
        G=G, HD=hd, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, IEEE=q.dtype == torch.float32,
        num_stages=stages, READ_AHEAD=read_ahead, **pdl_options(pdl))
    out = torch.empty(B, T, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)  # o_proj's order
    _decode_attention_combine[(B * KV, G * T)](
        o_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2), T, KV, n_split, G=G, HD=hd,
        BLOCK_M=block_m, BLOCK_S=max(2, triton.next_power_of_2(n_split)), **pdl_options(pdl))
    return out


# ---------------------------------------------------------------------------------------------
# A few tokens through a whole block in four kernels and the decode attention


if triton is not None:
    @triton.jit
    def _normed(X, NW, EPS, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """RMSNorm of the D values at X (fp32 statistics), rounded to x's dtype as RMSNorm returns
        it: (BLOCK_D,), zero past D. Every program of a projection computes it for itself: a row is
        a few KB and sits in L2."""
        c = tl.arange(0, BLOCK_D)
        x = tl.load(X + c, mask=c < D, other=0.0).to(tl.float32)
        w = tl.load(NW + c, mask=c < D, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, 0) / D + EPS)
        return (x * inv * w).to(X.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _times(w, x):
        """w (R, K) times one row x (K,): (R,). One token at a time, with the weight held in
        registers for all of them: registers do not grow with the tokens, and each token's sums
        run in the order of a one-token step, so a position gets the same numbers in a step of one
        token and in a forward of two (batch invariance; from DOT_TOKENS on the tensor cores sum)."""
        return tl.sum(w * x[None, :], 1)

    @triton.jit
    def _inv_rms(X, EPS, T: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of each of the T rows of D values at X (fp32): (BLOCK_T,).
        The chunks are unrolled and their squares summed elementwise, one reduction at the end, so
        no load waits for the one before: all are in flight at once, where a loop with a sum per
        chunk made a chain of D / BLOCK_K memory round trips before the first weight chunk. A pass
        of its own: the squares summed in the product's loop instead, its sums scaled at the end,
        were measured slower (BENCHMARKS.md)."""
        t = tl.arange(0, BLOCK_T)[:, None]
        sq = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        for k0 in tl.static_range(0, D, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(X + t * D + c, mask=(t < T) & (c < D), other=0.0).to(tl.float32)
            sq += x * x
        return tl.rsqrt(tl.sum(sq, 1) / D + EPS)

    @triton.jit
    def _chunk(X, NW, inv, k0, T: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """Columns k0 .. k0+BLOCK_K-1 of the T rows at X, normalised (RMSNorm with weight NW and the
        rows' inv, rounded to x's dtype as RMSNorm returns it) unless NW is None: (BLOCK_T, BLOCK_K),
        zero past T and D, a tensor-core product's left operand."""
        t, c = tl.arange(0, BLOCK_T)[:, None], k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(X + t * D + c, mask=(t < T) & (c < D), other=0.0)
        if NW is not None:
            w = tl.load(NW + c, mask=c < D, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * inv[:, None] * w).to(X.dtype.element_ty)
        return x

    @triton.jit
    def _park(WS, tile, split, S: tl.constexpr, SLOT: tl.constexpr, at: tl.constexpr, x, offsets):
        """Split-K: a program's partial sums x, at `offsets`, into its split's slot of its tile's
        workspace (S slots of SLOT fp32 values a tile)."""
        tl.store(WS + (tile * S + split) * SLOT + at + offsets, x)

    @triton.jit
    def _last(TICKETS, tile, S: tl.constexpr):
        """Split-K: whether this program is the last of its tile's S to have parked its sums. Each
        takes a ticket, an atomic add with acquire-release order: what a program parked before
        its ticket is seen by the one that takes a later ticket. The last sets the count back to 0
        for the next launch."""
        last = tl.atomic_add(TICKETS + tile, 1) == S - 1
        tl.atomic_xchg(TICKETS + tile, 0, mask=last)
        return last

    @triton.jit
    def _gathered(WS, tile, S: tl.constexpr, SLOT: tl.constexpr, at: tl.constexpr, offsets):
        """Split-K: the S partial sums parked at `at` of a tile, added in split order 0 .. S-1, so
        the result does not depend on which program finished last. Read past L1 (.cg)."""
        total = tl.load(WS + tile * S * SLOT + at + offsets, cache_modifier=".cg")
        for s in tl.static_range(1, S):
            total += tl.load(WS + (tile * S + s) * SLOT + at + offsets, cache_modifier=".cg")
        return total

    @triton.jit
    def _pair_of_splits(WS, TICKETS, tile, split, S: tl.constexpr, a, b):
        """Split-K for a kernel with two sums a and b (BLOCK_T, R) a program (q/k/v's halves of a
        head, gate/up): parks both, takes the ticket and, in the tile's last program, gathers both.
        Returns (a, b, last): the tile's totals in its last program."""
        BLOCK_T: tl.constexpr = a.shape[0]
        R: tl.constexpr = a.shape[1]
        o = tl.arange(0, BLOCK_T)[:, None] * R + tl.arange(0, R)[None, :]
        _park(WS, tile, split, S, 2 * BLOCK_T * R, 0, a, o)
        _park(WS, tile, split, S, 2 * BLOCK_T * R, BLOCK_T * R, b, o)
        last = _last(TICKETS, tile, S)
        if last:
            a = _gathered(WS, tile, S, 2 * BLOCK_T * R, 0, o)
            b = _gathered(WS, tile, S, 2 * BLOCK_T * R, BLOCK_T * R, o)
        return a, b, last

    @triton.jit
    def _dot(x, w):
        """x (BLOCK_T, K) times w (R, K) transposed on the tensor cores, fp32 sums: (BLOCK_T, R).
        'ieee' keeps fp32 operands exact; bf16 and fp16 ones ignore it."""
        return tl.dot(x, tl.trans(w), input_precision="ieee")

    @triton.jit
    def _put(acc, i: tl.constexpr, row):
        """acc (BLOCK_T, R) with row i set to row (R,)."""
        return tl.where(tl.arange(0, acc.shape[0])[:, None] == i, row[None, :], acc)

    @triton.jit
    def _rope_rows(POS, COS, SIN, r, T: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr):
        """The T tokens' positions (BLOCK_T, 1) and RoPE's cos and sin at them, channels r and r + HD/2
        (BLOCK_T, R) each. No kernel of the chain writes them, so they are read before the wait, with
        the weights, not after the product: two memory round trips (the positions, then the
        tables) off the end of the kernel."""
        t = tl.arange(0, BLOCK_T)[:, None]
        pos = tl.load(POS + t, mask=t < T, other=0)
        rr = r[None, :]
        return (pos, tl.load(COS + pos * HD + rr), tl.load(SIN + pos * HD + rr), tl.load(COS + pos * HD + rr + HD // 2),
                tl.load(SIN + pos * HD + rr + HD // 2))

    @triton.jit
    def _norm_qkv_rope(X, NW, WQ, WK, WV, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE, WS, TICKETS, skh, sks, svh, svs,
                       EPS, T: tl.constexpr, D: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr,
                       R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
                       KS: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        """Tile (head, j) of the H query, KV key and KV value heads: channels r = j*R .. j*R+R-1 of
        the head's first half and r + HD/2 of its second, the two that RoPE's rotate-half mixes,
        for each of the T tokens. With S > 1 (split-K, tensor cores only) S programs share a tile,
        split s summing columns s*KS .. s*KS+KS-1."""
        _let_the_next_kernel_start(PDL)
        tile, split = tl.program_id(0) // S, tl.program_id(0) % S
        head, j = tile // (HD // 2 // R), tile % (HD // 2 // R)
        if head < H:
            w_head = WQ + head * HD * D
        elif head < H + KV:
            w_head = WK + (head - H) * HD * D
        else:
            w_head = WV + (head - H - KV) * HD * D
        r = j * R + tl.arange(0, R)
        t = tl.arange(0, BLOCK_T)
        last = True
        if DOT:  # several tokens: the weight streamed through the tensor cores in chunks of BLOCK_D
            pos, c1, s1, c2, s2 = _rope_rows(POS, COS, SIN, r, T, HD, BLOCK_T)
            _wait_for_the_previous_kernel(PDL)
            inv = _inv_rms(X, EPS, T, D, BLOCK_T, BLOCK_D)
            a, b = tl.zeros([BLOCK_T, R], tl.float32), tl.zeros([BLOCK_T, R], tl.float32)
            for i in range(0, KS, BLOCK_D):  # this split's columns
                k0 = split * KS + i
                c = k0 + tl.arange(0, BLOCK_D)[None, :]
                xn = _chunk(X, NW, inv, k0, T, D, BLOCK_T, BLOCK_D)
                a += _dot(xn, tl.load(w_head + r[:, None] * D + c, mask=c < D, other=0.0))
                b += _dot(xn, tl.load(w_head + (r + HD // 2)[:, None] * D + c, mask=c < D, other=0.0))
            if S > 1:
                a, b, last = _pair_of_splits(WS, TICKETS, tile, split, S, a, b)
        else:  # a token or two: whole rows of the weight held in registers, the tokens one at a time
            c = tl.arange(0, BLOCK_D)
            wa = tl.load(w_head + r[:, None] * D + c[None, :], mask=(c < D)[None, :], other=0.0)  # loads first:
            wb = tl.load(w_head + (r + HD // 2)[:, None] * D + c[None, :], mask=(c < D)[None, :], other=0.0)
            pos, c1, s1, c2, s2 = _rope_rows(POS, COS, SIN, r, T, HD, BLOCK_T)  # after the weights' loads: it waits
            _wait_for_the_previous_kernel(PDL)
            a, b = tl.zeros([BLOCK_T, R], tl.float32), tl.zeros([BLOCK_T, R], tl.float32)
            for i in tl.static_range(T):
                xn = _normed(X + i * D, NW, EPS, D, BLOCK_D)  # the norm is computed while they arrive
                a, b = _put(a, i, _times(wa, xn)), _put(b, i, _times(wb, xn))
        if last:  # (the last of a tile's splits)
            dt = X.dtype.element_ty
            a, b = a.to(dt).to(tl.float32), b.to(dt).to(tl.float32)  # (BLOCK_T, R): the projection's output, rounded
            if head < H + KV:  # RoPE on queries and keys: x * cos + rotate_half(x) * sin, cos and sin in x's dtype
                c1, s1 = c1.to(dt).to(tl.float32), s1.to(dt).to(tl.float32)
                c2, s2 = c2.to(dt).to(tl.float32), s2.to(dt).to(tl.float32)
                a, b = a * c1 - b * s1, b * c2 + a * s2
            rr = r[None, :]
            if head < H:  # q (1, H, T, HD)
                out = Q_OUT + head * T * HD + t[:, None] * HD
            elif head < H + KV:
                out = K_CACHE + (head - H) * skh + pos * sks
            else:
                out = V_CACHE + (head - H - KV) * svh + pos * svs
            tl.store(out + rr, a.to(out.dtype.element_ty), mask=(t < T)[:, None])
            tl.store(out + rr + HD // 2, b.to(out.dtype.element_ty), mask=(t < T)[:, None])

    @triton.jit
    def _linear_residual(Y, W, RES, OUT, WS, TICKETS, T: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                         R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, S: tl.constexpr,
                         KS: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        """Tile: rows n = tile*R .. tile*R+R-1 of res + W @ y, for each of the T tokens. With S > 1
        (split-K) S programs share a tile, split s summing columns s*KS .. s*KS+KS-1."""
        _let_the_next_kernel_start(PDL)
        tile, split = tl.program_id(0) // S, tl.program_id(0) % S
        n = tile * R + tl.arange(0, R)
        t = tl.arange(0, BLOCK_T)[:, None]
        rows, keep = t * N + n[None, :], (t < T) & (n < N)[None, :]
        acc, res = tl.zeros([BLOCK_T, R], tl.float32), tl.zeros([BLOCK_T, R], tl.float32)
        # The residual is read with the first activations, not after the product (a memory round
        # trip less), where one program sums a tile in one chunk (per token) or alone (tensor cores).
        # Read inside a loop of chunks it slowed the 7B's down_proj; with split-K only the last
        # program needs it.
        EARLY_RES: tl.constexpr = (DOT and S == 1) or (not DOT and KS == BLOCK_K)
        if DOT and EARLY_RES:  # (no weight loads to overlap with the wait)
            _wait_for_the_previous_kernel(PDL)
            res = tl.load(RES + rows, mask=keep, other=0.0).to(tl.float32)
        for i in range(0, KS, BLOCK_K):  # this split's columns
            k0 = split * KS + i
            c = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(W + n[:, None] * K + c[None, :], mask=(n < N)[:, None] & (c < K)[None, :], other=0.0)
            _wait_for_the_previous_kernel(PDL)  # (at once after the first time)
            if DOT:
                acc += _dot(_chunk(Y, None, None, k0, T, K, BLOCK_T, BLOCK_K), w)
            else:
                if EARLY_RES:
                    res = tl.load(RES + rows, mask=keep, other=0.0).to(tl.float32)
                for tk in tl.static_range(T):
                    y = tl.load(Y + tk * K + c, mask=c < K, other=0.0).to(tl.float32)
                    acc += tl.where(t == tk, _times(w, y)[None, :], 0.0)
        last = True
        if S > 1:
            o = t * R + tl.arange(0, R)[None, :]
            _park(WS, tile, split, S, BLOCK_T * R, 0, acc, o)
            last = _last(TICKETS, tile, S)
            if last:
                acc = _gathered(WS, tile, S, BLOCK_T * R, 0, o)
        if last:
            if not EARLY_RES:
                res = tl.load(RES + rows, mask=keep, other=0.0).to(tl.float32)
            dt = RES.dtype.element_ty
            tl.store(OUT + rows, (res + acc.to(dt).to(tl.float32)).to(dt), mask=keep)

    @triton.jit
    def _norm_swiglu(X, NW, WG, WU, OUT, WS, TICKETS, EPS, T: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                     R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
                     KS: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        """Tile: rows f = tile*R .. tile*R+R-1 of silu(Wg @ norm(x)) * (Wu @ norm(x)), for each of the
        T tokens. With S > 1 (split-K, tensor cores only) S programs share a tile, split s summing
        columns s*KS .. s*KS+KS-1."""
        _let_the_next_kernel_start(PDL)
        tile, split = tl.program_id(0) // S, tl.program_id(0) % S
        f = tile * R + tl.arange(0, R)
        t = tl.arange(0, BLOCK_T)
        last = True
        if DOT:
            _wait_for_the_previous_kernel(PDL)
            inv = _inv_rms(X, EPS, T, D, BLOCK_T, BLOCK_D)
            g, u = tl.zeros([BLOCK_T, R], tl.float32), tl.zeros([BLOCK_T, R], tl.float32)
            for i in range(0, KS, BLOCK_D):  # this split's columns
                k0 = split * KS + i
                c = k0 + tl.arange(0, BLOCK_D)[None, :]
                m = (f < F)[:, None] & (c < D)
                xn = _chunk(X, NW, inv, k0, T, D, BLOCK_T, BLOCK_D)
                g += _dot(xn, tl.load(WG + f[:, None] * D + c, mask=m, other=0.0))
                u += _dot(xn, tl.load(WU + f[:, None] * D + c, mask=m, other=0.0))
            if S > 1:
                g, u, last = _pair_of_splits(WS, TICKETS, tile, split, S, g, u)
        else:
            c = tl.arange(0, BLOCK_D)
            m = (f < F)[:, None] & (c < D)[None, :]
            wg = tl.load(WG + f[:, None] * D + c[None, :], mask=m, other=0.0)
            wu = tl.load(WU + f[:, None] * D + c[None, :], mask=m, other=0.0)
            _wait_for_the_previous_kernel(PDL)
            g, u = tl.zeros([BLOCK_T, R], tl.float32), tl.zeros([BLOCK_T, R], tl.float32)
            for i in tl.static_range(T):
                xn = _normed(X + i * D, NW, EPS, D, BLOCK_D)
                g, u = _put(g, i, _times(wg, xn)), _put(u, i, _times(wu, xn))
        if last:
            dt = X.dtype.element_ty
            g, u = g.to(dt).to(tl.float32), u.to(dt).to(tl.float32)  # (BLOCK_T, R)
            tt = t[:, None]
            tl.store(OUT + tt * F + f[None, :], (g * tl.sigmoid(g) * u).to(dt), mask=(tt < T) & (f < F)[None, :])


# (rows per program, warps) of each kernel for a token or two: measured by bench.py decode-block.
# Small tiles and many programs, every load in flight at once, won.
TILES = {"qkv": (1, 2), "linear": (2, 4), "swiglu": (2, 4)}
# From DOT_TOKENS tokens on, the products of a bf16 or fp16 model run on the tensor cores (tl.dot, the
# tokens padded to 16 rows): (rows per program, columns per chunk, warps, pipeline stages) of each
# kernel, the stages as many as the GPU's shared memory holds (dot_stages). An fp32 model keeps the
# per-token sums, exact and batch invariant.
DOT_TOKENS = 3
DOT_TILES = {"qkv": (32, 256, 4, 4), "linear": (32, 256, 4, 4), "swiglu": (64, 256, 4, 4)}
# Gate/up's tiles where those of DOT_TILES would outnumber the SMs (the 7B shape's 14,336 rows: 224
# tiles of 64 on an H200's 132 SMs, 1.7 waves): 128 rows, 128 columns a chunk, 8 warps, one wave of
# 112 tiles. Faster at the 7B shape on an H200, slower at the 1.1B's (88 tiles of 64: one wave already;
# BENCHMARKS.md).
WIDE_SWIGLU = (128, 128, 8, 4)
DOT_DTYPES = (torch.bfloat16, torch.float16)


# Split-K on the tensor cores: a verification's tiles of 32 or 64 rows can be fewer than the SMs
# (the 1.1B's q/k/v has 40, its down_proj 64, against an H200's 132), which leaves SMs idle; each
# tile's columns are then cut into S splits, one program each. With their pipeline stages a program
# fills an SM's shared memory, so one wave of programs (S * tiles <= SMs) is the most that pays: S is
# the largest power of two that keeps to one wave, a split at least SPLIT_COLUMNS columns (measured:
# BENCHMARKS.md). The 7B shape's tiles (96 to 224) are not split.
SPLIT_COLUMNS = 512


def shared_memory(x: torch.Tensor) -> int:
    """Bytes of shared memory a program may use on x's GPU (no bound in Triton's CPU interpreter)."""
    return _shared_memory(x.device.index) if x.is_cuda else 1 << 30


@functools.cache
def _shared_memory(device: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def multiprocessors(x: torch.Tensor) -> int:
    """SMs of x's GPU (1 in Triton's CPU interpreter, which runs one program at a time)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


def dot_stages(kernel: str, R: int, BLOCK_T: int, BLOCK_K: int, element_size: int, shared: int, most: int) -> int:
    """The most pipeline stages, at most `most` (the tiles' own count), whose buffers fit `shared`
    bytes (0 if not even 2 do): each stage after the first holds a chunk of the tokens and of each
    weight's R rows, and about 10 KB go to the rest (Triton's compiled shared memory, test_model.py)."""
    weights = 1 if kernel == "linear" else 2
    for stages in range(most, 1, -1):
        if (stages - 1) * (BLOCK_T + weights * R) * BLOCK_K * element_size + 10_240 <= shared:
            return stages
    return 0


def tiles(kernel: str, x: torch.Tensor, T: int, width: int, rows=None, num_warps=None,
          most_rows: int = 1 << 30, out_rows: int = 0) -> dict:
    """A kernel's launch settings for T tokens of x over rows of `width` values (out_rows of them):
    R, BLOCK_T, the chunk of columns (BLOCK_K: the whole row below DOT_TOKENS, in _linear_residual at
    most 4096), DOT, num_warps (and num_stages on the tensor cores)."""
    if T >= DOT_TOKENS and x.dtype in DOT_DTYPES and most_rows >= 16:
        r, k, w, s = DOT_TILES[kernel]
        if kernel == "swiglu" and not rows and out_rows > r * multiprocessors(x):
            r, k, w, s = WIDE_SWIGLU
        t = dict(R=min(rows or r, most_rows), BLOCK_T=max(16, triton.next_power_of_2(T)),
                 BLOCK_K=max(16, min(k, triton.next_power_of_2(width))), DOT=True, num_warps=num_warps or w)
        t["num_stages"] = dot_stages(kernel, t["R"], t["BLOCK_T"], t["BLOCK_K"], x.element_size(), shared_memory(x), s)
        if t["num_stages"]:
            return t
    r, w = TILES[kernel]
    return dict(R=min(rows or r, most_rows), BLOCK_T=triton.next_power_of_2(T),
                BLOCK_K=min(4096, triton.next_power_of_2(width)), DOT=False, num_warps=num_warps or w)


def split_k(t: dict, x: torch.Tensor, n_tiles: int, width: int, sums: int, splits=None) -> dict:
    """The splits S of each of n_tiles tiles' `width` columns (split-K; only on the tensor cores),
    the columns of a split KS (a multiple of BLOCK_K), and the workspace WS (room for `sums`
    partial sums of (BLOCK_T, R) a split) and TICKETS (one count a tile,
    0 between launches) that S > 1 uses."""
    S = (splits or 1) if t["DOT"] else 1
    if t["DOT"] and not splits:
        while n_tiles * 2 * S <= multiprocessors(x) and width >= 2 * S * SPLIT_COLUMNS:
            S *= 2
    KS = triton.cdiv(triton.cdiv(width, S), t["BLOCK_K"]) * t["BLOCK_K"]
    slot = sums * t["BLOCK_T"] * t["R"]
    ws, tickets = _split_buffers(x.device, n_tiles * S * slot if S > 1 else 1, n_tiles)
    return dict(S=S, KS=KS, WS=ws, TICKETS=tickets)


@functools.cache
def _split_buffers(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split-K workspace and its tickets. The kernels that share one run one after another, and
    without PDL (DOT_TOKENS on), so a launch starts only once the one before has set every ticket
    back to 0."""
    return (torch.empty(floats, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))


def _launch(t: dict) -> dict:
    return {k: t[k] for k in ("num_warps", "num_stages") if k in t}


def norm_qkv_rope(x, norm_w, eps, wq, wk, wv, rope, pos, cache, rows=None, num_warps=None, pdl=False, splits=None):
    """RMSNorm, the q/k/v projections and RoPE of T tokens (a few), their keys and values
    written into the cache: the queries (1, H, T, hd). x (1, T, d); norm_w (d,) and eps the
    RMSNorm's; wq (H*hd, d), wk, wv (KV*hd, d); rope the model's whole (cos, sin) tables
    (max_pos, hd), read at pos (T,) inside the kernel; cache (k, v), each (1, KV, S, hd).
    Plain-torch form, as model.Attention computes it, with cos, sin = rope[0][pos], rope[1][pos]:
        h = norm(x); q, k, v = q_proj(h), k_proj(h), v_proj(h)   (viewed as heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin); cache.update(pos, k, v)"""
    (k, v), (T, d) = cache, x.shape[-2:]
    KV, hd = k.shape[1], k.shape[3]
    H = wq.shape[0] // hd
    t = tiles("qkv", x, T, d, rows, num_warps, most_rows=hd // 2)
    block_d = t["BLOCK_K"] if t["DOT"] else triton.next_power_of_2(d)  # a chunk, or the whole row
    n_tiles = (H + 2 * KV) * (hd // 2 // t["R"])
    sk = split_k(t, x, n_tiles, d, 2, splits)
    q = torch.empty(1, H, T, hd, dtype=x.dtype, device=x.device)
    _norm_qkv_rope[(n_tiles * sk["S"],)](
        x, norm_w, wq, wk, wv, *rope, pos, q, k, v, sk["WS"], sk["TICKETS"], k.stride(1), k.stride(2), v.stride(1),
        v.stride(2), eps, T, d, H=H, KV=KV, HD=hd, R=t["R"], BLOCK_T=t["BLOCK_T"], BLOCK_D=block_d, S=sk["S"],
        KS=sk["KS"], DOT=t["DOT"], **pdl_options(pdl), **_launch(t))
    return q


def linear_residual(y, weight, res, rows=None, num_warps=None, pdl=False, splits=None):
    """res + y @ weight.T for T tokens: y (T, in) contiguous, weight (out, in), res (1, T, out) ->
    (1, T, out). The projections that write into the residual stream (o_proj, down_proj)."""
    N, K = weight.shape
    T = res.shape[1]
    t = tiles("linear", y, T, K, rows, num_warps)
    n_tiles = triton.cdiv(N, t["R"])
    sk = split_k(t, y, n_tiles, K, 1, splits)
    out = torch.empty_like(res)
    _linear_residual[(n_tiles * sk["S"],)](y, weight, res, out, T=T, N=N, K=K, **t, **sk, **pdl_options(pdl))
    return out


def norm_swiglu(x, norm_w, eps, wg, wu, rows=None, num_warps=None, pdl=False, splits=None):
    """silu(gate_proj(h)) * up_proj(h) with h = norm(x), for T tokens: x (1, T, d) -> (T, ffn), the
    input of down_proj (model.MLP before its last product); norm_w (d,), eps; wg, wu (ffn, d)."""
    (F_, d), T = wg.shape, x.shape[1]
    t = tiles("swiglu", x, T, d, rows, num_warps, out_rows=F_)
    block_d = t["BLOCK_K"] if t["DOT"] else triton.next_power_of_2(d)  # a chunk, or the whole row
    n_tiles = triton.cdiv(F_, t["R"])
    sk = split_k(t, x, n_tiles, d, 2, splits)
    out = torch.empty(T, F_, dtype=x.dtype, device=x.device)
    _norm_swiglu[(n_tiles * sk["S"],)](x, norm_w, wg, wu, out, sk["WS"], sk["TICKETS"], eps, T, d, F_, R=t["R"],
                                       BLOCK_T=t["BLOCK_T"], BLOCK_D=block_d, S=sk["S"], KS=sk["KS"],
                                       DOT=t["DOT"], **pdl_options(pdl), **_launch(t))
    return out


# Whether decode_block launches its kernels with programmatic dependent launch on a GPU that has it
# (compute capability 9.0 on); bench.py decode turns it off for the side-by-side row.
PDL = True
# The most tokens decode_block takes: a one-token step, a speculative draft's two-token catch-up, the
# target's verification of up to 7 proposals.
BLOCK_TOKENS = 8


def decode_block(block: plain.Block, x, rope, pos, stages: int = 1, read_ahead: bool = False):
    """model.Block.forward for a few tokens of one sequence (at most BLOCK_TOKENS), in six kernels: norm + q/k/v +
    RoPE + cache write, the decode attention (two), o_proj + residual, norm + gate/up + SiLU,
    down_proj + residual. x (1, T, d); rope the model's (cos, sin) tables; pos (T,). Equal to
    block(x, rope[0][pos], rope[1][pos], pos). One custom op to torch.compile: inductor neither
    looks into its kernels nor launches them, so they can be launched with PDL. stages, read_ahead:
    the decode attention's (attention_settings)."""
    cache = block.self_attn.kv_cache
    return _decode_block(x, pos, cache.k, cache.v, rope[0], rope[1], *block_weights(block), stages, read_ahead)


def block_weights(block: plain.Block) -> tuple[list, list]:
    """A block's weights in the order the decode_block op takes them, and its two norms' eps."""
    a, m, n1, n2 = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
    return ([n1.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, n2.weight,
             m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight], [n1.eps, n2.eps])


if triton is not None:
    @torch.library.custom_op("portimbria::decode_block", mutates_args=("k", "v"))
    def _decode_block(x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, weights: list[torch.Tensor], eps: list[float], stages: int,
                      read_ahead: bool) -> torch.Tensor:
        n1, wq, wk, wv, wo, n2, wg, wu, wd = weights
        # Hopper on, for one or two tokens: with PDL on the tensor-core kernels, one after another, a
        # 7B-shaped block of 5 tokens took 182 us against 138 without (why was not found; BENCHMARKS.md).
        # Nor would they be safe as they are: a pipelined loop loads its first chunks of activations
        # in its prologue, before the wait inside it (_linear_residual with split-K).
        pdl = (PDL and x.is_cuda and torch.version.hip is None and x.shape[1] < DOT_TOKENS
               and torch.cuda.get_device_capability(x.device)[0] >= 9)
        x = x.contiguous()
        q = norm_qkv_rope(x, n1, eps[0], wq, wk, wv, (cos, sin), pos, (k, v), pdl=pdl)
        y = decode_attention(q, k, v, pos, pdl=pdl, stages=stages, read_ahead=read_ahead and pdl)
        y = y.transpose(1, 2)  # (1, T, H, hd), contiguous
        x = linear_residual(y, wo, x, pdl=pdl)
        return linear_residual(norm_swiglu(x, n2, eps[1], wg, wu, pdl=pdl), wd, x, pdl=pdl)

    @_decode_block.register_fake
    def _(x, pos, k, v, cos, sin, weights, eps, stages, read_ahead):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def projections(block: plain.Block) -> list:
    a, m = block.self_attn, block.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def fuses(block: plain.Block) -> bool:
    """Whether decode_block can run this block: no biases, contiguous weights of one dtype, a head
    size that is a power of two. No timing decides it: on an H200 it beat the compiled block at the
    150M, 1.1B and 7B widths at one and two tokens and, its tensor-core kernels launched without
    PDL, at five (BENCHMARKS.md). Not everywhere: at two tokens of the 7B shape, a speculative
    verification of K = 1, it took 5.30 ms against 4.78 through cuBLAS."""
    ms = projections(block)
    return (all(m.bias is None for m in ms) and
            all(m.weight.is_contiguous() and m.weight.dtype == ms[0].weight.dtype for m in ms) and
            block.self_attn.hd >= 2 and block.self_attn.hd & (block.self_attn.hd - 1) == 0)


def use_decode_blocks(model: plain.Llama, stages: int = 1, read_ahead: bool = False):
    """Cached forwards of up to BLOCK_TOKENS tokens of batch 1 through decode_block where it fuses (the
    block's own forward otherwise, and for every other forward), its attention with `stages` and
    `read_ahead`."""
    for block in model.model.layers:
        block.__dict__.pop("forward", None)  # the class's forward, if installed before
        if fuses(block):
            block.forward = _few_token_forward(model, block, block.forward, stages, read_ahead)


def _few_token_forward(model, block, forward, stages, read_ahead):
    def run(x, cos, sin, pos=None):
        if (pos is not None and x.shape[0] == 1 and x.shape[1] <= BLOCK_TOKENS
                and block.self_attn.kv_cache.k.shape[0] == 1):
            return decode_block(block, x, (model.rope_cos, model.rope_sin), pos, stages, read_ahead)
        return forward(x, cos, sin, pos)
    return run


def attention_settings(model: plain.Llama, stages=(1, 2, 4), slots: int = 512, cached: int = 300) -> dict:
    """Time a one-token step's blocks through decode_block with each of the decode attention's
    pipeline `stages`, reading ahead or not: one CUDA graph over every block that fuses, each with
    a cache of `slots` holding `cached` positions. The best showed only among the kernels around
    the attention, and it differs by model: on an H200, reading ahead, the 1.1B's and a 7B-shaped
    model's blocks were fastest with 1 stage and the Portimbria-150M's with 1 or 4, while with 2
    stages reading ahead slowed the 7B shape's by 6-7 us (BENCHMARKS.md).
    Returns {(stages, read_ahead): us a block}."""
    blocks = [b for b in model.model.layers if fuses(b)]
    if not blocks:
        return {}
    w, a = model.lm_head.weight, blocks[0].self_attn
    slots = min(slots, model.rope_cos.shape[0])  # a short context: no position past RoPE's tables
    cached = min(cached, slots - 1)
    caches = [torch.randn(2, 1, a.n_kv, slots, a.hd, dtype=w.dtype, device=w.device) for _ in blocks]
    x = torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device)
    pos, rope = torch.tensor([cached], device=w.device), (model.rope_cos, model.rope_sin)
    weights = [block_weights(b) for b in blocks]
    times = {}
    with torch.no_grad():
        for setting in [(s, ahead) for ahead in (False, True) for s in stages]:
            def run(setting=setting):
                return [_decode_block(x, pos, k, v, *rope, *bw, *setting) for (k, v), bw in zip(caches, weights)]
            run()  # Triton compiles, outside the graph
            times[setting] = round(cuda_graph_us(run, 20) / len(blocks), 2)
    return times


class DecodeLinear(nn.Linear):
    """nn.Linear for decoding a few tokens at a time, x (B, T, in) @ W.T, bound by reading W once.
    - One token, compiled: written as multiply-and-sum, inductor compiles it to one loop that
      streams W and fuses it with its neighbours: faster than cuBLAS's GEMV for small weights
      (width 768), slower for large ones (width 4096), so `multiply_sum` is set per weight shape
      by measure_projections on a GPU; on the CPU it beat the BLAS GEMV at every width measured.
      On a GPU two tokens too (where decode_block does not take the block: one with a bias, or
      batch > 1), by the same per-shape choice (timed at one token): the 150M's
      two-token forward took 681 us this way against 997 through cuBLAS (BENCHMARKS.md).
    - A few tokens on the CPU: (W @ x^T)^T. The BLAS reaches the same numbers through a faster
      path than x @ W^T, whose small-M GEMM packs the whole weight (BENCHMARKS.md)."""

    multiply_sum = True

    def forward(self, x):
        tokens = x.shape[-2]
        if (self.bias is None and self.multiply_sum and torch.compiler.is_compiling()
                and (tokens == 1 or (tokens == 2 and x.is_cuda))):
            return (x.unsqueeze(-2) * self.weight).sum(-1)  # (B, T, 1, in) * (out, in) -> (B, T, out)
        if self.bias is None and x.device.type == "cpu" and 1 < x.shape[-2] <= 16:
            return (self.weight @ x.flatten(0, -2).T).T.view(*x.shape[:-1], -1)  # (out, in) @ (in, B*T)
        return F.linear(x, self.weight, self.bias)


def _multiply_sum(x, w):
    return (x.unsqueeze(-2) * w).sum(-1)


def measure_projections(model: nn.Module, l2_bytes: int = 2 ** 28, margin: float = 1.25) -> dict:
    """Time a one-token product with each DecodeLinear weight shape both ways, cuBLAS (F.linear)
    and the compiled multiply-and-sum, each as one CUDA graph over copies of the weight that
    together exceed the L2 cache (as a decode step's weights do), and set multiply_sum where it
    is faster by `margin`. Returns {(out, in): {"cublas_us": .., "multiply_sum_us": ..}}."""
    linears = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    w0 = linears[0].weight
    compiled = torch.compile(_multiply_sum, fullgraph=True, dynamic=False)
    times = {}
    with torch._dynamo.config.patch(recompile_limit=64):  # one graph per shape, of every model measured
        for shape in sorted({tuple(m.weight.shape) for m in linears}):
            times[shape] = _time_projection(shape, w0, compiled, l2_bytes)
    for m in linears:  # inside the step's graph the reduction kept less of its lead than alone
        t = times[tuple(m.weight.shape)]
        m.multiply_sum = t["multiply_sum_us"] * margin < t["cublas_us"]
    return times


def _time_projection(shape, w0, compiled, l2_bytes: int) -> dict:
    copies = min(256, max(2, math.ceil(l2_bytes / (shape[0] * shape[1] * w0.element_size()))))
    ws = [torch.randn(shape, dtype=w0.dtype, device=w0.device) for _ in range(copies)]
    x = torch.randn(1, 1, shape[1], dtype=w0.dtype, device=w0.device)
    times = {}
    for name, fn in (("cublas_us", F.linear), ("multiply_sum_us", compiled)):
        fn(x, ws[0])  # compile, pick the cuBLAS kernel
        times[name] = round(cuda_graph_us(lambda: [fn(x, w) for w in ws]) / copies, 2)
    return times


def cuda_graph_us(run, replays: int = 10) -> float:
    """Microseconds per replay of run() captured as one CUDA graph (after one untimed replay)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def use_decode_kernels(model: plain.Llama, measure: bool = True) -> dict:
    """Kernels for decoding a few tokens at a time (compiled): every nn.Linear becomes a
    DecodeLinear, and on a GPU with Triton the cached attention of up to 16 new tokens goes
    through decode_attention; when measure, each weight shape's faster product is set and batch-1
    forwards of up to BLOCK_TOKENS tokens go through decode_block wherever it fuses, its attention
    with the fastest attention settings measured. Returns those timings (empty on the CPU):
    {"projections_us": {"outxin": ..}, "attention_us": {"stages 4, read ahead": us a block, ..}}."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear  # same weights, the decode-time forward
    on_gpu = model.lm_head.weight.is_cuda
    if not (on_gpu and triton is not None):
        return {}
    for block in model.model.layers:
        block.self_attn.attend = _cached_attention
    if not measure:
        return {}
    timings = measure_projections(model)
    settings = attention_settings(model)
    use_decode_blocks(model, *min(settings, key=settings.get, default=(1, False)))
    return {"projections_us": {f"{o}x{i}": t for (o, i), t in timings.items()},
            "attention_us": {f"stages {s}" + (", read ahead" if ahead else ""): t
                             for (s, ahead), t in settings.items()}}


def _cached_attention(q, k, v, pos=None):
    if pos is None or q.shape[2] > 16:  # whole sequences and long prompts: the model's attention
        return plain.attention(q, k, v, pos)
    return decode_attention(q, k, v, pos)


# ---------------------------------------------------------------------------------------------
# Decode steps under CUDA graphs


def step_options(model: plain.Llama) -> dict | None:
    """Inductor's options for a decode step on a GPU (None, the defaults, on the CPU, where the
    step has no user-defined Triton kernel). Inductor gives each user-defined Triton kernel its own
    stored copy of an input it has not stored (a cheap pointwise result such as the step's
    positions), one more kernel per use: 40 a token for the 150M's 20 layers, measured while
    decode_block's kernels were still inductor's to launch (it is one custom op now, whose inputs
    inductor stores anyway; the decode attention of longer forwards is still inductor's). A
    threshold of 0 stores every pointwise result that has more than one user, which keeps it to one."""
    return {"realize_reads_threshold": 0} if model.lm_head.weight.is_cuda else None


def compile_generator(gen, sync_every: int = 32):
    """Compile a sample.Generator's decode step (use_decode_kernels first). On a GPU, its
    `sync_every` steps between two host reads become one CUDA graph replay (GraphedSteps), and it
    reads back every `sync_every` tokens: each read drains the GPU's queue; the prompt's pass is a
    CUDA graph too (GraphedPrefill)."""
    timings = use_decode_kernels(gen.model)
    gen.step = torch.compile(gen.step, fullgraph=True, dynamic=False, options=step_options(gen.model))
    gen.compiled = True
    if gen.model.lm_head.weight.is_cuda:
        gen.steps, gen.sync_every = GraphedSteps(gen.step, [gen.model]), sync_every
        gen.prefill = GraphedPrefill(gen.model)
    return timings


def compile_speculative(gen, sync_every: int = 8):
    """Compile a sample.SpeculativeGenerator's round of gen.k proposals whole, with the decode kernels:
    the draft's two-token and one-token forwards, the target's k + 1, and the bookkeeping between
    them (greedy picks, seen-token rows, accept) fused into a few kernels. On a GPU, the
    `sync_every` rounds between two host reads become one CUDA graph replay, and each model's
    prompt pass is one too. The rounds near the end of the context, with fewer proposals, run eagerly.
    Returns each model's use_decode_kernels timings."""
    timings = {name: use_decode_kernels(m) for name, m in (("target", gen.target), ("draft", gen.draft))
               if name == "target" or gen.draft is not gen.target}
    gen.steady_round = torch.compile(gen.round, fullgraph=True, dynamic=False, options=step_options(gen.target))
    gen.compiled = True
    if gen.target.lm_head.weight.is_cuda:
        gen.rounds, gen.sync_every = GraphedSteps(gen.steady_round, [gen.target, gen.draft]), sync_every
        gen.prefill = {name: GraphedPrefill(m) for name, m in (("target", gen.target), ("draft", gen.draft))}
    return timings


def cache_addresses(models) -> tuple:
    """Where the models' KV caches live: a captured graph reads and writes these addresses."""
    return tuple((b.self_attn.kv_cache.k.data_ptr(), b.self_attn.kv_cache.v.data_ptr(),
                  tuple(b.self_attn.kv_cache.k.shape)) for m in models for b in m.model.layers)


def padded_prefill(model: plain.Llama, ids, last):
    """The prompt's pass of Generator.prefill over ids (B, T), a prompt and padding after it, with
    the head at position last (1,) only: (B, V) float32. Causal attention keeps the padding out of
    the prompt's positions, and its keys and values land past the prompt, where the position
    bound hides them until decoding overwrites them: the logits at last and the cache below it
    are those of the unpadded pass (up to rounding: in bf16 the products of more rows may take
    other kernels)."""
    h = model.hidden(ids, start_pos=0)  # (B, T, d)
    return model.lm_head(h.index_select(1, last))[:, 0].float()


def warm_up(run):
    """run() once on a side stream before its capture, as CUDA graphs want: torch.compile compiles,
    cuBLAS and Triton pick their kernels, outside the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)


class GraphedPrefill:
    """Generator.prefill as a CUDA graph replay, ids (B, P) -> the logits at the last position
    (B, V) float32: the prompt is padded to a power of two (at least 16 tokens, at most the cache)
    and one graph per (batch, padded length) of the current caches is captured on first use
    (padded_prefill). Run eagerly, the prompt's pass is one host call per operation: 18 ms for a
    16-token prompt of the 150M on an H200, 70 us a token of 256 (BENCHMARKS.md)."""

    def __init__(self, model: plain.Llama):
        self.model, self.graphs, self.caches = model, {}, None
        self.pool = torch.cuda.graph_pool_handle()  # shared: a graph's output is copied out at once

    def __call__(self, ids):
        B, P = ids.shape
        T = min(max(16, 1 << (P - 1).bit_length()), self.model.cache_len)
        caches = cache_addresses([self.model])
        if caches != self.caches:  # new caches: the graphs of the old ones would write freed memory
            self.graphs, self.caches = {}, caches
        if (B, T) not in self.graphs:
            self.graphs[B, T] = self.capture(B, T, ids.device)
        graph, static_ids, last, logits = self.graphs[B, T]
        static_ids[:, :P] = ids  # what the padding holds does not matter: no prompt position sees it
        last.fill_(P - 1)
        graph.replay()
        return logits.clone()

    def capture(self, B, T, device):
        static_ids = torch.zeros(B, T, dtype=torch.long, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        warm_up(lambda: padded_prefill(self.model, static_ids, last))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = padded_prefill(self.model, static_ids, last)
        return graph, static_ids, last, logits


class GraphedSteps:
    """steps(n, *state, *settings) as one CUDA graph of n calls of step(*state, *settings), a
    function that updates its state tensors in place. The graph reads and writes fixed addresses:
    its own copies of the state (copied in before a replay and out after it), the models' weights
    and KV caches. One graph per (n, shapes, settings, caches), captured on first use after one
    warm-up call whose effects are undone (its cache writes are the ones the first real call
    makes, and the random state is restored)."""

    def __init__(self, step, models):
        self.step, self.models, self.graphs = step, models, {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, n, *args):
        state = [a for a in args if isinstance(a, torch.Tensor)]
        settings = tuple(a for a in args if not isinstance(a, torch.Tensor))
        key = (n, tuple((s.shape, s.dtype) for s in state), settings, cache_addresses(self.models))
        if key not in self.graphs:
            self.graphs[key] = self.capture(n, state, settings)
        graph, static = self.graphs[key]
        for s, a in zip(static, state):
            s.copy_(a)
        graph.replay()
        for s, a in zip(static, state):
            a.copy_(s)

    def capture(self, n, state, settings):
        static = [s.clone() for s in state]
        rng = torch.cuda.get_rng_state()
        warm_up(lambda: self.step(*static, *settings))
        for s, a in zip(static, state):
            s.copy_(a)
        torch.cuda.set_rng_state(rng)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            for _ in range(n):
                self.step(*static, *settings)
        return graph, static
