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


def test_each_command_is_registered_by_the_module_the_table_names():
    """build_parser(argv) imports only the chosen command's module: the table must be right."""
    everything = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert everything == set(cli.COMMANDS)
    for command, module in cli.COMMANDS.items():
        parser = cli.build_parser([command, "--help"])
        registered = set(parser._subparsers._group_actions[0].choices)
        assert command in registered
        assert registered == {c for c, m in cli.COMMANDS.items() if m == module}


def test_an_unknown_or_missing_command_still_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "predict" in err and "blend" in err


def test_building_the_train_and_predict_parsers_imports_no_heavy_library():
    """`mixcls train` waits for torch only once it trains, and never imports matplotlib before
    the report; a fresh interpreter shows what building the parser imported."""
    import subprocess
    import sys
    heavy = ("torch", "matplotlib", "sklearn", "pandas", "scipy", "cv2", "albumentations", "timm")
    code = ("import sys; from mixcls.cli import build_parser; "
            "[build_parser([c, 'x']) for c in ('train', 'predict', 'pseudo', 'report', 'demo')]; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


PROMPT_EXIT_SCRIPT = """
import atexit, sys, threading, time
from mixcls import cli

class Teardown:
    def __del__(self):  # runs only when the interpreter tears its modules down
        print("teardown ran", flush=True)

kept = Teardown()
atexit.register(lambda: print("atexit ran"))
written = []

def late_writer():
    time.sleep(0.2)
    written.append("thread joined")
    print("thread joined")

def fake_main(argv=None):
    threading.Thread(target=late_writer).start()  # not a daemon: must finish first
    sys.stdout.write("unflushed output")  # no newline, no flush: lost unless run() flushes
    return 3

cli.main = fake_main
cli.run()
print("never reached")
"""


def test_run_exits_with_mains_code_after_handlers_threads_and_flush_but_no_teardown():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PROMPT_EXIT_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    out = done.stdout
    assert "unflushed output" in out and "thread joined" in out and "atexit ran" in out
    assert out.index("thread joined") < out.index("atexit ran")
    assert "teardown ran" not in out and "never reached" not in out

