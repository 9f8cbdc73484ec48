"""Many jobs, and long videos cut into segments, on a Ray cluster: ``python -m latentsync.batch JOBS.jsonl``.

``jobs`` reads the jobs file and writes result lines (no Ray), ``worker`` is the Ray actor that loads the models
once, ``cluster`` joins Ray and sizes the workers to its nodes, ``driver`` hands the workers their tasks,
``command`` is the command line (:func:`command.main`).
"""
