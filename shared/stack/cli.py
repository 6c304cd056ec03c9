"""``wsi stack up|down|status``: the local stack from the command line.

The main CLI wires it as a subcommand::

    stack = subcommands.add_parser("stack", help="local broker, PostgreSQL and S3 servers")
    add_stack_arguments(stack)
    stack.set_defaults(handler=cli_stack)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from wsitk.shared.config import wsi_home
from wsitk.shared.stack.servers import COMPONENTS


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"], help="start, stop, or show the stack")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where data, logs, pids and stack.env live (default: $WSI_HOME, else the nearest .wsi folder here "
        "or above, else ~/.wsi)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the servers listen on (default loopback)"
    )
    parser.add_argument(
        "--component",
        choices=COMPONENTS,
        default=None,
        help="start or stop only this server (for outage drills); the others are left alone",
    )
    for component in COMPONENTS:
        parser.add_argument(
            f"--{component}-port",
            type=int,
            default=None,
            help=f"fixed port for the {component} (default: free)",
        )
    parser.add_argument("--json", action="store_true", help="status as JSON")


def cli_stack(args: argparse.Namespace) -> int:
    from wsitk.shared.stack import local

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state_dir: Path = (args.state_dir or wsi_home()).resolve()
    if args.action == "status":
        status = local.stack_status(state_dir)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for component, entry in status.items():
                state = "running" if entry["alive"] else "stopped"
                print(
                    f"{component:9s} {state:8s} pid={entry['pid']} endpoint={entry['endpoint']} log={entry['log']}"
                )
        return 0 if all(entry["alive"] for entry in status.values()) else 1
    if args.action == "down":
        if args.component:
            was_running = local.stop_component(state_dir, args.component)
            print(f"{args.component}: {'stopped' if was_running else 'was not running'}")
        else:
            stopped = local.stop_stack(state_dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in {state_dir})")
        return 0
    if args.component:
        pid = local.start_component(state_dir, args.component, host=args.host)
        print(f"{args.component}: running, pid {pid}")
        return 0
    ports = {name: getattr(args, f"{name}_port") for name in COMPONENTS if getattr(args, f"{name}_port")}
    try:
        info = local.start_stack(state_dir, host=args.host, ports=ports)
    except (RuntimeError, TimeoutError) as error:
        print(f"wsi stack up failed: {error}", file=sys.stderr)
        return 1
    print(f"Kafka bootstrap : {info.kafka_bootstrap}")
    print(f"S3 endpoint     : http://{info.s3_endpoint}  (access key {info.s3_access_key})")
    print(f"PostgreSQL      : {info.host}:{info.ports['postgres']}/wsi  (app role wsi_app, owner wsi_admin)")
    env_file = state_dir / "stack.env"
    print(f"Settings written to {env_file} (credentials inside).")
    if state_dir != wsi_home():
        print(f"Point services and tools at it with: export WSI_ENV_FILE={env_file}")
    print(f"Logs in {state_dir / 'logs'}. Stop with: wsi stack down --state-dir {state_dir}")
    return 0
