"""The interactive web tool: an HTTP API around one model (``app``) and the page in ``static/``."""
