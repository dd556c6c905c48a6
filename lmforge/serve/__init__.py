"""`lmforge serve`: the OpenAI-compatible HTTP API, the web chat UI and feedback collection."""
