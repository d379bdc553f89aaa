"""Geometry as pure math: tiles (mercantile), the scene grid, pixel ↔ lon/lat, areas of interest.

Nothing here does I/O, so Hypothesis can test it exhaustively. Every other stage may import it.
"""
