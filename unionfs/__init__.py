"""Layer indexes, the merged tree, FUSE operations and the crfs-merge command line."""
