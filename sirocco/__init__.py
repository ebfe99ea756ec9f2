"""Sirocco: a self-hosted implementation of the Mistral AI platform API."""

__version__ = "0.1.0"
