"""Pydantic wire shapes shared by the API and the worker."""
