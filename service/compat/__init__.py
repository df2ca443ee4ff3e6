"""Foreign API dialects, one adapter each, translating to the same runtime calls as tandem's own
routes: ``openai`` (``/v1/embeddings``, ``/v1/models``) and ``qdrant`` (a Qdrant REST subset under
``/qdrant``, its filters in ``qdrant_filters``). Each shapes its own error bodies
(``ERROR_PREFIX`` and ``error_body``), which ``service.errors`` uses for paths under its prefix."""
