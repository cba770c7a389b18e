"""``python -m cli``: the ``hostiso`` operator CLI."""

from cli.app import main

main()
