"""Data sets users arrive with (RecordIO, image folders, verification .bin), shards and the streaming loader.

``load_bin`` is re-exported here because evaluation code and users reach for it by this name; the
rest is imported from its module (``facekd.data.convert``, ``facekd.data.loader``, …).
"""
from facekd.data.verification import load_bin

__all__ = ["load_bin"]
