"""Configuration: one dataclass per concern, named presets, and `--field value` CLI overrides.

ModelConfig uses Hugging Face's Llama field names, so `config.json` of a saved model is a plain
dump of it and `transformers.LlamaConfig` reads it as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of the normal init (HF's name for it)
    bos_token_id: int = 1
    eos_token_id: int = 2
    # The seed's bf16 precision recipe. These two are ours; HF ignores unknown config keys.
    norm_fp32: bool = True  # RMSNorm statistics and scaling computed in fp32
    fp32_edge_blocks: bool = True  # first and last transformer block run in fp32 under autocast
    fp32_edge_attention: bool = False  # also their attention core (no flash kernel: slow)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads} (grouped-query attention shares "
                f"each KV head among a whole number of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The reference model: 151,026,432 parameters.
    "portimbria-150m": ModelConfig(),
    # The card's smaller family members: 8064-token vocab, full multi-head attention, 1024 context.
    # The card's exact widths were not available to us: these land on its published totals
    # (12.3M and 30.4M parameters) to within 0.5%.
    "stentor2-12m": ModelConfig(vocab_size=8064, hidden_size=256, intermediate_size=992,
                                num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=1024, rope_theta=10000.0),
    "stentor2-30m": ModelConfig(vocab_size=8064, hidden_size=384, intermediate_size=1472,
                                num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=6,
                                max_position_embeddings=1024, rope_theta=10000.0),
    # Small enough to train on a laptop CPU in minutes (the demo and the tests). Same vocab as
    # Portimbria so it uses the shipped tokenizer.
    "tiny": ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


@dataclass
class TrainConfig:
    preset: str = "portimbria-150m"  # which MODEL_PRESETS entry to build
    data_dir: str = "data/demo"
    out_dir: str = "out"
    device: str = "auto"  # auto | tpu | cuda | cpu
    seed: int = 1337
    # Batch: global tokens per step = batch_size * seq_len * devices * grad_accum.
    # The seed: 8 per core x 8 TPU cores x 4096 = 64 x 4096 tokens.
    batch_size: int = 8
    seq_len: int = 4096
    grad_accum: int = 1
    token_budget: float = 6e9  # decides max_steps unless max_steps is set
    max_steps: int = 0  # 0: derived from token_budget
    # AdamW (the seed card).
    lr: float = 8e-4
    min_lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01  # Linear weights only
    grad_clip: float = 1.0
    # Schedule: linear warmup then cosine to min_lr, or warmup-stable-decay (WSD) when
    # schedule == "wsd": constant after warmup until decay_frac of the steps remain.
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    # Precision: "bf16" (autocast with the model's fp32 recipe) or "fp32".
    precision: str = "bf16"
    compile: bool = True  # CUDA only
    # Recompute each block's activations in backward (about a third more compute, a fraction of
    # the activation memory): the TPU's 16 GiB need it at 8 x 4096 tokens per chip (bench.py tpu).
    activation_checkpointing: bool = False
    xla_cache_dir: str = "xla_cache"  # persistent XLA compile cache, in OUT_DIR unless absolute; "" for none
    # Data mixture (renormalised over the sources present) and the late curriculum anneal.
    web_weight: float = 0.75
    code_weight: float = 0.15
    math_weight: float = 0.10
    anneal_frac: float = 0.15  # the last 15% of the token budget
    anneal_web_weight: float = 0.55
    anneal_code_weight: float = 0.27
    anneal_math_weight: float = 0.18
    # Evaluation, logging, checkpoints.
    eval_interval: int = 1000
    max_eval_samples: int = 5000
    log_interval: int = 10
    ckpt_interval: int = 1000  # OUT_DIR/latest is also written at the end and on SIGINT/SIGTERM
    resume: bool = False


# ---------------------------------------------------------------------------------------------
# CLI overrides: `--lr 3e-4`, `--compile false`, `--resume` (a bare bool flag means true).

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, typ, text: str):
    if typ is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"--{name}: expected true/false, got {text!r}")
    try:
        if typ is int:
            f = float(text)  # accept 6e9 for an int field when it is whole
            if not f.is_integer():
                raise ValueError
            return int(f)
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {typ.__name__}, got {text!r}") from None


def apply_overrides(argv: list[str], *configs) -> list:
    """Apply `--field value` pairs from argv to whichever dataclass owns the field.

    Returns new dataclass instances (ModelConfig validation re-runs). Unknown fields raise a
    ValueError naming the close matches.
    """
    fields = {}
    for i, cfg in enumerate(configs):
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            fields.setdefault(f.name, (i, hints[f.name]))
    updates: list[dict] = [{} for _ in configs]
    k = 0
    while k < len(argv):
        arg = argv[k]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are --field value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown option --{name}{hint}")
        i, typ = fields[name]
        if not eq:
            nxt = argv[k + 1] if k + 1 < len(argv) else None
            if typ is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ValueError(f"--{name} needs a value")
            else:
                value = nxt
                k += 1
        updates[i][name] = _coerce(name, typ, value)
        k += 1
    return [dataclasses.replace(c, **u) for c, u in zip(configs, updates)]


def model_config(preset: str) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        close = difflib.get_close_matches(preset, MODEL_PRESETS, n=3, cutoff=0.4)
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(MODEL_PRESETS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    return dataclasses.replace(MODEL_PRESETS[preset])
