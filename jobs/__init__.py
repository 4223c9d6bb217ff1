"""Ray job entrypoints, job submission and the nightly runs."""
