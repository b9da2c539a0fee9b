"""The layer studio: make, inspect and edit layered images in the browser.

  python scripts/studio.py                                  # the main job's model (outputs/demo/train/model)
  python scripts/studio.py --checkpoint runs/sd15/model --port 8080

Serves a local page (127.0.0.1 and a free port unless --host/--port say otherwise) and prints its address.
The page: a global prompt alone (split into a background and one prompt per object, shown as rows to edit) or
a background and layer prompts; seed, steps, guidance, candidates. Each result shows its composite and every
layer over a checkerboard with its mask; each layer can be shown or hidden, regenerated (layer inpainting:
a new prompt and/or seed) or restyled (style transfer at a strength), with undo and redo; the other layers of
an edit stay bit-identical. Export ORA, PSD or a zip of RGBA PNGs plus the exchange-format folder; open an
ORA, a PSD or such a zip to edit it. Requests from several tabs queue through one loaded model.

Everything the studio makes is written under --out (one session folder per start, every version of every
document as an exchange-format folder); nothing else is written.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path("outputs/demo/train/model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="studio.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help=f"LayerDiff model folder (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--out", type=Path, default=Path("outputs/studio"), help="where the studio writes (default outputs/studio)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "layerdiff").is_dir():
        if args.checkpoint == DEFAULT_CHECKPOINT:
            parser.error(f"no model at {args.checkpoint}: make one with `python scripts/demo.py` (the main job), or pass --checkpoint DIR")
        parser.error(f"--checkpoint {args.checkpoint} is not a LayerDiff model folder (it has no layerdiff/)")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="studio.py: %(levelname)s: %(name)s: %(message)s")

    from layerdiff_jax.fileio import OutputFolderError, folder_lock
    from layerdiff_jax.sampling import CheckpointError, LayerDiffPipeline
    from layerdiff_jax.studio.server import Studio, make_server

    try:
        with folder_lock(args.out, "studio.py"):  # one studio per output folder
            session = args.out / datetime.datetime.now().strftime("session_%Y%m%d_%H%M%S")
            start = time.perf_counter()
            pipe = LayerDiffPipeline.load(args.checkpoint)
            server = make_server(Studio(pipe, session), args.host, args.port)
            host, port = server.server_address[:2]
            print(f"loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s; documents go to {session}")
            print(f"layer studio at http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                print(f"stopped; every version made is in {session}")
            finally:
                server.server_close()
    except (CheckpointError, OutputFolderError) as e:
        print(f"studio.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"studio.py: error: cannot listen on {args.host}:{args.port} ({e.strerror or e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    sys.exit(main())
