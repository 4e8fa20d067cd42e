"""``kdkit init [TEMPLATE] [-o FILE]``: write a commented starter config."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TEMPLATE = "folder_resnet50_to_resnet18"


def templates_dir() -> Path:
    """The shipped configs: ``kdkit/configs/`` (package data, so a wheel has them too; the
    repository's ``configs/`` is a link to it)."""
    return Path(__file__).resolve().parents[1] / "configs"


def templates() -> list[str]:
    return sorted(p.stem for p in templates_dir().glob("*.yaml"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write a commented starter config for kdkit train",
        description="Copy one of the shipped configs (configs/*.yaml), comments included, to "
        "FILE; edit it, then run kdkit train FILE.",
    )
    p.add_argument(
        "template", nargs="?", default=DEFAULT_TEMPLATE,
        help=f"one of the shipped configs (default: {DEFAULT_TEMPLATE}); see --list",
    )  # fmt: skip
    p.add_argument("-o", "--output", default="kdkit.yaml", metavar="FILE",
                   help="where to write it (default: kdkit.yaml); - for stdout")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the templates and exit")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit._io import atomic_write_text, check_output_path
    from kdkit.errors import KDError, closest_names

    names = templates()
    if args.list:
        print("\n".join(names))
        return 0
    name = args.template.removesuffix(".yaml")
    if name not in names:
        if not names:
            raise KDError(f"no templates found in {templates_dir()}")
        raise KDError(
            f"no template {name!r}; did you mean {closest_names(name, names, 1)[0]!r}? "
            f"(templates: {', '.join(names)})"
        )
    text = (templates_dir() / f"{name}.yaml").read_text()
    if args.output == "-":
        print(text, end="")
        return 0
    out = Path(args.output)
    check_output_path(out, what="-o")  # never a file a run or a cache keeps, even with --force
    if out.exists() and not args.force:
        raise KDError(f"{out} exists; pass --force to overwrite it or -o another file")
    atomic_write_text(out, text)
    print(f"wrote {out} (template {name}); edit it, then: kdkit train {out}")
    return 0
