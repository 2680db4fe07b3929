"""The distribution's metadata, checked without building it: what Airflow reads of it, and its ranges.

The provider info must pass Airflow's own schema, name the distribution as Airflow normalises it, and
give every ``[cdr_webhook]`` option a default the settings parser accepts, a type and a description.
The ranges must hold the pinned set (constraints.txt) the rest of the suite runs on. The built wheel
itself runs in tests/e2e/test_package.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import resources

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cdr_webhook import provider, setting_docs, setting_values, settings
from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_provider_info_passes_airflows_schema_and_names_the_distribution():
    import jsonschema

    schema = json.loads(resources.files("airflow").joinpath("provider_info.schema.json").read_text())
    info = provider.get_provider_info()
    jsonschema.validate(info, schema)
    # Airflow refuses a provider whose package-name is not the distribution's normalised name.
    assert info["package-name"] == canonicalize_name(PROJECT["name"]) == provider.PACKAGE_NAME
    assert info["versions"] == [__import__("cdr_webhook").__version__]


def test_every_option_has_a_default_the_parser_accepts_a_type_and_a_description():
    options = provider.get_provider_info()["config"]["cdr_webhook"]["options"]
    assert set(options) == set(setting_values.PARSERS)  # a new setting needs its entry here too
    for name, option in options.items():
        assert option["description"], name
        assert option["type"] in {"string", "integer", "float"}, name
    defaults = {name: option["default"] for name, option in options.items() if option["default"] is not None}
    # What Airflow's configuration holds by default reads back as Settings' own defaults.
    assert setting_values.parse_settings(defaults) == settings.Settings()
    assert options["cdrs_per_task"]["default"] == "auto"  # not 0, which the parser refuses
    unset = {name for name, option in options.items() if option["default"] is None}
    assert unset == {
        "failure_notifier",
        "max_cdrs_per_run",
        "start_from",
        "allowed_networks",
        "rate_limit_per_second",
    }
    for name in unset:
        assert getattr(settings.Settings(), name) in (None, ())


def test_option_types_follow_the_parsers():
    options = setting_docs.config_options()
    assert options["retries"]["type"] == "integer"
    assert options["watch_interval_seconds"]["type"] == "float"
    assert options["max_payload_bytes"]["type"] == "integer"
    assert options["cdrs_per_task"]["type"] == "string"  # auto or a number
    assert options["schedule"]["type"] == "string"


def test_the_airflow_command_is_built_without_importing_the_package_modules():
    """Airflow calls the provider's ``cli`` function for every ``airflow`` command: it must stay cheap."""
    probe = (
        "import sys; from cdr_webhook.airflow_cli import get_cli_commands; "
        "[command] = get_cli_commands(); "
        "loaded = sorted(m for m in sys.modules if m.startswith(('cdr_webhook.', 'psycopg'))); "
        "print(command.name, loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "plugins")},
    )
    assert result.stdout.split(" ", 1) == ["cdr-webhook", "['cdr_webhook.airflow_cli']\n"]


def test_the_airflow_command_hands_its_arguments_to_the_modules_parser(capsys):
    import argparse

    from cdr_webhook.__main__ import build_parser
    from cdr_webhook.airflow_cli import DESCRIPTION, get_cli_commands

    [command] = get_cli_commands()
    parser = argparse.ArgumentParser(prog="airflow")
    commands = parser.add_subparsers(dest="subcommand")
    sub = commands.add_parser(command.name)
    for arg in command.args:
        arg.add_to_parser(sub)
    sub.set_defaults(func=command.func)
    args = parser.parse_args(["cdr-webhook", "endpoints", "pause", "--help"])
    assert args.arguments == ["endpoints", "pause", "--help"]
    with pytest.raises(SystemExit) as exited:
        args.func(args)
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: airflow cdr-webhook endpoints pause")
    # The description names every group and command python -m cdr_webhook has.
    groups = build_parser()._subparsers._group_actions[0].choices
    for group, group_parser in groups.items():
        commands_of_group = group_parser._subparsers._group_actions[0].choices
        assert f"{group} {'|'.join(commands_of_group)}" in DESCRIPTION


def test_the_ranges_hold_the_pinned_set_of_our_tests_demo_and_image():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    for text in PROJECT["dependencies"]:
        requirement = Requirement(text)
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned), f"{text} does not allow constraints.txt's {pinned}"


def test_the_entry_points_name_what_exists():
    from airflow.plugins_manager import AirflowPlugin

    from cdr_webhook.plugin import CdrWebhookPlugin

    points = PROJECT["entry-points"]
    assert points["airflow.plugins"] == {"cdr_webhook": "cdr_webhook.plugin:CdrWebhookPlugin"}
    assert points["apache_airflow_provider"] == {"provider_info": "cdr_webhook.provider:get_provider_info"}
    assert issubclass(CdrWebhookPlugin, AirflowPlugin)
