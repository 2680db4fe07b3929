"""The layering contract's one list kept by hand: what of deliver/ the page may not import."""

from __future__ import annotations

import pathlib
import tomllib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "cdr_webhook"


def test_the_page_is_banned_from_every_module_of_deliver_but_the_test_cdr():
    # ruff cannot ban a package but one of its modules, so web/ruff.toml names each module: a module
    # added to deliver/ without its line there would be open to the page.
    banned = tomllib.loads((PACKAGE / "web" / "ruff.toml").read_text())["lint"]["flake8-tidy-imports"][
        "banned-api"
    ]
    modules = {p.stem for p in (PACKAGE / "deliver").glob("*.py")} - {"__init__", "sample"}
    assert {name for name in banned if name.startswith("cdr_webhook.deliver")} == {
        f"cdr_webhook.deliver.{module}" for module in modules
    }
