"""Every error a user can cause, under one base class.

The CLI turns an :class:`AmberHunterError` into a one-line message and exit code 2; anything
else is a bug and keeps its traceback. So each message names the bad value *and* the fix,
because that one line is all the user sees.
"""

import re

#: A Python object's repr, as libraries put one in their messages: "<_io.BytesIO object at
#: 0x7f…>" (Pillow), "<urllib3.connection.HTTPConnection object at 0x7f…>: " (urllib3 before 2.3).
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>(?::\s*)?")


def plain(text: str) -> str:
    """A library's message fit to show: without object reprs, on one line.

    A repr tells a user nothing, and differs on every call, so a run's failure summary could not
    count the scenes that failed for one reason together.
    """
    return _OBJECT_REPR.sub("", text).replace("\n", " ").strip()


class AmberHunterError(Exception):
    """Base class: a problem with the user's input, data or environment, not a bug."""


class ImageError(AmberHunterError):
    """An image file that cannot be used: unreadable, corrupt, or of the wrong shape."""


class DatasetError(AmberHunterError):
    """A labelled dataset that cannot be trained or evaluated on."""


class LabelsError(DatasetError):
    """A labels CSV that names missing files or unknown labels, or has a bad header."""


class ModelBundleError(AmberHunterError):
    """A model bundle that is missing, corrupt or incompatible with the request."""


class EmbedderError(AmberHunterError):
    """An unknown embedder, or one whose weights or libraries are not available."""


class WeightsUnavailableError(EmbedderError):
    """Pretrained weights that are neither cached nor downloadable."""


class ConfigError(AmberHunterError):
    """An option value or combination that makes no sense."""


class AreaError(ConfigError):
    """An area of interest that is empty, inverted or outside Web Mercator."""


class TileSourceError(AmberHunterError):
    """A tile source that cannot be opened or does not serve what was asked for."""




class RunAbortError(AmberHunterError):
    """A failure about the whole run, not one scene: a refused API key, a deleted source file, a
    full disk. A scan stops at once on it (every later scene would fail the same way) instead of
    marking the rest of the region failed. Raise it, or a subclass, only where that is true."""


class SourceUnavailableError(TileSourceError, RunAbortError):
    """A tile source that refuses the whole run (HTTP 401/403), has gone (a deleted file), or does
    not answer at all (a server never reached, or a run of tiles in a row without an answer)."""


class ScanCancelledError(TileSourceError):
    """A tile request abandoned because the user asked the scan to stop (a second Ctrl-C)."""


class RunStoreError(RunAbortError):
    """A run directory that cannot be written (a full disk, say), or a resume with a changed config:
    either way no further scene can be stored, so the run stops."""


class SceneUnavailableError(AmberHunterError):
    """A scanned scene whose pixels cannot be shown or segmented again without a new fetch: its
    tiles were pruned from the run's tile cache (they are never fetched again silently)."""


class FeedbackError(AmberHunterError):
    """A feedback file that cannot be read, or a retrain that cannot be done honestly (too few
    examples of a class, training data not on this machine)."""


class ClusterError(RunAbortError):
    """A dask cluster that cannot run the scan: a scheduler that does not answer, or a worker that
    cannot open the run's tile source or load its model. Every scene would fail the same way, so
    the run stops (and resumes with the same command once the cluster is fixed)."""
