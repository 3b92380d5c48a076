"""Generation from a trained checkpoint (``omni-train generate``): megatron-core's static
inference cache driven by a hand-written loop (:mod:`.cache`, :mod:`.sampling`,
:mod:`.generate`)."""
