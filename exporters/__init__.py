"""``ringtune export`` and its driver: check a plan against the model, have the runtime's backend
(``edge_runtime.backends.<runtime>.export``) write the stages, and write the manifest that lists them.

The backends' exporters import heavy toolchains (executorch.exir) lazily: a device that only runs
stages never imports this package (the runtime sits below it in pyproject.toml's import layers).
"""
