"""Students that timm lacks, registered with timm under names timm does not use.

Import this package (weight_selection.py and main.py do) and create them with timm.create_model.
"""
from . import students  # noqa: F401
