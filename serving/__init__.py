"""Serving: the ADN and its fronts in the MLflow Model Registry, and a Ray Serve application that picks the skip
mask per batch to meet each request's deadline (``python -m serving``, ``python -m serving.register``)."""
