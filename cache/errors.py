"""Typed cache errors. Each message says what went wrong and what to do about it."""


class CacheError(Exception):
    """Base class for every cache problem the user can act on."""


class CacheCorruptError(CacheError):
    """A cached file failed its checksum or could not be parsed."""


class CacheFormatError(CacheError):
    """An entry was written by a newer cogedit with a format this one cannot read."""


class CacheBusyError(CacheError):
    """Another process holds the entry's lock longer than we were willing to wait."""


class DiskFullError(CacheError):
    """Not enough free space to write a cache file."""


class InvalidEntryIdError(CacheError):
    """An id that is not a cache id (and so must never become a path)."""


class ReadOnlyCacheError(CacheError):
    """The cache directory cannot be written."""
