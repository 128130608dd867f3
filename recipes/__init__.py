"""Recipes shipped with ngkit (package data: the TOML files beside this module)."""
