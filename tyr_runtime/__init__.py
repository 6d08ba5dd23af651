"""What a run needs around the algorithm that is not a Prefect task: store URLs and the S3 store, the embedded
SeaweedFS, the per-process workspace, opening and locking a run, and the real assets fetched from PyPI."""
