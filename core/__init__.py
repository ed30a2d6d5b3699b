"""Weightsmith core."""
