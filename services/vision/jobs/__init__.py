"""Jobs: long-running work submitted over gRPC (`vision.v1.Jobs`) and done by Celery workers on Redis.

    config      JobsConfig: Redis URL, key namespace, queues, visibility timeout (shared by service, worker, CLI)
    app         the Celery app: queues, acks_late + reject_on_worker_lost, prefetch 1
    store       job records and progress in Redis (Celery's result backend): submit, get, list, cancel
    runtime     what a running job uses: lease (one runner per job), progress, cancel checks, metrics
    tasks       the Celery tasks (download, finetune): idempotent, keyed by the job id
    fetch       hardened HTTP fetching: SSRF refusal after DNS and on every redirect, limits, deadlines
    download    the download job: URL list -> validated, deduplicated images, lists, summary; resumable
    worker      `vision worker`: one Celery worker node per queue, Prometheus metrics
    cli         `vision jobs ...` (a gRPC client of the Jobs service)

Fine-tuning itself lives in `training/` (training.finetune); workers import it only when a job runs.
"""
