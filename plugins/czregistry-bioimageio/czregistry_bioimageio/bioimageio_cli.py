"""bioimageio.core's command line (``bioimageio test model.zip``), run offline and with the serializer fix of
``_compat``: ``python -m czregistry_bioimageio.bioimageio_cli test model.zip``."""

from __future__ import annotations


def main() -> None:
    from ._compat import ensure_ready

    ensure_ready()
    from bioimageio.core.__main__ import main as bioimageio_main

    bioimageio_main()


if __name__ == "__main__":
    main()
