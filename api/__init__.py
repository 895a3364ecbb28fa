"""The HTTP front end. Never imports torch."""
