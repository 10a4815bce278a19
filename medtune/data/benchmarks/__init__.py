"""Readers of the field's medical VQA benchmarks, in the layouts users download.

- :func:`pathvqa`, :func:`vqa_rad_hf` (:func:`hf_vqa_parquet`): Hugging Face parquet
  (``image`` bytes, ``question``, ``answer``; yes/no -> CLOSED, else OPEN);
- :func:`pmc_vqa`: PMC-VQA csv metafiles + images folder;
- :func:`omnimedvqa`: OmniMedVQA ``QA_information/<access>/*.json`` + ``Images/``;
- :func:`medxpertqa`: MedXpertQA ``MM/<split>.jsonl`` + ``images/`` (several images per question);
- :func:`mmmu`: MMMU's health subjects, ``<Subject>/<split>-*.parquet``.

SLAKE's hub copy (``BoKelvin/SLAKE``) is the ``Slake1.0`` layout: :func:`medtune.data.slake`.
Multiple-choice samples carry ``meta["task"] = "mcq"``, ``choices`` (option texts, A first) and
``answer`` (the letter). Each reader's docstring names the loader / dataset card it follows.
"""

from medtune.data.benchmarks.medxpert_jsonl import medxpertqa
from medtune.data.benchmarks.mmmu_parquet import MMMU_HEALTH_SUBJECTS, mmmu
from medtune.data.benchmarks.omnimed_json import omnimedvqa
from medtune.data.benchmarks.parquet_vqa import hf_vqa_parquet, pathvqa, vqa_rad_hf
from medtune.data.benchmarks.pmc_csv import pmc_vqa

__all__ = [
    "MMMU_HEALTH_SUBJECTS",
    "hf_vqa_parquet",
    "medxpertqa",
    "mmmu",
    "omnimedvqa",
    "pathvqa",
    "pmc_vqa",
    "vqa_rad_hf",
]
