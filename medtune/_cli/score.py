"""``medtune score FILE [FILE2 ...] [--out metrics.json]``: re-score saved predictions.

No model: reads predictions files and prints a metrics JSON. With one file the output is that
file's metrics object; with several it is ``{"files": {path: metrics, ...}}``. The kind of each
file is read from its content:

- ``*.safetensors``: retrieval scores (``sim_i2t``, ``txt2img``, optional ``sim_t2i``), scored with
  BLIP's ``itm_eval`` keys and rules (:mod:`medtune.eval.retrieval_metrics`); the output is exactly
  that object;
- JSONL rows with ``labels`` and ``scores`` objects: classification predictions
  (:mod:`medtune.eval.classification_metrics`); ``--val FILE`` adds validation-threshold metrics;
- rows with ``task: caption``: BLEU/METEOR/ROUGE-L/CIDEr (``--per-row FILE`` writes per-report
  scores as JSONL);
- rows with ``task: mcq``: multiple-choice accuracy (:func:`medtune.eval.mcq.score_mcq_rows`);
- other rows: VQA metrics (:func:`medtune.eval.vqa_metrics.score_predictions`) and
  MedEvalKit's accuracies (:func:`medtune.eval.medevalkit_vqa.score_medevalkit_vqa`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medtune.utils.errors import UserError
from medtune.utils.jsonl import write_jsonl_atomic

EPILOG = """\
metrics (each named by its rule; the 'rules' key of the output states them):
  closed_accuracy_strict     CLOSED: normalized equal, or yes/no answer == first predicted token
  closed_accuracy_llava_med  CLOSED: LLaVA-Med v1 substring rule (after its Dec 2023 fix)
  open_exact_match           OPEN: normalized tokens equal
  open_token_f1              OPEN: SQuAD-style token F1
  open_recall_llava_med      OPEN: LLaVA-Med v1 word recall
  open_hit_llava_med         OPEN: normalized answer is a substring of the prediction (answers
                             empty under LLaVA-Med's normalization, e.g. "A", are skipped and
                             counted in n_skipped_empty_answer_llava_med)
rows whose answer is empty after normalization are counted in n_skipped_empty_answer.
open tokens: each CJK character is its own token (the CMRC 2018 / DuReader F1 rule).
closed_accuracy_llava_med is LLaVA-Med's rule: closed answers that are not yes/no, and Chinese
  是/否 answers, score 0 (n_closed_not_yes_no counts them; see by_language).
caption files (rows with task "caption", as `medtune run eval` writes them): BLEU-1..4, METEOR,
  ROUGE-L, CIDEr through pycocoevalcap (needs java); --no-meteor skips the slow METEOR;
  --per-row FILE writes one JSON line of per-report scores per row; --chexbert DIR adds
  CheXbert F1 (14 and 5 observations, micro/macro) with a local labeler checkpoint.
multiple-choice files (rows with task "mcq": id, question, choices, answer letter, prediction):
  mcq_accuracy by MedEvalKit's judge_multi_choice (letters, option text, \\boxed{} / <answer> /
  "answer:" extraction, else the most similar option), n_mcq, n_mcq_no_option (settled by
  similarity), per-group accuracies (by_modality, by_question_type, by_subset, ...).
VQA files also get MedEvalKit's accuracy_medevalkit, closed_accuracy_medevalkit,
  open_accuracy_medevalkit and open_token_f1_medevalkit (its rules: see rules_medevalkit).
retrieval files (*.safetensors with sim_i2t, txt2img[, sim_t2i]): BLIP itm_eval's txt_r1/5/10,
  txt_r_mean, img_r1/5/10, img_r_mean, r_mean in percent.
classification files (rows with labels and scores objects): auroc_macro, per-class auroc,
  f1_max_mavl, acc_at_f1_max_mavl; with --val VAL.jsonl also f1_at_val_threshold and
  acc_at_val_threshold.
--charts DIR also draws <metric>.png (a bar per file: checkpoint x dataset from its rows), roc_<n>.png
  for classification files and report_<n>.html (every question, filters, search) for VQA / caption
  files; --judge VERDICTS adds vqa_judge verdicts to the pages, --images ROOT finds the images.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` sub-command to ``medtune``'s parser.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "score",
        help="re-score predictions JSONL files (no model needed) and print a metrics JSON",
        description="Re-score saved predictions JSONL files and print a metrics JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "predictions",
        nargs="+",
        metavar="FILE",
        help="predictions JSONL (VQA, caption or classification) or retrieval.safetensors",
    )
    parser.add_argument("--out", metavar="metrics.json", help="also write the JSON to this file")
    parser.add_argument("--no-meteor", action="store_true", help="caption files: skip METEOR")
    parser.add_argument(
        "--val",
        metavar="VAL.jsonl",
        help="classification files: validation predictions (thresholds picked on them)",
    )
    parser.add_argument(
        "--per-row", metavar="FILE", help="caption files: write per-report scores as JSONL"
    )
    parser.add_argument(
        "--chexbert",
        metavar="DIR",
        help="caption files of chest X-ray reports: CheXbert F1 with this local labeler "
        "(chexbert.pth and vocab.txt; nothing is downloaded)",
    )
    parser.add_argument(
        "--charts",
        metavar="DIR",
        help="also draw: a bar chart per metric over the files, ROC curves per class for "
        "classification files, report.html pages for VQA / caption files (medtune.viz)",
    )
    parser.add_argument(
        "--judge",
        metavar="VERDICTS",
        action="append",
        help="with --charts: vqa_judge verdicts.jsonl whose verdicts the report pages show",
    )
    parser.add_argument(
        "--images",
        metavar="ROOT",
        help="with --charts: dataset root that the rows' image paths are relative to",
    )
    parser.set_defaults(func=run)


def _error(message: str) -> int:
    print(f"medtune: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Score the files named in ``args.predictions``; print (and optionally write) the JSON.

    Args:
        args: parsed arguments with ``predictions`` (list of paths) and ``out`` (path or None).

    Returns:
        0 on success; 2 (after a ``medtune: error: ...`` line on stderr) when a file is missing or
        a row is malformed.
    """
    if args.per_row and len(args.predictions) != 1:
        return _error("--per-row takes one predictions file")
    if args.val and not Path(args.val).is_file():
        return _error(f"validation predictions file not found: {args.val}")
    if args.val and Path(args.val).stat().st_size == 0:
        return _error(f"{args.val}: the validation predictions file is empty (0 bytes)")
    results = {}
    per_row: list[dict] | None = None
    for path in args.predictions:
        p = Path(path)
        if not p.exists():
            return _error(f"predictions file not found: {path}")
        if not p.is_file():
            return _error(f"not a file: {path}")
        if p.stat().st_size == 0:
            # what a run killed before its first row leaves: never a table of nulls
            return _error(
                f"{path}: the predictions file is empty (0 bytes); expected rows to score"
            )
        try:
            if p.suffix == ".safetensors":
                metrics = _score_retrieval(p, args)
            else:
                metrics, per_row = _score_rows(p, args)
        except (ValueError, RuntimeError, UserError) as e:
            return _error(str(e))
        except (OSError, UnicodeDecodeError) as e:
            return _error(f"cannot read {path}: {e}")
        results[str(path)] = metrics
    output = next(iter(results.values())) if len(results) == 1 else {"files": results}
    text = json.dumps(output, indent=2, ensure_ascii=False)
    if args.out:
        try:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            return _error(f"cannot write {args.out}: {e}")
    if args.per_row:
        if per_row is None:
            return _error("--per-row is for caption files (rows with task: caption)")
        try:
            write_jsonl_atomic(args.per_row, per_row)
        except OSError as e:
            return _error(f"cannot write {args.per_row}: {e}")
    if args.charts:
        from medtune.viz.eval_outputs import score_figures

        paths = score_figures(results, args.charts, image_root=args.images, judge=args.judge)
        print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)  # stdout stays the JSON
    elif args.judge or args.images:
        return _error("--judge and --images go with --charts")
    print(text)
    return 0


def _score_retrieval(path: Path, args: argparse.Namespace) -> dict:
    """BLIP's itm_eval object for a retrieval.safetensors file (nothing added: its exact keys)."""
    from medtune.eval.retrieval_metrics import score_retrieval_file

    if args.val or args.per_row or args.chexbert:
        raise UserError(f"{path}: --val, --per-row and --chexbert do not apply to a retrieval file")
    return score_retrieval_file(path)


def _score_rows(path: Path, args: argparse.Namespace) -> tuple[dict, list[dict] | None]:
    """Metrics of a predictions JSONL file by its kind, and the per-row caption scores."""
    from medtune.eval.caption_metrics import is_caption_row, score_caption_rows
    from medtune.eval.classification_metrics import (
        is_classification_row,
        read_classification_rows,
        score_classification_rows,
    )
    from medtune.eval.mcq import is_mcq_row, score_mcq_rows
    from medtune.eval.medevalkit_vqa import score_medevalkit_vqa
    from medtune.eval.predictions import read_predictions
    from medtune.eval.vqa_metrics import score_predictions

    rows = read_predictions(path, validate=False)
    if not rows:
        raise UserError(f"{path}: the predictions file holds no rows; expected rows to score")
    metrics: dict = {"predictions": str(path)}
    n_cls = sum(map(is_classification_row, rows))
    if n_cls:
        if n_cls != len(rows):
            raise UserError(
                f"{path}: {n_cls} classification row(s) (labels and scores) and "
                f"{len(rows) - n_cls} other row(s); score them apart"
            )
        val = read_classification_rows(args.val) if args.val else None
        metrics.update(score_classification_rows(read_classification_rows(path), val))
        if args.val:
            metrics["val_predictions"] = str(args.val)
        return metrics, None
    if args.chexbert and not any(map(is_caption_row, rows)):
        raise UserError(f"{path}: --chexbert is for report (caption) files")
    if args.val:
        raise UserError(f"{path}: --val is for classification predictions (labels and scores)")
    n_mcq = sum(map(is_mcq_row, rows))
    if n_mcq:
        # multiple choice (task: mcq): MedEvalKit's judge_multi_choice, medtune.eval.mcq
        if n_mcq != len(rows):
            raise UserError(
                f"{path}: {n_mcq} multiple-choice row(s) (task: mcq) and {len(rows) - n_mcq} "
                "other row(s); score them apart"
            )
        if args.chexbert or args.per_row:
            raise UserError(f"{path}: --chexbert and --per-row are for caption files")
        return metrics | score_mcq_rows(rows, str(path)), None
    n_cap = sum(map(is_caption_row, rows))
    if n_cap and n_cap != len(rows):
        raise UserError(
            f"{path}: {n_cap} caption row(s) and {len(rows) - n_cap} VQA row(s); score them apart"
        )
    if not n_cap:
        vqa_rows = read_predictions(path)
        return metrics | score_predictions(vqa_rows) | score_medevalkit_vqa(vqa_rows), None
    scores = score_caption_rows(rows, meteor=not args.no_meteor, per_item=bool(args.per_row))
    per_id = scores.pop("per_id", None)
    metrics.update(scores)
    if args.chexbert:
        from medtune.eval.chexbert import score_reports_chexbert

        # CheXbert compares one reference per report: the first when a row lists several.
        refs = [r["answer"][0] if isinstance(r["answer"], list) else r["answer"] for r in rows]
        metrics["chexbert"] = score_reports_chexbert(
            [r["prediction"] for r in rows], refs, args.chexbert
        )
    if per_id is None:
        return metrics, None
    per_row = [
        {"id": r["id"], "dataset": r.get("dataset"), "split": r.get("split"), **per_id[r["id"]]}
        for r in rows
    ]
    return metrics, per_row
