"""Settings and names read from the environment and flags: serve settings, model URIs, jobs and worker configuration."""
