"""``python -m tinyllm``: the ``tinyllm`` command (see :mod:`tinyllm.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
