"""The one procrastinate App, shared by the API (to defer) and the worker (to run)."""

from __future__ import annotations

import procrastinate

# The connector gets its pool from `app.open_async(pool=...)` in each process:
# the service's own pool, so jobs deferred by the API ride its transactions.
app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(),
    import_paths=["service.worker.tasks", "service.worker.run"],
)
