"""Tile sources: HTTP templates, MBTiles files and tile folders, with the on-disk tile cache,
rate limits and retries.

Sources know tiles and bytes only; they know nothing of superpixels, models or runs.
"""
