"""Where an Optuna sweep keeps its study: which sweeps have a database (hydra.sweeper.storage), the
URLs Optuna can keep a study in, a URL shown without its password, and the database's tables made
once before the sweeper opens the study, however many workers start at the same moment."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from summ.errors import ConfigError
from summ.files import make_folder

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
RDB_URLS = ("postgresql", "mysql", "mariadb", "oracle", "mssql")  # a server several machines share


def is_optuna(hydra_cfg: Any) -> bool:
    """The sweep is hydra-optuna-sweeper's."""
    target = OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or ""
    return "optuna" in target.lower()


def has_storage(hydra_cfg: Any) -> bool:
    """An Optuna sweep whose study is kept in a database (hydra.sweeper.storage), not in memory:
    the only kind whose trials can be looked up, annotated or continued."""
    return is_optuna(hydra_cfg) and bool(hydra_cfg.sweeper.get("storage"))


def check_storage_url(url: str) -> None:
    """A storage Optuna cannot keep a study in, refused before the first trial."""
    if url and not url.startswith((SQLITE, *RDB_URLS)):
        raise ConfigError(
            f"hydra.sweeper.storage={shown(url)} is not a database Optuna can keep a study in: "
            f"give sqlite:///<file>.db, postgresql://<user>:<password>@<host>/<database>, or null "
            f"for a study in memory"
        )


def prepare_storage(hydra_cfg: Any, attempts: int = 8) -> None:
    """Create Optuna's tables before the sweeper opens its study. Workers that start at the same
    moment on an empty database race to create them (PostgreSQL: UniqueViolation on pg_type) and
    the loser would die; here it waits a moment and finds them made."""
    url = str(OmegaConf.select(hydra_cfg, "sweeper.storage", default="") or "")
    if is_optuna(hydra_cfg) and url.startswith(SQLITE):  # SQLite makes the file, not its folder
        make_folder(Path(url[len(SQLITE) :]).parent)
    if not is_optuna(hydra_cfg) or not url.startswith(RDB_URLS):
        return
    import optuna
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            optuna.storages.RDBStorage(url).engine.dispose()
            return
        except ModuleNotFoundError as exc:  # the database's driver
            raise ConfigError(
                f"hydra.sweeper.storage={shown(url)} needs the Python module {exc.name}: "
                f"pip install -e '.[postgres]' for PostgreSQL"
            ) from None
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == attempts or isinstance(exc, sqlalchemy.exc.OperationalError):
                # OperationalError: no server, wrong password: nothing a retry fixes
                reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
                raise ConfigError(
                    f"cannot open the Optuna storage hydra.sweeper.storage={shown(url)} ({reason}): "
                    f"check that the server is up and the host, user, password and database"
                ) from None
            log.info("Optuna tables are being created by another worker (%s); retrying", type(exc.orig).__name__)
            time.sleep(0.2 + random.random())


def shown(url: str) -> str:
    """A storage URL fit for a message: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing in it to hide
        return url
