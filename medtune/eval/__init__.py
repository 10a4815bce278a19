"""Evaluation: VQA metrics, caption metrics, the predictions JSONL and the LLM judge.

Kept import-light: nothing here imports torch. Import the submodules directly:
:mod:`medtune.eval.vqa_metrics`, :mod:`medtune.eval.caption_metrics`,
:mod:`medtune.eval.predictions`, :mod:`medtune.eval.judge`.
"""
