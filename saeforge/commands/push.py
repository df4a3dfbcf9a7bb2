"""``saeforge push RUN REPO_ID``: publish an SAE folder on the Hugging Face Hub with a model card."""
from __future__ import annotations

import argparse
from saeforge.publish import push


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload an SAE folder to the Hugging Face Hub with a generated model card",
        description="Write RUN/README.md (a model card: architecture, model, hook, metrics from RUN/eval.json, how "
                    "to load it with saeforge and SAELens) and RUN/saelens/ (the SAE in SAELens's layout), then "
                    "upload RUN to REPO_ID (created if missing) with huggingface_hub. Log in first with "
                    "`huggingface-cli login` or set HF_TOKEN. Resume checkpoints and locks are not uploaded.",
    )
    p.add_argument("run", help="the SAE folder (e.g. the --out of saeforge train), in any format saeforge reads")
    p.add_argument("repo_id", help="Hub model repo, owner/name")
    p.add_argument("--dry-run", action="store_true",
                   help="write the card and the SAELens copy and list the files, without contacting the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    p.add_argument("--revision", help="branch to upload to (default: main)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--no-saelens", action="store_true", help="do not add the saelens/ copy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = push(args.run, args.repo_id, dry_run=args.dry_run, private=args.private, revision=args.revision,
               commit_message=args.message, saelens=not args.no_saelens)
    for note in res.notes:
        print(f"note: {note}")
    verb = "would upload" if res.dry_run else "uploaded"
    print(f"{verb} {len(res.files)} files from {res.folder} to {res.repo_id}:")
    for rel in res.files:
        size = (res.folder / rel).stat().st_size
        print(f"  {rel}  ({size} bytes)")
    print(f"model card: {res.card}")
    if res.url:
        print(res.url)
    return 0
