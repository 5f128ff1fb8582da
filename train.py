"""Pretrain a Llama on packed token shards: one loop for TPU (xmp.spawn), CUDA and CPU.

    python train.py                                          # Portimbria-150M, the card's recipe
    python train.py --preset tiny --data_dir data/demo --seq_len 256 --max_steps 200
    torchrun --nproc_per_node=8 train.py                     # several GPUs (DDP, NCCL)
    torchrun --nproc_per_node=2 train.py --device cpu        # several CPU processes (gloo)
    python train.py --resume                                 # continue OUT_DIR/latest

Every field of TrainConfig and ModelConfig (config.py) is an option: `--lr 3e-4`, `--compile false`.
Checkpoints (OUT_DIR/latest, OUT_DIR/best) are Hugging Face model folders (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import data
from config import ModelConfig, TrainConfig, configure, model_config, parse_args
import kernels
from model import Llama

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5e": 197e12,
              "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12, "TPU v6e": 918e12}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Devices: one class per device family, with the same methods; the loop calls only these.
# TorchRuntime runs CUDA and the CPU (one process, or DDP under torchrun); XLARuntime runs a
# TPU's chips under xmp.spawn (and XLA on the CPU, which is how the tests check it).


def device_kind(requested: str) -> str:
    """'xla' on a TPU VM (or with PJRT_DEVICE set), else 'cuda' when a GPU is visible, else
    'cpu'; or what --device asks for."""
    if requested in ("tpu", "xla") or (requested == "auto" and (
            os.environ.get("PJRT_DEVICE") or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))):
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        # Python scalars that change every step (the learning rate) must reach the graph as
        # inputs, not as constants, or each new value compiles a new graph.
        os.environ.setdefault("XLA_NO_SPECIAL_SCALARS", "1")
        return "xla"
    try:
        return checkpoint.device_and_dtype(requested)[0]  # CUDA when it is there
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None


def make_runtime(kind: str, tcfg: TrainConfig, index: int = 0):
    """The runtime of this process: kind from device_kind; index is an XLA worker's."""
    if kind == "xla":
        cache = str(Path(tcfg.out_dir) / tcfg.xla_cache_dir / str(index)) if tcfg.xla_cache_dir else None
        return XLARuntime(cache)
    return TorchRuntime(kind, tcfg.compile, tcfg.memory_budget)


class Runtime:
    """What both families do alike. A subclass sets device, name, rank, world, master."""

    def autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def peak_flops(self) -> float | None:
        """The device's dense bf16 peak, for MFU; None for a device PEAK_FLOPS does not know."""
        return next((v for k, v in PEAK_FLOPS.items() if k.lower() in self.name.lower()), None)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if flag is true on any: a collective, so all ranks must call it."""
        if self.world == 1:
            return flag
        return self.all_reduce_sum(torch.tensor([float(flag)]).to(self.device)).item() > 0


class TorchRuntime(Runtime):
    """CUDA or the CPU, one process or one of torchrun's (DDP over NCCL or gloo)."""

    tpu = False
    sum_dtype = torch.float64  # the validation loss sums many batches

    def __init__(self, kind: str, compile_model: bool = False, memory_budget: float = 1.0):
        self.kind = kind  # "cuda" | "cpu"
        self.compile = compile_model and kind == "cuda"
        if self.compile:
            set_memory_budget(memory_budget)
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.master = self.rank == 0
        local = int(os.environ.get("LOCAL_RANK", 0))
        if kind == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
            self.name = torch.cuda.get_device_name(local)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device, self.name = torch.device("cpu"), "CPU"
            checkpoint.reuse_freed_host_memory()
        self.ddp = self.world > 1
        if self.ddp:
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")

    def prepare(self, model: Llama, tcfg: TrainConfig):
        """Move the model to the device, with block checkpointing if asked."""
        model.to(self.device)
        if tcfg.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint as recompute

            recompute_blocks(model, functools.partial(recompute, use_reentrant=False))

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host batch on the device. On CUDA from pinned memory without waiting, so the copy
        overlaps the GPU's work (the loop fetches the next batch before the backward pass)."""
        t = torch.from_numpy(array)
        if self.kind == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def peak_memory(self) -> str | None:
        if self.kind != "cuda":
            return None
        used = torch.cuda.max_memory_allocated(self.device)
        return format_memory(used, torch.cuda.get_device_properties(self.device).total_memory)

    def wrap(self, model):
        """The module the loop calls: DDP across processes, compiled on CUDA."""
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Gradients live in DDP's all-reduce buckets (no copy in and out), and 100 MB buckets
            # (default 25) make fewer, larger all-reduces of the fp32 gradients.
            model = self.ddp_model = DDP(model, device_ids=[self.device.index] if self.kind == "cuda" else None,
                                         gradient_as_bucket_view=True, bucket_cap_mb=100)
        return torch.compile(model) if self.compile else model

    def no_sync(self, last_micro: bool):
        return self.ddp_model.no_sync() if self.ddp and not last_micro else contextlib.nullcontext()

    def optimizer(self, groups, lr, betas, eps):
        # Fused AdamW: one kernel per step, and it honours opt.found_inf (skips the update).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    def reduce_grads(self, opt):
        pass  # DDP all-reduced them during backward

    def optimizer_step(self, opt, found_inf):
        """One AdamW update, skipped on the device when found_inf is 1: no host round-trip."""
        opt.found_inf = found_inf
        opt.step()

    def micro_step_boundary(self):
        pass

    def zero_grad(self, opt):
        opt.zero_grad(set_to_none=True)

    def step_boundary(self):
        pass

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def compile_stats(self) -> dict:
        return {}

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


class XLARuntime(Runtime):
    """One process per TPU chip under xmp.spawn (spawn_xla), or XLA on the CPU. The loop's
    boundaries cut its graphs: a micro-batch's forward and backward, then the update."""

    sum_dtype = torch.float32  # a TPU has no float64

    def __init__(self, cache_dir: str | None = None):
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.metrics as xla_metrics
        import torch_xla.runtime as xr

        self.xla, self.xm, self.xla_metrics = torch_xla, xm, xla_metrics
        if cache_dir:
            # One directory per process, as torch_xla's docs do it: a restart or --resume
            # loads the compiled graphs instead of compiling them again (minutes on a TPU).
            xr.initialize_cache(cache_dir)
        self.device = torch_xla.device()
        self.rank, self.world = xr.global_ordinal(), xr.world_size()
        self.master = self.rank == 0
        self.tpu = xr.device_type() == "TPU"
        # e.g. "TPU v5 lite" on a v5e, which PEAK_FLOPS knows
        self.name = xm.xla_device_kind() if self.tpu else f"XLA {xr.device_type()}"

    def prepare(self, model: Llama, tcfg: TrainConfig):
        """Move the model to the device and give it XLA's attention kernel, loss, block
        checkpointing and matmul precision."""
        model.to(self.device)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # .to() on XLA can untie
        kernels.use_attention(model, kernels.pallas_attention if self.tpu else kernels.blockwise_attention)
        kernels.use_chunked_loss(model, 1024)  # the step's full logits would not fit in fp32
        if model.config.fp32_edge_blocks and tcfg.precision == "bf16":
            # A TPU multiplies fp32 matrices in one bf16 pass by default
            # (torch_xla/backends); "highest" makes the edge blocks' matmuls really fp32.
            import torch_xla.backends

            torch_xla.backends.set_mat_mul_precision("highest")
        if tcfg.activation_checkpointing:
            # torch_xla's version puts an optimization barrier before the recomputation, or
            # XLA's common-subexpression pass would merge it with the forward pass.
            from torch_xla.utils.checkpoint import checkpoint as recompute

            recompute_blocks(model, functools.partial(recompute, use_reentrant=True))

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def peak_memory(self) -> str | None:
        if not self.tpu:
            return None
        info = self.xm.get_memory_info(self.device)
        return format_memory(info.get("peak_bytes_used", info["bytes_used"]), info["bytes_limit"])

    def wrap(self, model):
        return model

    def no_sync(self, last_micro: bool):
        return contextlib.nullcontext()

    def optimizer(self, groups, lr, betas, eps):
        # torch_xla's sync-free AdamW skips a step on found_inf without a host round-trip.
        from torch_xla.amp import syncfree

        return syncfree.AdamW(groups, lr=lr, betas=betas, eps=eps)

    def reduce_grads(self, opt):
        # before clipping, so the clip sees the global gradient norm
        if self.world > 1:
            self.xm.reduce_gradients(opt)

    def optimizer_step(self, opt, found_inf):
        opt.step(found_inf=found_inf)

    def micro_step_boundary(self):
        """After each micro-batch's backward: run it as its own graph, so its activations are
        freed before the next micro-batch, and the step is two graphs whatever grad_accum is."""
        self.xla.sync()

    def zero_grad(self, opt):
        # The gradients stay allocated (zeroed inside the update's graph), so every micro-batch
        # graph finds them as inputs: one graph, not a first-micro-batch variant.
        opt.zero_grad(set_to_none=False)

    def step_boundary(self):
        self.xla.sync()  # exactly once per optimizer step

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.xm.all_reduce(self.xm.REDUCE_SUM, t) if self.world > 1 else t

    def compile_stats(self) -> dict:
        """Graphs compiled so far (the count stops growing once every step shape is compiled),
        and how many of them the persistent cache did not have."""
        return {"xla_compiles": self.xla_metrics.counter_value("UncachedCompile") or 0,
                "xla_cache_misses": self.xla_metrics.counter_value("PersistentCacheMiss") or 0}

    def close(self):
        pass


def spawn_xla(worker, args):
    """XLA: one process per chip (xmp.spawn). This parent only waits, so a signal sent to it
    (a preemption's SIGTERM, Ctrl-C) is passed on to the workers, which save and stop."""
    import torch_xla.distributed.xla_multiprocessing as xmp

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    xmp.spawn(worker, args=args)


def format_memory(used, limit) -> str:
    return f"{int(used) / 2**30:.2f} of {int(limit) / 2**30:.2f} GiB"


def set_memory_budget(budget: float):
    """--memory_budget: torch.compile's partitioner keeps this share of the activations for
    backward and recomputes the cheapest rest (1: keep all, its default)."""
    if budget < 1:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = budget


def recompute_blocks(model: Llama, recompute):
    """Activation checkpointing: in training, each block's activations are recomputed in backward
    (recompute(fn, *args), torch's or torch_xla's checkpoint) instead of kept."""
    for block in model.model.layers:
        def forward(*args, _block=block, _forward=block.forward):
            return recompute(_forward, *args) if _block.training else _forward(*args)

        block.forward = forward


# ---------------------------------------------------------------------------------------------
# The recipe: optimizer groups and LR schedule


def param_groups(model: Llama, weight_decay: float):
    """Weight decay on Linear weights only: not on norms, not on the (tied) embedding. Frozen
    weights (LoRA's base) are not the optimizer's."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() == 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine to min_lr; or with
    schedule='wsd', constant until the last decay_frac of the steps, then linear to min_lr.
    The decay reaches min_lr one step past the last (as nanoGPT's does), so no update is made
    with lr exactly 0: torch_xla would bake that 0 into a second compiled graph."""
    warm = max(1, int(cfg.warmup_frac * max_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, max_steps - warm)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))
    if cfg.schedule == "wsd":
        decay_start = max(warm, max_steps - int(cfg.decay_frac * max_steps))
        if step < decay_start:
            return cfg.lr
        t = (step - decay_start) / max(1, max_steps - decay_start)
        return cfg.lr - (cfg.lr - cfg.min_lr) * min(t, 1.0)
    raise ValueError(f"--schedule {cfg.schedule!r}: choose cosine or wsd")


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """6N for the weights' matmuls (forward + backward) plus 12*L*d*T for attention (PaLM)."""
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ---------------------------------------------------------------------------------------------
class StopSignal:
    """SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) are recorded here; the ranks
    agree on them at the next log step, save OUT_DIR/latest and exit with 128 + the signal's
    number (143, 130), as a shell reports a process the signal ended: a scheduler must not read
    the stop as a finished run."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    def is_set(self) -> bool:
        return self.signum != 0

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)  # a rank told by the others: SIGTERM's


STOP = StopSignal()


def install_stop_handlers():
    signal.signal(signal.SIGTERM, STOP)
    signal.signal(signal.SIGINT, STOP)


def save_on_master(rt: Runtime, what: Path, write):
    """Run write() on rank 0, and tell every rank whether it worked: if it failed (a full disk),
    all ranks stop with a message rather than wait forever in the next collective."""
    error = None
    if rt.master:
        try:
            write()
        except OSError as e:
            error = e
    if rt.any_rank(error is not None):
        raise SystemExit(f"train.py: could not write {what}: {error}. The previous checkpoint is "
                         f"intact; free space or fix permissions, then continue with --resume"
                         if rt.master else f"train.py rank {rt.rank}: stopping, rank 0 could not write {what}")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: a model folder's weights, and LoRA


class LoRALinear(nn.Module):
    """A frozen Linear plus a trained low-rank update (Hu et al. 2021, LoRA):

        y = x W^T + (alpha / r) (x A^T) B^T      W (out, in) frozen; A (r, in), B (out, r) trained

    A starts as nn.Linear's (and peft's) Kaiming-uniform init and B at zero, so training starts
    from the base model exactly. The adapters are of the base's own class (FP32Linear in the
    recipe's fp32 edge blocks). Module names are peft's (base_layer, lora_A, lora_B), so
    checkpoint.py writes the adapters in peft's layout by name alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = type(base)(base.in_features, rank, bias=False)
        self.lora_B = type(base)(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_lora(model: Llama, rank: int, alpha: float, targets: list[str]) -> int:
    """Freeze every weight and give each target projection of every block an adapter; returns
    the trainable count."""
    model.requires_grad_(False)
    for block in model.model.layers:
        for module in (block.self_attn, block.mlp):
            for name in targets:
                if isinstance(getattr(module, name, None), nn.Linear):
                    setattr(module, name, LoRALinear(getattr(module, name), rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_config(folder: str, given: dict) -> ModelConfig:
    """The shape of a model started from a folder: its config.json. The precision recipe and the
    context length are the run's to choose; a shape option that contradicts the folder is refused."""
    cfg = checkpoint.load_config(Path(folder))
    if "preset" in given:
        raise ValueError(f"--preset and --init_from both give the model's shape; leave out --preset "
                         f"(the shape is {folder}/config.json's)")
    for k, v in given.items():
        if hasattr(cfg, k) and k not in PRECISION | {"max_position_embeddings"} and getattr(cfg, k) != v:
            raise ValueError(f"--{k} {v} contradicts --init_from {folder} ({k}={getattr(cfg, k)} in "
                             f"its config.json); leave out --{k}")
    return configure(cfg, given)


# ---------------------------------------------------------------------------------------------
# The loop


def default_eval_windows(train_tokens: int, seq_len: int, world: int = 1) -> int:
    """--max_eval_samples 0: a tenth of the windows the run trains on, so that a short run does not
    spend most of its time evaluating, and at most the recipe's 5000 (a full run has millions)."""
    return max(world, min(5000, train_tokens // seq_len // 10))


EVAL_PROGRESS_S = 30  # seconds between the progress lines of a long evaluation


@torch.no_grad()
def validation_loss(model, windows, rt: Runtime, cfg: TrainConfig) -> tuple[float, int]:
    """Mean loss over all ranks' validation windows, and how many windows. Every batch has the
    same shapes and inputs made on the host (a short last batch is padded with rows whose targets
    are ignored), so under XLA the whole evaluation is one graph and one host read."""
    model.eval()
    total = torch.zeros(2, dtype=rt.sum_dtype).to(rt.device)  # (sum of losses x tokens, tokens)
    t0 = last = time.time()
    for i in range(0, len(windows), cfg.batch_size):
        if rt.master and i and time.time() - last >= EVAL_PROGRESS_S:
            last, elapsed = time.time(), time.time() - t0
            log(f"  eval: {i:,}/{len(windows):,} windows" + (" on rank 0" if rt.world > 1 else "")
                + f", {fmt_time(elapsed)} elapsed, ETA {fmt_time(elapsed * (len(windows) - i) / i)}")
        chunk = windows[i:i + cfg.batch_size]
        n = len(chunk)
        arr = np.stack(chunk + [chunk[-1]] * (cfg.batch_size - n)).astype(np.int64)
        y = arr[:, 1:].copy()
        y[n:] = -100
        x, y = rt.to_device(np.ascontiguousarray(arr[:, :-1])), rt.to_device(y)
        tokens = torch.tensor(float(n * cfg.seq_len), dtype=rt.sum_dtype).to(rt.device)
        with rt.autocast(cfg.precision):
            loss = model(x, targets=y)
        total += torch.stack([loss.to(total.dtype) * tokens, tokens])
        rt.step_boundary()
    total = rt.all_reduce_sum(total).cpu()
    model.train()
    return (total[0] / total[1]).item(), round(total[1].item() / cfg.seq_len)


class Run:
    """One training run: the model, optimizer and data, the counters the loop keeps, and the
    loop's four parts: train_step, report_and_vote, evaluate, save_latest."""

    def __init__(self, tcfg: TrainConfig, mcfg: ModelConfig, rt: Runtime):
        self.tcfg, self.rt, self.out = tcfg, rt, Path(tcfg.out_dir)
        if tcfg.seq_len > mcfg.max_position_embeddings:
            raise SystemExit(f"--seq_len {tcfg.seq_len} exceeds the model's context (max_position_embeddings="
                             f"{mcfg.max_position_embeddings}); pass a shorter --seq_len or "
                             f"--max_position_embeddings {tcfg.seq_len}")
        torch.manual_seed(tcfg.seed)
        if tcfg.init_from and not tcfg.resume:
            try:
                self.model = checkpoint.load_model(tcfg.init_from, **dataclasses.asdict(mcfg))
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"train.py: --init_from: {e}") from None
        else:
            self.model = Llama(mcfg)  # initialised on the CPU: the same weights on every device and rank
        self.n_params = self.model.num_params()
        self.lora, self.trainable = None, self.n_params
        if tcfg.lora_rank:
            self.trainable = add_lora(self.model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_target_list)
            self.lora = checkpoint.lora_config(tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_target_list,
                                               tcfg.init_from)
        rt.prepare(self.model, tcfg)
        self.tokens_per_step = tcfg.batch_size * tcfg.seq_len * rt.world * tcfg.grad_accum
        self.max_steps = tcfg.max_steps or max(1, int(tcfg.token_budget // self.tokens_per_step))
        self.opt = rt.optimizer(param_groups(self.model, tcfg.weight_decay), tcfg.lr,
                                (tcfg.beta1, tcfg.beta2), tcfg.eps)
        self.step, self.tokens, self.best_val_loss, self.saved_step = 0, 0, float("inf"), None
        if tcfg.resume:
            try:
                path = checkpoint.latest_checkpoint(self.out)
                saved = checkpoint.load_training_state(path, self.model, self.opt, rt.device)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"train.py: {e}") from None
            self.step, self.tokens, self.best_val_loss = saved["step"], saved["tokens"], saved["best_val_loss"]
            self.saved_step = self.step
            if rt.master:
                log(f"resumed from {path} at step {self.step:,} ({self.tokens:,} tokens)")
        self.start_step = self.step
        mix = data.Mixture({"web": tcfg.web_weight, "code": tcfg.code_weight, "math": tcfg.math_weight},
                           {"web": tcfg.anneal_web_weight, "code": tcfg.anneal_code_weight,
                            "math": tcfg.anneal_math_weight},
                           anneal_step=int(self.max_steps * (1 - tcfg.anneal_frac)))
        try:
            self.loader = data.MixtureLoader(tcfg.data_dir, tcfg.batch_size, tcfg.seq_len, mix, tcfg.seed,
                                             rt.rank, rt.world, tcfg.grad_accum, mcfg.vocab_size)
            eval_windows = tcfg.max_eval_samples or default_eval_windows(
                self.max_steps * self.tokens_per_step, tcfg.seq_len, rt.world)
            self.val = data.val_windows(tcfg.data_dir, tcfg.seq_len, eval_windows, rt.rank,
                                        rt.world, mcfg.vocab_size)
        except (FileNotFoundError, ValueError) as e:  # missing or damaged shards: the message names them
            raise SystemExit(f"train.py: {e}") from None
        self.step_model = rt.wrap(self.model)
        self.flops_per_token = flops_per_token(mcfg, self.n_params, tcfg.seq_len)
        self.metrics = None
        if rt.master:
            if tcfg.overwrite and not tcfg.resume:  # only now that the new run has its model and data
                remove_old_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if tcfg.resume:
                drop_metrics_after(self.out / "metrics.jsonl", self.step)
            self.metrics = open(self.out / "metrics.jsonl", "a")
            lora = (f" | LoRA r={tcfg.lora_rank} alpha={tcfg.lora_alpha:g} on {','.join(tcfg.lora_target_list)}: "
                    f"{self.trainable:,} trainable ({self.trainable / self.n_params:.2%})" if self.lora else "")
            log(f"model {tcfg.init_from or tcfg.preset}: {self.n_params:,} parameters{lora} | device {rt.name} x{rt.world} | "
                f"{self.tokens_per_step:,} tokens/step | {self.max_steps:,} steps "
                f"({self.max_steps * self.tokens_per_step / 1e9:.3g}B tokens) | sources "
                f"{', '.join(self.loader.names)} | {len(self.val)} val windows" + (" per rank" if rt.world > 1 else ""))
        # Device-side running values, read by the host only at log steps: the window's summed
        # loss and its count of skipped steps, the run of consecutive non-finite steps, the last
        # gradient norm.
        self.window = torch.zeros(2).to(rt.device)
        self.bad_run = torch.zeros(()).to(rt.device)
        self.grad_norm = torch.zeros(()).to(rt.device)
        self.grad_norm_history: list[float] = []
        self.steps_in_window, self.lr, self.stopping = 0, 0.0, False
        self.t_start = self.t_window = time.time()
        self.next_batches = self.fetch(self.step) if self.step < self.max_steps else None

    def due(self, interval: int) -> bool:
        return self.step % interval == 0 or self.step == self.max_steps

    def fetch(self, step: int):
        return [(self.rt.to_device(x), self.rt.to_device(y)) for x, y in self.loader.get_batch(step)]

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; nothing is read back to the host."""
        rt, tcfg = self.rt, self.tcfg
        self.lr = lr_at(self.step, tcfg, self.max_steps)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        batches, self.next_batches = self.next_batches, None
        step_loss = torch.zeros(()).to(rt.device)
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            with rt.no_sync(last), rt.autocast(tcfg.precision):
                loss = self.step_model(x, targets=y) / len(batches)
            if last and self.step + 1 < self.max_steps:
                self.next_batches = self.fetch(self.step + 1)  # the host's work overlaps the backward
            loss.backward()
            step_loss += loss.detach()
            rt.micro_step_boundary()
        rt.reduce_grads(self.opt)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                        tcfg.grad_clip or math.inf).detach()
        bad = (~torch.isfinite(self.grad_norm) | ~torch.isfinite(step_loss)).float()
        rt.optimizer_step(self.opt, bad)  # skipped on the device when bad
        rt.zero_grad(self.opt)
        self.window = self.window + torch.stack([torch.where(bad > 0, 0.0, step_loss), bad])
        self.bad_run = (self.bad_run + 1) * bad
        rt.step_boundary()
        self.step += 1
        self.tokens += self.tokens_per_step
        self.steps_in_window += 1

    def report_and_vote(self):
        """The loop's one host read: the window's mean loss, its skipped steps and the gradient
        norm, summed over ranks together with the stop vote, so all ranks stop at the same step;
        logged and written to metrics.jsonl. Three non-finite steps in a row end the run here."""
        rt = self.rt
        stop_vote = torch.tensor([float(STOP.is_set())]).to(rt.device)
        stats = rt.all_reduce_sum(torch.cat([self.window, stop_vote, self.bad_run[None], self.grad_norm[None]]))
        # means over ranks (all but the loss are the same on every rank)
        loss_sum, skipped, stop_votes, bad_run, grad_norm = (stats.cpu() / rt.world).tolist()
        self.stopping, skipped = stop_votes > 0, round(skipped)
        good = self.steps_in_window - skipped
        loss = loss_sum / good if good else float("nan")
        now = time.time()
        tokens_per_s = self.steps_in_window * self.tokens_per_step / (now - self.t_window)
        mfu = self.flops_per_token * tokens_per_s / (rt.peak_flops * rt.world) if rt.peak_flops else None
        eta = (self.max_steps - self.step) * (now - self.t_start) / max(1, self.step - self.start_step)
        if rt.master:
            log(f"step {self.step:>7,}/{self.max_steps:,} | loss {loss:.4f} | lr {self.lr:.2e} | "
                f"gnorm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                + f" | {fmt_time(now - self.t_start)} elapsed | ETA {fmt_time(eta)}")
            memory = rt.peak_memory() if self.step - self.start_step <= self.tcfg.log_interval else None
            if memory:
                log(f"  peak device memory {memory}")
            if skipped:
                log(f"  skipped {skipped} update(s) with a non-finite loss or gradient norm")
            recent = float(np.median(self.grad_norm_history[-50:])) if self.grad_norm_history else 0.0
            if len(self.grad_norm_history) >= 5 and math.isfinite(grad_norm) and grad_norm > 4 * recent:
                log(f"  grad-norm spike: {grad_norm:.3f} vs median {recent:.3f}")
        self.write_metrics({"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": grad_norm,
                            "tokens": self.tokens, "tok_s": round(tokens_per_s, 1), "mfu": mfu,
                            "skipped": skipped, "time": round(now - self.t_start, 2), **rt.compile_stats()})
        if math.isfinite(grad_norm):
            self.grad_norm_history.append(grad_norm)
        if bad_run >= 3:
            raise SystemExit(f"stopping: {round(bad_run)} optimizer steps in a row had a non-finite loss or "
                             f"gradient norm at step {self.step}. Lower --lr, check the data, or resume "
                             f"from {self.out}/latest (step {self.saved_step}).")
        self.window = torch.zeros(2).to(rt.device)  # made on the host: no new graph for the next step
        self.steps_in_window, self.t_window = 0, time.time()

    def evaluate(self):
        """Validation loss; a new best is saved to OUT_DIR/best."""
        t0 = time.time()
        val_loss, windows = validation_loss(self.step_model, self.val, self.rt, self.tcfg)
        seconds = time.time() - t0
        better = val_loss < self.best_val_loss and self.step > 0
        best = self.out / checkpoint.BEST
        if better:
            self.best_val_loss = val_loss
            save_on_master(self.rt, best, self.save_best)
        ppl = math.exp(min(val_loss, 50))
        if self.rt.master:
            log(f"eval step {self.step:,} | val loss {val_loss:.4f} | ppl {ppl:.2f} | {windows} windows of {self.tcfg.seq_len}"
                f" in {seconds:.1f}s" + (f" | new best, saved {best}" if better else ""))
        self.write_metrics({"step": self.step, "val_loss": val_loss, "val_ppl": ppl, "tokens": self.tokens,
                            "val_windows": windows})

    def save_best(self):
        """OUT_DIR/best (merged, for a LoRA run) and a LoRA run's adapters in peft's layout."""
        checkpoint.save_checkpoint(self.out / checkpoint.BEST, self.model, lora=self.lora)
        if self.lora:
            adapters = checkpoint.split_lora(self.model.state_dict(), self.lora, merge=False)[1]
            checkpoint.replace_folder(self.out / checkpoint.BEST_ADAPTER,
                                      lambda tmp: checkpoint.save_adapter(tmp, adapters, self.lora))

    def save_latest(self):
        """OUT_DIR/latest: weights, optimizer, and what --resume needs to continue exactly."""
        self.saved_step = self.step
        state = {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss,
                 "max_steps": self.max_steps, "train_config": dataclasses.asdict(self.tcfg)}
        latest = self.out / checkpoint.LATEST
        save_on_master(self.rt, latest, lambda: checkpoint.save_checkpoint(latest, self.model, self.opt, state,
                                                                           self.lora))

    def write_metrics(self, row: dict):
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def finish(self):
        if not self.rt.master:
            return
        plot_metrics(self.out)
        best = "no best/ yet (no evaluation after step 0)"
        if math.isfinite(self.best_val_loss):
            best = (f"{self.out}/best (best val loss {self.best_val_loss:.4f})"
                    + (f", its adapters in {self.out}/best_adapter" if self.lora else ""))
        if self.stopping:
            log(f"stopped by a signal at step {self.step}: checkpoint in {self.out}/latest; {best}; "
                f"continue with --resume (exit code {STOP.exit_code()})")
        else:
            log(f"done: {best} and {self.out}/latest")


def drop_metrics_after(path: Path, step: int):
    """A resumed run redoes the steps after its checkpoint: drop their rows from the killed run,
    so metrics.jsonl has one row per step and evaluation."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False  # a row cut short by the kill

    if path.is_file():
        rows = [line for line in path.read_text(errors="replace").splitlines(keepends=True) if kept(line)]
        with data.AtomicFile(path, "w") as f:
            f.writelines(rows)


def train(tcfg: TrainConfig, mcfg: ModelConfig, rt: Runtime) -> Run:
    run = Run(tcfg, mcfg, rt)
    try:
        if run.step == 0 and tcfg.eval_interval < run.max_steps:
            run.evaluate()  # the untrained baseline: about ln(vocab)
        while run.step < run.max_steps and not run.stopping:
            run.train_step()
            if run.due(tcfg.log_interval):
                run.report_and_vote()  # the host read: a log line, and the ranks' vote to stop on a signal
            if run.due(tcfg.eval_interval):
                run.evaluate()
            if run.due(tcfg.ckpt_interval) or run.stopping:
                run.save_latest()
    finally:  # also when a step ends the run (non-finite losses, a failed save): each row is flushed as written
        if run.metrics:
            run.metrics.close()
    run.finish()
    return run


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_metrics(out: Path) -> list[dict]:
    """OUT_DIR/metrics.jsonl's rows: one per logged step and one per evaluation."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

def plot_metrics(out: Path):
    """OUT_DIR/loss.png: train and validation loss from metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"no {out}/loss.png: matplotlib is not installed (pip install -r requirements.txt)")
        return
    rows = read_metrics(out)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if va:
        ax.plot(*zip(*va), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


# Options that change the plan of a resumed run: its LR schedule or its data mixture's steps.
REPLANS = {"max_steps", "token_budget", "batch_size", "grad_accum", "seq_len", "lr", "min_lr",
           "schedule", "warmup_frac", "decay_frac", "anneal_frac"}


def parse(argv, announce: bool = False) -> tuple[TrainConfig, ModelConfig, set[str]]:
    """The run's configuration: the defaults, the preset, then the options given. With --resume
    the saved run's settings take the place of the defaults and the preset, so only the options
    given now change them (announce: say which, in one line). Also returns the names given."""
    given = parse_args(argv, __doc__, TrainConfig(), ModelConfig())
    try:
        tcfg = configure(TrainConfig(), given)
        if not tcfg.resume:
            mcfg = init_config(tcfg.init_from, given) if tcfg.init_from else configure(model_config(tcfg.preset), given)
            return tcfg, mcfg, set(given)
        path = checkpoint.latest_checkpoint(Path(tcfg.out_dir))
        saved = checkpoint.read_trainer_state(path)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        before = TrainConfig(**{k: v for k, v in saved["train_config"].items() if k in known})
        tcfg = configure(before, given)
        saved_model = checkpoint.load_config(path)
        refuse_shape_change(path, saved_model, tcfg.preset, given)
        mcfg = configure(saved_model, given)
        if saved["step"] >= (tcfg.max_steps or math.inf):
            raise ValueError(f"--resume: {path} is at step {saved['step']:,}, already at or past "
                             f"--max_steps {tcfg.max_steps:,}; pass a larger --max_steps to continue")
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: {e}") from None
    changed = {k: (getattr(before, k), getattr(tcfg, k)) for k in given
               if k in known and k not in ("resume", "out_dir", "overwrite") and getattr(before, k) != getattr(tcfg, k)}
    if announce and changed:
        log("resume: the saved run's settings, except " + ", ".join(
            f"--{k} {new} (was {old})" for k, (old, new) in changed.items())
            + (f"; this re-plans the LR schedule and the data mixture from step {saved['step']:,}"
               if REPLANS & set(changed) else ""))
    return tcfg, mcfg, set(given)


RUN_FILES = ("metrics.jsonl", "loss.png", checkpoint.BEST, checkpoint.LATEST, checkpoint.BEST_ADAPTER)
# and what a kill in the middle of a save leaves (checkpoint.replace_folder)
RUN_LEFTOVERS = tuple(f"{name}.{end}" for name in RUN_FILES[2:] for end in ("old", "tmp"))


def check_out_dir(tcfg: TrainConfig, given: set[str]):
    """Before any work: out_dir must be a folder that can be written, and a new run must not
    replace a finished run's best/ and latest/ and append to its metrics.jsonl (loss.png would
    draw both as one, a later --resume would keep both's rows)."""
    out = Path(tcfg.out_dir)
    if tcfg.resume and tcfg.overwrite and "overwrite" in given:
        raise SystemExit(f"train.py: --resume continues the run in {out}, --overwrite true deletes it; "
                         f"pass one of them")
    there = out
    while not there.exists() and there.parent != there:
        there = there.parent
    if there == out and not out.is_dir():
        raise SystemExit(f"train.py: --out_dir {out} is a file, not a folder; pass a folder's path")
    if not there.is_dir():
        raise SystemExit(f"train.py: --out_dir {out}: {there} is a file, so no folder can be made "
                         f"under it; pass another --out_dir")
    if not os.access(there, os.W_OK | os.X_OK):
        raise SystemExit(f"train.py: --out_dir {out}: {there} is not writable (read-only, or no "
                         f"permission); pass a folder you can write, or fix its permissions")
    found = [name for name in (*RUN_FILES, *RUN_LEFTOVERS) if (out / name).exists() and not name.endswith(".tmp")]
    if found and not tcfg.resume and not tcfg.overwrite:
        raise SystemExit(f"train.py: {out} holds a run ({', '.join(found)}): --resume continues it, "
                         f"--out_dir DIR starts a new one elsewhere, --overwrite true deletes it and starts over")


def remove_old_run(out: Path):
    removed = []
    for name in RUN_FILES + RUN_LEFTOVERS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log(f"--overwrite: deleted {', '.join(removed)} in {out}")


# What a resumed run may change of its model: the precision recipe, none of its weights' shapes or values.
PRECISION = {"norm_fp32", "fp32_edge_blocks", "fp32_edge_attention"}


def refuse_shape_change(path: Path, saved: ModelConfig, preset: str, given: dict):
    """--resume with another --preset (or a shape option) would go on training the saved model
    while trainer_state.json recorded the new one."""
    asked = configure(model_config(preset) if "preset" in given else saved, given)
    for f in dataclasses.fields(ModelConfig):
        old, new = getattr(saved, f.name), getattr(asked, f.name)
        if f.name not in PRECISION and old != new:
            option = f"--{f.name} {new}" if f.name in given else f"--preset {preset} has {f.name} {new}"
            raise ValueError(f"--resume: {path} holds a model with {f.name} {old}; {option}. A resumed run "
                             f"keeps its model: drop the option, or start a new run with --out_dir DIR")


def tpu_micro_batches(tcfg: TrainConfig, given: set[str]) -> TrainConfig:
    """On a TPU, unless --batch_size or --grad_accum is given, a device's batch runs as micro-batches
    of one sequence (8 x 4096 tokens per chip: 1 x 4096, grad_accum 8): the only split whose step
    fits a v5e chip's 16 GiB in XLA's memory plan (README, TPU; bench.py tpu)."""
    if given & {"batch_size", "grad_accum"}:
        return tcfg
    return dataclasses.replace(tcfg, batch_size=1, grad_accum=tcfg.grad_accum * tcfg.batch_size)


def xla_worker(index: int, argv):
    tcfg, mcfg, given = parse(argv)
    rt = make_runtime("xla", tcfg, index)
    if rt.tpu:
        tcfg = tpu_micro_batches(tcfg, given)
    if train(tcfg, mcfg, rt).stopping:
        raise SystemExit(STOP.exit_code())  # xmp.spawn raises it again in the parent


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tcfg, mcfg, given = parse(argv, announce=True)
    check_out_dir(tcfg, given)
    kind = device_kind(tcfg.device)
    if kind == "xla":
        spawn_xla(xla_worker, (argv,))
        return
    install_stop_handlers()
    rt = make_runtime(kind, tcfg)
    try:
        run = train(tcfg, mcfg, rt)
    finally:
        rt.close()
    if run.stopping:
        raise SystemExit(STOP.exit_code())


if __name__ == "__mp_main__":
    # An xmp.spawn worker imports this file in its main thread, then runs xla_worker in another
    # thread (torch_xla/_internal/pjrt.py), where signal handlers cannot be installed.
    install_stop_handlers()

if __name__ == "__main__":
    main()
