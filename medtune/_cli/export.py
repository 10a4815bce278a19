"""``medtune export hf CHECKPOINT OUT_DIR``: a trained MedVLM as a transformers LLaVA folder.

The folder loads with transformers alone (``AutoModelForImageTextToText`` + ``AutoProcessor``,
``pipeline("image-text-to-text")``) and serves with vLLM / SGLang
(:mod:`medtune.training.export_llava` says which exports vLLM's LLaVA loader takes). A model
without an exact LLaVA equivalent (a Q-Former or pooled connector, several encoders, a tower read
after its final norm) is refused with the reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  $ medtune export hf outputs/demo_llava/epoch_1 exported/demo_llava
  $ medtune export hf outputs/vision_finetune_slake/epoch_2 exported/slake \\
        --eval-dir outputs/eval_slake_vqa_rad        # its results.json goes into the model card
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand (format ``hf``)."""
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint in another project's layout (hf: transformers LLaVA)",
        description="Write a medtune checkpoint as a transformers LlavaForConditionalGeneration folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=["hf"], help="hf: transformers LLaVA")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's epoch_k folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write")
    parser.add_argument("--eval-dir", metavar="DIR", help="an eval output folder for the card")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export; print the folder written."""
    from medtune.utils.errors import UserError

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"{ckpt}: not a medtune checkpoint folder (no config.yaml)")
    from medtune.training.export_llava import export_hf

    out = export_hf(ckpt, args.out_dir, eval_dir=args.eval_dir)
    print(f"wrote transformers LLaVA folder {out}")
    return 0
