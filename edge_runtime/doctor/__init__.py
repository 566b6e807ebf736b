"""``ringtune doctor``: what goes wrong on Pis and phones, checked on the device, each with a fix.

Every check is a function returning :class:`Finding`s. The ones that read the system take the
paths they read (``/proc``, ``/sys``, the state directory) as arguments, so tests feed them real
files in a temporary directory; ``run_checks`` runs them all against the live system.
"""
from edge_runtime.doctor.finding import Finding, Status, worst

__all__ = ["Finding", "Status", "worst"]
