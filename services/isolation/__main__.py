"""``python -m services.isolation``: run the isolation service."""

from services.isolation.bootstrap import main
from shared.process import install_fast_event_loop

install_fast_event_loop()
main()
