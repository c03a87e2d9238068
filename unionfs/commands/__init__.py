"""The command line's rooms, beside unionfs/cli.py (which only parses and dispatches): the
mount server's life, its log and lock, usage errors, progress, export and convert."""
