"""``python -m mergearena``: the command line, where the ``mergearena`` script is not on PATH."""

from mergearena.cli import main

main()
