"""Pretrain a Llama on packed token shards: one loop for TPU (xmp.spawn), CUDA and CPU.

    python train.py                                          # Portimbria-150M, the seed recipe
    python train.py --preset tiny --data_dir data/demo --seq_len 256 --max_steps 200
    torchrun --nproc_per_node=8 train.py                     # several GPUs (DDP, NCCL)
    torchrun --nproc_per_node=2 train.py --device cpu        # several CPU processes (gloo)
    python train.py --resume                                 # continue from OUT_DIR/latest

Any field of TrainConfig or ModelConfig (config.py) can be set with `--field value`.
Checkpoints (OUT_DIR/latest, OUT_DIR/best) are Hugging Face model folders.
"""

from __future__ import annotations

import base64
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
import threading
import time
from pathlib import Path

import numpy as np
import torch

import data
from config import ModelConfig, TrainConfig, apply_overrides, model_config
from model import Llama, blockwise_attention

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5e": 197e12,
              "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12, "TPU v6e": 918e12}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Devices: everything that differs between XLA (TPU), CUDA and CPU lives in this class.


class Runtime:
    def __init__(self, kind: str, compile_model: bool = False):
        self.kind = kind  # "xla" | "cuda" | "cpu"
        self.compile = compile_model and kind == "cuda"
        self.ddp = False
        if kind == "xla":
            import torch_xla
            import torch_xla.runtime as xr

            import torch_xla.core.xla_model as xm

            self.xla, self.xm = torch_xla, xm
            self.device = torch_xla.device()
            self.rank, self.world = xr.global_ordinal(), xr.world_size()
            self.tpu = xr.device_type() == "TPU"
            # e.g. "TPU v5 lite" on a v5e, which PEAK_FLOPS knows
            self.name = xm.xla_device_kind() if self.tpu else f"XLA {xr.device_type()}"
        else:
            self.world = int(os.environ.get("WORLD_SIZE", 1))
            self.rank = int(os.environ.get("RANK", 0))
            local = int(os.environ.get("LOCAL_RANK", 0))
            if kind == "cuda":
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
                self.name = torch.cuda.get_device_name(local)
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            else:
                self.device, self.name = torch.device("cpu"), "CPU"
            if self.world > 1:
                import torch.distributed as dist

                dist.init_process_group("nccl" if kind == "cuda" else "gloo")
                self.ddp = True
        self.master = self.rank == 0
        # Sums over many batches (the validation loss) in float64, but a TPU has no float64.
        self.sum_dtype = torch.float32 if kind == "xla" else torch.float64

    def prepare(self, model: Llama, tcfg: TrainConfig):
        """Move the model to the device and give it this device's attention kernel, block
        checkpointing and matmul precision."""
        model.to(self.device)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # .to() on XLA can untie
        if self.kind == "xla":
            model.set_attention(pallas_attention if self.tpu else blockwise_attention)
            model.loss_chunk = 1024  # the step's full logits would be 4.3 GB in fp32
            if model.config.fp32_edge_blocks and tcfg.precision == "bf16":
                # A TPU multiplies fp32 matrices in one bf16 pass by default
                # (torch_xla/backends); "highest" makes the edge blocks' matmuls really fp32.
                import torch_xla.backends

                torch_xla.backends.set_mat_mul_precision("highest")
        if tcfg.activation_checkpointing:
            if self.kind == "xla":
                # torch_xla's version puts an optimization barrier before the recomputation, or
                # XLA's common-subexpression pass would merge it with the forward pass.
                from torch_xla.utils.checkpoint import checkpoint
            else:
                from torch.utils.checkpoint import checkpoint
            model.checkpoint = functools.partial(checkpoint, use_reentrant=self.kind == "xla")

    def peak_memory(self) -> str | None:
        """The device's peak memory so far, where the runtime reports it (TPU, CUDA)."""
        if self.kind == "cuda":
            used = torch.cuda.max_memory_allocated(self.device)
            limit = torch.cuda.get_device_properties(self.device).total_memory
        elif self.kind == "xla" and self.tpu:
            info = self.xm.get_memory_info(self.device)
            used, limit = info.get("peak_bytes_used", info["bytes_used"]), info["bytes_limit"]
        else:
            return None
        return f"{int(used) / 2**30:.2f} of {int(limit) / 2**30:.2f} GiB"

    @property
    def peak_flops(self):
        return next((v for k, v in PEAK_FLOPS.items() if k.lower() in self.name.lower()), None)

    def autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def wrap(self, model):
        """The module the loop calls: DDP across processes, compiled on CUDA."""
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Gradients live in DDP's all-reduce buckets (no copy in and out of them), and 100 MB
            # buckets (default 25) mean fewer, larger all-reduces for 0.6 GB of fp32 grads: two H200
            # went from 1.88x to 1.90x one GPU (584,124 -> 590,610 tokens/s, train.py on the demo data).
            model = self.ddp_model = DDP(model, device_ids=[self.device.index] if self.kind == "cuda" else None,
                                         gradient_as_bucket_view=True, bucket_cap_mb=100)
        return torch.compile(model) if self.compile else model

    def no_sync(self, last_micro: bool):
        return self.ddp_model.no_sync() if self.ddp and not last_micro else contextlib.nullcontext()

    def optimizer(self, groups, lr, betas, eps):
        if self.kind == "xla":
            # torch_xla's sync-free AdamW skips a step on found_inf without a host round-trip.
            from torch_xla.amp import syncfree

            return syncfree.AdamW(groups, lr=lr, betas=betas, eps=eps)
        # Fused AdamW: one kernel per step, and it honours opt.found_inf (skips the update).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    def reduce_grads(self, opt):
        # DDP all-reduces during backward; on XLA the gradients are all-reduced here, before
        # clipping, so the clip sees the global gradient norm.
        if self.kind == "xla" and self.world > 1:
            self.xm.reduce_gradients(opt)

    def optimizer_step(self, opt, found_inf):
        """One AdamW update, skipped on the device when found_inf is 1: no host round-trip."""
        if self.kind == "xla":
            opt.step(found_inf=found_inf)
        else:
            opt.found_inf = found_inf
            opt.step()

    def micro_step_boundary(self):
        """After each micro-batch's backward, on XLA: run it as its own graph, so its activations
        are freed before the next micro-batch, and the step is two graphs whatever grad_accum is
        (a micro-batch's forward and backward; the update)."""
        if self.kind == "xla":
            self.xla.sync()

    def zero_grad(self, opt):
        # On XLA the gradients stay allocated (zeroed inside the update's graph), so every
        # micro-batch graph finds them as inputs: one graph, not a first-micro-batch variant.
        opt.zero_grad(set_to_none=self.kind != "xla")

    def step_boundary(self):
        """End of an optimizer step: on XLA, cut and run the graph (exactly once per step)."""
        if self.kind == "xla":
            self.xla.sync()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        if self.kind == "xla":
            return self.xm.all_reduce(self.xm.REDUCE_SUM, t)
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if flag is true on any: a collective, so all ranks must call it."""
        if self.world == 1:
            return flag
        return self.all_reduce_sum(torch.tensor([float(flag)]).to(self.device)).item() > 0

    def compile_stats(self) -> dict:
        """XLA graphs compiled so far (the count stops growing once every step shape is compiled),
        and how many of them the persistent cache did not have."""
        if self.kind != "xla":
            return {}
        import torch_xla.debug.metrics as met

        return {"xla_compiles": met.counter_value("UncachedCompile") or 0,
                "xla_cache_misses": met.counter_value("PersistentCacheMiss") or 0}

    def close(self):
        if self.ddp:
            import torch.distributed as dist

            dist.destroy_process_group()


def pallas_attention(q, k, v):
    """torch_xla's Pallas flash-attention kernel (TPU only): O(T) memory in forward and backward.
    k and v come with as many heads as q (Attention repeats the KV heads for GQA). Its sm_scale
    defaults to 1.0, not 1/sqrt(head_dim)."""
    try:
        from torch_xla.experimental.custom_kernel import flash_attention
    except ImportError as e:
        raise SystemExit(f"the TPU attention kernel needs jax: pip install 'torch_xla[pallas]==2.9.0' ({e})")
    return flash_attention(q, k, v, causal=True, sm_scale=q.shape[-1] ** -0.5)


def pick_device(requested: str) -> str:
    if requested in ("tpu", "xla") or (requested == "auto" and (
            os.environ.get("PJRT_DEVICE") or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))):
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        # Python scalars that change every step (the learning rate) must reach the graph as
        # inputs, not as constants, or each new value compiles a new graph.
        os.environ.setdefault("XLA_NO_SPECIAL_SCALARS", "1")
        return "xla"
    if requested in ("cuda", "cpu"):
        if requested == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch")
        return requested
    if requested != "auto":
        raise SystemExit(f"--device {requested!r}: choose auto, tpu, cuda or cpu")
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# The recipe: optimizer groups and LR schedule


def param_groups(model: Llama, weight_decay: float):
    """Weight decay on Linear weights only: not on norms, not on the (tied) embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
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
# Checkpoints: HF model folders, plus training state as safetensors + JSON (no pickle)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_folder(model: Llama, path: Path):
    model.save_pretrained(path)
    shutil.copyfile(data.TOKENIZER_FILE, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model.config.max_position_embeddings}, indent=2) + "\n")


def save_checkpoint(path: Path, model: Llama, opt=None, state: dict | None = None):
    """Write an HF model folder (and the training state) atomically: into a temporary folder,
    fsynced, then renamed over the old one. A kill at any moment leaves a complete folder at
    `path` or at `path.old`, which load_checkpoint also accepts."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model_folder(model, tmp)
    if opt is not None:
        names = {p: n for n, p in model.named_parameters()}
        tensors = {f"{names[p]}::{k}": v.detach().cpu().contiguous()
                   for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, model: Llama, opt, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out_dir / "latest"
    if not (path / "trainer_state.json").is_file() and (out_dir / "latest.old" / "trainer_state.json").is_file():
        path = out_dir / "latest.old"  # killed between the two renames of save_checkpoint
    if not (path / "trainer_state.json").is_file():
        raise SystemExit(f"--resume: no checkpoint to resume from in {out_dir}/latest "
                         f"(expected trainer_state.json there); start without --resume")
    try:
        loaded = Llama.from_pretrained(path, fp32_edge_blocks=model.config.fp32_edge_blocks,
                                       norm_fp32=model.config.norm_fp32)
        opt_sd = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise SystemExit(f"--resume: checkpoint {path} is unreadable: {e}\n"
                         f"Delete it to start over, or restore it from a copy.") from None
    if loaded.config != model.config:
        diff = {f.name: (getattr(loaded.config, f.name), getattr(model.config, f.name))
                for f in dataclasses.fields(ModelConfig)
                if getattr(loaded.config, f.name) != getattr(model.config, f.name)}
        raise SystemExit(f"--resume: {path} holds a different model (checkpoint vs now: {diff})")
    with torch.no_grad():
        for p, q in zip(model.parameters(), loaded.parameters()):
            p.copy_(q.to(p.dtype))
    params = dict(model.named_parameters())
    for key, t in opt_sd.items():
        name, k = key.split("::")
        opt.state[params[name]][k] = t.to(device)
    state = json.loads((path / "trainer_state.json").read_text())
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8))
    return state


# ---------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def evaluate(model, windows, rt: Runtime, cfg: TrainConfig) -> float:
    """Mean loss over this rank's validation windows, summed across ranks. Every batch has the
    same shapes and inputs made on the host (a short last batch is padded with rows whose targets
    are ignored), so under XLA the whole evaluation is two graphs and one host read."""
    model.eval()
    total = torch.zeros(2, dtype=rt.sum_dtype).to(rt.device)  # (sum of losses x tokens, tokens)
    for i in range(0, len(windows), cfg.batch_size):
        chunk = windows[i:i + cfg.batch_size]
        n = len(chunk)
        arr = np.stack(chunk + [chunk[-1]] * (cfg.batch_size - n))
        y = arr[:, 1:].copy()
        y[n:] = -100
        x, y = torch.from_numpy(arr[:, :-1]).to(rt.device), torch.from_numpy(y).to(rt.device)
        tokens = torch.tensor(float(n * cfg.seq_len), dtype=rt.sum_dtype).to(rt.device)
        with rt.autocast(cfg.precision):
            loss = model(x, targets=y)
        total += torch.stack([loss.to(total.dtype) * tokens, tokens])
        rt.step_boundary()
    total = rt.all_reduce_sum(total).cpu()
    model.train()
    return (total[0] / total[1]).item()


# Stopping. SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) set STOP; the ranks agree
# on it at the next log step, save OUT_DIR/latest and exit 0.
STOP = threading.Event()


def install_stop_handlers():
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    signal.signal(signal.SIGINT, lambda signum, frame: STOP.set())


def forward_stop_signals_to_children():
    """For the xmp.spawn parent, which only waits: a signal sent to it reaches the workers."""
    def forward(signum, frame):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


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
        raise SystemExit(f"train.py: could not write {what}: {error}. Free space or fix permissions, "
                         f"then continue with --resume" if rt.master else
                         f"train.py rank {rt.rank}: stopping, rank 0 could not write {what}")


def train(tcfg: TrainConfig, mcfg: ModelConfig, rt: Runtime):
    out = Path(tcfg.out_dir)
    if tcfg.seq_len > mcfg.max_position_embeddings:
        raise SystemExit(f"--seq_len {tcfg.seq_len} exceeds the model's context (max_position_embeddings="
                         f"{mcfg.max_position_embeddings}); pass a shorter --seq_len or "
                         f"--max_position_embeddings {tcfg.seq_len}")
    torch.manual_seed(tcfg.seed)
    model = Llama(mcfg)  # initialised on the CPU: the same weights on every device and rank
    n_params = model.num_params()
    rt.prepare(model, tcfg)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * rt.world * tcfg.grad_accum
    max_steps = tcfg.max_steps or max(1, int(tcfg.token_budget // tokens_per_step))
    opt = rt.optimizer(param_groups(model, tcfg.weight_decay), tcfg.lr, (tcfg.beta1, tcfg.beta2), tcfg.eps)
    state = {"step": 0, "tokens": 0, "best_val_loss": float("inf")}
    if tcfg.resume:
        state = load_checkpoint(out, model, opt, rt.device)
        if rt.master:
            log(f"resumed from {out}/latest at step {state['step']:,} ({state['tokens']:,} tokens)")
    mix = data.Mixture({"web": tcfg.web_weight, "code": tcfg.code_weight, "math": tcfg.math_weight},
                       {"web": tcfg.anneal_web_weight, "code": tcfg.anneal_code_weight,
                        "math": tcfg.anneal_math_weight},
                       anneal_step=int(max_steps * (1 - tcfg.anneal_frac)))
    try:
        loader = data.MixtureLoader(tcfg.data_dir, tcfg.batch_size, tcfg.seq_len, mix, tcfg.seed,
                                    rt.rank, rt.world, tcfg.grad_accum, mcfg.vocab_size)
        val = data.val_windows(tcfg.data_dir, tcfg.seq_len, tcfg.max_eval_samples, rt.rank, rt.world,
                               mcfg.vocab_size)
    except (FileNotFoundError, ValueError) as e:  # missing or damaged shards: the message names them
        raise SystemExit(f"train.py: {e}") from None
    step_model = rt.wrap(model)
    fpt = flops_per_token(mcfg, n_params, tcfg.seq_len)
    metrics = None
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        metrics = open(out / "metrics.jsonl", "a")
        log(f"model {tcfg.preset}: {n_params:,} parameters | device {rt.name} x{rt.world} | "
            f"{tokens_per_step:,} tokens/step | {max_steps:,} steps ({max_steps * tokens_per_step / 1e9:.3g}B tokens) "
            f"| sources {', '.join(loader.names)} | {len(val) * rt.world} val windows")

    def write_metrics(row):
        if rt.master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def save_latest(done):
        state["saved_step"] = done
        st = dict(state, step=done, torch_rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                  train_config=dataclasses.asdict(tcfg), max_steps=max_steps)
        save_on_master(rt, out / "latest", lambda: save_checkpoint(out / "latest", model, opt, st))

    def run_eval(done):
        val_loss = evaluate(step_model, val, rt, tcfg)
        better = val_loss < state["best_val_loss"] and done > 0
        if better:
            state["best_val_loss"] = val_loss
            save_on_master(rt, out / "best", lambda: save_checkpoint(out / "best", model))
        if rt.master:
            log(f"eval step {done:,} | val loss {val_loss:.4f} | ppl {math.exp(min(val_loss, 50)):.2f}"
                + (f" | new best, saved {out}/best" if better else ""))
        write_metrics({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                       "tokens": state["tokens"]})

    start = state["step"]
    if start == 0 and tcfg.eval_interval < max_steps:
        run_eval(0)  # the untrained baseline: ln(vocab) or so
    dev = rt.device
    # Device-side running values, read by the host only at log steps: the sum of the window's
    # losses and its count of skipped steps, and the run of consecutive non-finite steps.
    window = torch.zeros(2).to(dev)
    bad_run = torch.zeros(()).to(dev)
    grad_norm = torch.zeros(()).to(dev)
    grad_norms: list[float] = []
    t0 = t_log = time.time()
    steps_in_window, stopping = 0, False
    for step in range(start, max_steps):
        lr = lr_at(step, tcfg, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = loader.get_batch(step)
        step_loss = torch.zeros(()).to(dev)
        for i, (x, y) in enumerate(micro):
            x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
            with rt.no_sync(i == len(micro) - 1), rt.autocast(tcfg.precision):
                loss = step_model(x, targets=y) / len(micro)
            loss.backward()
            step_loss += loss.detach()
            rt.micro_step_boundary()
        rt.reduce_grads(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip).detach()
        bad = (~torch.isfinite(grad_norm) | ~torch.isfinite(step_loss)).float()
        rt.optimizer_step(opt, bad)
        rt.zero_grad(opt)
        window = window + torch.stack([torch.where(bad > 0, 0.0, step_loss), bad])
        bad_run = (bad_run + 1) * bad
        rt.step_boundary()
        state["tokens"] += tokens_per_step
        steps_in_window += 1
        done = step + 1
        if done % tcfg.log_interval == 0 or done == max_steps:
            # The loop's one host read, which is also where the ranks agree to stop.
            stop_here = torch.tensor([float(STOP.is_set())]).to(dev)
            stats = rt.all_reduce_sum(torch.cat([window, stop_here, bad_run[None], grad_norm[None]]))
            # means over ranks (all but the loss are the same on every rank)
            loss_sum, n_bad, stop_vote, run_bad, gn = (stats.cpu() / rt.world).tolist()
            stopping, n_bad = stop_vote > 0, round(n_bad)
            good = steps_in_window - n_bad
            loss_v = loss_sum / good if good else float("nan")
            now = time.time()
            tok_s = steps_in_window * tokens_per_step / (now - t_log)
            mfu = fpt * tok_s / (rt.peak_flops * rt.world) if rt.peak_flops else None
            eta = (max_steps - done) * (now - t0) / max(1, done - start)
            memory = rt.peak_memory() if done - start <= tcfg.log_interval else None
            if rt.master:
                log(f"step {done:>7,}/{max_steps:,} | loss {loss_v:.4f} | lr {lr:.2e} | gnorm {gn:.3f} | "
                    f"{tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "") +
                    f" | {fmt_time(now - t0)} elapsed | ETA {fmt_time(eta)}")
                if memory:
                    log(f"  peak device memory {memory}")
                if n_bad:
                    log(f"  skipped {n_bad} update(s) with a non-finite loss or gradient norm")
                if len(grad_norms) >= 5 and math.isfinite(gn) and gn > 4 * float(np.median(grad_norms[-50:])):
                    log(f"  grad-norm spike: {gn:.3f} vs median {np.median(grad_norms[-50:]):.3f}")
            write_metrics({"step": done, "loss": loss_v, "lr": lr, "grad_norm": gn, "tokens": state["tokens"],
                           "tok_s": round(tok_s, 1), "mfu": mfu, "skipped": n_bad, "time": round(now - t0, 2),
                           **rt.compile_stats()})
            if math.isfinite(gn):
                grad_norms.append(gn)
            if run_bad >= 3:
                raise SystemExit(f"stopping: {round(run_bad)} optimizer steps in a row had a non-finite loss or "
                                 f"gradient norm at step {done}. Lower --lr, check the data, or resume "
                                 f"from {out}/latest (step {state.get('saved_step', '?')}).")
            window = torch.zeros(2).to(dev)  # made on the host: no new graph for the next step
            steps_in_window, t_log = 0, time.time()

        if done % tcfg.eval_interval == 0 or done == max_steps:
            run_eval(done)
        if done % tcfg.ckpt_interval == 0 or done == max_steps or stopping:
            save_latest(done)
        if stopping:
            if rt.master:
                log(f"stopped by a signal at step {done}: checkpoint in {out}/latest; continue with --resume")
            break
    if rt.master:
        metrics.close()
        log(f"done: {out}/best (best val loss {state['best_val_loss']:.4f}) and {out}/latest")
        plot_metrics(out)
    return model, state


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_metrics(out: Path):
    """loss.png from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
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


def parse(argv) -> tuple[TrainConfig, ModelConfig]:
    try:
        tcfg, _ = apply_overrides(argv, TrainConfig(), ModelConfig())
        return tuple(apply_overrides(argv, TrainConfig(), model_config(tcfg.preset)))
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None


def _xla_worker(index, argv):
    tcfg, mcfg = parse(argv)
    if tcfg.xla_cache_dir:
        # One directory per process, as torch_xla's docs do it: a restart or --resume loads the
        # compiled graphs instead of compiling them again (minutes each on a TPU).
        import torch_xla.runtime as xr

        xr.initialize_cache(str(Path(tcfg.out_dir) / tcfg.xla_cache_dir / str(index)))
    rt = Runtime("xla")
    if rt.tpu:
        tcfg = tpu_micro_batches(tcfg, argv)
    train(tcfg, mcfg, rt)


def tpu_micro_batches(tcfg: TrainConfig, argv) -> TrainConfig:
    """On a TPU, unless --batch_size or --grad_accum is given, a device's batch runs as micro-batches
    of one sequence (8 x 4096 tokens per chip: 1 x 4096, grad_accum 8). The step's XLA memory plan
    (on XLA:CPU, an upper bound) is then 7.7 GiB, against 13.5 GiB for micro-batches of two and
    48.3 GiB for the whole batch at once, for a v5e chip's 16 GiB (bench.py tpu)."""
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if given & {"batch_size", "grad_accum"}:
        return tcfg
    return dataclasses.replace(tcfg, batch_size=1, grad_accum=tcfg.grad_accum * tcfg.batch_size)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for cls in (TrainConfig, ModelConfig):
            print(f"{cls.__name__} fields: " + ", ".join(f"--{f.name}" for f in dataclasses.fields(cls)))
        return
    tcfg, mcfg = parse(argv)
    kind = pick_device(tcfg.device)
    if kind == "xla":
        import torch_xla.distributed.xla_multiprocessing as xmp

        forward_stop_signals_to_children()
        xmp.spawn(_xla_worker, args=(argv,))
        return
    install_stop_handlers()
    rt = Runtime(kind, tcfg.compile)
    try:
        train(tcfg, mcfg, rt)
    finally:
        rt.close()


if __name__ == "__mp_main__":
    # An xmp.spawn worker imports this file in its main thread, then runs _xla_worker in another
    # thread (torch_xla/_internal/pjrt.py), where signal handlers cannot be installed.
    install_stop_handlers()

if __name__ == "__main__":
    main()
