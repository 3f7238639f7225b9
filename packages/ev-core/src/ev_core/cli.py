"""The ``ev`` command: one entry point over every installed ev package.

``ev demo`` runs each installed package's demo; ``ev <package> ...`` forwards to that
package's own CLI (``ev reid eval ...`` is ``ev-reid eval ...``). Packages are found through
the ``ev.cli`` / ``ev.demo`` entry-point groups (:mod:`ev_core.plugins`).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from ev_core.errors import EvError
from ev_core.io import write_json
from ev_core.plugins import discover_plugins
from ev_core.progress import set_quiet

QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Silence progress bars (same as EV_QUIET=1).")
]

app = typer.Typer(
    name="ev",
    help="ev: efficient vision toolkit. `ev demo` runs every installed package's demo.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(quiet: QuietOption = False) -> None:
    if quiet:
        set_quiet(True)


def make_package_app(distribution: str, help: str) -> typer.Typer:
    """The typer app every ev package's CLI starts from.

    It has the ``--quiet`` option and a ``version`` command; the package adds its own
    commands. Registered in the ``ev.cli`` entry-point group it also appears as
    ``ev <name> ...``.

    Args:
        distribution: the package's distribution name (e.g. ``"ev-reid"``).
        help: one-line description shown by ``--help``.
    """
    package_app = typer.Typer(
        name=distribution, help=help, no_args_is_help=True, add_completion=False
    )

    @package_app.callback()
    def _package_root(quiet: QuietOption = False) -> None:
        if quiet:
            set_quiet(True)

    @package_app.command("version")
    def _version() -> None:
        """Print the installed version."""
        from importlib.metadata import version

        typer.echo(f"{distribution} {version(distribution)}")

    return package_app


core_app = make_package_app("ev-core", "ev-core: models, layers and utilities.")


@core_app.command("models")
def core_models() -> None:
    """List the ev models registered with timm and their default configs."""
    import ev_core

    for name in ev_core.list_ev_models():
        typer.echo(f"{name}: {ev_core.get_model_config(name)}")


@app.command("packages")
def packages() -> None:
    """List installed ev packages, their versions and whether they ship a demo."""
    for p in discover_plugins():
        demo = "demo" if p.demo is not None else "no demo yet"
        typer.echo(f"{p.distribution} {p.version}  (ev {p.name}; {demo})")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "ev-demo-output"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny sizes (seconds; a smoke test).")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="The longer runs each package describes (minutes).")
    ] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only these packages (repeatable).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run the demo of every installed ev package on its generated or shipped data.

    Each demo writes metrics (JSON) and figures (PNG) under OUT/<package>/; a summary of
    what ran, what has no demo yet and what failed is written to OUT/summary.json, and the
    paths of every figure are printed at the end. The default runs take about 45 s per
    package on 2 idle cores; ``--full`` runs the longer experiments.
    """
    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full", param_hint="--full")
    if quiet:
        set_quiet(True)
    plugins = discover_plugins()
    if only:
        unknown = sorted(set(only) - {p.name for p in plugins})
        if unknown:
            raise typer.BadParameter(f"not installed: {', '.join(unknown)}", param_hint="--only")
        plugins = [p for p in plugins if p.name in only]
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"ran": {}, "no_demo_yet": [], "failed": {}}
    for plugin in plugins:
        if plugin.demo is None:
            summary["no_demo_yet"].append(plugin.distribution)
            continue
        target = out / plugin.name
        typer.echo(f"==> {plugin.distribution} demo -> {target}")
        start = time.perf_counter()
        try:
            run = plugin.demo.load()
            kwargs = {"full": True} if full and "full" in inspect.signature(run).parameters else {}
            metrics = run(target, quick, **kwargs)
        except Exception as exc:  # report every package, then fail at the end
            traceback.print_exc()
            summary["failed"][plugin.distribution] = f"{type(exc).__name__}: {exc}"
            continue
        summary["ran"][plugin.distribution] = {
            "out_dir": str(target),
            "seconds": round(time.perf_counter() - start, 1),
            "metrics": metrics,
        }
    path = write_json(out / "summary.json", summary)
    figures = sorted(out.rglob("*.png"))
    summary_files = sorted(
        p for p in out.rglob("*.json") if p.name in {"metrics.json", "summary.json"}
    )
    typer.echo(f"==> outputs of every demo under {out.resolve()}")
    for figure in figures:
        typer.echo(f"figure: {figure.resolve()}")
    for metrics_file in summary_files:
        typer.echo(f"metrics: {metrics_file.resolve()}")
    typer.echo(f"ran demos: {', '.join(summary['ran']) or 'none'}")
    typer.echo(f"no demo yet: {', '.join(summary['no_demo_yet']) or 'none'}")
    if summary["failed"]:
        typer.echo(f"FAILED: {', '.join(summary['failed'])}", err=True)
    typer.echo(f"outputs written to {out.resolve()} (summary: {path})")
    if summary["failed"]:
        raise typer.Exit(code=1)


_TRUTHY = {"1", "true", "yes", "on"}


def run_cli(typer_app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app the way every ev console script does.

    A known error (:class:`~ev_core.errors.EvError`, or a missing file/permission problem)
    prints one line, ``error: <message>``, to stderr and exits with status 2. ``--debug``
    anywhere on the command line (removed before parsing) or ``EV_DEBUG=1`` lets the
    exception propagate with its traceback.

    Args:
        typer_app: the app to run.
        argv: the arguments (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EV_DEBUG", "").strip().lower() in _TRUTHY
    args = [a for a in args if a != "--debug"]
    if debug:
        typer_app(args=args)
        return
    try:
        typer_app(args=args)
    except (EvError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        text = str(exc).strip()
        message = text.splitlines()[0] if text else type(exc).__name__
        typer.echo(f"error: {message} (run with --debug for the traceback)", err=True)
        raise SystemExit(2) from None


def _mount_plugins() -> None:
    for plugin in discover_plugins():
        if plugin.name in {"demo", "packages"}:
            continue
        app.add_typer(plugin.cli.load(), name=plugin.name)


def main() -> None:
    """Console script ``ev``."""
    _mount_plugins()
    run_cli(app)


def core_main() -> None:
    """Console script ``ev-core``."""
    run_cli(core_app)
