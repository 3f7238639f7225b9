"""Losses shared by the ev packages."""
