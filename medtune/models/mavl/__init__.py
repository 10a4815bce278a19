"""MAVL (CVPR 2024, HieuPhan33/CVPR2024_MAVL): multi-aspect concept queries decoded against chest
X-ray patches. :func:`mavl_model` builds it with its knowledge books; :class:`MAVLLoss` trains it."""

from medtune.models.mavl.books import ANATOMY, ENTITIES, KEEP_ENTITIES, encode_books
from medtune.models.mavl.losses import MAVLLoss
from medtune.models.mavl.model import MAVL, build_mavl, mavl_model

__all__ = ["ANATOMY", "ENTITIES", "KEEP_ENTITIES", "MAVL", "MAVLLoss", "build_mavl", "encode_books",
           "mavl_model"]  # fmt: skip
