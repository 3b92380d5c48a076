"""Model build: megatron-core modules from the typed config, then the stage's freezing policy.

``build_model`` and friends (``assembly``) import megatron-core, so they load on first use:
``omni_train.model.count`` (closed-form parameter counts) serves the launcher without it.
"""

_ASSEMBLY = ("BuiltModel", "build_model", "global_parameter_counts")

__all__ = list(_ASSEMBLY)


def __getattr__(name: str):
    if name in _ASSEMBLY:
        from omni_train.model import assembly

        return getattr(assembly, name)
    raise AttributeError(f"module 'omni_train.model' has no attribute {name!r}")
