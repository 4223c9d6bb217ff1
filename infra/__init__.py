"""Deployment and local infrastructure: the local object store, container image and cluster manifests."""
