"""`tlt run` (an RL job on this machine) and `tlt report` (Markdown + plots from step logs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tlt.errors import ConfigError

if TYPE_CHECKING:
    from tlt.rpc.tls import ClientTLS


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an RL job (GRPO + adaptive SD + adaptive drafter) on this machine")
    add_spec_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per step)")
    p.add_argument("--no-report", action="store_true", help="skip the Markdown/PNG report at the end")
    mode = p.add_argument_group("services (default: start rollout, drafter and trainer processes on loopback)")
    mode.add_argument("--inproc", action="store_true", help="run every service inside this process (threads)")
    mode.add_argument("--rollout", action="append", default=[], metavar="HOST:PORT",
                      help="use running rollout services instead of starting them (repeatable)")
    mode.add_argument("--drafter", metavar="HOST:PORT", help="a running drafter-training service")
    mode.add_argument("--trainer", metavar="HOST:PORT", help="a running policy-trainer service")
    mode.add_argument("--planner", choices=("controller", "external"), default="controller",
                      help="who moves workers between roles: this controller, or an external one (the operator)")
    mode.add_argument("--metrics-port", type=int, help="serve the controller's /metrics, /healthz, /readyz here")
    mode.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server binds to")
    _add_tls_args(p, server=False)
    p.set_defaults(func=cmd_run)


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The job spec as `tlt run` takes it (CONFIG, --set, --output-dir); commands that read a job's outputs take the
    same, so that they find what the run wrote."""
    p.add_argument("config", nargs="?", type=Path, help="job spec YAML (default: the built-in demo job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set rollout.workers=3 (repeatable; value parsed as YAML)")
    p.add_argument("--output-dir", type=Path, help="where logs, checkpoints, the store and the report go")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one service (rollout, drafter or trainer) as a gRPC server")
    p.add_argument("service", choices=("rollout", "drafter", "trainer"))
    p.add_argument("--config", type=Path, help="job spec YAML (default: the built-in demo job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=8080, help="HTTP port of /metrics, /healthz, /readyz")
    p.add_argument("--name", default="", help="worker name (rollout; default: the service kind)")
    p.add_argument("--drafter", default="", metavar="HOST:PORT", help="drafter service (rollout workers push there)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: job threads, else all cores)")
    p.add_argument("--port-file", type=Path, help="write the bound ports as JSON here once serving")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to drain in-flight RPCs on SIGTERM")
    _add_tls_args(p, server=True)
    p.set_defaults(func=cmd_serve)


def _add_tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    """The TLS flags of `tlt serve` (``server``) or `tlt run`: all optional, plaintext without them."""
    tls = p.add_argument_group("gRPC TLS (optional; default plaintext)")
    if server:
        tls.add_argument("--tls-cert", type=Path, metavar="PATH",
                         help="serve over TLS with this PEM certificate (chain); also the client certificate a "
                              "rollout worker presents to --drafter")
        tls.add_argument("--tls-key", type=Path, metavar="PATH", help="the certificate's unencrypted PEM private key")
        tls.add_argument("--tls-client-ca", type=Path, metavar="PATH",
                         help="require client certificates signed by this CA (mutual TLS)")
        tls.add_argument("--tls-ca", type=Path, metavar="PATH",
                         help="rollout: reach the --drafter service over TLS, trusting this CA")
    else:
        tls.add_argument("--tls-ca", type=Path, metavar="PATH",
                         help="reach the running services over TLS, trusting this CA (default: $TLT_TLS_CA)")
        tls.add_argument("--tls-cert", type=Path, metavar="PATH",
                         help="client certificate for services that require one (default: $TLT_TLS_CERT)")
        tls.add_argument("--tls-key", type=Path, metavar="PATH",
                         help="the client certificate's private key (default: $TLT_TLS_KEY)")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="check the services' certificates against NAME instead of the dialed host"
                          + ("" if server else " (default: $TLT_TLS_SERVER_NAME)"))


def _client_tls_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key, "server_name": args.tls_server_name}


def load_spec(config: Path | None, overrides: dict[str, Any], output_dir: Path | None = None):
    """The job spec from ``config`` (None: the built-in demo job), ``--set`` overrides and ``--output-dir``."""
    from tlt.config import apply_overrides, job_spec_from_dict, load_job_spec

    if output_dir is not None:
        overrides = {**overrides, "output_dir": str(output_dir)}
    if config is not None:
        return load_job_spec(config, overrides)
    return job_spec_from_dict(apply_overrides({}, overrides))


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from tlt.rpc.tls import ServerTLS, resolve_client_tls
    from tlt.serving.serve import ServeOptions, serve

    spec = load_spec(args.config, parse_overrides(args.overrides))
    check_store(spec.store_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # TLS files are checked here, before a model is loaded or a port bound
    tls = ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    drafter_tls = None
    if args.tls_ca and args.service != "rollout":
        raise ConfigError(f"--tls-ca is for a rollout worker's --drafter connection; tlt serve {args.service} "
                          f"dials no other service (its own TLS: --tls-cert, --tls-key, --tls-client-ca)")
    if args.tls_ca or args.tls_server_name:
        drafter_tls = resolve_client_tls(_client_tls_flags(args))
    serve(spec, ServeOptions(args.service, args.host, args.port, args.metrics_port, args.name or args.service,
                             args.drafter, args.threads, args.port_file, args.grace, tls=tls,
                             drafter_tls=drafter_tls))
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a Markdown report with plots from one or more steps.jsonl logs")
    p.add_argument("logs", nargs="+", type=Path, help="steps.jsonl files (several: compared side by side)")
    p.add_argument("--labels", help="comma-separated run labels (default: the parent directory names)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.set_defaults(func=cmd_report)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["rollout.workers=3"]`` -> ``{"rollout.workers": 3}`` (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set rollout.workers=3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError, ValueError, LookupError, AttributeError, TypeError) as exc:
            # PyYAML raises plain Python errors for some tags (`!!int x`, `!!bool maybe`) and huge ints
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({type(exc).__name__}: {exc})") from None
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from tlt.controller.display import ProgressDisplay

    spec = load_spec(args.config, parse_overrides(args.overrides), args.output_dir)
    remote = bool(args.rollout or args.drafter or args.trainer)
    if remote and (args.inproc or not args.rollout or not args.trainer):
        raise ConfigError("to use running services give --rollout (one per worker) and --trainer (and --drafter "
                          "unless speculative.mode is off), without --inproc")
    tls = _run_tls(args, remote)
    display = ProgressDisplay(spec.steps, enabled=not args.no_progress)
    try:
        _run_controller(spec, args, display if not args.no_progress else _print_steps, tls)
    finally:
        display.close()
    log = Path(spec.output_dir) / "steps.jsonl"
    print(f"step log: {log}")
    if not args.no_report:
        from tlt.controller.report import read_log, write_report

        report = write_report({spec.name: read_log(log)}, Path(spec.output_dir) / "report",
                              title=f"TLT run: {spec.name}")
        print(f"report: {report}")
    exports = "tlt export-policy" + (" / tlt export-drafter" if spec.rollout.speculative.mode != "off" else "")
    print(f"store: {spec.store_uri} ({exports} with this job's arguments and --out DIR write its newest versions as "
          "model directories)")
    return 0


def _run_tls(args: argparse.Namespace, remote: bool) -> ClientTLS | None:
    """How `tlt run` reaches running services: the TLS flags, else the ``TLT_TLS_*`` environment. The services
    it starts itself (or runs in process) talk plaintext on loopback, so there the environment is not used."""
    from tlt.rpc.tls import CLIENT_FLAGS, resolve_client_tls

    flags = _client_tls_flags(args)
    if not remote:
        given = [CLIENT_FLAGS[name] for name, value in flags.items() if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: TLS applies to running services (--rollout, --drafter, "
                              f"--trainer); the services `tlt run` starts itself talk plaintext on loopback")
        return None
    return resolve_client_tls(flags, os.environ)


def check_store(uri: str) -> None:
    """Fail with one clear line (StoreError) if an S3 store's bucket is missing, its endpoint unreachable or the
    credentials unusable. Some services touch the store only on their first RPC, and `tlt run` would otherwise
    report the first service to trip over it with that service's log."""
    from tlt.store import ArtifactStore
    from tlt.store_s3 import is_s3

    if is_s3(uri):
        ArtifactStore(uri).latest("policy")


def _run_controller(spec, args: argparse.Namespace, on_event, tls: ClientTLS | None = None) -> None:
    """Start (or connect to) the services (over TLS with ``tls``), serve the controller's metrics if asked,
    run the job."""
    from contextlib import ExitStack

    from tlt.controller.components import load_prompt_sets, resolve_model_dir
    from tlt.controller.loop import Controller
    from tlt.controller.services import ServiceAddresses

    resolve_model_dir(spec)  # bad paths fail here, before any service process starts
    if not (args.rollout or spec.rollout.backend == "vllm"):
        from tlt.models.loader import resolve_device

        resolve_device(spec.model.device)  # so does model.device: cuda where no GPU is visible
    load_prompt_sets(spec)
    check_store(spec.store_uri)
    supervisor = None
    with ExitStack() as stack:
        if args.inproc:
            addresses = None
        elif args.rollout:
            addresses = ServiceAddresses(tuple(args.rollout), args.drafter, args.trainer, tls)
        else:
            from tlt.serving.launcher import LocalServices

            local = LocalServices(spec)
            addresses = stack.enter_context(local)
            supervisor = local.revive
        controller = Controller(spec, on_event=on_event, services=addresses, move_roles=args.planner == "controller",
                                supervisor=supervisor)
        stack.callback(controller.close)
        if args.metrics_port is not None:
            from tlt.metrics import new_registry
            from tlt.serving.http import MetricsServer

            registry = new_registry(controller.metric_samples)
            stack.enter_context(MetricsServer(args.metrics_port, args.metrics_host, registry).start())
        controller.run()


def _print_steps(event: dict) -> None:
    from tlt.controller.display import ProgressDisplay

    if event["event"] == "step_end":
        print(ProgressDisplay.step_line(event["record"]), flush=True)
    elif event["event"] in ("worker_failed", "worker_down"):
        print(ProgressDisplay.worker_line(event), flush=True)
    elif event["event"] in ("service_down", "service_back"):
        print(ProgressDisplay.service_line(event), flush=True)


def cmd_report(args: argparse.Namespace) -> int:
    from tlt.controller.report import main_report

    labels = args.labels.split(",") if args.labels else None
    return main_report(args.logs, labels, args.out)
