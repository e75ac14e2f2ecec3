"""The REST API service: FastAPI app, routes, dataset feeder (see README.md)."""
