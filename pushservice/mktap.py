"""
``pushservice-mktap [--out FILE] [pushservice options]``: write a .tap that
``twistd -nf FILE`` runs with that configuration (twistd still reads .tap
files; nothing else writes them any more).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.application import service
from twisted.persisted import sob
from twisted.python import usage

from .tap import Options, makeService

__all__ = ["main"]


def write_tap(path: str, args: Sequence[str]) -> None:
    """Pickle an application holding the service built from C{args}."""
    options = Options()
    options.parseOptions(list(args))
    application = service.Application("pushservice")
    makeService(options).setServiceParent(application)
    sob.IPersistable(application).save(filename=path)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = "pushservice.tap"
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        print(Options().__str__())
        return 0
    if args[:1] == ["--out"] and len(args) > 1:
        out, args = args[1], args[2:]
    elif args[:1] and args[0].startswith("--out="):
        out, args = args[0].split("=", 1)[1], args[1:]
    try:
        write_tap(out, args)
    except usage.UsageError as e:
        print(f"pushservice-mktap: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; run it with: twistd -nf {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
