"""Prefect tasks: one per step of the method, plus the S3 store and the embedded SeaweedFS server."""
