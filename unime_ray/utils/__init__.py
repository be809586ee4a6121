"""Shared plumbing: logging, Ray start-up, progress reporting, run manifests."""
