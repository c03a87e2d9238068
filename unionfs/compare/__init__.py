"""Comparing two images' merged trees (`crfs-merge diff`): trees.py is the pure comparison of
path records, images.py reads them from opened images and decides whether files hold the same
bytes, reading as little as it can."""

from unionfs.compare.images import ContentJudge, ImageSide
from unionfs.compare.trees import ADDED, MODIFIED, REMOVED, Change, FieldChange, Record, Verdict, compare

__all__ = [
    "ADDED",
    "MODIFIED",
    "REMOVED",
    "Change",
    "ContentJudge",
    "FieldChange",
    "ImageSide",
    "Record",
    "Verdict",
    "compare",
]
