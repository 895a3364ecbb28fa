"""The web console: static pages served by the API at `/`, talking only to the public `/v1` API."""
