"""An OpenAI-compatible HTTP server over the continuous-batching engine (`lmstack serve`)."""

from lmstack.serve.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
