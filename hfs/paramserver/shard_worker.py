"""One shard process of `hfs serve-params --shards N`: serialised options in, a serving shard out.

Run as ``python -m hfs.paramserver.shard_worker OPTIONS_JSON VERBOSE`` by
``hfs.paramserver.launch.start_shard``: ``OPTIONS_JSON`` is ``ServeOptions.to_json()`` (this
shard's port, index, peers, snapshot folder, resume), the secret comes from
``HFS_PS_SECRET``. The parent resolved the config once, so a shard never re-reads it and
never goes through the command line parser.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Serve one shard until SIGTERM/SIGINT or a `shutdown` op; a user error is one `error:` line, exit 2."""
    from hfs.paramserver import SECRET_ENV
    from hfs.paramserver.launch import ServeOptions, serve
    from hfs.utils.errors import HfsError
    from hfs.utils.log import prefix_log_lines, setup_logging

    options_json, verbose = argv[0], int(argv[1]) if len(argv) > 1 else 0
    setup_logging(verbose)
    secret = os.environ.get(SECRET_ENV, "")
    try:
        opts = ServeOptions.from_json(options_json, secret.encode() if secret else None)
        prefix_log_lines(f"[shard {opts.shard.index}/{opts.shard.count}] ")  # which shard wrote each line
        serve(opts)
    except (HfsError, OSError) as exc:
        where = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"error: {where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
