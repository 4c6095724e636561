"""The worker: Celery app and task, image loading, the model runtime, writing results."""
