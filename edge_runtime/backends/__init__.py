"""Runtime backends: one folder per runtime an agent can run its stages on, each with the same three
modules, and the interface they share (``base.StageRunner``).

- ``export``: write a stage's artifacts for this runtime (coordinator or ``ringtune export`` side; the
  lowering toolchain lives here and nowhere else).
- ``load``: an agent's runners for its stages, from what the coordinator shipped or an export directory.
- ``runner``: forward/backward of one stage per micro-batch (a ``StageRunner``).

``torch``: eager PyTorch on the CPU, stages mapped from a slice file (``edge_runtime.models.slices``).
``executorch``: ExecuTorch programs lowered to XNNPACK, LoRA tensors fed in as inputs.
Loading and running never import exporting, and neither backend imports the other (pyproject.toml's
import contracts).
"""
