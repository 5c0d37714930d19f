"""mixcls.cli: every listed command module is registered; a missing one is an error, not a
silently absent command."""

from __future__ import annotations

import pytest

from mixcls import cli


def test_every_listed_command_module_registers_a_command():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert {"train", "predict", "select", "noise", "explain", "show-mix"} <= set(commands)


def test_a_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="mixcls.commands.no_such_command"):
        cli.build_parser()


def test_predict_models_choices_are_the_model_sets_predict_knows():
    """commands/predict.py lists --models without importing torch; the list must stay predict's."""
    from mixcls.predict import MODEL_SETS

    parser = cli.build_parser()
    predict = parser._subparsers._group_actions[0].choices["predict"]
    models = next(a for a in predict._actions if a.dest == "models")
    assert tuple(models.choices) == MODEL_SETS
