"""cb-proxy: an LLM sidecar reverse proxy speaking the OpenAI API."""

__version__ = "0.1.0"
