"""Atomic writes, tables, image grids."""
