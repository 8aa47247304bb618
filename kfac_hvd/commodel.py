"""``python -m kfac_hvd.commodel``: the traffic and time models' command, kept for existing commands;
the models live in :mod:`kfac_hvd.analysis` (see :mod:`kfac_hvd.analysis.commodel`)."""

from kfac_hvd.analysis.commodel import main

if __name__ == "__main__":
    raise SystemExit(main())
