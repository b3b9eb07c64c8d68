"""The catalog's index: every adapter, revision, alias and alias move, derived from the log.

``base`` holds the :class:`~catalog.index.base.RevisionIndex` ABC; ``lmdb_index.LmdbIndex`` is the
production backend and ``memory_index.MemoryIndex`` a dict-backed one for tests. Backends are
imported from their modules so that importing the ABC never loads LMDB.
"""
