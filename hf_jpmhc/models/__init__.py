"""Everything a Hub checkpoint carries as remote code. Kept flat: ``save_pretrained`` copies a model file
and its single-dot relative imports, so these modules import each other only as ``from .x import y``."""
