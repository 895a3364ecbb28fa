"""Code shared by the API and the worker. Never imports torch."""
