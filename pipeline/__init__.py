"""dinat-batch: batch inference for DiNAT image models, from object storage to Parquet."""
