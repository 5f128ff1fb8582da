"""Checkpoints: every read and write of a model folder, for every script.

A model folder is Hugging Face's `LlamaForCausalLM` layout: config.json + model.safetensors (or
shards with model.safetensors.index.json), plus tokenizer.json and tokenizer_config.json, so HF
tools load what we write and we load HF Llama folders as they are. A training checkpoint
(OUT_DIR/latest) adds optimizer.safetensors and trainer_state.json. Nothing here unpickles.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

import data
from config import BOS_ID, EOS_ID, SENTENCEPIECE_FILE, TOKENIZER_FILE, ModelConfig, load_tokenizer
from model import Llama

ROOT = Path(__file__).resolve().parent
# The folders of a run in OUT_DIR: the best model by validation loss (and, for a LoRA run, its
# adapters in peft's layout), and the checkpoint --resume continues.
BEST, BEST_ADAPTER, LATEST = "best", "best_adapter", "latest"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Model folders


def save_model(model: Llama, path, dtype: torch.dtype | None = None, state_dict: dict | None = None):
    """Write config.json, model.safetensors and, when the model uses the shipped tokenizer's
    vocabulary, tokenizer.json + tokenizer_config.json (AutoTokenizer then adds <s> itself) and
    tokenizer.model, the sentencepiece file, as Mistral's own folders carry it (for llama.cpp).
    state_dict: the weights to write in place of the model's own (a LoRA model's plain weights)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # HF re-ties it on load; safetensors refuses shared storage
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in sd.items()}
    dtype_name = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               head_dim=model.config.head_dim, attention_bias=False, mlp_bias=False,
               **dataclasses.asdict(model.config), torch_dtype=dtype_name)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    _respect_umask(path / "model.safetensors")  # safetensors creates its files 0600
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if load_tokenizer().get_vocab_size() == model.config.vocab_size:
        shutil.copyfile(TOKENIZER_FILE, path / "tokenizer.json")
        shutil.copyfile(SENTENCEPIECE_FILE, path / "tokenizer.model")
        # model_input_names: transformers 4.x's fast tokenizer otherwise returns token_type_ids,
        # which generate(**tok(...)) refuses for a Llama. Not Mistral's "LlamaTokenizer" class:
        # transformers 5 rebuilds its pre-tokenizer, and runs of spaces then tokenize differently
        # from tokenizer.json.
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False,
            "model_max_length": model.config.max_position_embeddings}, indent=2) + "\n")


def _respect_umask(path: Path):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_model(path, dtype=torch.float32, device="cpu", **overrides) -> Llama:
    """Load any HF Llama folder. overrides set ModelConfig fields that HF configs lack
    (e.g. fp32_edge_blocks=False for inference)."""
    path = Path(path)
    cfg = dataclasses.replace(load_config(path), **overrides)
    sd = load_safetensors(path)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)  # some tied checkpoints store a copy; HF ignores it too
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF files
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)}, model {tuple(expected[k])}"
                   for k in set(sd) & set(expected) if sd[k].shape != expected[k])
    if missing or unexpected or wrong:
        lines = [f"{path}: weights do not match config.json"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12])
                             + (" ..." if len(items) > 12 else ""))
        raise ValueError("\n".join(lines))
    ints = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if ints:  # a cast would turn them into weights without a word
        raise ValueError(f"{path}: the weight {ints[0]} is stored as {str(sd[ints[0]].dtype).removeprefix('torch.')}"
                         + (f" (and {len(ints) - 1} more)" if len(ints) > 1 else "")
                         + "; weights must be floating point (fp32, bf16, fp16): re-save the model")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.build_rope(torch.device(device))
    return model


# HF LlamaConfig's defaults, for the fields a config.json may leave out.
_HF_DEFAULTS = dict(max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, initializer_range=0.02, bos_token_id=BOS_ID,
                    eos_token_id=EOS_ID)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def load_config(path) -> ModelConfig:
    """Read an HF Llama config.json into a ModelConfig, refusing what this model cannot run."""
    path = Path(path)
    f = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected an HF model folder "
                                f"with config.json and model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected an HF model folder "
                                f"(config.json + model.safetensors), e.g. one written by train.py")
    try:
        hf = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    arch = hf.get("architectures") or []
    # Mistral's architecture is Llama's plus an optional sliding window: with none (v0.3) or one
    # at least the context, the same weights compute the same function.
    if hf.get("model_type") not in ("llama", "mistral") and not {"LlamaForCausalLM", "MistralForCausalLM"} & set(arch):
        raise ValueError(f"{f}: model_type={hf.get('model_type')!r}, architectures={arch}; "
                         f"only Llama checkpoints (model_type 'llama' or 'mistral') can be loaded")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{f}: missing field(s) {', '.join(missing)}")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (this model has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope} (only plain RoPE)")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if window is not None and window < context:
        problems.append(f"sliding_window={window} < max_position_embeddings={context} (only full "
                        f"attention: set max_position_embeddings to {window} to use it within one window)")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        problems.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
    if problems:
        raise ValueError(f"{f}: unsupported Llama variant: " + "; ".join(problems))
    fields = {fld.name for fld in dataclasses.fields(ModelConfig)}
    kw = {**_HF_DEFAULTS, "num_key_value_heads": hf["num_attention_heads"]}
    kw.update({k: v for k, v in hf.items() if k in fields})
    if "rope_theta" in rope:  # transformers 5 keeps rope_theta inside rope_parameters
        kw["rope_theta"] = rope["rope_theta"]
    for k in ("bos_token_id", "eos_token_id"):  # HF allows a list of EOS ids; keep the first
        if isinstance(kw[k], list):
            kw[k] = kw[k][0]
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: {e}") from None


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model.safetensors (or its shards). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object: "
                             f"{type(e).__name__} {e})") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" (found {', '.join(other)}: pickle files are not loaded; convert them to "
                f"safetensors first)" if other else "")
        raise FileNotFoundError(f"{path}: no model.safetensors{hint}")
    sd = {}
    for name in files:
        try:
            sd.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name}: cannot read safetensors file ({e}); it may be "
                             f"truncated or corrupt: re-download or re-save it") from None
    return sd


# ---------------------------------------------------------------------------------------------
# Inference: sample.py and eval_ppl.py


def find_checkpoint(ckpt: str | None) -> Path:
    """--ckpt, or else out/best, then out/latest (beside this file or in the working directory)."""
    if ckpt:
        return Path(ckpt)
    for cand in (ROOT / "out" / BEST, ROOT / "out" / LATEST, Path("out") / BEST, Path("out") / LATEST):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError("no checkpoint in out/best or out/latest; train one with "
                            "`python train.py` or pass --ckpt DIR (any Hugging Face Llama folder)")


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """'auto' picks CUDA when it is there; dtype 'auto' is bf16 on a GPU and fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if device != "cpu" else "fp32"
    return device, DTYPES[dtype]


def reuse_freed_host_memory():
    """glibc serves each large allocation (a CPU step's logits, its activations) with a fresh
    mmap and unmaps it on free, so every step page-faults its memory in again, which on a small
    machine costs about as much as the compute (BENCHMARKS.md, train.py on a CPU). From the
    heap, and with freed memory kept, the next step reuses the same pages. For train.py on the
    CPU and every script that loads a model onto it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its own allocator
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'ed chunks
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not give freed heap back to the system


def load_for_inference(ckpt: str | None, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, its tokenizer, the folder) for sample.py, eval_ppl.py and
    eval_tasks.py. The tokenizer is the folder's tokenizer.json, else the shipped one. Raises
    ValueError or FileNotFoundError with a message that names the folder."""
    device, dtype = device_and_dtype(device, dtype)
    if device == "cpu":
        reuse_freed_host_memory()
    path = find_checkpoint(ckpt)
    model = load_model(path, dtype=dtype, device=device, fp32_edge_blocks=False)
    tok_file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else TOKENIZER_FILE
    tok = load_tokenizer(tok_file)
    n_tok, n_model = tok.get_vocab_size(), model.config.vocab_size
    if tok_file == TOKENIZER_FILE and n_tok != n_model:
        raise ValueError(f"{path} has no tokenizer.json, and its model's {n_model}-token vocabulary is not "
                         f"the shipped tokenizer's ({n_tok} tokens): put the model's tokenizer.json in {path}")
    if n_tok > n_model:
        raise ValueError(f"{tok_file} has {n_tok} tokens but the model in {path} only {n_model}: "
                         f"they do not belong together; put the model's tokenizer.json in {path}")
    return model.eval(), tok, path


# ---------------------------------------------------------------------------------------------
# LoRA adapters in peft's layout. A model with adapters (train.py's LoRALinear) names its modules
# as peft does: an adapted projection X holds X.base_layer (the frozen Linear), X.lora_A and X.lora_B.

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model."  # peft's tensor names: its wrappers' prefix, then the model's own


def split_lora(sd: dict, lora: dict, merge: bool) -> tuple[dict, dict]:
    """A LoRA model's state dict -> (the plain model's, the adapters'). The plain weights are the
    frozen base, or with merge each adapted weight W + (alpha / r) B A (Hu et al. 2021, eq. 3), the
    model the adapters compute."""
    plain = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    if merge:
        scale = lora["lora_alpha"] / lora["r"]
        for k, a in adapters.items():
            if k.endswith(".lora_A.weight"):
                w = k.removesuffix("lora_A.weight") + "weight"
                b = adapters[k.replace(".lora_A.", ".lora_B.")]
                plain[w] = plain[w] + scale * (b.float() @ a.float()).to(plain[w].dtype)
    return plain, adapters


def lora_config(rank: int, alpha: float, targets: list[str], base: str) -> dict:
    """adapter_config.json as peft writes it for LoraConfig(r, lora_alpha, target_modules)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False}


def save_adapter(path: Path, adapters: dict, lora: dict | None):
    """adapter_model.safetensors under peft's names, and with lora its adapter_config.json: then
    the folder is one peft loads, PeftModel.from_pretrained(base_model, path)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({ADAPTER_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapters.items()},
              str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    _respect_umask(path / ADAPTER_WEIGHTS)
    if lora is not None:
        (path / ADAPTER_CONFIG).write_text(json.dumps(lora, indent=2) + "\n")


def load_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """path/adapter_model.safetensors under the model's own parameter names."""
    from safetensors.torch import load_file

    sd = load_file(str(path / ADAPTER_WEIGHTS))
    # peft's in-memory names carry the adapter's name ("lora_A.default.weight"); its files do not
    return {k.removeprefix(ADAPTER_PREFIX).replace(".default.", "."): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# Training checkpoints: the model folder + optimizer state + trainer_state.json, written atomically


def save_checkpoint(path: Path, model: Llama, opt=None, state: dict | None = None, lora: dict | None = None):
    """A model folder (and with opt the training state) at path, written by replace_folder.
    lora (the adapter config of a model with adapters): a training checkpoint holds the frozen
    base as its model and the adapters in adapter_model.safetensors, what --resume needs (no
    adapter_config.json: HF would take the folder for an adapter); a model folder is the merged
    model."""
    replace_folder(path, lambda tmp: _write_checkpoint(tmp, model, opt, state, lora))


def replace_folder(path: Path, write):
    """data.replace_folder (PATH.tmp, then PATH.old while renaming: load_training_state also
    accepts latest.old), with safetensors' own error for a failed write (a full disk) as an OSError."""
    from safetensors import SafetensorError

    def guarded(tmp):
        try:
            write(tmp)
        except SafetensorError as e:
            raise OSError(str(e)) from None

    data.replace_folder(path, guarded)


def _write_checkpoint(tmp: Path, model: Llama, opt, state: dict | None, lora: dict | None):
    from safetensors.torch import save_file

    if lora is None:
        save_model(model, tmp)
    else:
        plain, adapters = split_lora(model.state_dict(), lora, merge=opt is None)
        save_model(model, tmp, state_dict=plain)
        if opt is not None:
            save_adapter(tmp, adapters, None)
    if opt is not None:
        names = {p: n for n, p in model.named_parameters()}
        tensors = {f"{names[p]}::{k}": v.detach().cpu().contiguous()
                   for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _respect_umask(tmp / "optimizer.safetensors")
        state = dict(state, torch_rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")


def latest_checkpoint(out_dir: Path) -> Path:
    """OUT_DIR/latest, or latest.old when a kill came between save_checkpoint's two renames."""
    for path in (out_dir / LATEST, out_dir / f"{LATEST}.old"):
        if (path / "trainer_state.json").is_file():
            return path
    raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out_dir}/latest "
                            f"(expected trainer_state.json there); start without --resume")


def read_trainer_state(path: Path) -> dict:
    f = path / "trainer_state.json"
    try:
        state = json.loads(f.read_text())
        fields = dict(step=int, tokens=int, best_val_loss=(int, float), train_config=dict, torch_rng=str)
        if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in fields.items()):
            raise ValueError(f"not a trainer state: needs {', '.join(fields)}")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is unreadable ({e}); delete {path} to start over, or restore it "
                         f"from a copy") from None
    return state


def load_training_state(path: Path, model: Llama, opt, device) -> dict:
    """Load a training checkpoint's weights into model and its state into opt (both already
    built with the saved configuration), restore the RNG and return trainer_state.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    try:
        loaded = load_model(path, fp32_edge_blocks=model.config.fp32_edge_blocks,
                            norm_fp32=model.config.norm_fp32,
                            fp32_edge_attention=model.config.fp32_edge_attention)
        opt_sd = load_file(str(path / "optimizer.safetensors"))
        rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}\n"
                         f"Delete it to start over, or restore it from a copy.") from None
    if loaded.config != model.config:
        diff = {f.name: (getattr(loaded.config, f.name), getattr(model.config, f.name))
                for f in dataclasses.fields(ModelConfig)
                if getattr(loaded.config, f.name) != getattr(model.config, f.name)}
        raise ValueError(f"{path} holds a different model (checkpoint vs now: {diff})")
    saved, params = dict(loaded.named_parameters()), dict(model.named_parameters())
    if (path / ADAPTER_WEIGHTS).is_file():  # a LoRA run: the folder's model is the frozen base
        saved.update(load_adapter_weights(path))
    with torch.no_grad():
        for name, p in params.items():
            key = name.replace(".base_layer.", ".")
            if key not in saved:
                raise ValueError(f"{path} has no {key}: it was saved by a run with other --lora_* "
                                 f"settings; resume with the run's own settings")
            p.copy_(saved[key].to(p.dtype))
    unused = sorted(k for k in saved if ".lora_" in k and k not in params)
    if unused:
        raise ValueError(f"{path} holds LoRA adapters ({unused[0]}, ...) that this run has none of; "
                         f"resume with the run's own --lora_* settings")
    for key, t in opt_sd.items():
        name, k = key.split("::")
        opt.state[params[name]][k] = t.to(device)
    return state
