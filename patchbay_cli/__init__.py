"""The `patchbay` command line. It sits above every role (api, worker, inference, demo) because it starts them.

Each command imports what it runs only when it runs, so the API image (no torch) can use the API-side
commands: `migrate`, `api`, `team ...`, `models add` and `storage check`.
"""

from patchbay_cli.base_models import models_app
from patchbay_cli.roles import app
from patchbay_cli.storage import storage_app
from patchbay_cli.teams import team_app

app.add_typer(team_app, name="team")
app.add_typer(models_app, name="models")
app.add_typer(storage_app, name="storage")

__all__ = ["app"]
