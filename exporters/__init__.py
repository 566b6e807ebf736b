"""Export plan stages as the artifacts a device runtime loads (ExecuTorch programs or torch
safetensors), with a manifest of shapes, LoRA order and file hashes.

Submodules import heavy toolchains (transformers, executorch.exir) lazily: a device that only
runs stages imports ``ringtune.manifest`` alone.
"""
