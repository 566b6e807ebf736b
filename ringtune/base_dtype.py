"""The ``--base-dtype`` choices (no torch import: the CLI parsers use them)."""

BASE_DTYPES = ("fp32", "bf16", "int8", "int4")
"""Storage dtypes of frozen base weights, widest first."""
AUTO = "auto"
BASE_DTYPE_CHOICES = (AUTO, *BASE_DTYPES)
