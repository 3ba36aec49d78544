"""``python -m tabpo``: the command line, for launchers that start a module (torchrun -m)."""

from tabpo.cli.app import main

if __name__ == "__main__":
    main()
