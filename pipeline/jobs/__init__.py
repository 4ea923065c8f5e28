"""The job layer: job records in Redis (``records``, ``broker``), what each task does
(``steps``) and the worker side of comparisons (``compare``). It may use Redis; it never
imports Celery or ``workers``."""
