"""stridelab.pipeline: the math and the workers (DDIM core, schedules, models, metrics).

`pipeline/` never imports `search/` or `jobs/`; see docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
