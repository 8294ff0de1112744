"""Why a photo could not be turned into RGB pixels, in words a PACS administrator can act on.

Two kinds of failure call for two different responses from whoever runs the
PACS, so they are two classes:

* :class:`UnsupportedPhotoError`: the object is valid DICOM (or a valid image
  file) that this node does not handle: a video or multi-frame object, more
  than 8 bits per sample, a photometric interpretation or transfer syntax
  without a decoder here, a SOP class the node is not configured for, an image
  over the size limit.  The fix is on the routing or configuration side.
* :class:`CorruptPhotoError`: the object is damaged or inconsistent: an
  unreadable file, no Pixel Data, truncated pixel data, Rows/Columns that do
  not match the data, a codestream the decoder rejects.  The fix is on the
  sending side.
"""

from __future__ import annotations


class PhotoError(Exception):
    """Base class: a photo could not be decoded.

    ``reason`` is a short sentence for a PACS administrator, such as
    ``"pixel data truncated: 1200000 bytes present, 2359296 expected"``.
    ``source`` optionally names the file or instance it is about; ``str()``
    of the error is ``"<source>: <reason>"`` when a source is known and the
    reason does not already name it.
    """

    def __init__(self, reason: str, source: str | None = None) -> None:
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source and source not in reason else reason)

    def with_source(self, source: str) -> PhotoError:
        """Return a copy of this error (same class and reason) that names ``source``."""
        err = type(self)(self.reason, source)
        err.__cause__ = self.__cause__
        return err


class UnsupportedPhotoError(PhotoError):
    """Valid input that the node does not handle (configuration or routing problem)."""


class CorruptPhotoError(PhotoError):
    """Damaged or self-contradicting input (problem on the sending side)."""
