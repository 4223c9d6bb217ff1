"""Neighborhood attention (NA) with relative positional bias, the operator DiNAT stands on."""

from dinat_batch.kernels.dispatch import BackendStatus, available_backends, na2d

__all__ = ["BackendStatus", "available_backends", "na2d"]
