"""``python -m tlt_operator [kopf run options]``: run the RLJob operator (kopf) with its handlers.

Any ``kopf run`` option passes through (``--namespace ns``, ``--standalone``, ``--peering name``,
``--liveness http://0.0.0.0:8081/healthz``, ``--verbose``); without a namespace option it watches all
namespaces (``--all-namespaces``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from kopf.cli import main as kopf_main

    args = list(sys.argv[1:] if argv is None else argv)
    scoped = any(a in ("-n", "--namespace", "-A", "--all-namespaces") or a.startswith("--namespace=") for a in args)
    if not scoped:
        args.append("--all-namespaces")
    kopf_main(args=["run", "-m", "tlt_operator.handlers", *args], prog_name="tlt-operator")


if __name__ == "__main__":
    main()
