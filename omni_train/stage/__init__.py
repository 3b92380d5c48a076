"""The stage runner (``runner.run_stage``): one stage of the curriculum, from config to checkpoint
and manifest; ``launch.launch_stage`` runs one in fresh processes. Nothing is imported here, so
the light launcher does not pull in megatron-core."""
