"""The kernel edge: choosing libfuse 3, driving its low-level API, and translating FUSE
requests into reads of the merged tree (errno is decided here and nowhere else)."""
