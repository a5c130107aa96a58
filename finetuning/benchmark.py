"""Quality and speed against a plain HuggingFace ``Trainer`` baseline, on the same model, data and hyperparameters.

  biobert bench finetune --model minilm --tasks NCBI-disease GAD --max-train-examples 500 \\
      --max-eval-examples 300 --epochs 2 --gad-folds 2 --seeds 1 2 3

For each task: our fine-tuning (finetuning/{ner,re,qa}.py, without dev-set epoch selection so the protocols match) and the baseline
(transformers' BertFor{Token,Sequence}Classification / QuestionAnswering + Trainer + its default dynamic-padding
collator, fused AdamW, same linear warmup/decay), both scored by the same metric code on the same subsample.
Prints scores and training examples/s (training loop only, evaluation excluded) per seed, then mean +- std per
system and a verdict line per task, and writes OUT/benchmark.{json,md}. One seed is noise on a small subsample: use
several before reading a score difference.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biobert.config import option, parse_suite
from biobert.errors import run
from biobert.files import atomic_write, atomic_write_json
from finetuning.common import load_tokenizer, subsample
from finetuning.config import TASK_CONFIGS
from finetuning.evaluate_all import SCORES, SUITE, SuiteTask, default_data_root, run_task, task_config
from finetuning.heads import BertForTokenClassification, load_head, resolve_model
from finetuning.metrics import classification_scores, ner_scores
from finetuning.ner_data import convert_tags, label_list, read_conll
from finetuning.relation_data import default_negative, label_set, read_re_file, stratified_folds


def _hf_args(cfg, out_dir: str):
    """TrainingArguments with our schedule exactly: a float warmup_steps < 1 is a ratio in transformers 5
    (ceil(ratio * steps), as ours); weight decay spares biases and LayerNorm in both; length grouping when we bucket
    (HF's sampler pools min(50, n / 4 batches) batches, as ours); linear decay, fused AdamW, eps 1e-8 (defaults)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, save_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if cfg.bucket_by_length else "random",
        bf16=cfg.bf16, dataloader_num_workers=0,
    )


SPEEDS = ("train_examples_per_s", "train_examples_per_cpu_s")


def _speeds(n_examples: float, wall_s: float, cpu_s: float) -> dict:
    """Training examples per second of wall time and per second of this process's CPU time (all threads)."""
    return {"train_examples_per_s": n_examples / wall_s, "train_examples_per_cpu_s": n_examples / max(cpu_s, 1e-9)}


def _hf_train(model, features: list[dict], cfg, out_dir: str, collator) -> dict:
    """Train with a stock Trainer; returns its training speeds (trainer.train() only)."""
    from transformers import Trainer

    trainer = Trainer(model=model, args=_hf_args(cfg, out_dir), train_dataset=features, data_collator=collator)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    return _speeds(len(features) * cfg.epochs, time.perf_counter() - t0, time.process_time() - c0)


def _torch_train(model, features: list[dict], cfg, out_dir: str, collator) -> dict:
    """The plain PyTorch loop, as a textbook writes it: shuffled batches, AdamW without decay on biases/LayerNorm,
    linear warmup (ceil(ratio * steps)) and decay to 0, gradient clipping. No bucketing, no selection."""
    g = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(cfg.epochs * math.ceil(len(features) / cfg.batch_size))
    warm = math.ceil(cfg.warmup_ratio * steps)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    t0, c0, step = time.perf_counter(), time.process_time(), 0
    while step < steps:
        order = torch.randperm(len(features), generator=g).tolist()
        for i in range(0, len(order), cfg.batch_size):
            if step == steps:
                break
            batch = collator([features[j] for j in order[i : i + cfg.batch_size]])
            model(**batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return _speeds(len(features) * cfg.epochs, time.perf_counter() - t0, time.process_time() - c0)


@torch.no_grad()
def _hf_logits(model, features: list[dict], collator, batch_size: int) -> list[np.ndarray]:
    model.eval()
    out = []
    for i in range(0, len(features), batch_size):
        chunk = features[i : i + batch_size]
        batch = collator([{k: v for k, v in f.items() if k in ("input_ids", "attention_mask")} for f in chunk])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"].float().numpy()
        out.extend(logits[j, : len(f["input_ids"])] if logits.ndim == 3 else logits[j] for j, f in enumerate(chunk))
    return out


def hf_ner(cfg, model_dir: Path, train_fn=_hf_train, our_head: bool = False) -> dict:
    """run_ner-style baseline: first-subword labels, sentences truncated at max_seq_len (cut tokens predicted O).
    ``train_fn``: the Trainer, or ``_torch_train`` (the plain loop, see ``torch_ner``); ``our_head``: our
    BertForTokenClassification (tested equal to HF's in forward and backward) instead of transformers'."""
    from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

    tok = load_tokenizer(model_dir)
    data = Path(cfg.data)
    train = read_conll(data / "train.tsv")
    labels = label_list([train])
    train.sentences = subsample(train.sentences, cfg.max_train_examples, cfg.seed)
    test = read_conll(data / "test.tsv")
    test.sentences = subsample(test.sentences, cfg.max_eval_examples, cfg.seed)
    l2i = {lab: i for i, lab in enumerate(labels)}

    def encode(sentences):
        enc = tok([s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=cfg.max_seq_len)
        feats, firsts = [], []
        for i, s in enumerate(sentences):
            tags, prev, lab, first = convert_tags(s.tags, "iob2"), None, [], {}
            for pos, w in enumerate(enc.word_ids(i)):
                lab.append(l2i[tags[w]] if w is not None and w != prev else -100)
                if w is not None and w != prev:
                    first[w] = pos
                prev = w
            feats.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab})
            firsts.append(first)
        return feats, firsts

    torch.manual_seed(cfg.seed)
    if our_head:
        model = load_head(model_dir, BertForTokenClassification, labels)
    else:
        model = AutoModelForTokenClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=l2i)
    collator = DataCollatorForTokenClassification(tok)
    train_feats, _ = encode(train.sentences)
    speeds = train_fn(model, train_feats, cfg, os.path.join(cfg.output_dir, "hf_tmp"), collator)
    test_feats, firsts = encode(test.sentences)
    logits = _hf_logits(model, test_feats, collator, cfg.eval_batch_size)
    pred = [[labels[int(np.argmax(lg[first[w]]))] if w in first else "O" for w in range(len(s.tokens))]
            for lg, first, s in zip(logits, firsts, test.sentences)]
    scores = ner_scores([convert_tags(s.tags, "iob2") for s in test.sentences], pred)
    return {**{k: scores[k] for k in SCORES["ner"]}, "n_pred_entities": scores["n_pred_entities"],
            "collapsed": scores["n_pred_entities"] == 0, **speeds}


def torch_ner(cfg, model_dir: Path, our_head: bool = True) -> dict:
    """``hf_ner`` with the plain PyTorch loop instead of the Trainer: the reference of the regression test (on our
    head by default: the same model as ours, about twice as fast on a CPU as transformers' padded one)."""
    return hf_ner(cfg, model_dir, train_fn=_torch_train, our_head=our_head)


def hf_re(cfg, model_dir: Path) -> dict:
    """Sequence-classification baseline; CV folds identical to ours (same stratified_folds, same seed)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from finetuning.common import find_split

    tok = load_tokenizer(model_dir)
    full_train = read_re_file(find_split(cfg.data, "train", (".tsv", ".jsonl")))
    train = subsample(full_train, cfg.max_train_examples, cfg.seed)
    dev_path = find_split(cfg.data, "dev", (".tsv", ".jsonl"))
    test_path = find_split(cfg.data, "test", (".tsv", ".jsonl")) or dev_path
    labels = label_set(full_train)
    negative = default_negative(labels)
    l2i = {lab: i for i, lab in enumerate(labels)}
    if cfg.cv_folds:
        pool = train + (subsample(read_re_file(dev_path), cfg.max_eval_examples, cfg.seed) if dev_path else [])
        folds = stratified_folds([e.label for e in pool], cfg.cv_folds, cfg.seed)
        splits = [([e for e, f in zip(pool, folds) if f != k], [e for e, f in zip(pool, folds) if f == k])
                  for k in range(cfg.cv_folds)]
    else:
        splits = [(train, subsample(read_re_file(test_path), cfg.max_eval_examples, cfg.seed))]
    collator = DataCollatorWithPadding(tok)
    results, speeds, constant = [], [], False
    for fold_train, fold_test in splits:
        def encode(examples):
            enc = tok([e.text for e in examples], truncation=True, max_length=cfg.max_seq_len)
            return [{"input_ids": i, "attention_mask": m, "labels": l2i.get(e.label, 0)}
                    for i, m, e in zip(enc["input_ids"], enc["attention_mask"], examples)]

        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
        speeds.append(_hf_train(model, encode(fold_train), cfg, os.path.join(cfg.output_dir, "hf_tmp"), collator))
        logits = _hf_logits(model, encode(fold_test), collator, cfg.eval_batch_size)
        pred = [labels[int(np.argmax(lg))] for lg in logits]
        constant |= len(fold_test) > 1 and len(set(pred)) == 1  # as ours flags it: one class for every example
        results.append(classification_scores([e.label for e in fold_test], pred, negative))
    out = {k: float(np.mean([r[k] for r in results])) for k in SCORES["re"]}
    return {**out, "collapsed": constant, **{k: float(np.mean([s[k] for s in speeds])) for k in SPEEDS}}


def hf_qa(cfg, model_dir: Path) -> dict:
    """BertForQuestionAnswering + Trainer on the same windows; scored with our n-best/aggregation code."""
    from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

    from finetuning.metrics import bioasq_factoid_scores
    from finetuning.qa import QATask, load_splits
    from finetuning.qa_data import aggregate_by_question, gold_by_question, nbest_spans

    tok = load_tokenizer(model_dir)
    splits = load_splits(cfg, Path(cfg.data))
    task = QATask(cfg, tok)
    train_enc, test = task.encode(splits["train"][0]), splits["test"][0]
    feats = [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in task.features(train_enc)]
    torch.manual_seed(cfg.seed)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    collator = DataCollatorWithPadding(tok)
    speeds = _hf_train(model, feats, cfg, os.path.join(cfg.output_dir, "hf_tmp"), collator)
    enc = task.encode(test)
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for i in range(0, len(enc["input_ids"]), cfg.eval_batch_size):
            chunk = [{"input_ids": ids, "token_type_ids": tt} for ids, tt in
                     zip(enc["input_ids"][i : i + cfg.eval_batch_size], enc["token_type_ids"][i : i + cfg.eval_batch_size])]
            batch = collator(chunk)
            out = model(**batch)
            for j, f in enumerate(chunk):
                starts.append(out.start_logits[j, : len(f["input_ids"])].numpy())
                ends.append(out.end_logits[j, : len(f["input_ids"])].numpy())
    nbest = nbest_spans(test, enc, starts, ends, cfg.n_best, cfg.max_answer_len)
    scores = bioasq_factoid_scores(aggregate_by_question(test, nbest, cfg.top_k), gold_by_question(test), cfg.top_k)
    return {**{k: scores[k] for k in SCORES["qa"]}, "collapsed": False, **speeds}


BASELINES = {"ner": hf_ner, "re": hf_re, "qa": hf_qa}


def _our_speeds(metrics: dict) -> dict:
    runs = [f["train"] for f in metrics.get("folds", [])] or [metrics["train"]]
    return _speeds(sum(r["train_examples_seen"] for r in runs), sum(r["train_seconds"] for r in runs),
                   sum(r["train_cpu_seconds"] for r in runs))


def speed_ratio(ours: dict, hf: dict) -> tuple[float, str]:
    """Our training speed over the Trainer's, and the clock it is read on. On a CPU: process CPU time, which other
    jobs on the machine do not distort (wall time on a shared 2-core VM varied 0.8-1.9x between identical runs); on a
    GPU, where the host's CPU time says nothing of the device's, wall time."""
    key, clock = ("train_examples_per_s", "wall time") if torch.cuda.is_available() else \
        ("train_examples_per_cpu_s", "CPU time")
    return ours[key] / hf[key], clock


PRIMARY = {"ner": "f1", "re": "f1", "qa": "mrr"}


def summarise(task: str, kind: str, runs: dict[str, list[dict]]) -> list[dict]:
    """Per system: the mean and (sample) std over seeds of every score and of examples/s, plus the per-seed runs."""
    rows = []
    for who, per_seed in runs.items():
        row = {"task": task, "kind": kind, "system": who, "seeds": len(per_seed), "runs": per_seed}
        for k in per_seed[0]:
            values = np.array([r[k] for r in per_seed], dtype=float)
            row[k] = float(values.mean())
            row[k + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> str:
    """'ours vs hf_trainer: f1 +0.012 (0.8 std), speed 1.85x' for one task's two rows."""
    ours, hf = (next(r for r in rows if r["system"] == who) for who in ("ours", "hf_trainer"))
    k = PRIMARY[ours["kind"]]
    spread = max(ours[k + "_std"], hf[k + "_std"])
    diff = ours[k] - hf[k]
    noise = f" ({diff / spread:+.1f} std)" if spread else ""
    speed, clock = speed_ratio(ours, hf)
    return (f"{ours['task']}: ours - HF Trainer {k} {diff:+.4f}{noise} over {ours['seeds']} seed(s); "
            f"training speed {speed:.2f}x ({clock})")


# The parity targets: mean score within half a point of the Trainer's, no collapse where it learns, 1.5x its speed.
SCORE_MARGIN, MIN_SPEEDUP = 0.005, 1.5


def targets(rows: list[dict]) -> str:
    """'NER-sparse targets: score ok, no collapse ok, speed FAIL (1.31x < 1.5x)' for one task's two rows."""
    ours, hf = (next(r for r in rows if r["system"] == who) for who in ("ours", "hf_trainer"))
    k = PRIMARY[ours["kind"]]
    diff = ours[k] - hf[k]
    # a collapsed run predicts no entity (NER) or one class for everything (RE): its score can still be > 0 (the
    # majority class's share), so the flag, not the score, decides
    down = [[r.get("collapsed", r[k] <= 0) for r in who["runs"]] for who in (ours, hf)]
    collapsed = [i + 1 for i, (o, h) in enumerate(zip(*down)) if o and not h]
    speed, _ = speed_ratio(ours, hf)
    line = (f"{ours['task']} targets: score {'ok' if diff >= -SCORE_MARGIN else 'FAIL'} ({diff:+.4f}, margin "
            f"-{SCORE_MARGIN}), no collapse {'FAIL (seed runs ' + str(collapsed) + ')' if collapsed else 'ok'}, "
            f"speed {'ok' if speed >= MIN_SPEEDUP else 'FAIL'} ({speed:.2f}x, target {MIN_SPEEDUP}x)")
    both = [i + 1 for i, (o, h) in enumerate(zip(*down)) if o and h]
    mine = [i + 1 for i, o in enumerate(down[0]) if o]
    if mine:
        line += (f"; ours collapsed in seed runs {mine}" + (f" (the Trainer too in {both})" if both else "")
                 + ": scores there are a constant predictor's, not a comparison")
    return line


@dataclass(frozen=True)
class ParityTask:
    """A standing benchmark task: a subset of a shared corpus. NER subsets are written once (bench_data, fixed for
    every seed); RE and QA draw ``n_train``/``n_eval`` per seed, as --max-train/eval-examples do."""

    task: SuiteTask
    n_train: int
    n_eval: int | None = None
    entity_fraction: float | None = None  # NER: a thinned ("sparse") training set


PARITY = (
    ParityTask(SuiteTask("NER-dense", "ner", "ner/NCBI-disease-IOB"), 1450),
    ParityTask(SuiteTask("NER-sparse", "ner", "ner/NCBI-disease-IOB"), 1400, entity_fraction=0.12),
    ParityTask(SuiteTask("ChemProt", "re", "re/ChemProt"), 1000, 500),
    ParityTask(SuiteTask("BioASQ", "qa", "qa/BioASQ"), 600, 300),
)
# One setting for every task and both systems (flags override): the settings the issue measured at.
PARITY_SETTINGS = {"epochs": 3.0, "learning_rate": 5e-5, "batch_size": 32, "max_seq_len": 128,
                   "max_query_len": 32, "doc_stride": 32}


def _parity_plan(data_root: Path, out: Path, names: list[str]) -> list[tuple[SuiteTask, Path, dict]]:
    """(suite task, its data root, per-task config values) for each standing task, NER subsets written under out."""
    from finetuning.bench_data import write_subset

    plan = []
    for p in PARITY:
        if p.task.name not in names:
            continue
        if p.task.kind == "ner":
            write_subset(data_root / p.task.subdir, out / "ner" / p.task.name, p.n_train, p.entity_fraction, p.n_eval)
            plan.append((SuiteTask(p.task.name, "ner", f"ner/{p.task.name}"), out, {}))
        else:
            plan.append((p.task, data_root, {"max_train_examples": p.n_train, "max_eval_examples": p.n_eval}))
    return plan


def markdown(rows: list[dict]) -> str:
    keys = [k for k in ("precision", "recall", "f1", "strict_accuracy", "lenient_accuracy", "mrr")
            if any(k in r for r in rows)]
    md = ["| task | system | seeds | " + " | ".join(keys) + " | train ex/s | train ex/CPU-s |",
          "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        cells = [f"{r[k]:.4f} ± {r[k + '_std']:.4f}" if k in r else "" for k in keys]
        cells += [f"{r[k]:.1f} ± {r[k + '_std']:.1f}" for k in SPEEDS]
        md.append(f"| {r['task']} | {r['system']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


@dataclass(kw_only=True)
class FinetuneBenchConfig:
    """Ours vs the HF Trainer on the same data and hyperparameters; every other flag goes to both systems."""

    data_root: str | None = option(None, "the shared data directory (default: $BIOBERT_DATA, else ../shared/data)")
    output_dir: str = option("benchmark_out", "OUT/benchmark.{json,md} and each run's files")
    parity: bool = option(False, "the standing parity benchmark: dense and sparse NER, ChemProt, BioASQ subsets at one "
                                 f"setting for both systems ({PARITY_SETTINGS}, under any flag given), target verdicts")
    tasks: list[str] | None = option(None, "tasks to run (default: the suite, or with --parity its tasks)",
                                     choices=[t.name for t in SUITE] + [p.task.name for p in PARITY])
    seeds: list[int] = option(factory=lambda: [42], help="one run of each system per seed (the seed also draws the "
                                                         "subsamples): mean +- std")
    gad_folds: int = option(10, "cross-validation folds for GAD")


def main(cfg: FinetuneBenchConfig, given: dict) -> list[dict]:
    given = {k: v for k, v in given.items() if k not in ("data", "output_dir", "seed")}
    if given.get("num_threads"):
        torch.set_num_threads(int(given["num_threads"]))
    data_root = Path(cfg.data_root) if cfg.data_root else default_data_root()
    out_root = Path(cfg.output_dir)
    if cfg.parity:
        given = {**PARITY_SETTINGS, **given}
        plan = _parity_plan(data_root, out_root / "data", cfg.tasks or [p.task.name for p in PARITY])
    else:
        plan = [(t, data_root, {"cv_folds": cfg.gad_folds} if t.name == "GAD" else {})
                for t in SUITE if t.name in (cfg.tasks or [t.name for t in SUITE])]
    model_dir = resolve_model(given.pop("model", "minilm"))
    recipe = given.pop("recipe", "quick")
    overrides = {**given, "model": str(model_dir), "select_on_dev": False, "save_model": False, "progress": False,
                 "report_to": ["none"]}  # as the HF Trainer it is timed against (report_to="none")
    rows, verdicts = [], []
    for task, task_root, extra in plan:
        if task.kind == "qa" and int(given.get("max_seq_len", 384)) < 256:
            extra = {"max_query_len": 32, "doc_stride": 32, **extra}  # the QA defaults are sized for 384 tokens
        runs: dict[str, list[dict]] = {"ours": [], "hf_trainer": []}
        for seed in cfg.seeds:
            tcfg = task_config(task, task_root, out_root / f"seed{seed}", {**overrides, **extra, "seed": seed}, recipe)
            ours = run_task(tcfg, task.kind)
            runs["ours"].append({k: ours[k] for k in SCORES[task.kind]} | {
                "collapsed": bool(ours.get("collapsed", False)), **_our_speeds(ours)})
            hf = BASELINES[task.kind](tcfg, model_dir)
            runs["hf_trainer"].append({k: hf[k] for k in (*SCORES[task.kind], "collapsed", *SPEEDS)})
            for who, per_seed in runs.items():
                print(f"{task.name:15s} seed {seed:<5d} {who:10s} "
                      + " ".join(f"{k}={v:.4f}" for k, v in per_seed[-1].items()), flush=True)
        task_rows = summarise(task.name, task.kind, runs)
        verdicts.append(verdict(task_rows))
        if cfg.parity:
            verdicts.append(targets(task_rows))
        print("\n".join(verdicts[-2 if cfg.parity else -1:]), flush=True)
        rows += task_rows
    atomic_write_json(out_root / "benchmark.json",
                      {"args": {k: str(v) for k, v in vars(cfg).items()}, "config": {k: str(v) for k, v in given.items()},
                       "recipe": recipe, "rows": rows, "verdicts": verdicts})
    md = markdown(rows) + "\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    atomic_write(out_root / "benchmark.md", md)
    print(md)
    return rows


def cli(argv: list[str] | None = None) -> int:
    cfg, given = parse_suite(FinetuneBenchConfig, TASK_CONFIGS.values(), argv, prog="biobert bench finetune",
                             description=__doc__)
    main(cfg, given)
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
