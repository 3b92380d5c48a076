"""One parallel-state object per process, built once from the parallel config."""

from omni_train.parallel.state import ParallelState, destroy_parallel, init_parallel

__all__ = ["ParallelState", "destroy_parallel", "init_parallel"]
