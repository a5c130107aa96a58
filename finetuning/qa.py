"""BioASQ factoid QA fine-tuning: ``biobert qa --model DIR --data DIR --output-dir OUT``.

DATA holds train/dev/test .json in SQuAD v1 format (one snippet per paragraph); without a test file (a directory with
a single JSON, or train.json without test.json) a seeded part of the train questions is the test set
(``--test-holdout``, named in metrics.json "test_source"; 0: no test score, never a dev score as the headline). A model
directory that already has ``qa_outputs`` weights (e.g. fine-tuned on SQuAD first, as BioBERT did) keeps them. Writes
OUT/metrics.json (strict/lenient accuracy and MRR over the top 5 per question, SQuAD EM/F1 per snippet),
OUT/{split}_predictions.json (ranked answers), _predictions.tsv (gold answers beside the ranked predictions, rank of the
first correct one), _nbest.json, _bioasq.json (submission), OUT/model.
``--max-train-examples``/``--max-eval-examples`` count questions here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from biobert.errors import UserError, run
from biobert.files import atomic_write, atomic_write_json
from finetuning.bioasq import predictions_to_bioasq
from finetuning.common import find_split, load_tokenizer, no_test_note, require_data_dir, results_line, subsample
from finetuning.config import QAConfig, parse_task, to_dict
from finetuning.heads import BertForQuestionAnswering, checkpoint_keys, load_head, resolve_model
from finetuning.metrics import bioasq_factoid_scores, squad_exact, squad_f1
from finetuning.qa_data import (
    QAExample,
    aggregate_by_question,
    encode_qa,
    gold_by_question,
    holdout_split,
    nbest_spans,
    read_squad,
)
from finetuning.trainer import Runtime, fit, predict, setup_runtime

log = logging.getLogger(__name__)
SCORE_KEYS = ("strict_accuracy", "lenient_accuracy", "mrr")


class QATask:
    def __init__(self, cfg: QAConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def encode(self, examples: list[QAExample]) -> dict:
        return encode_qa(examples, self.tokenizer, self.cfg.max_seq_len, self.cfg.doc_stride, self.cfg.max_query_len)

    def features(self, enc: dict) -> list[dict]:
        return [
            {"input_ids": i, "token_type_ids": t, "start_positions": s, "end_positions": e}
            for i, t, s, e in zip(enc["input_ids"], enc["token_type_ids"], enc["start_positions"], enc["end_positions"])
        ]

    def evaluate(self, model, examples: list[QAExample], rt: Runtime) -> tuple[dict, dict, list]:
        """-> (scores, ranked answers per question, n-best per snippet)."""
        enc = self.encode(examples)
        out = predict(model, self.features(enc), self.cfg, rt, keys=["start_logits", "end_logits"], per_token=True)
        nbest = nbest_spans(examples, enc, out["start_logits"], out["end_logits"], self.cfg.n_best,
                            self.cfg.max_answer_len)
        ranked = aggregate_by_question(examples, nbest, self.cfg.top_k)
        gold = gold_by_question(examples)
        scores = bioasq_factoid_scores(ranked, gold, self.cfg.top_k) if gold else {}
        answered = [(ex, spans) for ex, spans in zip(examples, nbest) if ex.answers]
        if answered:
            best = [spans[0]["text"] if spans else "" for _, spans in answered]
            scores["squad_exact_match"] = sum(squad_exact(p, ex.answers) for p, (ex, _) in zip(best, answered)) / len(best)
            scores["squad_f1"] = sum(squad_f1(p, ex.answers) for p, (ex, _) in zip(best, answered)) / len(best)
        return scores, ranked, nbest


def _questions(examples: list[QAExample], n: int | None, seed: int) -> list[QAExample]:
    keep = set(subsample(sorted({e.qid for e in examples}), n, seed))
    return [e for e in examples if e.qid in keep]


def load_splits(cfg: QAConfig, data: Path) -> dict[str, tuple[list[QAExample], str] | None]:
    paths = {s: find_split(data, s, (".json",)) for s in ("train", "dev", "test")}
    splits = {s: (read_squad(p), str(p)) if p else None for s, p in paths.items()}
    if splits["train"] is None:
        files = sorted(data.glob("*.json"))
        if len(files) != 1:
            raise FileNotFoundError(f"{data}: expected train.json (+ dev/test.json) or exactly one SQuAD-format JSON")
        splits["train"] = (read_squad(files[0]), str(files[0]))
    if splits["test"] is None and cfg.test_holdout > 0:
        examples, source = splits["train"]
        train, held = holdout_split(examples, cfg.test_holdout, cfg.seed)
        splits["train"] = (train, source)
        splits["test"] = (held, f"{Path(source).name}: {cfg.test_holdout:.0%} of its questions held out as test "
                                f"(seed {cfg.seed}); train is the rest")
    limits = {"train": cfg.max_train_examples, "dev": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    return {s: (_questions(v[0], limits[s], cfg.seed), v[1]) if v else None for s, v in splits.items()}


def predictions_tsv(ranked: dict, gold: dict) -> str:
    """One row per question: its gold answers beside the ranked predictions and the rank of the first correct one."""
    rows = ["question_id\tgold\tpredictions\tfirst_correct_rank"]
    for qid in sorted(set(ranked) | set(gold)):
        golds = {a.strip().lower() for a in gold.get(qid, ())}
        preds = ranked.get(qid, [])
        rank = next((i + 1 for i, p in enumerate(preds) if p.strip().lower() in golds), "")
        clean = [" ".join(str(x).split()).replace("|", "/") for x in preds]
        rows.append(f"{qid}\t{' | '.join(sorted(' '.join(g.split()) for g in gold.get(qid, ())))}\t"
                    f"{' | '.join(clean)}\t{rank}")
    return "\n".join(rows) + "\n"


def main(cfg: QAConfig) -> dict:
    rt = setup_runtime(cfg)
    data = require_data_dir(cfg.data)
    model_dir = resolve_model(cfg.model)
    task = QATask(cfg, load_tokenizer(model_dir))
    splits = load_splits(cfg, data)
    model = load_head(model_dir, BertForQuestionAnswering)
    head_kept = "qa_outputs.weight" in checkpoint_keys(model_dir)
    if not cfg.do_train and not head_kept:
        raise UserError(f"{model_dir} has no fine-tuned QA head (qa_outputs weights): fine-tune it first (--do-train, "
                        "the default), or point --model at a QA-fine-tuned model")
    if head_kept:
        log.warning("%s: starting from its fine-tuned qa_outputs head", model_dir)
    metrics: dict = {"task": "qa", "qa_head_from_checkpoint": head_kept}
    dev = splits["dev"][0] if splits["dev"] else None
    if cfg.do_train:
        train, source = splits["train"]
        metrics["train_source"] = source
        evaluate = (lambda m: task.evaluate(m, dev, rt)[0]) if dev and cfg.do_eval and cfg.select_on_dev else None
        metrics["train"] = fit(model, task.features(task.encode(train)), cfg, rt, evaluate, select="mrr", desc="qa")
    model.to(rt.device)
    for name, wanted in (("dev", cfg.do_eval), ("test", cfg.do_predict)):
        if splits[name] is None or not wanted:
            continue
        scores, ranked, nbest = task.evaluate(model, splits[name][0], rt)
        metrics[name] = {**scores, "source": splits[name][1]}
        if rt.is_main:
            atomic_write_json(cfg.output_path(f"{name}_predictions.json"), ranked)
            atomic_write(cfg.output_path(f"{name}_predictions.tsv"), predictions_tsv(ranked, gold_by_question(
                splits[name][0])))
            atomic_write_json(cfg.output_path(f"{name}_nbest.json"), {ex.id: spans for ex, spans in zip(splits[name][0], nbest)})
            atomic_write_json(cfg.output_path(f"{name}_bioasq.json"), predictions_to_bioasq(ranked, cfg.top_k))
    final = metrics.get("test") or {}  # a dev score (it also chose the epoch) is never the headline
    metrics.update({k: v for k, v in final.items() if k != "source"})
    metrics["test_source"] = splits["test"][1] if splits["test"] else None
    if "test" not in metrics and cfg.do_predict:
        metrics["no_test_score"] = no_test_note(data)
    metrics["config"] = to_dict(cfg)
    if rt.is_main:
        if cfg.do_train and cfg.save_model:
            from pretraining.model import save_pretrained

            save_pretrained(model, cfg.output_path("model"), tokenizer_dir=model_dir)
        atomic_write_json(cfg.output_path("metrics.json"), metrics)
        print(results_line("qa", metrics, (*SCORE_KEYS, "squad_exact_match", "squad_f1")))
    return metrics


def cli(argv: list[str] | None = None) -> int:
    main(parse_task(QAConfig, argv, prog="biobert qa", description=__doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run(cli))
