"""The generic train loop on megatron-core's schedule and optimizer; modality logic lives in the
forward step."""
