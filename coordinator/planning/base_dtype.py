"""Which storage dtype the frozen base weights get: ``--base-dtype auto|fp32|bf16|int8|int4``.

auto: fp32 when some plan fits the devices at fp32, otherwise the widest dtype that fits. Fitting is a
question of memory only (the cost table of each dtype prices its weights), so it is decided on the
devices' profiles before they are calibrated at the chosen dtype. Pure: no I/O.
"""
from __future__ import annotations

from collections.abc import Callable

from coordinator.planning.costs import CostTable
from coordinator.planning.partitioner import DoesNotFitError, partition
from device_profiles.profile import DeviceProfile
from ringtune.base_dtype import AUTO, BASE_DTYPES, check_base_dtype
from ringtune.run_shape import RunShape


def choose_base_dtype(requested: str, table_for: Callable[[str], CostTable], profiles: list[DeviceProfile],
                      owner: str, shape: RunShape, allowed: tuple[str, ...] = BASE_DTYPES) -> tuple[str, str]:
    """(dtype, why). requested is auto or a dtype; allowed are the dtypes every runtime in the ring takes
    (widest first). Raises DoesNotFitError when nothing fits, saying which dtype would."""
    if requested != AUTO:
        check_base_dtype(requested)
        if requested not in allowed:
            raise DoesNotFitError(f"--base-dtype {requested}: the ring's runtimes take only {', '.join(allowed)}")
        try:
            partition(table_for(requested), profiles, owner, shape)
        except DoesNotFitError as error:
            hint = _narrower_that_fits(requested, table_for, profiles, owner, shape, allowed)
            raise DoesNotFitError(f"{error}{hint}") from None
        return requested, f"asked for with --base-dtype {requested}"
    errors = []
    for dtype in allowed:
        try:
            partition(table_for(dtype), profiles, owner, shape)
        except DoesNotFitError as error:
            errors.append((dtype, error))
            continue
        if not errors:
            return dtype, f"the model fits these devices at {dtype}"
        return dtype, (f"it does not fit these devices at {', '.join(d for d, _ in errors)}; {dtype} is the widest "
                       f"dtype that fits")
    raise DoesNotFitError(f"{errors[-1][1]} (even with frozen weights at {errors[-1][0]})")


def _narrower_that_fits(requested: str, table_for, profiles, owner: str, shape: RunShape,
                        allowed: tuple[str, ...]) -> str:
    """A hint for an error: the widest narrower dtype that would fit, if any."""
    for dtype in allowed[allowed.index(requested) + 1:]:
        try:
            partition(table_for(dtype), profiles, owner, shape)
        except DoesNotFitError:
            continue
        return f"; it fits at --base-dtype {dtype} (or auto)"
    return ""
