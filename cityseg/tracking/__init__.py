"""MLflow tracking, the only package that imports mlflow (deploy/pyfunc.py aside: MLflow runs
that file as the model's code); it imports nothing from train, infer or deploy. One question
per module:

- store.py: where are runs tracked, and how do I reach them? (`open_store`, NoStore)
- outage.py: how long may a server stay silent? (the limit, TrackingUnavailable, waits)
- outbox.py: what happens to a run's writes meanwhile? (kept in order, sent, spooled to disk)
- records.py: what does a run write? (records, and how each is sent)
- session.py: one run from start to end, and what it logs (the Tracker, `open`)
- liveness.py: is a RUNNING run's process still there? (its heartbeat, `runs clean`)
- queries.py: which runs? (named tag queries), a run's artifacts, the model registry

`from cityseg import tracking` and then `tracking.<name>`: every public name is here.
"""

from cityseg.tracking.liveness import (
    HEARTBEAT_EVERY_S,
    HEARTBEAT_TAG,
    STAGE_TAG,
    STALE_AFTER_S,
    Liveness,
    clean_stale,
    interrupted,
    is_stale,
    liveness,
    shown_status,
)
from cityseg.tracking.outage import TrackingUnavailable, interrupt_waits, on_outage_limit
from cityseg.tracking.queries import (
    config_text,
    downloaded,
    full_run_id,
    is_complete,
    logged_config,
    model_run,
    point_runs,
    promote,
    resumable_run,
    run_artifacts,
    run_id_in,
    sweep_children,
    sweep_parents,
)
from cityseg.tracking.session import NOTE_TAG, Tracker, open
from cityseg.tracking.store import (
    EXPERIMENT_KIND_TAG,
    MODEL_DEVELOPMENT,
    RETRIES,
    UI_PORT_ENV,
    NoStore,
    RetryingClient,
    Store,
    experiment_links,
    is_local,
    new_local_store,
    open_store,
    run_url,
    search_runs,
    tag_filter,
    tracking_uri,
    ui_port,
)

__all__ = [
    "EXPERIMENT_KIND_TAG", "HEARTBEAT_EVERY_S", "HEARTBEAT_TAG", "MODEL_DEVELOPMENT", "NOTE_TAG",
    "RETRIES", "STAGE_TAG", "STALE_AFTER_S", "UI_PORT_ENV", "Liveness", "NoStore",
    "RetryingClient", "Store", "Tracker", "TrackingUnavailable", "clean_stale", "config_text",
    "downloaded", "full_run_id", "interrupt_waits", "on_outage_limit",
    "experiment_links", "interrupted", "is_complete", "logged_config", "is_local",
    "new_local_store", "is_stale",
    "liveness", "model_run", "open", "open_store", "point_runs", "promote", "resumable_run",
    "run_artifacts", "run_id_in", "run_url", "search_runs",
    "shown_status", "sweep_children", "sweep_parents", "tag_filter", "tracking_uri", "ui_port",
]
