"""Processes that host the layers below: the gRPC server, Ray Serve deployments, the Celery worker."""
