"""``medtune score PRED.jsonl [PRED2.jsonl ...] [--out metrics.json]``: re-score saved predictions.

No model and no torch: reads predictions JSONL files (DESIGN §3) and prints a metrics JSON
(:func:`medtune.eval.vqa_metrics.score_predictions`). With one file the output is that file's
metrics object; with several it is ``{"files": {path: metrics, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
metrics (each named by its rule; the 'rules' key of the output states them):
  closed_accuracy_strict     CLOSED: normalized equal, or yes/no answer == first predicted token
  closed_accuracy_llava_med  CLOSED: LLaVA-Med v1 substring rule (after its Dec 2023 fix)
  open_exact_match           OPEN: normalized strings equal
  open_token_f1              OPEN: SQuAD-style token F1
  open_recall_llava_med      OPEN: LLaVA-Med v1 word recall
  open_hit_llava_med         OPEN: normalized answer is a substring of the prediction
rows whose answer is empty after normalization are counted in n_skipped_empty_answer.
caption files (rows with task "caption", as `medtune run eval` writes them): BLEU-1..4, METEOR,
  ROUGE-L, CIDEr through pycocoevalcap (needs java); --no-meteor skips the slow METEOR.
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
    parser.add_argument("predictions", nargs="+", metavar="PRED.jsonl", help="predictions JSONL")
    parser.add_argument("--out", metavar="metrics.json", help="also write the JSON to this file")
    parser.add_argument("--no-meteor", action="store_true", help="caption files: skip METEOR")
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
    from medtune.eval.caption_metrics import is_caption_row, score_caption_rows
    from medtune.eval.predictions import PredictionsError, read_predictions
    from medtune.eval.vqa_metrics import score_predictions

    results = {}
    for path in args.predictions:
        p = Path(path)
        if not p.exists():
            return _error(f"predictions file not found: {path}")
        if not p.is_file():
            return _error(f"not a file: {path}")
        try:
            rows = read_predictions(p)
        except PredictionsError as e:
            return _error(str(e))
        except (OSError, UnicodeDecodeError) as e:
            return _error(f"cannot read {path}: {e}")
        metrics = {"predictions": str(path)}
        n_cap = sum(map(is_caption_row, rows))
        if n_cap and n_cap != len(rows):
            return _error(
                f"{path}: {n_cap} caption row(s) and {len(rows) - n_cap} VQA row(s); score them apart"
            )
        try:
            metrics.update(
                score_caption_rows(rows, meteor=not args.no_meteor)
                if n_cap
                else score_predictions(rows)
            )
        except (ValueError, RuntimeError) as e:
            return _error(f"{path}: {e}")
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
    print(text)
    return 0
