"""Foreign API dialects, one module each, translating to the same runtime calls as tandem's own
routes: ``openai`` (``/v1/embeddings``, ``/v1/models``). Each may shape its own error bodies
(``ERROR_PREFIX`` and ``error_body``), which ``service.errors`` uses for paths under its prefix."""
