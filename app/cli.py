"""``phototag``: one command for everything the project does.

    phototag serve        serve the REST API and the upload page
    phototag train        train a tagger on labelled photos
    phototag evaluate     measure a checkpoint on labelled photos
    phototag pretrained   build the default ImageNet checkpoint
    phototag tag          tag a photo library: XMP sidecars, a results file
    phototag teach        teach a custom tag from example photos
    phototag people       teach, list and forget the names given to faces

``phototag COMMAND --help`` tells more. Each command is its module's ``main(argv)``; the
older names (``phototag-serve``, ``phototag-train``, ...) run the same functions. Exit status: 0
done, 1 failed while running, 2 a usage or configuration error.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# command -> (module, one line of help); the module's ``main(argv) -> int`` runs it
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.__main__", "serve the REST API and the upload page"),
    "train": ("model.train", "train a tagger on labelled photos"),
    "evaluate": ("model.evaluate", "measure a checkpoint on labelled photos"),
    "pretrained": ("model.pretrained", "build the default ImageNet checkpoint"),
    "tag": ("model.library.cli", "tag a photo library: XMP sidecars, a results file"),
    "teach": ("model.teach", "teach a custom tag from example photos"),
    "people": ("model.people.cli", "teach, list and forget the names given to faces"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: phototag COMMAND [ARGS...]\n\n"
        "Self-hosted photo auto-tagging.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "phototag COMMAND --help tells more about each."
    )


def command(name: str) -> Callable[[Sequence[str] | None], int]:
    module, _ = COMMANDS[name]
    return importlib.import_module(module).main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\nphototag: error: unknown command {name!r}", file=sys.stderr)
        return 2
    return command(name)(rest)


if __name__ == "__main__":
    sys.exit(main())
