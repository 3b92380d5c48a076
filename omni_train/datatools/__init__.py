"""Dataset tooling that never runs inside a training job: inspection (``data show``)."""
