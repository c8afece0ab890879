"""The file store plugin: ``PATH`` or ``file:PATH`` (an image file or a block
device node), opened as ``pydm.store.FileStore``.

Rules of this module: ``parse`` only looks (one ``stat``, for the identity
two names of one file share); ``open`` says why a file cannot be used in one
line.  A relative path is taken relative to the table's ``cwd``.
"""

import os

from pydm.store import FileStore, file_identity
from pydm.store_registry import StoreSpec, file_path


class FilePlugin:
    name = "file"
    schemes = ("file",)

    def parse(self, arg, cwd=None):
        path = file_path(arg, cwd)
        try:
            key = file_identity(os.stat(path))
        except OSError:
            key = None           # FileStore says why in its own words
        return StoreSpec("file", key, path, path)

    def open(self, spec, readonly):
        return FileStore(spec.params, readonly)


PLUGIN = FilePlugin()
