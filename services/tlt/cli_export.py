"""`tlt export-drafter` and `tlt export-policy`: a job's published versions as deployable model directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlt.cli_run import add_spec_args, check_store, load_spec, parse_overrides
from tlt.errors import ConfigError
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND

_HELP = {
    DRAFTER_KIND: "export a trained drafter version as an EAGLE-3 draft model directory (vLLM loads it)",
    POLICY_KIND: "export a trained policy version as a Hugging Face model directory (weights, config, tokenizer)",
}


def add_export(sub: argparse._SubParsersAction) -> None:
    for kind in (DRAFTER_KIND, POLICY_KIND):
        p = sub.add_parser(f"export-{kind}", help=_HELP[kind])
        add_spec_args(p)  # as given to `tlt run`: the store is found where the job put it
        p.add_argument("--store", metavar="URI",
                       help="the store to export from (default: the job's store.uri, else <output_dir>/store)")
        p.add_argument("--version", type=int, help=f"{kind} version to export (default: the newest complete one)")
        p.add_argument("--out", type=Path, required=True, help="directory to write (must be new or empty)")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")
        if kind == POLICY_KIND:
            p.add_argument("--no-tokenizer", action="store_true",
                           help="weights and config only (default: add the tokenizer of the job's model.path)")
        p.set_defaults(func=cmd_export, kind=kind)


def cmd_export(args: argparse.Namespace) -> int:
    from tlt.controller.components import resolve_model_dir
    from tlt.export import export_drafter, export_policy, origin
    from tlt.store import ArtifactStore
    from tlt.store_s3 import is_s3

    spec = load_spec(args.config, parse_overrides(args.overrides), args.output_dir)
    uri = args.store or spec.store_uri
    if not is_s3(uri) and not Path(uri.removeprefix("file://")).is_dir():
        raise ConfigError(f"store {uri} does not exist; run the job first, or point at its store (the job's CONFIG, "
                          "--output-dir, --set store.uri=... or --store)")
    check_store(uri)
    store = ArtifactStore(uri)
    if args.kind == DRAFTER_KIND:
        manifest, config = export_drafter(store, args.out, version=args.version, force=args.force)
        print(f"exported {origin(manifest)} from {uri} to {args.out}: EAGLE-3 draft model (aux layers "
              f"{config['eagle_config']['eagle_aux_hidden_state_layer_ids']}, draft vocabulary "
              f"{config.get('draft_vocab_size')})")
        print(f"vLLM: speculative_config={{\"method\": \"eagle3\", \"model\": \"{args.out.resolve()}\", "
              "\"num_speculative_tokens\": 3}")
        return 0
    base = None
    if not args.no_tokenizer:
        try:
            base = resolve_model_dir(spec, build=False)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the policy's tokenizer comes from it), or pass --no-tokenizer") from None
    manifest, config, added = export_policy(store, args.out, base, version=args.version, force=args.force)
    print(f"exported {origin(manifest)} from {uri} to {args.out}: Hugging Face model "
          f"({', '.join(config.get('architectures') or ['unknown architecture'])}"
          + (f", tokenizer from {base}" if added else ", no tokenizer") + ")")
    return 0
