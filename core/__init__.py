"""Code shared by the API and the worker: settings, db, models, schemas, storage, queue, and the job and
registry lifecycles. Never imports torch, and imports no role (api/, worker/, demo/, patchbay_cli/)."""
