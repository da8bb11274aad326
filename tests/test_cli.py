"""The `moba` command line itself: lazy commands (no torch for --help), one-line errors, help without <bool>."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from moba_cli import cli
from moba_cli.commands._common import SEED_MAX, OutOpt, SeedOpt
from moba_cli.errors import MobaError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_does_not_import_torch_and_is_fast():
    proc = _run_python(
        """
        import sys, time
        t0 = time.perf_counter()
        import moba_cli.cli
        try:
            sys.argv = ["moba", "--help"]
            moba_cli.cli.main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        took = time.perf_counter() - t0
        heavy = sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules)
        print("HEAVY", heavy, "SECONDS", took, file=sys.stderr)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr
    seconds = float(proc.stderr.rsplit("SECONDS", 1)[1])
    assert seconds < 3.0, f"moba --help took {seconds:.2f} s"  # ~0.1 s here; torch alone takes longer
    for name in cli.COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_help_is_complete_and_loads_only_that_command(name):
    # Only the asked command's module is imported, and its --help shows its own text and options.
    proc = _run_python(
        f"""
        import sys
        import moba_cli.cli
        sys.argv = ["moba", {name!r}, "--help"]
        try:
            moba_cli.cli.main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("LOADED", sorted(m for m in sys.modules if m.startswith("moba_cli.commands.")), file=sys.stderr)
        """
    )
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stderr.rsplit("LOADED", 1)[1]
    targets = {n: lazy.target.partition(":")[0] for n, lazy in cli.COMMANDS.items()}
    assert repr(targets[name]) in loaded
    assert not [m for n, m in targets.items() if n != name and repr(m) in loaded], loaded
    assert f"Usage: moba {name} " in proc.stdout and "--help" in proc.stdout


def test_top_level_names_load_lazily():
    proc = _run_python(
        """
        import sys
        import moba_cli
        assert "torch" not in sys.modules
        assert moba_cli.__version__ and issubclass(moba_cli.MobaError, ValueError)
        from moba_cli import full_attention, load_model, moba_attention, moba_decode
        assert "torch" in sys.modules
        assert all(callable(f) for f in (full_attention, load_model, moba_attention, moba_decode))
        try:
            moba_cli.no_such_name
        except AttributeError:
            print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def _all_help_screens() -> list[str]:
    screens = [runner.invoke(cli.app, ["--help"], env={"COLUMNS": "160"}).output]
    for name in cli.COMMANDS:
        result = runner.invoke(cli.app, [name, "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0, result.output
        screens.append(result.output)
    return screens


def test_help_shows_no_bool_type_after_flags():
    screens = _all_help_screens()
    assert any("--help" in s for s in screens)
    for screen in screens:
        assert "<bool>" not in screen, screen
    assert "<int>" in "".join(screens)  # options that take a value still show their type


# ---------------------------------------------------------------------------------------------------------------
# A fake sub-app and command, registered like the real ones, to test the mechanism itself.

fake = typer.Typer(help="Fake evaluations.")


@fake.command("needle", help="Find the needle.")
def _needle(
    seed: SeedOpt = 0,
    out: OutOpt = None,
    boom: Annotated[bool, typer.Option("--boom", help="Fail with a MobaError.")] = False,
    interrupt: Annotated[bool, typer.Option("--interrupt", help="Act as if Ctrl-C was pressed.")] = False,
) -> None:
    if boom:
        raise MobaError("the [needle] is missing")
    if interrupt:
        raise KeyboardInterrupt
    typer.echo(f"needle seed={seed}")


HELP = "A single fake command."


def single(seed: SeedOpt = 0, crash: Annotated[bool, typer.Option("--crash")] = False) -> None:
    if crash:
        raise OSError(28, "No space left on device", "/tmp/full")
    typer.echo(f"single seed={seed}")


@pytest.fixture
def fake_commands(monkeypatch):
    module = types.ModuleType("moba_fake_commands")
    module.app, module.single, module.HELP = fake, single, HELP
    monkeypatch.setitem(sys.modules, "moba_fake_commands", module)
    monkeypatch.setitem(cli.COMMANDS, "fake-eval", cli.Lazy("moba_fake_commands:app", "Fake evaluations."))
    monkeypatch.setitem(cli.COMMANDS, "single", cli.Lazy("moba_fake_commands:single", "One fake command."))
    monkeypatch.setitem(cli.COMMANDS, "missing", cli.Lazy("moba_never_imported_module:x", "Never loaded."))


def test_registered_sub_app_and_command_run(fake_commands):
    listing = runner.invoke(cli.app, ["--help"], env={"COLUMNS": "160"})
    assert listing.exit_code == 0
    assert "Fake evaluations." in listing.output and "Never loaded." in listing.output  # listed, not imported
    assert runner.invoke(cli.app, ["fake-eval", "needle", "--seed", "7"]).output.strip() == "needle seed=7"
    assert runner.invoke(cli.app, ["single", "--seed", "3"]).output.strip() == "single seed=3"
    sub_help = runner.invoke(cli.app, ["fake-eval", "--help"], env={"COLUMNS": "160"})
    assert "needle" in sub_help.output and "Find the needle." in sub_help.output  # a group, even with one command
    needle_help = runner.invoke(cli.app, ["fake-eval", "needle", "--help"], env={"COLUMNS": "160"}).output
    assert "--boom" in needle_help and "<bool>" not in needle_help
    assert "A single fake command." in runner.invoke(cli.app, ["single", "--help"]).output


def _error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_errors_become_one_line(fake_commands):
    line = _error_line(runner.invoke(cli.app, ["fake-eval", "needle", "--boom"]), 1)
    assert line == "error: the [needle] is missing"  # markup-like text printed as written
    assert _error_line(runner.invoke(cli.app, ["fake-eval", "needle", "--interrupt"]), 130) == "error: interrupted"
    assert "No space left" in _error_line(runner.invoke(cli.app, ["single", "--crash"]), 1)
    assert "--nope" in _error_line(runner.invoke(cli.app, ["single", "--nope"]), 2)
    usage = _error_line(runner.invoke(cli.app, ["convert"]), 2)  # a missing argument names the usage
    assert "Missing argument 'SRC'" in usage and "DST" in usage
    assert "Did you mean 'single'" in _error_line(runner.invoke(cli.app, ["singel"]), 2)


@pytest.mark.parametrize("value", ["-1", str(SEED_MAX + 1), "1e3", str(2**70)])
def test_seed_bounds(fake_commands, value):
    line = _error_line(runner.invoke(cli.app, ["single", "--seed", value]), 2)
    assert "--seed" in line


def test_seed_edges_accepted(fake_commands):
    for value in ("0", str(SEED_MAX)):
        assert runner.invoke(cli.app, ["single", "--seed", value]).output.strip() == f"single seed={value}"


def test_no_args_shows_help_for_a_sub_app(fake_commands):
    fake.info.no_args_is_help = True
    try:
        result = runner.invoke(cli.app, ["fake-eval"])
    finally:
        fake.info.no_args_is_help = False
    assert "needle" in result.output and "error:" not in result.output


def test_loading_a_command_is_cached(fake_commands, monkeypatch):
    calls = []
    real = cli.load_command
    monkeypatch.setattr(cli, "load_command", lambda name, lazy: calls.append(name) or real(name, lazy))
    group = typer.main.get_command(cli.app)
    ctx = group.make_context("moba", ["single"])
    assert group.get_command(ctx, "single") is group.get_command(ctx, "single")
    assert calls == ["single"]
    start = time.perf_counter()
    assert group.get_command(ctx, "nope") is None and time.perf_counter() - start < 1


def test_a_missing_optional_package_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "moba_needs_pkg_cmd.py").write_text("import surely_not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "needy", cli.Lazy("moba_needs_pkg_cmd:run", "Needs a package."))
    assert "needy" in runner.invoke(cli.app, ["--help"]).output  # listing does not import it
    line = _error_line(runner.invoke(cli.app, ["needy", "--help"]), 1)
    assert line == "error: 'moba needy' needs the Python package 'surely_not_installed_pkg_xyz', which is not installed"
