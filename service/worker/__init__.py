"""The procrastinate worker: the queue app, its tasks and the worker process."""
