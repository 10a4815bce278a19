"""OpenI held out by report ``uid``: seeded, a fraction option, written once and reused.

OpenI (IU X-ray) has no official split, and one report (``uid``) has several images (frontal,
lateral): splitting by image would put one study on both sides. XrayGPT's OpenI release names
images after the NLM files (``CXR<uid>_IM-....png``); the Kaggle layout's reader keeps ``uid`` in
``meta``. The rule:

1. every sample gets its ``uid`` (``meta["uid"]``, else the leading number of its id / image id,
   ``CXR`` prefix allowed);
2. the sorted distinct uids are shuffled with ``random.Random(seed)``; the first
   ``round(fraction * n)`` (at least 1, at most ``n - 1``) are ``validation``, the rest ``train``;
3. the split is written to ``split_file`` (JSON: seed, fraction, uid lists) the first time and
   *read* afterwards, so later runs, other machines and new reports never move a study; a file
   written with another seed or fraction is refused, and uids it does not know go to ``train``
   only if ``allow_new`` (else refused);
4. :func:`check_uid_leakage` (run on every read) refuses a uid, or an image file, on both sides.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from medtune.data.errors import DataError
from medtune.data.report_readers import xraygpt
from medtune.data.sample import Sample

SPLITS = ("train", "validation")
_UID = re.compile(r"^(?:CXR)?(\d+)(?:_|$)")


def uid_of(sample: Sample) -> str:
    """The OpenI report uid of a sample (``meta["uid"]`` or the leading number of its id)."""
    if sample.meta.get("uid") is not None:
        return str(sample.meta["uid"])
    for name in (str(sample.meta.get("image_id") or ""), str(sample.id)):
        m = _UID.match(name)
        if m:
            return str(int(m.group(1)))
    raise DataError(
        f"sample {sample.id}: no OpenI uid (expected meta['uid'] or an id like CXR12_IM-...)"
    )


def make_uid_split(uids: Sequence[str], fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}`` (sorted) by the rule of the module docstring."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction {fraction}: expected a number in (0, 1)")
    pool = sorted(set(uids), key=lambda u: (len(u), u))
    if len(pool) < 2:
        raise ValueError(f"{len(pool)} uid(s): at least 2 are needed to hold one out")
    random.Random(seed).shuffle(pool)
    n = min(max(1, round(fraction * len(pool))), len(pool) - 1)
    return {"train": sorted(pool[n:]), "validation": sorted(pool[:n])}


def check_uid_leakage(samples: Sequence[Sample], sides: dict[str, set[str]]) -> None:
    """Refuse a uid, or an image file, that lies on both sides of the split."""
    both = sides["train"] & sides["validation"]
    if both:
        raise DataError(f"uid split leaks: uid(s) {sorted(both)[:5]} on both sides")
    where: dict[str, str] = {}
    for s in samples:
        side = "validation" if uid_of(s) in sides["validation"] else "train"
        for p in s.image_paths:
            if where.setdefault(str(p), side) != side:
                raise DataError(f"uid split leaks: image {p} on both sides")


def load_or_write_split(
    samples: Sequence[Sample], split_file: str | Path, fraction: float, seed: int, allow_new: bool
) -> dict[str, set[str]]:
    """The split of ``split_file``, written from ``samples`` when the file does not exist yet."""
    path = Path(split_file)
    uids = [uid_of(s) for s in samples]
    if not path.exists():
        split = make_uid_split(uids, fraction, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"seed": seed, "fraction": fraction, **split}, indent=1))
        tmp.replace(path)
    data = json.loads(path.read_text())
    if data.get("seed") != seed or data.get("fraction") != fraction:
        raise DataError(
            f"{path}: written with seed {data.get('seed')} and fraction {data.get('fraction')}, "
            f"not {seed} / {fraction} (delete it to make a new split, or use its settings)"
        )
    sides = {k: set(map(str, data[k])) for k in SPLITS}
    unknown = sorted(set(uids) - sides["train"] - sides["validation"])
    if unknown and not allow_new:
        raise DataError(
            f"{path}: uid(s) {unknown[:5]} are not in the split file (new reports: pass "
            "allow_new=True to put them in train)"
        )
    sides["train"] |= set(unknown)
    check_uid_leakage(samples, sides)
    return sides


def xraygpt_openi(
    root: str | Path,
    split: str = "train",
    split_file: str | Path | None = None,
    fraction: float = 0.1,
    seed: int = 0,
    allow_new: bool = False,
    dataset: str = "openi_xraygpt",
) -> list[Sample]:
    """XrayGPT's OpenI release (``filter_cap.json`` + ``image/``) with one side of the uid split.

    Args:
        root: XrayGPT's ``dataset/openi`` folder.
        split: ``train`` or ``validation``.
        split_file: where the split is written once and read afterwards (default
            ``root/medtune_uid_split.json``).
        fraction, seed: the held-out fraction of uids and the shuffle seed.
        allow_new: uids missing from an existing split file go to train instead of an error.
        dataset: ``meta["dataset"]``.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    samples = xraygpt(root, dataset=dataset)
    sides = load_or_write_split(
        samples, split_file or Path(root) / "medtune_uid_split.json", fraction, seed, allow_new
    )
    out = []
    for s in samples:
        if uid_of(s) in sides[split]:
            s.meta["split"] = split
            s.meta["uid"] = uid_of(s)
            out.append(s)
    return out
