"""The upper directory of a writable mount (issue 10): the diff it holds, in OCI form."""
