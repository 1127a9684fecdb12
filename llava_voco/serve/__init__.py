"""Serving compressed images: the VoCo cache store and the chat CLI."""
