"""The pipe protocol between the server and its model process: length-prefixed pickles."""

from __future__ import annotations

import os
import pickle
import struct


class FrameReader:
    """Length-prefixed frames (8-byte big-endian length, then a pickle) out of a byte stream read in chunks."""

    HEADER = struct.Struct("!Q")

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, chunk: bytes):
        """Add `chunk`; yield every message now complete."""
        self._buffer += chunk
        while len(self._buffer) >= self.HEADER.size:
            (size,) = self.HEADER.unpack_from(self._buffer)
            end = self.HEADER.size + size
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[self.HEADER.size:end])
            del self._buffer[:end]
            yield pickle.loads(payload)


def write_frame(fd: int, payload: bytes) -> None:
    """One length-prefixed frame, written whole (the caller serializes writers)."""
    view = memoryview(FrameReader.HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]
