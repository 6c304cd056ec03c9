"""``wsi``: one command line for running, feeding and inspecting the pipeline.

Every subcommand imports what it needs when it runs, so ``wsi --help`` stays instant and a service
image carries only its own dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

SERVICES = {
    "ingest": "wsitk.services.ingest.main",
    "tiler": "wsitk.services.tiler.main",
    "quality-filter": "wsitk.services.quality_filter.main",
    "embedder": "wsitk.services.embedder.main",
    "mil-scorer": "wsitk.services.mil_scorer.main",
    "recorder": "wsitk.services.recorder.main",
    "viewer": "wsitk.services.viewer.main",
}


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), function)(args)
        return result

    return call


def _add_lazy_arguments(parser: argparse.ArgumentParser, module: str, function: str) -> None:
    getattr(importlib.import_module(module), function)(parser)


def _add_services_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    services = sub.add_parser("services", help="start/stop the six services and the viewer in the background")
    services.add_argument("action", choices=["up", "down", "status", "restart"])
    services.add_argument("--only", nargs="*", choices=sorted(SERVICES), help="act on these services only")
    services.add_argument(
        "--replicas",
        default="",
        metavar="NAME=N,...",
        help="run stages as N members of their consumer group, e.g. tiler=2,quality-filter=2,embedder=2 "
        "(up/restart; a lower count than running stops the extra members)",
    )
    services.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_services"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi",
        description="WSI Toolkit: whole-slide images in an S3 bucket become MIL predictions, through six services.",
        epilog="The local state (stack endpoints, logs, models) is $WSI_HOME, else the nearest .wsi folder in "
        "the working directory or a parent (the demo's is .wsi in the checkout), else ~/.wsi.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error (or WSI_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stack = sub.add_parser("stack", help="the local broker, PostgreSQL and S3 servers (up/down/status)")
    _add_lazy_arguments(stack, "wsitk.shared.stack.cli", "add_stack_arguments")
    stack.set_defaults(handler=_lazy("wsitk.shared.stack.cli", "cli_stack"))

    db = sub.add_parser("db", help="database schema")
    db.add_argument(
        "action",
        choices=["migrate", "wait"],
        help="migrate: apply migrations under the owner role; wait: until every migration is applied",
    )
    db.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_db"))

    run = sub.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=sorted(SERVICES))
    run.set_defaults(handler=cli_run)

    _add_services_parser(sub)

    synth = sub.add_parser("synth", help="generate synthetic pyramidal slides with ground truth")
    _add_lazy_arguments(synth, "wsitk.shared.slides.synth", "add_synth_arguments")
    synth.set_defaults(handler=_lazy("wsitk.shared.slides.synth", "cli_synth"))

    submit = sub.add_parser("submit", help="upload slide files into the watched uploads bucket")
    submit.add_argument("files", nargs="+", type=Path)
    submit.add_argument("--prefix", default="", help="key prefix in the bucket (e.g. a case or batch id)")
    submit.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_submit"))

    status = sub.add_parser("status", help="slides and predictions as the recorder has them")
    status.add_argument("--limit", type=int, default=50)
    status.add_argument(
        "--slide", help="one slide (id as listed, 8+ digit prefix, upload key or file name): every run"
    )
    status.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_status"))

    events = sub.add_parser("events", help="public events (predictions, rejections, failures) as JSON lines")
    events.add_argument("action", choices=["tail"])
    events.add_argument("--topic", action="append", help="topic(s) to read (default: every public topic)")
    events.add_argument("--follow", action="store_true", help="keep waiting for new events")
    events.add_argument("--idle-timeout", type=float, default=5.0, help="stop after this long without events")
    events.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_events"))

    redrive = sub.add_parser("redrive", help="replay dead-lettered messages to their source topics")
    redrive.add_argument("--service", help="only letters dead-lettered by this service")
    redrive.add_argument("--slide", help="only letters of this slide (id as `wsi status` lists it, or key)")
    redrive.add_argument("--dry-run", action="store_true")
    redrive.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_redrive"))

    reconcile = sub.add_parser("reconcile", help="re-announce unfinished slides (after a broker restart)")
    reconcile.add_argument("--stalled-after", type=float, default=0.0, help="seconds without progress")
    reconcile.set_defaults(handler=_lazy("wsitk.services.ingest.poller", "cli_reconcile"))

    _add_correction_commands(sub)
    _add_model_commands(sub)

    experiment = sub.add_parser(
        "experiment", help="labelled synthetic cohort -> pipeline -> wsi train -> wsi evaluate, in one go"
    )
    _add_lazy_arguments(experiment, "wsitk.shared.experiment", "add_experiment_arguments")
    experiment.set_defaults(handler=_lazy("wsitk.shared.experiment", "cli_experiment"))

    demo = sub.add_parser("demo", help="stack + services + synthetic slides in, predictions out")
    demo.add_argument("--slides", type=int, default=6)
    demo.add_argument("--size", default="6000x5000", help="slide size WxH in level-0 pixels")
    demo.add_argument("--timeout", type=float, default=900.0)
    demo.set_defaults(handler=_lazy("wsitk.shared.demo", "cli_demo"))
    return parser


def _add_correction_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wsi mpp ...`` and ``wsi reprocess`` (shared/corrections.py)."""
    mpp = sub.add_parser("mpp", help="per-slide MPP overrides: set (one slide or a CSV), list, remove")
    _add_lazy_arguments(mpp, "wsitk.shared.corrections", "add_mpp_arguments")
    mpp.set_defaults(handler=_lazy("wsitk.shared.corrections", "cli_mpp"))
    reprocess = sub.add_parser(
        "reprocess", help="run stored slides again with another MPP or tissue/QC settings (no new upload)"
    )
    _add_lazy_arguments(reprocess, "wsitk.shared.corrections", "add_reprocess_arguments")
    reprocess.set_defaults(handler=_lazy("wsitk.shared.corrections", "cli_reprocess"))


def _add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wsi model ...`` and ``wsi export ...`` (argument definitions in ``models/cli.py``, no torch)."""
    model = sub.add_parser(
        "model", help="models: defaults, backbone export, registry (register/promote/list)"
    )
    model_sub = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    init_defaults = model_sub.add_parser("init-defaults", help="build the default backbone and MIL model")
    init_defaults.add_argument("--model-dir", type=Path, default=None)
    init_defaults.add_argument("--seed", type=int, default=0)
    init_defaults.add_argument(
        "--encoder",
        default="small-cnn",
        choices=("small-cnn", "small-cnn-synth"),
        help="small-cnn: random weights (default); small-cnn-synth: trained on separate synthetic slides "
        "(about ten minutes)",
    )
    init_defaults.set_defaults(handler=_lazy("wsitk.shared.ops", "cli_model"))
    export_backbone = model_sub.add_parser(
        "export-backbone",
        help=(
            "export a tile encoder (registry name + local checkpoint, or module:Factory) to ONNX, validated "
            "against torch; without OUT it becomes the pipeline's encoder"
        ),
    )
    _add_lazy_arguments(export_backbone, "wsitk.shared.models.cli", "add_export_backbone_arguments")
    export_backbone.set_defaults(handler=_lazy("wsitk.shared.models.cli", "cli_export_backbone"))

    register = model_sub.add_parser("register", help="register a training run's ensemble (ONNX + card)")
    _add_lazy_arguments(register, "wsitk.shared.models.lifecycle", "add_register_arguments")
    register.set_defaults(handler=_lazy("wsitk.shared.models.lifecycle", "cli_register"))
    promote = model_sub.add_parser("promote", help="make a registered version the active one")
    _add_lazy_arguments(promote, "wsitk.shared.models.lifecycle", "add_promote_arguments")
    promote.set_defaults(handler=_lazy("wsitk.shared.models.lifecycle", "cli_promote"))
    deactivate = model_sub.add_parser("deactivate", help="no active version: back to the shipped default")
    deactivate.add_argument("--actor", default=None)
    deactivate.set_defaults(handler=_lazy("wsitk.shared.models.lifecycle", "cli_deactivate"))
    retire = model_sub.add_parser("retire", help="retire a registered version")
    retire.add_argument("version")
    retire.add_argument("--actor", default=None)
    retire.set_defaults(handler=_lazy("wsitk.shared.models.lifecycle", "cli_retire"))
    listing = model_sub.add_parser("list", help="registered model versions")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_lazy("wsitk.shared.models.lifecycle", "cli_list"))

    train = sub.add_parser("train", help="train MIL models on labelled slides (patient-level splits, k-fold)")
    _add_lazy_arguments(train, "wsitk.shared.models.training", "add_train_arguments")
    train.set_defaults(handler=_lazy("wsitk.shared.models.training", "cli_train"))
    evaluate = sub.add_parser("evaluate", help="evaluate a training run on its held-out test patients")
    _add_lazy_arguments(evaluate, "wsitk.shared.models.evaluate_run", "add_evaluate_arguments")
    evaluate.set_defaults(handler=_lazy("wsitk.shared.models.evaluate_run", "cli_evaluate"))
    rescore = sub.add_parser("rescore", help="re-score slides from stored embeddings with a model version")
    _add_lazy_arguments(rescore, "wsitk.services.mil_scorer.rescore", "add_rescore_arguments")
    rescore.set_defaults(handler=_lazy("wsitk.services.mil_scorer.rescore", "cli_rescore"))

    export = sub.add_parser(
        "export",
        help="export a slide: features (h5, CLAM / TRIDENT), attention GeoJSON (QuPath), heatmap, top tiles",
    )
    _add_lazy_arguments(export, "wsitk.shared.models.cli", "add_export_arguments")
    export.set_defaults(handler=_lazy("wsitk.shared.models.cli", "cli_export"))

    dicomweb = sub.add_parser(
        "dicomweb", help="pull a study's slide series from a DICOMweb archive into the pipeline"
    )
    _add_lazy_arguments(dicomweb, "wsitk.shared.interop.dicomweb", "add_arguments")
    dicomweb.set_defaults(handler=_lazy("wsitk.shared.interop.dicomweb", "cli_dicomweb"))


def cli_run(args: argparse.Namespace) -> int:
    from wsitk.shared.config import load_settings
    from wsitk.shared.heap import configure

    # Every service: arrays reused from the heap while a batch is handled, its free pages returned after
    # each batch (shared/heap.py; the memory table in docs/throughput.md).
    configure()
    module = importlib.import_module(SERVICES[args.service])
    result: int = module.main(load_settings())
    return result


#: Commands that talk to a stack, so need to find its state (``require_wsi_home``) before anything else.
_STACK_COMMANDS = {"db", "submit", "status", "events", "redrive", "reconcile", "mpp", "reprocess", "rescore"}
_STACK_COMMANDS |= {"export", "services"}
_REGISTRY_ACTIONS = {"register", "promote", "deactivate", "retire", "list"}


def _needs_stack(args: argparse.Namespace) -> bool:
    return args.command in _STACK_COMMANDS or (
        args.command == "model" and getattr(args, "action", "") in _REGISTRY_ACTIONS
    )


def _server_down(exc: BaseException) -> str:
    """Which server an infrastructure failure is about, in one line."""
    from wsitk.shared.config import load_settings

    text = " ".join(str(exc).split()) or type(exc).__name__
    module = type(exc).__module__
    if "PostgreSQL" in text or module.startswith("psycopg"):
        return text if "PostgreSQL" in text else f"PostgreSQL unreachable: {text}"
    settings = load_settings()
    if module.startswith(("aiokafka", "kafka")):
        return f"Kafka broker unreachable at {settings.kafka_bootstrap}: {text}"
    if module.startswith(("urllib3", "minio")):
        return f"S3 server unreachable at {settings.s3_endpoint}: {text}"
    return text


def _expected_failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one line) for the failures a person can act on; None for a bug."""
    from pydantic import ValidationError
    from wsitk.shared.config import StateNotFound, wsi_home
    from wsitk.shared.errors import PermanentError, is_transient

    if isinstance(exc, StateNotFound):
        return 2, str(exc)
    if is_transient(exc):  # a server is down: say which, and how this CLI finds its stack
        return 2, (
            f"{_server_down(exc)}\n(state directory {wsi_home()}: start the local stack with `wsi stack up` "
            "(or `make demo`), or set WSI_HOME / the WSI_* endpoints to the running one)"
        )
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"WSI_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        return 2, f"invalid configuration: {problems}"
    if isinstance(exc, PermanentError):
        return 2, exc.reason
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return 2, f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}"
    if _is_project_error(exc):
        return 2, str(exc)
    return None


def _is_project_error(exc: BaseException) -> bool:
    """An error this project raises with a message meant for people (bad input, unknown slide or model
    version, missing model files), as opposed to a bug deep in a library."""
    return any(
        cls.__module__.startswith("wsitk.") and cls.__name__ != "HandBack" for cls in type(exc).__mro__
    )


def _debugging(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere on the line (or ``WSI_DEBUG=1``): keep tracebacks of unexpected errors."""
    debug = os.environ.get("WSI_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
    return [arg for arg in argv if arg != "--debug"], debug or "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    """``wsi``: every expected failure is one readable line on stderr and a non-zero status (2 for
    something to fix: input, configuration, a server down; 1 for an unexpected error, whose traceback
    ``--debug`` or ``WSI_DEBUG=1`` shows)."""
    parser = build_parser()
    argv, debug = _debugging(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    previous_logging = None
    kafka_log = logging.getLogger("aiokafka")
    kafka_log_level = kafka_log.level
    if args.command not in ("run", "demo", "experiment", "services", "stack"):
        # Tool commands print results on stdout; their library logs go to stderr, warnings and up only.
        from wsitk.shared.logging import configure_cli_logging

        previous_logging = configure_cli_logging(os.environ.get("WSI_CLI_LOG_LEVEL", "WARNING"))
        if not debug:  # a broker that is down is wsi's one line below, not also the client's own log
            kafka_log.setLevel(logging.CRITICAL)
    name = " ".join(str(part) for part in (args.command, getattr(args, "action", None)) if part)
    try:
        if _needs_stack(args):
            from wsitk.shared.config import require_wsi_home

            require_wsi_home()
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the one top-level handler: one line per failure; --debug re-raises
        if debug:
            raise
        known = _expected_failure(exc)
        if known is not None:
            print(f"wsi {name}: {known[1]}", file=sys.stderr)
            return known[0]
        if args.command == "run":  # a service's own crash: its log keeps the whole traceback
            raise
        print(
            f"wsi {name}: unexpected error: {type(exc).__name__}: {exc}\n"
            "(rerun with --debug, or WSI_DEBUG=1, for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        kafka_log.setLevel(kafka_log_level)
        if previous_logging is not None:  # called in-process (tests): leave logging as it was
            import structlog

            structlog.configure(**previous_logging)


if __name__ == "__main__":
    sys.exit(main())
