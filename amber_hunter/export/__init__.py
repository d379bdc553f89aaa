"""What a finished run is turned into: ``detections.geojson``, ``summary.json`` and ``map.html``.

Reads the run through :class:`~amber_hunter.run.store.RunStore` only.
"""
