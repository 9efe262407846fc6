"""The package version: one place, read by the package, by run records and by file metadata."""
__version__ = "0.1.0"
