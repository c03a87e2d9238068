"""Provenance of an image's merged tree: `crfs-merge explain` (what each layer did to one
path, and why it is or is not there) and `crfs-merge layers` (what each layer added, changed,
removed and stores for nothing). The rules are whiteout.history's; this package gathers the
layers' entries from the engine, builds typed reports and renders them."""
