"""Will it fit? The memory and time planner (``omni-train plan``), off the runtime path.

- :mod:`.measure`: activation bytes per layer kind, measured on CPU (every tensor storage
  followed);
- :mod:`.costs`: the committed measurements (``activation_costs.json``), fitted per kind;
- :mod:`.planner`: a stage's per-rank memory (the dry run's weights/gradients/optimizer plus
  activations from the fits and the blend's media mix), verdict, smallest fix, and time.
"""
