"""Image references, manifests and blob sources (local layouts and archives today)."""
