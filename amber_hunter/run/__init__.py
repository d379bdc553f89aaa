"""Region scans: the run config, the run store (the only owner of ``run.sqlite``), scene loading
from tile sources, and the resumable scan loop.
"""
