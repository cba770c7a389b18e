"""``python -m services.isolation``: run the isolation service."""

from services.isolation.bootstrap import main

main()
