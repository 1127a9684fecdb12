"""Evaluation entries in LLaVA's file formats."""
