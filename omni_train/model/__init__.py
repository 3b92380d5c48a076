"""Model build: megatron-core modules from the typed config (``assembly.build_model``), then the
stage's freezing policy. ``count`` (closed-form parameter counts) imports no megatron-core: the
launcher's pre-flight uses it."""
