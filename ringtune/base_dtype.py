"""The ``--base-dtype`` choices (no torch import: the CLI parsers use them)."""

BASE_DTYPES = ("fp32", "bf16", "int8", "int4")
"""Storage dtypes of frozen base weights, widest first."""
AUTO = "auto"
BASE_DTYPE_CHOICES = (AUTO, *BASE_DTYPES)


class BaseDtypeError(ValueError):
    """An unknown base dtype, or one a model or runtime cannot take."""


def check_base_dtype(dtype: str) -> str:
    if dtype not in BASE_DTYPES:
        raise BaseDtypeError(f"unknown base dtype {dtype!r}: use one of {', '.join(BASE_DTYPES)}")
    return dtype
